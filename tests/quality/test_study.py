"""The conversion quality study (benchmarks/quality/) at toy scale on CPU: corpus preparation from HTML pages,
every step of the driver end to end, the report written. The numbers of this run are not results."""

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # the retrieval documents the teacher and students train on: the evaluation's formats, train-split haystacks
    tokenizer = load_tokenizer(out / "text" / "tokenizer")
    assert len(np.fromfile(out / "text" / "copy.idx", dtype=np.int64)) == 16 + 1
    for name, (lo, hi), count in (("retrieval_1x", (16, 64), 24), ("retrieval_4x", (64, 256), 8)):
        offsets = np.fromfile(out / "text" / f"{name}.idx", dtype=np.int64)
        tokens = np.fromfile(out / "text" / f"{name}.bin", dtype=np.uint16)
        assert len(offsets) == count + 1 and offsets[-1] == len(tokens)
        lengths = offsets[1:] - offsets[:-1]
        # at most max_len + </s>, but a haystack holds at least one sentence, and the toy corpus's sentences are
        # long for the toy lengths: bounded overshoot
        assert lengths.min() >= 1 + 30 and lengths.max() <= 2 * hi, lengths
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert tokens[a] == tokenizer.bos_token_id and tokens[b - 1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(tokens[offsets[0] : offsets[1]].tolist(), skip_special_tokens=True)
        assert "What is the pass key? The pass key is" in decoded, decoded
    for name in ("teacher", "halo_forced", "halo_free", "evenly", "all_lightning"):
        result = json.loads((out / "results" / f"{name}.json").read_text())
        assert set(result["loss"]) == {"1", "2", "4", "8"}, name
        assert all(0 < v < 20 for v in result["loss"].values()), (name, result["loss"])
        assert set(result["accuracy"]) == {"passkey", "multikey"}
        assert set(result["logprob_control"]) == {"passkey", "multikey"}
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


def load_study(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_study", QUALITY / "study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality_study", study)  # (dataclasses and worker processes look it up)
    spec.loader.exec_module(study)
    return study


def test_control_examples_swap_the_answer_for_a_number_not_in_the_prompt(monkeypatch):
    study = load_study(monkeypatch)
    tokenizer = load_tokenizer()
    texts = [p for p in DEFAULT_SAMPLE_TEXT.read_text().split("\n\n") if p.strip()][:50]
    for task, digits in (("passkey", 5), ("multikey", 7)):
        examples = hidden_fact_examples(tokenizer, texts, 6, 400, 0.5, seed=1, task=task)
        controls = study.control_examples(tokenizer, examples, seed=1)
        for example, control in zip(examples, controls):
            (a, _), = example.answers
            (c, d), = control.answers
            assert c == a and control.ids[:a] == example.ids[:a] and d == len(control.ids)
            true, wrong = (tokenizer.decode(ids[a:]).strip() for ids in (example.ids, control.ids))
            assert len(true) == len(wrong) == digits and wrong.isdigit() and wrong != true
            assert wrong not in tokenizer.decode(example.ids[:a])
    result = {"logprob": {"passkey": {"4": {"0.0": -1.0, "0.5": -2.0, "1.0": None}}},
              "logprob_control": {"passkey": {"4": {"0.0": -3.0, "0.5": -3.0, "1.0": None}}}}
    assert study._mean_gain(result, "passkey", 4) == 1.5 and study._mean_gain(result, "multikey", 4) is None


def test_retrieval_documents_mix_both_formats_within_their_lengths(monkeypatch):
    """The retrieval training documents: passkey and multi-key alternating, every one within [BOS ... </s>] of at
    most max_len + 1 tokens, lengths spread over the range; the same documents whatever the number of workers."""
    study = load_study(monkeypatch)
    tokenizer = load_tokenizer()
    texts = [p for p in DEFAULT_SAMPLE_TEXT.read_text().split("\n\n") if p.strip()]
    monkeypatch.setattr(study, "RETRIEVAL_CHUNK", 5)
    monkeypatch.setattr(study.os, "cpu_count", lambda: 1)
    docs = study.retrieval_documents(tokenizer, texts, 12, 128, 512, seed=3)
    assert len(docs) == 12
    lengths = [len(d) for d in docs]
    assert max(lengths) <= 513 and min(lengths) < 300 < max(lengths), lengths
    for i, doc in enumerate(docs):
        assert doc[0] == tokenizer.bos_token_id and doc[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(doc, skip_special_tokens=True)
        question = "What is the pass key?" if i % 2 == 0 else "What is the special magic number for"
        assert question in text, text[-200:]
        answer = text.rsplit(" is ", 1)[1].strip()
        assert answer.isdigit() and text.count(answer) >= 2  # the answer is in the haystack
    monkeypatch.setattr(study.os, "cpu_count", lambda: 2)  # two worker processes, chunks of 5: the same documents
    assert study.retrieval_documents(tokenizer, texts, 12, 128, 512, seed=3) == docs


def test_copy_documents_are_full_sequences_of_repeated_random_spans(monkeypatch):
    study = load_study(monkeypatch)
    docs = study.copy_documents(512, 40, 300, 8, 100, bos=1, eos=2, seed=0)
    assert docs == study.copy_documents(512, 40, 300, 8, 100, bos=1, eos=2, seed=0)  # deterministic
    assert docs != study.copy_documents(512, 40, 300, 8, 100, bos=1, eos=2, seed=1)
    spans = []
    for doc in docs:
        assert len(doc) == 300  # one document fills one packed sequence
        pos = 0
        while pos < len(doc):  # walk the units: <s> span span </s>, the last one cut
            assert doc[pos] == 1
            end = doc.index(2, pos) if 2 in doc[pos:] else len(doc)
            body = doc[pos + 1 : end]
            if end < len(doc):  # a whole unit: two equal halves
                span = len(body) // 2
                assert len(body) % 2 == 0 and body[:span] == body[span:], (pos, body)
                assert 8 <= span <= min(100, 300 // 2 - 1) and min(body) >= 5 and max(body) < 512
                spans.append(span)
            pos = end + 1
    assert min(spans) < 30 < max(spans)  # log-uniform: short and long
    with pytest.raises(ValueError, match="length 12"):
        study.copy_documents(512, 1, 12, 8, 100, bos=1, eos=2, seed=0)
    # one unit per document (run 2's form): <s> span span </s>, spans up to max_span
    single = study.copy_documents(512, 40, None, 8, 100, bos=1, eos=2, seed=0)
    for doc in single:
        span = (len(doc) - 2) // 2
        assert doc[0] == 1 and doc[-1] == 2 and doc[1 : 1 + span] == doc[1 + span : -1] and 8 <= span <= 100
    assert max(len(d) for d in single) > 150  # spans longer than a filled document of 300 would allow
