"""The conversion quality study (benchmarks/quality/) at toy scale on CPU: corpus preparation from HTML pages,
every step of the driver end to end, the report written. The numbers of this run are not results."""

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sala_train.layer_selection.tasks import hidden_fact_examples
from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer

QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"


def run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    result = subprocess.run([sys.executable, str(QUALITY / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{script} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def write_html_pages(root: Path, num_pages: int) -> None:
    """Sphinx-like pages (article body, sidebar, code block, script) holding the shipped English sample, split
    between a fake Linux and a fake Python documentation tree."""
    paragraphs = [p.strip() for p in DEFAULT_SAMPLE_TEXT.read_text().split("\n\n") if p.strip()]
    for i in range(num_pages):
        chunk = paragraphs[i * len(paragraphs) // num_pages : (i + 1) * len(paragraphs) // num_pages]
        body = "".join(f"<p>{html.escape(p)}</p>" for p in chunk)
        folder = root / ("linux" if i % 2 else "python")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"page{i:03d}.html").write_text(
            f"<html><head><script>var secret = 1;</script></head><body><div class='sphinxsidebar'>Navigation "
            f"sidebar text here</div><div role='main'><h1>Page {i}</h1>{body}<pre>print('code block')</pre>"
            f"</div></body></html>")


def test_prepare_corpus_names_the_missing_packages(tmp_path):
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, str(QUALITY / "prepare_corpus.py"), "--out", str(tmp_path / "data"),
                             "--linux-doc", str(tmp_path / "none"), "--python-doc", str(tmp_path / "none")],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "apt-get install linux-doc python3-doc" in result.stderr


def test_hidden_fact_examples_put_the_asked_fact_at_its_depth():
    tokenizer = load_tokenizer()
    documents = ["The river runs to the sea. It is long and wide. Boats sail on it every day."] * 20
    for depth in (0.0, 0.5, 1.0):
        for task in ("passkey", "multikey"):
            example, = hidden_fact_examples(tokenizer, documents, 1, 300, depth, seed=3, task=task)
            assert len(example.ids) <= 300
            (a, b), = example.answers
            answer = tokenizer.decode(example.ids[a:b]).strip()
            text = tokenizer.decode(example.ids)
            fact = f"The pass key is {answer}" if task == "passkey" else f"is {answer}."
            position = text.index(fact) / len(text)
            assert abs(position - depth) < 0.25, (task, depth, position)
            if task == "multikey":
                assert text.count("The special magic number for") == 4 + 1  # 4 needles, the answer prompt


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    write_html_pages(tmp_path / "html", 40)
    data, out, doc = tmp_path / "data", tmp_path / "out", tmp_path / "docs" / "quality.md"
    run("prepare_corpus.py", "--out", data, "--linux-doc", tmp_path / "html" / "linux", "--python-doc",
        tmp_path / "html" / "python", "--vocab-size", 512, "--heldout-percent", 15, cwd=tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] > 0 and meta["splits"]["heldout"]["documents"] > 0
    tokens = (data / "train.bin").read_bytes()
    assert len(tokens) == 2 * meta["splits"]["train"]["tokens"]

    doc.parent.mkdir()
    doc.write_text("# Study\n\nMethod.\n\n<!-- results:start -->\nnot run yet\n<!-- results:end -->\n\nAfter.\n")
    common = ("--scale", "tiny", "--data", data, "--out", out, "--doc", doc, "--quiet")
    run("study.py", "all", *common, cwd=tmp_path)

    text = (out / "text" / "heldout.jsonl").read_text().splitlines()
    assert len(text) == meta["splits"]["heldout"]["documents"]
    for name in ("teacher", "halo_forced", "halo_free", "evenly", "all_lightning"):
        result = json.loads((out / "results" / f"{name}.json").read_text())
        assert set(result["loss"]) == {"1", "2", "4", "8"}, name
        assert all(0 < v < 20 for v in result["loss"].values()), (name, result["loss"])
        assert set(result["accuracy"]) == {"passkey", "multikey"}
        assert set(result["cost"]) == {"1", "2", "4", "8", "16"}
    plans = {v: json.loads((out / "plans" / f"{v}.json").read_text()) for v in ("halo_forced", "halo_free",
                                                                                 "evenly", "all_lightning")}
    assert plans["halo_forced"]["sparse_layers"][0] == 0 and plans["halo_forced"]["sparse_layers"][-1] == 7
    assert len(plans["halo_free"]["sparse_layers"]) == 2 and plans["all_lightning"]["sparse_layers"] == []
    assert len(plans["halo_forced"]["evidence"]["scores"]) == 8
    report = doc.read_text()
    assert report.startswith("# Study\n\nMethod.") and report.rstrip().endswith("After.")
    assert "not run yet" not in report and "| halo_forced | `SLLLLLLS` |" in report
    for png in ("quality_loss.png", "quality_accuracy.png", "quality_depth.png", "quality_scores.png"):
        assert (doc.parent / png).stat().st_size > 1000

    # every step skips or resumes what is done; the report regenerates from the JSON alone
    done = run("study.py", "train", "halo_free", *common, cwd=tmp_path)
    assert "sala_train.train" not in done.stdout
    export = out / "train" / "evenly" / "export" / "long"
    shutil.rmtree(export)  # as if killed between the last checkpoint and the export
    run("study.py", "train", "evenly", *common, cwd=tmp_path)
    assert json.loads((export / "config.json").read_text())["model_type"] == "minicpm_sala"
    assert (export / "tokenizer.json").exists()
    study = json.loads((out / "results" / "study.json").read_text())
    study["models"]["teacher"]["loss"]["1"] = 1.2345
    (out / "results" / "study.json").write_text(json.dumps(study))
    report_only = tmp_path / "docs" / "again.md"
    run("study.py", "report", "--from-json", out / "results" / "study.json", "--out", tmp_path / "nothing", "--doc",
        report_only, cwd=tmp_path)
    assert "| teacher | `dense (RoPE)` | 1.234 |" in report_only.read_text()
