"""The tools of the multi-GPU runs (docs/multi_gpu.md) on CPU: random students of a layer plan, and
benchmarks/multi_gpu_run.sh (setup, then the 128K recipe's phase shrunk to 2 gloo processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def make_student(out, *args):
    subprocess.run([sys.executable, str(REPO / "benchmarks/random_student.py"), "--out", str(out), "--small",
                    "--device", "cpu", *args], check=True, capture_output=True, text=True)


def test_random_student_follows_the_plan_and_the_seed(tmp_path):
    from sala_train.models import SALAForCausalLM

    make_student(tmp_path / "a", "--plan", "SLLS")
    make_student(tmp_path / "b", "--plan", "SLLS")
    make_student(tmp_path / "c", "--plan", "SLLS", "--seed", "1")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["mixer_types"] == ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
    assert config["dtype"] == "bfloat16"
    a, b, c = (SALAForCausalLM.from_pretrained(tmp_path / n, dtype="float32").state_dict() for n in "abc")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert a[name].std() > 0
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks/random_student.py"), "--out", str(tmp_path / "d"),
                          "--small", "--plan", "SXL"], capture_output=True, text=True)
    assert bad.returncode != 0 and "'X'" in bad.stderr


@pytest.mark.slow
def test_multi_gpu_run_script_trains_the_128k_recipe_shrunk(tmp_path):
    env = {**os.environ, "WORK": str(tmp_path), "SMALL": "1", "PY": sys.executable, "GPUS": "2", "SEQ": "256",
           "STEPS": "2", "CALL_SECONDS": "900", "CKPT_SECONDS": "60", "CUDA_VISIBLE_DEVICES": "",
           "EXTRA": "backend.bf16=false backend.tensor_parallel=1 backend.context_parallel=2 logging.wandb=disabled"}
    script = str(REPO / "benchmarks/multi_gpu_run.sh")
    setup = subprocess.run([script, "setup"], env=env, capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert (tmp_path / "sala-8b" / "config.json").is_file() and (tmp_path / "sample.idx").is_file()
    run = subprocess.run([script, "megatron"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "== torchrun exit code 0" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert "megatron-128k: 2 steps (last 2), starts 1" in run.stdout
    records = [json.loads(line) for line in (tmp_path / "runs/megatron-128k/metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if "loss" in r] == [1, 2]
