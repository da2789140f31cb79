"""benchmarks/profile_train.py runs on CPU: a tiny dense teacher on token arrays, both packed-attention variants
agree on one batch and are timed, then the profiler table."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_train_runs_and_variants_agree(tmp_path):
    teacher = tmp_path / "teacher"
    subprocess.run([sys.executable, "-m", "sala_train.make_teacher", "model=quality_teacher", f"output_dir={teacher}",
                    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
                    "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
                    "model.dim_model_base=16"], check=True, capture_output=True)
    from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT

    data = tmp_path / "sample.bin"
    subprocess.run([sys.executable, "-m", "sala_train.data.pretokenize", "--source", DEFAULT_SAMPLE_TEXT, "--type",
                    "text", "--text-unit", "paragraph", "--out", str(data), "--cache-dir", str(tmp_path / "cache")],
                   check=True, capture_output=True)
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/profile_train.py"), "--student", str(teacher),
                          "--data", str(data), "--seq-len", "128", "--micro-batch", "2", "--steps", "1",
                          "--varlen", "loop,grouped", "--rows", "3"], check=True, capture_output=True, text=True)
    losses = re.search(r"loss of one batch by variant: \{'loop': ([\d.]+), 'grouped': ([\d.]+)\}", run.stdout)
    assert losses, run.stdout
    assert abs(float(losses[1]) - float(losses[2])) < 1e-4 * float(losses[1])
    assert re.search(r"^\| grouped \| [\d.]+ \|", run.stdout, re.MULTILINE), run.stdout


def test_unknown_varlen_variant_is_refused_by_name(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/profile_train.py"), "--student", str(tmp_path),
                          "--data", str(tmp_path / "x.bin"), "--varlen", "grouped,padded"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "--varlen padded: expected some of grouped, loop" in run.stderr
