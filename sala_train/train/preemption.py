"""Preemption: SIGUSR1 or SIGTERM asks a running trainer to write a checkpoint and stop, so that the job can be
requeued and resume from that checkpoint. A time limit (``time_limit_minutes`` in the recipe) stops it the same
way once that much wall-clock time has passed, for jobs that must end before a scheduler's limit.

    with watch_preemption() as preemption:      # handlers installed here, the previous ones restored after
        ...
        if preemption.requested():               # after each optimizer step; every rank gets the same answer
            save the checkpoint
            preemption.stop(run_dir, rank, state) # writes run_dir/preempted.json (rank 0), exits with code 75

The handlers only set a flag: a signal can land anywhere (inside a collective, a checkpoint write), and the
only safe place to act on it is between optimizer steps. The flag is all-reduced (max), so when one rank was
signalled every rank stops after the same step, and rank 0 writes the checkpoint through the trainer's save
path. SLURM sends the signal to every process of a job step (``#SBATCH --signal=USR1@180``, ``scancel
--signal=USR1``, or SIGTERM when a job is preempted or cancelled). launch/slurm/train.sbatch then finds the
marker file and requeues the job (it cannot go by the exit code: torchrun reports a failed worker as exit code 1,
whatever code the worker exited with); under Hydra's submitit launcher, ``requeue_submitit_job`` does it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
MARKER_NAME = "preempted.json"  # in run_dir; launch/slurm/train.sbatch requeues the job when it is there


class Preempted(SystemExit):
    """The trainer stopped for preemption after writing a checkpoint. A SystemExit with code 75, so that an
    uncaught one ends ``python -m sala_train.train`` (and each torchrun worker) with that code and no traceback."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionWatcher:
    """Remembers the first preemption signal; ``requested()`` tells every rank whether any rank got one."""

    def __init__(self):
        self.signal_name: str | None = None
        self.deadline: float | None = None  # time.monotonic() past which requested() is true (a time limit)
        self.limit_minutes: float | None = None

    def handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def set_time_limit(self, started: float, minutes: float | None) -> None:
        """Stop as on a signal once ``minutes`` have passed since ``started`` (a time.monotonic() reading)."""
        self.limit_minutes = minutes
        self.deadline = None if minutes is None else started + 60.0 * minutes

    def requested(self) -> bool:
        if self.signal_name is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.signal_name = f"the time limit ({self.limit_minutes:g} min, time_limit_minutes)"
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, run_dir: Path, rank: int, state: dict) -> None:
        """Write the marker (rank 0) and raise Preempted; call it after the checkpoint of ``state`` is written."""
        reason = self.signal_name or "a signal or the time limit on another rank"
        message = (f"preempted by {reason}: checkpoint of stage {state['stage_index']} step {state['step']} written "
                   f"in {run_dir / 'checkpoints'}; the same command resumes from it")
        if rank == 0:
            (Path(run_dir) / MARKER_NAME).write_text(json.dumps({"signal": reason, **state}) + "\n")
            log.warning(message)
        if dist.is_initialized():
            dist.barrier()  # torchrun stops the other workers when the first one exits: the marker must be there
        raise Preempted(message)


@contextmanager
def watch_preemption():
    """Install the SIGUSR1 / SIGTERM handlers for the duration of the block (only from the main thread, where
    Python delivers signals; elsewhere the watcher never fires and a warning says so). Inside another
    watch_preemption block it yields the outer watcher, so that a signal that came before (the entry point
    installs one first thing, while the model still loads) is not forgotten."""
    outer = getattr(signal.getsignal(PREEMPTION_SIGNALS[0]), "__self__", None)
    if isinstance(outer, PreemptionWatcher):
        yield outer
        return
    watcher = PreemptionWatcher()
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: SIGUSR1 / SIGTERM keep their previous handlers, so the trainer "
                    "cannot checkpoint on preemption")
        yield watcher
        return
    previous = {signum: signal.signal(signum, watcher.handle) for signum in PREEMPTION_SIGNALS}
    try:
        yield watcher
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def requeue_submitit_job() -> None:
    """Requeue this SLURM job (from rank 0 of a job that Hydra's submitit launcher started): the requeued job runs
    the same pickled Hydra job, whose trainer resumes from the checkpoint just written."""
    job_id = os.environ.get("SLURM_JOB_ID")  # an array task's own id: requeues just that task
    if not job_id or os.environ.get("SLURM_PROCID", "0") != "0":
        return
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (exit %d): %s; resubmit the same command to resume", job_id,
                  result.returncode, result.stderr.strip())
    else:
        log.warning("requeued SLURM job %s; it resumes from the checkpoint", job_id)
