"""Launching through a real SLURM cluster (2 nodes on loopback, see sala_train.testing.slurm): sbatch of
launch/slurm/train.sbatch on 2 nodes (one torchrun per node, one worker each), preemption by signal with requeue
and exact resume, a job array sweep, and Hydra's submitit launcher: a 2-job multirun, and a 2-task job
preempted, requeued and resumed."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sala_train.testing import requires_module
from sala_train.testing.training import make_tiny_checkpoints, read_losses

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SELECT_ARRAY = REPO / "launch" / "slurm" / "select_array.sh"
STEPS = 200  # recipes/experiment/tiny_launch.yaml: 100 + 100 optimizer steps
SHORT = ["stages.0.tokens=1280", "stages.1.tokens=2560"]  # 10 + 10 steps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")  # fresh per session: job ids restart at 1 with every cluster


def job_environment(**extra) -> dict:
    """This process's environment without the topology of any enclosing job, with the python of this venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "SUBMITIT_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                             "NPROC_PER_NODE", "RUN_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # the 2 "nodes" share this machine's cores: one thread per worker (torchrun sets it only for 2+ per node)
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def recipe(checkpoints) -> list[str]:
    return ["+experiment=tiny_launch", f"student={checkpoints / 'student'}", f"teacher={checkpoints / 'teacher'}"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, checkpoints, workdir):
    """A training job on 2 nodes, 1 worker each, submitted with the defaults the docs describe: (job id, states)."""
    job = slurm_cluster.sbatch(["--nodes=2", TRAIN_SBATCH, *recipe(checkpoints)], cwd=workdir,
                               env=job_environment(NPROC_PER_NODE="1"))
    return job, slurm_cluster.wait(job, timeout_s=600)


def test_sbatch_trains_on_two_nodes_where_the_docs_say(slurm_cluster, uninterrupted, workdir):
    job, state = uninterrupted
    log = (workdir / f"slurm-sala-train-{job}.out").read_text()  # --output=slurm-%x-%j.out in the submit folder
    assert state == ["COMPLETED"], log
    run_dir = workdir / "runs" / f"sala-train-{job}"  # the default RUN_DIR: runs/<job name>-<job id>
    assert f"on node[1-2], head 127.0.0.1:" in log and f"run folder runs/sala-train-{job}" in log
    assert slurm_cluster.job(job)["NumNodes"] == "2"
    # torchrun --nnodes 2 on each node: the run needs both to join the rendezvous, and since only rank 0 writes
    # metrics, one record per step means the workers of both nodes trained as one group
    assert sorted(read_losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "stage-02-step-00000000" / "model" / "config.json").exists()
    assert (run_dir / "export" / "long" / "config.json").exists()
    assert not (run_dir / "preempted.json").exists()


def wait_for_step(metrics: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{metrics} did not reach step {step} in {timeout_s:g} s")


def test_preempted_job_checkpoints_requeues_and_ends_with_the_uninterrupted_losses(
        slurm_cluster, checkpoints, workdir, uninterrupted):
    job = slurm_cluster.sbatch(["--nodes=2", TRAIN_SBATCH, *recipe(checkpoints)], cwd=workdir,
                               env=job_environment(NPROC_PER_NODE="1", RUN_DIR="runs/preempted"))
    run_dir = workdir / "runs" / "preempted"
    wait_for_step(run_dir / "metrics.jsonl", 5, timeout_s=300)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])  # as --signal=USR1@180 does: every node's workers
    state = slurm_cluster.wait(job, timeout_s=600)
    log = (workdir / f"slurm-sala-train-{job}.out").read_text()  # --open-mode=append: both runs of the job
    assert state == ["COMPLETED"], log
    preempted = json.loads(re.search(r"train\.sbatch: preempted \((\{.*?\})\); requeueing", log).group(1))
    assert preempted["signal"] == "SIGUSR1"
    assert 5 <= preempted["global_step"] < STEPS  # the signal landed mid-run, after the step we waited for
    assert "(restart 1)" in log and "resuming from runs/preempted/checkpoints/" in log
    assert slurm_cluster.job(job)["Restarts"] == "1"

    expected = read_losses(workdir / "runs" / f"sala-train-{uninterrupted[0]}")
    resumed = read_losses(run_dir)
    assert resumed.keys() == expected.keys()
    for step in expected:  # fp32 on CPU, same batches, weights, optimizer state and RNG after the resume
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


def test_job_array_runs_one_sweep_line_per_task(slurm_cluster, checkpoints, workdir):
    (workdir / "lrs.txt").write_text("stages.0.schedule.lr=1e-3\nstages.0.schedule.lr=3e-3\n")
    job = slurm_cluster.sbatch(["--array=0-1", TRAIN_SBATCH, *recipe(checkpoints), *SHORT], cwd=workdir,
                               env=job_environment(NPROC_PER_NODE="1", RUN_DIR="runs/sweep", SWEEP_FILE="lrs.txt"))
    assert slurm_cluster.wait(job, timeout_s=600) == ["COMPLETED", "COMPLETED"]
    for task, lr in enumerate((0.001, 0.003)):
        run_dir = workdir / "runs" / "sweep" / str(task)
        assert sorted(read_losses(run_dir)) == list(range(1, 21))
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


def test_layer_selection_sweep_as_a_job_array(slurm_cluster, checkpoints, workdir):
    # select_array.sh: alignment job -> 2-task array, each scoring half of the layers -> merge writing the plan
    output = workdir / "select"
    overrides = [f"teacher={checkpoints / 'teacher'}", f"output={output}", "lightning_backend=torch",
                 "align.steps=3", "align.seq_len=64", "align.batch_size=2", "align.warmup_steps=1",
                 "tasks.context_len=96", "tasks.num_examples=2", "tasks.heldout_len=48", "tasks.heldout_sequences=2",
                 "selection.ratio=0.5"]
    env = job_environment(SHARDS="2")
    submitted = slurm_cluster.run([str(SELECT_ARRAY), *overrides], cwd=workdir, env=env).stdout
    align, sweep, merge = (int(x) for x in re.findall(r"(?:alignment|sweep|merge) (\d+)", submitted))
    assert slurm_cluster.wait(merge, timeout_s=600) == ["COMPLETED"], submitted
    assert slurm_cluster.wait(align) == ["COMPLETED"] and slurm_cluster.wait(sweep) == ["COMPLETED", "COMPLETED"]
    layers = json.loads((checkpoints / "teacher" / "config.json").read_text())["num_hidden_layers"]
    for i in range(2):
        shard = json.loads((output / f"sweep-shard-{i}-of-2.json").read_text())
        assert [m is not None for m in shard["layers"]] == [j % 2 == i for j in range(layers)]
    from sala_train.layer_selection import LayerPlan

    assert len(json.loads((output / "sweep.json").read_text())["layers"]) == layers
    assert LayerPlan.load(output / "plan.json").evidence["method"] == "halo"


@requires_module("hydra_plugins.hydra_submitit_launcher")
def test_submitit_launcher_runs_a_two_job_multirun(slurm_cluster, checkpoints, workdir):
    folder = workdir / "submitit"
    folder.mkdir()
    command = [sys.executable, "-m", "sala_train.train", "-m", "+launcher=slurm", *recipe(checkpoints), *SHORT,
               "hydra.sweep.dir=sweep", "hydra.launcher.timeout_min=10", "stages.0.schedule.lr=1e-3,2e-3"]
    result = subprocess.run(command, cwd=folder, env=slurm_cluster.environment(job_environment()),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for job_num, lr in enumerate((0.001, 0.002)):
        run_dir = folder / "sweep" / str(job_num)  # run_dir = hydra.sweep.dir / job number (recipes/launcher)
        assert sorted(read_losses(run_dir)) == list(range(1, 21)), result.stderr[-3000:]
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
    assert len(list((folder / "sweep" / ".submitit").glob("*/*_0_result.pkl"))) == 2  # 2 SLURM jobs


@requires_module("hydra_plugins.hydra_submitit_launcher")
def test_submitit_job_preempted_requeues_itself_and_ends_with_the_uninterrupted_losses(
        slurm_cluster, checkpoints, workdir, uninterrupted):
    folder = workdir / "submitit_preempted"
    folder.mkdir()
    command = [sys.executable, "-m", "sala_train.train", "-m", "+launcher=slurm", *recipe(checkpoints),
               "hydra.sweep.dir=sweep", "hydra.launcher.name=preempt-me", "hydra.launcher.tasks_per_node=2",
               "hydra.launcher.timeout_min=10"]
    sweep = subprocess.Popen(command, cwd=folder, env=slurm_cluster.environment(job_environment()),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(folder / "sweep" / "0" / "metrics.jsonl", 5, timeout_s=300)
        job = slurm_cluster.run(["squeue", "-h", "-n", "preempt-me", "-o", "%F"]).stdout.split()[0]
        slurm_cluster.run(["scancel", "--signal=USR1", job])
        output = sweep.communicate(timeout=600)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-5000:]
    (record,) = slurm_cluster.jobs(int(job))
    assert record["Restarts"] == "1"  # requeued once, by rank 0 of the job
    task_log = "".join(p.read_text() for p in (folder / "sweep" / ".submitit").glob("*/*_0_log.*"))
    assert "preempted by SIGUSR1" in task_log and "resuming from sweep/0/checkpoints/" in task_log, task_log[-3000:]

    # 2 SLURM tasks as 2 workers: the same run as the 2 workers (2 nodes) of the uninterrupted sbatch job
    expected = read_losses(workdir / "runs" / f"sala-train-{uninterrupted[0]}")
    resumed = read_losses(folder / "sweep" / "0")
    assert resumed.keys() == expected.keys()
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
