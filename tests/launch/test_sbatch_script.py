"""launch/slurm/train.sbatch refuses bad input with a message, before it starts anything (no cluster needed:
the script runs under bash with the few SLURM variables it reads)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


def run_sbatch_script(args, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RUN_DIR", "SWEEP_FILE")}
    return subprocess.run(["bash", str(TRAIN_SBATCH), *args], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)


IN_JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "sala-train", "SALA_TRAIN_ROOT": str(REPO)}
IN_ARRAY = {**IN_JOB, "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "not inside a SLURM job: submit this script with sbatch"),
    (["run_dir=x"], IN_JOB, "got 'run_dir=x': set the run folder with RUN_DIR=..."),
    ([], {**IN_JOB, "SALA_TRAIN_ROOT": "/nonexistent"}, "no launch/torchrun.sh under '/nonexistent'"),
    ([], {**IN_ARRAY, "SWEEP_FILE": "missing.txt"}, "SWEEP_FILE 'missing.txt' does not exist"),
    ([], {**IN_ARRAY, "SWEEP_FILE": "one_line.txt"}, "has no line 2 for array task 1"),
])
def test_bad_input_is_refused_with_a_message(tmp_path, args, env, message):
    (tmp_path / "one_line.txt").write_text("stages.0.schedule.lr=1e-3\n")
    result = run_sbatch_script(args, tmp_path, **env)
    assert result.returncode == 2
    assert message in result.stderr
