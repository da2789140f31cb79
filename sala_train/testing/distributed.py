"""Run a function on N fresh CPU processes with torch.distributed initialised: distributed tests on a laptop.

Example::

    def all_reduce_rank(rank, world_size):          # module level: each rank imports it by name
        total = torch.tensor([float(rank)])
        dist.all_reduce(total)
        return total

    def test_all_reduce():
        assert [t.item() for t in run_distributed(all_reduce_rank, world_size=2)] == [1.0, 1.0]
"""

import contextlib
import importlib
import importlib.util
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

# After one rank fails, how long the others get to finish or fail on their own (a peer blocked in a
# collective usually errors out as soon as the failed rank's connection closes) before they are stopped.
_GRACE_AFTER_FAILURE_S = 5.0
# A rank that exited without a report is declared dead only after this long, in case its report is
# still in the pipe.
_GRACE_FOR_LAST_REPORT_S = 1.0


class DistributedRunError(RuntimeError):
    """One or more ranks of ``run_distributed`` raised or died; the message holds their tracebacks."""


def _free_port() -> int:
    # Another process could take the port between here and rank 0 binding it; on a test machine that
    # window is small enough to accept.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environment_variable(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _resolve(module, qualname: str):
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _check_module_level(fn) -> None:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    qualname = getattr(fn, "__qualname__", "")
    try:
        is_module_level = module is not None and "<" not in qualname and _resolve(module, qualname) is fn
    except AttributeError:
        is_module_level = False
    if not is_module_level:
        raise TypeError(
            f"run_distributed needs a module-level function, because every rank imports it by name in a "
            f"fresh process; got {fn!r}. Define it at the top level of the test module (no lambdas, "
            f"nested functions or partials; pass extra values through args=...)."
        )


def _load_function(module_name: str, qualname: str, module_file: str | None):
    """Import ``module_name`` in this fresh process; load it from its file when the name does not import
    to that file (pytest's importlib mode gives test modules names that need not be importable)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    imported_file = getattr(module, "__file__", None) or ""
    if module is None or (module_file and os.path.realpath(imported_file) != os.path.realpath(module_file)):
        if module_file is None:
            raise ImportError(f"cannot import {module_name} to find {qualname}")
        spec = importlib.util.spec_from_file_location(module_name, module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so pickled args that refer to this module resolve
        spec.loader.exec_module(module)
    return _resolve(module, qualname)


def _run_rank(rank, world_size, port, backend, timeout_s, function_location, args_pickle, reports):
    """Entry point of one spawned rank: set up torch.distributed, call fn, report back, tear down."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    succeeded = False
    try:
        fn = _load_function(*function_location)
        args = pickle.loads(args_pickle)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        result_pickle = pickle.dumps(fn(rank, world_size, *args))
        succeeded = True
    except BaseException:  # noqa: BLE001 - SystemExit etc. too: the parent must hear about every failure
        # Report before the teardown below closes this rank's connections, so that the cause reaches the
        # parent ahead of the peers' "connection closed by peer" errors that it triggers.
        reports.put((rank, False, traceback.format_exc()))
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, not swallowed
        if succeeded:
            succeeded = False
            reports.put((rank, False, "destroy_process_group failed:\n" + traceback.format_exc()))
    if succeeded:
        reports.put((rank, True, result_pickle))


def _stop(processes, join_timeout_s: float) -> None:
    for process in processes:
        process.join(timeout=join_timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(timeout=2.0)
        if process.is_alive():
            process.kill()
            process.join()


def run_distributed(
    fn, world_size: int = 2, *, args: tuple = (), backend: str = "gloo", timeout_s: float = 120.0
) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes and return their results.

    ``fn`` must be a module-level function: each rank is a new ``spawn`` process that imports ``fn`` by
    module and name (a test module loaded by pytest's importlib mode is loaded from its file). ``args``
    and the return values must be picklable; return CPU values (a CUDA tensor would initialise CUDA in
    the parent when it is unpickled).

    In each rank, before ``fn`` runs: MASTER_ADDR=127.0.0.1, MASTER_PORT (a free port), RANK, WORLD_SIZE,
    LOCAL_RANK and LOCAL_WORLD_SIZE are set, ``OMP_NUM_THREADS=1`` (so a 2-core CI machine stays
    responsive), and ``torch.distributed`` is initialised with ``backend`` and a ``timeout_s`` collective
    timeout (for ``"nccl"``, rank r uses cuda:r). The process group is destroyed after ``fn`` returns.

    Returns the ranks' return values in rank order. If any rank raises or dies, raises
    DistributedRunError with the full traceback of every rank that failed (the first to fail first);
    ranks that are still running a few seconds later (usually blocked in a collective) are stopped.
    If the ranks have not all finished within ``timeout_s`` seconds, they are killed and TimeoutError
    is raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    _check_module_level(fn)
    module_file = getattr(sys.modules[fn.__module__], "__file__", None)
    function_location = (fn.__module__, fn.__qualname__, module_file)
    args_pickle = pickle.dumps(tuple(args))
    label = f"run_distributed({fn.__qualname__}, world_size={world_size})"

    context = torch_mp.get_context("spawn")
    reports = context.Queue()
    processes = []
    results, failures = {}, {}  # rank -> return value; rank -> traceback text, in the order they failed
    deadline = time.monotonic() + timeout_s
    try:
        with _environment_variable("OMP_NUM_THREADS", "1"):  # read by the children at start-up
            port = _free_port()
            for rank in range(world_size):
                process = context.Process(
                    target=_run_rank,
                    args=(
                        rank,
                        world_size,
                        port,
                        backend,
                        timeout_s,
                        function_location,
                        args_pickle,
                        reports,
                    ),
                    name=f"run_distributed-rank{rank}",
                )
                process.start()
                processes.append(process)

        first_seen_dead = {}
        give_up_at = None  # set when the first rank fails
        while len(results) + len(failures) < world_size:
            try:
                rank, succeeded, payload = reports.get(timeout=0.05)
            except queue.Empty:
                now = time.monotonic()
                for rank, process in enumerate(processes):
                    if process.exitcode is None or rank in results or rank in failures:
                        continue
                    first_seen_dead.setdefault(rank, now)
                    if now - first_seen_dead[rank] > _GRACE_FOR_LAST_REPORT_S:
                        failures[rank] = (
                            f"rank {rank} exited with code {process.exitcode} without reporting a result "
                            "(crashed, was killed, or exited during start-up; "
                            "its stderr is in the captured output)"
                        )
                if failures and give_up_at is None:
                    give_up_at = now + _GRACE_AFTER_FAILURE_S
                if give_up_at is not None and now > give_up_at:
                    break
                if now > deadline and not failures:  # with failures, report their tracebacks instead
                    unfinished = [r for r in range(world_size) if r not in results and r not in failures]
                    raise TimeoutError(
                        f"{label}: rank(s) {unfinished} did not finish within {timeout_s:g} s "
                        f"(finished: {sorted(results)}, failed: {sorted(failures)}); killing them. "
                        "A rank that waits in a collective which another rank never reaches hangs like this."
                    )
                continue
            if succeeded:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                if give_up_at is None:
                    give_up_at = time.monotonic() + _GRACE_AFTER_FAILURE_S
    finally:
        # Ranks that reported are only tearing down; the others (timeout, failure) are stopped at once.
        _stop(processes, join_timeout_s=5.0 if len(results) == world_size else 0.0)
        reports.close()

    if failures:
        stopped = [r for r in range(world_size) if r not in results and r not in failures]
        sections = [
            (
                f"{label}: rank(s) {list(failures)} failed "
                "(in the order they failed; the first is usually the cause)"
            )
        ]
        if stopped:
            sections[0] += f"; rank(s) {stopped} were still running and were stopped"
        for rank, text in failures.items():
            sections.append(f"--- rank {rank} ---\n{text.rstrip()}")
        raise DistributedRunError("\n\n".join(sections))
    return [results[rank] for rank in range(world_size)]
