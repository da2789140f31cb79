"""launch/torchrun.sh: clear errors for bad input, and a real 2-node run (two torchrun agents on this machine
meeting through c10d rendezvous on loopback, one worker each)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sala_train.testing.training import make_tiny_checkpoints, read_losses

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
TOPOLOGY_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "RDZV_BACKEND",
                      "RDZV_ID")


def launcher_environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TOPOLOGY_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}  # 2 workers share 2 cores


@pytest.mark.parametrize("args,env,message", [
    (["--nnodes", "2"], {}, "multi-node (--nnodes 2) needs the head node's address: set MASTER_ADDR"),
    (["--nproc-per-node", "two"], {}, "--nproc-per-node (NPROC_PER_NODE) must be a positive whole number, got 'two'"),
    ([], {"NPROC_PER_NODE": "0"}, "must be a positive whole number, got '0'"),
    (["--nnodes", "2", "--node-rank", "2"], {"MASTER_ADDR": "h"}, "must be a whole number below --nnodes 2"),
    (["--nnodes", "2"], {"MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "must be a TCP port 1..65535"),
    (["--lr", "1"], {}, "unknown option --lr (Hydra overrides have no leading dashes"),
    (["--nnodes"], {}, "--nnodes needs a value"),
    ([], {"PYTHON": "/nonexistent/python"}, "no python '/nonexistent/python'"),
])
def test_bad_input_is_refused_with_a_message(args, env, message):
    result = subprocess.run(["bash", str(TORCHRUN_SH), "run_dir=x", *args], env=launcher_environment(**env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_help_lists_the_options():
    result = subprocess.run(["bash", str(TORCHRUN_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"):
        assert option in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_and_train(tmp_path):
    checkpoints = make_tiny_checkpoints(tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    overrides = ["+experiment=tiny_launch", f"student={checkpoints / 'student'}",
                 f"teacher={checkpoints / 'teacher'}", f"run_dir={run_dir}",
                 "stages.0.tokens=1280", "stages.1.tokens=2560"]  # 10 + 10 steps
    env = launcher_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_ID="test-two-nodes")
    nodes = [subprocess.Popen(["bash", str(TORCHRUN_SH), "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", *overrides], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(outputs)
    assert sorted(read_losses(run_dir)) == list(range(1, 21))
    config = (run_dir / "config.yaml").read_text()
    assert "tokens: 1280" in config  # the Hydra overrides reached the trainer
    assert (run_dir / "checkpoints" / "stage-02-step-00000000" / "model" / "config.json").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_leaves_the_preemption_marker(tmp_path):
    # torchrun passes SIGTERM on to its workers; they finish the step, write the checkpoint and exit with 75
    checkpoints = make_tiny_checkpoints(tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    node = subprocess.Popen(["bash", str(TORCHRUN_SH), "--nproc-per-node", "2", "+experiment=tiny_launch",
                             f"student={checkpoints / 'student'}", f"teacher={checkpoints / 'teacher'}",
                             f"run_dir={run_dir}"], env=launcher_environment(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert node.poll() is None and time.monotonic() < deadline, "training ended or stalled before step 3"
        time.sleep(0.05)
    node.send_signal(signal.SIGTERM)  # bash exec'd torchrun: this is torchrun's PID
    output = node.communicate(timeout=300)[0]
    assert node.returncode != 0, output
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and 3 <= marker["global_step"] < 200, output
    checkpoint = f"stage-{marker['stage_index']:02d}-step-{marker['step']:08d}"
    assert (run_dir / "checkpoints" / checkpoint / "optimizer.pt").exists()
    assert max(read_losses(run_dir)) == marker["global_step"]
