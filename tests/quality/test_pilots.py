"""The quality study's pilots (benchmarks/quality/copy_pilot.py, mix_pilot.py) at toy scale: their data is what
their docstrings say, and they run end to end. Their numbers are results only at the scale docs/quality.md states."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"
TINY_MODEL = ["num_hidden_layers=2", "hidden_size=32", "intermediate_size=48", "num_attention_heads=2",
              "num_key_value_heads=1", "head_dim=16", "dim_model_base=16"]


def load(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(QUALITY))  # mix_pilot imports copy_pilot
    spec = importlib.util.spec_from_file_location(name, QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_copy_batch_marks_exactly_the_second_copies(monkeypatch):
    copy_pilot = load(monkeypatch, "copy_pilot")
    ids, second = copy_pilot.copy_batch(3, 200, 97, 4, 20, torch.Generator().manual_seed(0))
    assert ids.shape == second.shape == (3, 200)
    for row in range(3):
        pos, marked = 0, torch.zeros(200, dtype=torch.bool)
        while pos < 200:  # walk the packed <s> span span </s> documents
            assert ids[row, pos] == 1
            end = next((i for i in range(pos + 1, 200) if ids[row, i] == 2), 200)
            body = ids[row, pos + 1 : end]
            if end < 200:
                span = len(body) // 2
                assert 4 <= span <= 20 and torch.equal(body[:span], body[span:])
            else:  # the last document, cut: its second copy starts after span tokens, if it started at all
                span = next(s for s in range(4, 21) if len(body) <= 2 * s and torch.equal(
                    body[:max(0, len(body) - s)], body[s : s + max(0, len(body) - s)]))
            marked[pos + 1 + span : min(end, pos + 1 + 2 * span)] = True
            pos = end + 1
        assert torch.equal(second[row], marked)


def test_mix_pilot_runs_its_three_arms(monkeypatch, tmp_path):
    mix_pilot = load(monkeypatch, "mix_pilot")
    rng = np.random.default_rng(0)
    for name in ("train.bin", "heldout.bin"):
        rng.integers(5, 4096, 5000).astype(np.uint16).tofile(tmp_path / name)
    out = tmp_path / "pilot.json"
    torch.manual_seed(0)
    mix_pilot.main(["--data", str(tmp_path), "--steps", "4", "--copy-steps", "2", "--batch", "4", "--length", "64",
                    "--eval-every", "2", "--lr", "0.5", "--out", str(out), "--set", *TINY_MODEL])
    results = json.loads(out.read_text())["results"]
    assert [r["arm"] for r in results] == ["text", "copy_then_text", "mixed"]
    for r in results:
        assert [step for step, _, _ in r["curve"]] == [2, 4]
        assert all(np.isfinite([text, copy]).all() and text > 0 and copy > 0 for _, text, copy in r["curve"])
    # the arms saw different data: their losses differ
    assert len({r["curve"][-1][1] for r in results}) == 3
