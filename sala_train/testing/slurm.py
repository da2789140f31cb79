"""A real SLURM cluster on this machine, for tests: Debian's slurmctld, slurmd, slurm-client and munge, every
file (config, key, sockets, state, logs) under one temporary folder, loopback only, daemons started in the
foreground by this process and stopped by their PIDs. ``nodes`` > 1 runs one slurmd per node (node1, node2, ...,
each on its own port, all at 127.0.0.1), so that multi-node jobs (one torchrun per node) run for real.

    cluster = SlurmCluster.start(tmp_path / "slurm", nodes=2)  # installs the packages first if they are missing
    job = cluster.sbatch(["launch/slurm/train.sbatch", "run_dir=..."], cwd=workdir, env=env)
    states = cluster.wait(job, timeout_s=300)                # ["COMPLETED"] (one per array task; polls scontrol)
    cluster.stop()                                           # cancels the jobs, then stops the daemons

Clients (sbatch, scontrol, scancel, srun, and submitit) find the cluster through ``SLURM_CONF``: use
``cluster.environment()`` for their environment. No accounting (no slurmdbd): ``sacct`` does not work here, so
job state comes from ``scontrol show job`` (completed jobs stay listed for ``MinJobAge`` = 1 hour).

What this machine allows, and the config follows from: no systemd (munged and the slurm daemons are started
directly, with ``-F`` / ``-D``), no cgroups (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``),
``RealMemory`` no larger than ``slurmd -C`` reports, and the daemons run as root (installing the packages needs
root too). A fresh state folder restarts job ids at 1, so give every cluster a fresh folder for job output.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "munged")
CONTROLLER = "localhost"
PARTITION = "debug"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (not root, no apt-get, install failed); tests skip with this message."""


class SlurmError(RuntimeError):
    """The cluster did not come up, or a client command failed; the message holds the daemon log tails."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find(program: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin")


def install_slurm(timeout_s: float = 600) -> None:
    """apt-get install the packages unless every program is already there. Service start-up by the packages'
    scripts is blocked during the install (a policy-rc.d that says no), so nothing but our daemons runs."""
    if all(_find(p) for p in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root: "
                               f"apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:  # a stale package index: refresh once
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout_s)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmUnavailable(f"{' '.join(install)} failed: {error}") from error
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    if result.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(install)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    missing = [p for p in PROGRAMS if not _find(p)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {missing} are still missing")


def node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as ``slurmd -C`` reports them: slurmd refuses a node declared bigger."""
    text = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
    cpus = re.search(r"\bCPUs=(\d+)", text)
    memory = re.search(r"\bRealMemory=(\d+)", text)
    if not cpus or not memory:
        raise SlurmError(f"slurmd -C printed no CPUs= / RealMemory=: {text!r}")
    return int(cpus.group(1)), int(memory.group(1))


@dataclass
class SlurmCluster:
    root: Path
    nodes: int = 1
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def environment(self, base: dict | None = None) -> dict:
        """Environment for client commands and everything they start: SLURM_CONF points at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/usr/bin"
        return env

    # -- bring-up -----------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: str | Path, nodes: int = 1, timeout_s: float = 60) -> "SlurmCluster":
        install_slurm()
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise SlurmError(f"{root} is not empty; a cluster needs a fresh folder (job ids restart at 1)")
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got nodes={nodes}")
        cluster = cls(root, nodes)
        atexit.register(cluster.stop)  # also when the caller never gets to stop() (an interrupted test session)
        try:
            cluster._write_files()
            cluster._start_daemons(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_files(self) -> None:
        for sub in ("etc", "munge", "log", "ctld", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o700)  # munged refuses a key or socket folder that others can write
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cpus, memory = node_resources()
        self.conf.write_text("\n".join([
            "# written by sala_train.testing.slurm: a one-node test cluster on loopback",
            "ClusterName=sala-test",
            f"SlurmctldHost={CONTROLLER}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job may start again only after its credential expired (default 120 s)
            f"AuthInfo=socket={self.root / 'munge' / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={self.root / 'ctld'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",  # %n: the node's name
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups on this kind of machine
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job waits for this pass once eligible (default 60 s)
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay in `scontrol show job` (there is no sacct here)
            "KillWait=10",
            # every node claims all CPUs of this machine; the memory is shared out
            *(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
              f"RealMemory={max((memory - 512) // self.nodes, 256)} State=UNKNOWN" for name in self.node_names),
            f"PartitionName={PARTITION} Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _start_daemons(self, timeout_s: float) -> None:
        munge = self.root / "munge"
        self._spawn("munged", [_find("munged"), "-F", "--force", f"--socket={munge / 'munge.socket'}",
                               f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'seed'}"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged to open its socket", timeout_s)
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
                       "slurmctld to answer scontrol ping", timeout_s)
        for name in self.node_names:
            self._spawn(f"slurmd.{name}", [_find("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
        self._wait_for(self._nodes_are_ready, f"nodes {self.node_names} to be idle", timeout_s)

    def _nodes_are_ready(self) -> bool:
        states = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.lower().split()
        return len(states) == self.nodes and all(state in ("idle", "mixed") for state in states)

    def _wait_for(self, condition, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with code {process.returncode} while waiting for {what}\n"
                                     + self.logs())
            if condition():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout_s:g} s waiting for {what}\n" + self.logs())

    def logs(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- clients ------------------------------------------------------------------------------------
    def run(self, command: list[str], *, check: bool = True, cwd=None, env: dict | None = None,
            timeout_s: float = 60) -> subprocess.CompletedProcess:
        """A client command against this cluster (SLURM_CONF set on top of ``env``)."""
        result = subprocess.run(command, cwd=cwd, env=self.environment(env), capture_output=True, text=True,
                                timeout=timeout_s)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, command))} failed (exit {result.returncode}):\n{result.stdout}"
                             f"{result.stderr}\n" + self.logs())
        return result

    def sbatch(self, arguments: list[str], *, cwd, env: dict | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *map(str, arguments)], cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job (JobState, ExitCode, Restarts, StdOut, ...); a job array
        gives one per task (tasks still pending may share one record)."""
        text = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]

    def job(self, job_id: int) -> dict[str, str]:
        """The record of a job that is not an array."""
        return self.jobs(job_id)[0]

    def wait(self, job_id: int, timeout_s: float = 300, poll_s: float = 0.25) -> list[str]:
        """Poll ``scontrol`` until the job (every task of an array) has finished: ``sbatch --wait`` polls slowly.
        Returns the final JobState of each, by array task id."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.jobs(job_id)
            states = [r.get("JobState", "") for r in records]
            if states and all(state in FINISHED_STATES for state in states):
                records.sort(key=lambda r: int(r.get("ArrayTaskId", "0")) if r.get("ArrayTaskId", "0").isdigit() else 0)
                return [r["JobState"] for r in records]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {states} after {timeout_s:g} s\n{self.logs()}")
            time.sleep(poll_s)

    # -- tear-down ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then stop the slurmds, slurmctld and munged (SIGTERM, SIGKILL after 10 s), by PID."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                self.run(["scancel", f"--partition={PARTITION}"], check=False, timeout_s=30)
                self._wait_for_no_jobs(timeout_s=20)
            except (subprocess.SubprocessError, OSError, SlurmError):
                pass
        for name in [f"slurmd.{node}" for node in self.node_names] + ["slurmctld", "munged"]:
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _wait_for_no_jobs(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                return
            time.sleep(0.5)

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
