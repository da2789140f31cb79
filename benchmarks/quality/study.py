"""The conversion quality study (docs/quality.md): a small teacher, converted four ways, trained through the
stages, evaluated past its length.

    python benchmarks/quality/prepare_corpus.py                    # once, on a machine with the Debian docs
    python benchmarks/quality/study.py text                        # token arrays -> HALO and evaluation text
    python benchmarks/quality/study.py teacher                     # pretrain the dense teacher (resumes)
    python benchmarks/quality/study.py select                      # HALO, first/last forced and free; baselines
    python benchmarks/quality/study.py convert                     # the four students
    python benchmarks/quality/study.py train halo_forced           # one student through the stages (resumes)
    python benchmarks/quality/study.py evaluate teacher evenly     # some models (or: evaluate all)
    python benchmarks/quality/study.py report                      # results/*.json -> docs/quality.md + plots
    python benchmarks/quality/study.py report --from-json runs/quality/results/study.json   # from the JSON alone
    python benchmarks/quality/study.py all --scale tiny --data D --out O --doc O/quality.md   # the CPU test

Every step reads and writes under --out (default runs/quality) and skips what is already there; training and
selection resume from their checkpoints, so a step killed by a time limit continues when rerun. Each step calls
the framework's own APIs with the shipped recipes (sala-make-teacher: recipes/model/quality_teacher.yaml;
the trainer: recipes/experiment/quality_{teacher,student}.yaml; selection: recipes/select.yaml; conversion),
composed with Hydra exactly as their command lines do; --scale tiny only adds overrides that shrink them.

Variants (a quarter of the layers sparse in each but the last):
    halo_forced    HALO scores, first and last layer forced sparse (as MiniCPM-SALA)
    halo_free      HALO scores, nothing forced
    evenly         evenly spaced, first and last included
    all_lightning  no sparse layer
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("quality")

VARIANTS = ("halo_forced", "halo_free", "evenly", "all_lightning")
MODELS = ("teacher",) + VARIANTS
LOSS_MULTIPLES = (1, 2, 4, 8)  # of the teacher's training length
RETRIEVAL_MULTIPLES = (1, 2, 4, 8, 16)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RETRIEVAL_TASKS = ("passkey", "multikey")


@dataclass
class Scale:
    """Sizes of one version of the study. The recipes hold the full-scale values; `tiny` overrides them."""

    teacher_len: int  # the teacher's training length (the students' long stage is 4x)
    make_teacher: list[str] = field(default_factory=list)  # sala-make-teacher overrides
    teacher: list[str] = field(default_factory=list)  # trainer overrides, recipes/experiment/quality_teacher.yaml
    student: list[str] = field(default_factory=list)  # trainer overrides, recipes/experiment/quality_student.yaml
    select: list[str] = field(default_factory=list)  # recipes/select.yaml overrides
    sparse_config: dict = field(default_factory=dict)  # InfLLM-V2 settings of the students
    select_chars: int = 8_000_000  # characters of training text the HALO alignment and sweep read
    heldout_tokens: int = 262_144  # held-out tokens of the loss-by-length evaluation (same tokens at every length)
    examples: int = 8  # retrieval examples per (task, length, depth)
    depths: tuple = DEPTHS  # of the asked fact in the haystack (a subset of DEPTHS)
    timing_repeats: int = 3
    # sequences per forward in the evaluation (held-out loss, retrieval scoring; right-padded, which no causal
    # model sees from its real positions). Run 2 scored one at a time: 348 s of launch-bound forwards.
    eval_batch: int = 8
    # Retrieval-format training documents (study.py text -> text/retrieval_{1x,4x}.bin): how many of each. 1x:
    # haystacks of 1/16 to 1x the teacher length (teacher, and the students' short stages); 4x: 1x to 4x (the
    # students' long stage); lengths log-uniform. The recipes mix them in by token weight
    # (recipes/experiment/quality_*.yaml).
    retrieval_docs: tuple = (16000, 240)
    # Copy documents (study.py text -> text/copy.bin) of <s> span span </s> units of random ids: how many, the
    # span lengths (log-uniform), and whether units fill whole documents of teacher_len tokens (copy_fill; one
    # document per packed sequence) or each unit is a document of its own (run 2).
    copy_docs: int = 20000
    copy_spans: tuple = (8, 511)
    copy_fill: bool = False


FULL = Scale(
    teacher_len=1024,
    select=["align.seq_len=512", "align.batch_size=16", "align.steps=200", "align.warmup_steps=20",
            "align.checkpoint_every=50", "tasks.context_len=1024", "tasks.heldout_len=1024",
            "tasks.num_examples=16", "tasks.heldout_sequences=32", "tasks.batch_size=8"],
    sparse_config={"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1,
                   "window_size": 512, "topk": 16, "dense_len": 2048},
)

SCALES = {
    "full": FULL,
    # run 3 (docs/quality.md): a copy warm-up of 2560 steps on full-sequence copy documents with short spans
    "full_copy2560": replace(FULL, teacher=["stages.0.tokens=41943040", "stages.0.save_every=250"],
                             copy_docs=44000, copy_spans=(8, 64), copy_fill=True),
    "tiny": Scale(
        teacher_len=64,
        make_teacher=["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=8",
                      "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=32",
                      "model.dim_model_base=16"],
        teacher=[f"stages.{i}.{key}" for i in range(2) for key in (
            "seq_len=64", "global_batch_tokens=512", "micro_batch_size=8", "save_every=4", "schedule.warmup_steps=1")]
        + ["stages.0.tokens=1024", "stages.1.tokens=3072", "logging.progress=false"],
        student=[f"stages.{i}.{key}" for i in range(3) for key in (
            "seq_len=64", "tokens=512", "global_batch_tokens=256", "micro_batch_size=4", "schedule.warmup_steps=0")]
        + ["stages.3.seq_len=256", "stages.3.tokens=512", "stages.3.global_batch_tokens=256",
           "stages.3.micro_batch_size=1", "stages.3.data.long_doc_threshold=128", "logging.progress=false"],
        select=["align.seq_len=64", "align.batch_size=4", "align.steps=4", "align.warmup_steps=1",
                "tasks.context_len=128", "tasks.heldout_len=64", "tasks.num_examples=2", "tasks.heldout_sequences=2",
                "tasks.batch_size=2", "tasks.recall=[passkey,needle]"],
        sparse_config={"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "init_blocks": 1,
                       "window_size": 32, "topk": 2, "dense_len": 128},
        select_chars=100_000,
        retrieval_docs=(24, 8),
        copy_docs=16,
        depths=(0.0, 0.5, 1.0),
        heldout_tokens=2048,
        examples=1,
        timing_repeats=1,
    ),
}


class Study:
    def __init__(self, args):
        self.scale: Scale = SCALES[args.scale]
        self.data = Path(args.data)
        self.out = Path(args.out)
        self.doc = Path(args.doc)
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = not args.quiet
        self.text = self.out / "text"
        self.teacher_dir = self.out / "teacher" / "export" / "pretrain"

    # -- helpers ------------------------------------------------------------------------------------
    def compose(self, config_name: str, overrides: list[str]):
        """A recipe composed as its command line composes it (Hydra, the ConfigStore schemas)."""
        from hydra import compose, initialize_config_module

        from sala_train.config import register_configs

        register_configs()
        with initialize_config_module("sala_train.recipes", version_base="1.3"):
            return compose(config_name, overrides=overrides)

    def record_time(self, step: str, seconds: float) -> None:
        file = self.out / "timings.json"
        timings = json.loads(file.read_text()) if file.exists() else {}
        timings[step] = round(timings.get(step, 0.0) + seconds, 1)  # summed over resumed commands
        file.write_text(json.dumps(timings, indent=1))

    def data_overrides(self, stages: tuple[tuple[str, ...], ...]) -> list[str]:
        """The paths of every stage's data sources, in the recipe's order: "train" (the train split's token
        arrays, prepare_corpus.py) or a document set of study.py text ("retrieval_1x", "retrieval_4x", "copy")."""
        return [f"stages.{i}.data.sources.{j}.path="
                f"{self.data / 'train.bin' if name == 'train' else self.text / (name + '.bin')}"
                for i, names in enumerate(stages) for j, name in enumerate(names)]

    TEACHER_DATA = (("copy",), ("train", "retrieval_1x", "copy"))  # recipes/experiment/quality_teacher.yaml
    STUDENT_DATA = (("train", "retrieval_1x", "copy"),) * 3 + (("train", "retrieval_4x"),)  # .../quality_student.yaml

    def train(self, overrides: list[str]) -> None:
        """The trainer of `python -m sala_train.train`, with the same resolved config written to the run."""
        from omegaconf import OmegaConf

        from sala_train.train.__main__ import git_revision
        from sala_train.train.trainer import Trainer

        if not self.progress:  # --quiet: the trainer's periodic log lines instead of its progress bar
            overrides = [*overrides, "logging.progress=false"]
        cfg = self.compose("train", overrides)
        print("$ python -m sala_train.train " + " ".join(overrides), flush=True)
        trainer = Trainer(OmegaConf.to_object(cfg))
        (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (Path(cfg.run_dir) / "git_revision.txt").write_text(git_revision() + "\n")
        trainer.run()
        export = Path(cfg.run_dir) / "export" / cfg.stages[-1].name
        if not (export / "config.json").exists():  # killed between the last checkpoint and the export: redo it
            from sala_train.generate import load_model

            latest = trainer.latest_checkpoint()
            load_model(str(latest / "model"), dtype="float32").save_pretrained(export, tokenizer=trainer.tokenizer)

    def student_dir(self, variant: str) -> Path:
        return self.out / "train" / variant / "export" / "long"

    def model_dir(self, name: str) -> Path:
        return self.teacher_dir if name == "teacher" else self.student_dir(name)

    # -- steps --------------------------------------------------------------------------------------
    def step_text(self) -> None:
        """heldout.jsonl (one {"id", "text"} per document: the evaluation's haystacks) and select.txt (HALO's text),
        decoded from the arrays that prepare_corpus.py wrote (byte-level BPE decodes exactly). Training reads the
        arrays themselves."""
        from sala_train.tokenizer import load_tokenizer

        if (self.text / "done").exists() and (self.text / "copy.idx").exists():
            return
        meta_file = self.data / "meta.json"
        if not meta_file.exists():
            raise SystemExit(f"study: {meta_file} is missing; run benchmarks/quality/prepare_corpus.py --out "
                             f"{self.data} first (needs: apt-get install linux-doc python3-doc)")
        tokenizer = load_tokenizer(self.data / "tokenizer")
        self.text.mkdir(parents=True, exist_ok=True)
        for split in ("train", "heldout"):
            tokens = np.fromfile(self.data / f"{split}.bin", dtype=np.uint16)
            offsets = np.fromfile(self.data / f"{split}.idx", dtype=np.int64)
            docs = [tokens[a + 1 : b - 1].tolist() for a, b in zip(offsets[:-1], offsets[1:])]  # <s> ids </s>
            texts = tokenizer.batch_decode(docs)
            if split == "heldout":
                with open(self.text / "heldout.jsonl", "w") as f:
                    for i, text in enumerate(texts):
                        f.write(json.dumps({"id": f"{split}-{i}", "text": text}) + "\n")
            if split == "train":  # HALO's alignment and sweep text: every k-th document (both sources, all topics)
                stride = max(1, math.ceil(sum(map(len, texts)) / self.scale.select_chars))
                (self.text / "select.txt").write_text("\n\n".join(texts[::stride]))
                self.write_training_documents(tokenizer, texts)
        shutil.copytree(self.data / "tokenizer", self.text / "tokenizer", dirs_exist_ok=True)
        (self.text / "done").write_text("")

    def write_training_documents(self, tokenizer, texts: list[str]) -> None:
        """retrieval_1x, retrieval_4x and copy (<name>.bin/.idx in text/): the document sets the recipes mix into
        the teacher's and the students' data, the retrieval haystacks from the train split's ``texts``."""
        length = self.scale.teacher_len
        for name, count, lo, hi, seed in (("retrieval_1x", self.scale.retrieval_docs[0], length // 16, length, 7),
                                          ("retrieval_4x", self.scale.retrieval_docs[1], length, 4 * length, 8)):
            docs = retrieval_documents(tokenizer, texts, count, lo, hi, seed)
            write_id_arrays(docs, self.text / f"{name}.bin")
            print(f"{name}: {len(docs)} retrieval documents, {sum(map(len, docs))} tokens (train-split haystacks "
                  f"of {lo}-{hi} tokens)", flush=True)
        lo, hi = self.scale.copy_spans[0], min(self.scale.copy_spans[1], length // 2 - 1)
        docs = copy_documents(len(tokenizer), self.scale.copy_docs, length if self.scale.copy_fill else None,
                              lo, hi, tokenizer.bos_token_id, tokenizer.eos_token_id, seed=9)
        write_id_arrays(docs, self.text / "copy.bin")
        print(f"copy: {len(docs)} documents, {sum(map(len, docs))} tokens (spans of {lo}-{hi}"
              f"{', units filling each document' if self.scale.copy_fill else ''})", flush=True)

    def step_teacher(self) -> None:
        from omegaconf import OmegaConf

        from sala_train.make_teacher import make_teacher

        if (self.teacher_dir / "config.json").exists():
            return
        init = self.out / "teacher-init"
        if not (init / "config.json").exists():
            cfg = self.compose("make_teacher", ["model=quality_teacher", f"output_dir={init}",
                                                f"tokenizer={self.text / 'tokenizer'}", *self.scale.make_teacher])
            spec = OmegaConf.to_object(cfg.model)
            make_teacher(spec.to_hf_config(), init, tokenizer_dir=cfg.tokenizer, progress=False)
        self.train(["+experiment=quality_teacher", f"student={init}", f"run_dir={self.out / 'teacher'}",
                    *self.data_overrides(self.TEACHER_DATA), *self.scale.teacher])

    def step_select(self) -> None:
        """HALO once (alignment + sweep), then the plan with and without forced layers from the same sweep;
        the evenly spaced and all-lightning plans need no evidence."""
        from omegaconf import OmegaConf

        from sala_train.layer_selection import LayerPlan, run_halo
        from sala_train.layer_selection.halo import num_sparse_layers

        plans = self.out / "plans"
        plans.mkdir(parents=True, exist_ok=True)
        for name, forced in (("halo_forced", "[0,-1]"), ("halo_free", "[]")):
            if (plans / f"{name}.json").exists():
                continue
            overrides = [f"teacher={self.teacher_dir}", f"output={self.out / 'select'}",
                         f"data.text_files=[{self.text / 'select.txt'}]", f"selection.forced_layers={forced}",
                         *self.scale.select]
            print("$ python -m sala_train.select " + " ".join(overrides), flush=True)
            plan = run_halo(OmegaConf.to_object(self.compose("select", overrides)), progress=self.progress)
            if plan is None:
                raise SystemExit("study: the HALO alignment stopped early; rerun `study.py select` to continue")
            shutil.copy(self.out / "select" / "plan.json", plans / f"{name}.json")
        num_layers = len(LayerPlan.load(plans / "halo_forced.json"))
        k = num_sparse_layers(num_layers, 0.25)
        LayerPlan.evenly_spaced(num_layers, k).save(plans / "evenly.json")
        LayerPlan.parse("L" * num_layers, {"method": "all_lightning"}).save(plans / "all_lightning.json")

    def step_convert(self) -> None:
        from sala_train.conversion import convert
        from sala_train.layer_selection import LayerPlan

        for variant in VARIANTS:
            output = self.out / "students" / variant
            if (output / "config.json").exists():
                continue
            plan = LayerPlan.load(self.out / "plans" / f"{variant}.json")
            print(f"converting {variant}: {plan.format()}", flush=True)
            convert(self.teacher_dir, plan, output, sparse_config=dict(self.scale.sparse_config),
                    aligned=self.out / "select" / "students.safetensors", overwrite=True)

    def step_train(self, variant: str) -> None:
        if (self.student_dir(variant) / "config.json").exists():
            return
        self.train(["+experiment=quality_student", f"student={self.out / 'students' / variant}",
                    f"teacher={self.teacher_dir}", f"run_dir={self.out / 'train' / variant}",
                    *self.data_overrides(self.STUDENT_DATA), *self.scale.student])

    def step_evaluate(self, name: str, force: bool = False) -> None:
        result_file = self.out / "results" / f"{name}.json"
        if result_file.exists() and not force:
            return
        result = evaluate_model(name, self.model_dir(name), self)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        partial = result_file.with_suffix(".json.partial")  # a killed command leaves no half-written result
        partial.write_text(json.dumps(result, indent=1))
        partial.rename(result_file)

    def step_report(self) -> None:
        results = {}
        for name in MODELS:
            file = self.out / "results" / f"{name}.json"
            if file.exists():
                results[name] = json.loads(file.read_text())
        corpus = _read(self.data / "meta.json")
        if corpus is not None:
            corpus.pop("heldout_ids", None)
        study = {"scale": self.scale.__dict__, "models": results, "timings": _read(self.out / "timings.json"),
                 "corpus": corpus, "plans": {v: _read(self.out / "plans" / f"{v}.json") for v in VARIANTS}}
        (self.out / "results").mkdir(parents=True, exist_ok=True)
        (self.out / "results" / "study.json").write_text(json.dumps(study, indent=1))
        write_report(self.out / "results" / "study.json", self.doc)


def retrieval_documents(tokenizer, texts: list[str], count: int, min_len: int, max_len: int,
                        seed: int) -> list[list[int]]:
    """Training documents in the evaluation's retrieval formats (layer_selection.tasks.hidden_fact_examples):
    half passkey, half multi-key needles, each a haystack of train-split sentences of a random length in
    [min_len, max_len] tokens with the asked fact at a random depth, the question and its answer at the end,
    then </s>. A pretraining corpus of documentation never asks a question about its own text, so without
    these no model of the study learns what the evaluation asks (the first run: every accuracy 0, the teacher's
    too). Evaluation haystacks are held-out text and its numbers and seeds differ; the format is shared."""
    chunks = [(seed * 1000 + c, start, min(RETRIEVAL_CHUNK, count - start)) for c, start in
              enumerate(range(0, count, RETRIEVAL_CHUNK))]  # fixed chunks: the same documents on any machine
    workers = min(len(chunks), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [doc for chunk in chunks for doc in _retrieval_chunk(tokenizer, texts, min_len, max_len, *chunk)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_retrieval_chunk, tokenizer, texts, min_len, max_len, *chunk) for chunk in chunks]
        return [doc for future in futures for doc in future.result()]


RETRIEVAL_CHUNK = 250  # retrieval documents per worker task


def _retrieval_chunk(tokenizer, texts: list[str], min_len: int, max_len: int, seed: int, first: int,
                     count: int) -> list[list[int]]:
    """Documents first .. first + count - 1 of retrieval_documents (even: passkey, odd: multi-key)."""
    import random

    from sala_train.layer_selection.tasks import hidden_fact_examples

    rng, docs = random.Random(seed), []
    while len(docs) < count:
        task = "passkey" if (first + len(docs)) % 2 == 0 else "multikey"
        # log-uniform: many short documents (copying at short range, learned first), some of the longest
        length = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        source, chars = [], 0  # random train documents, enough text for the haystack (about 4 characters a token)
        while chars < 8 * max_len and len(source) < len(texts):
            source.append(texts[rng.randrange(len(texts))])
            chars += len(source[-1])
        depth, best, draws = rng.random(), None, 0
        while draws < 20:  # a haystack holds at least one sentence, so a long one overshoots: the shortest of 20
            try:
                example, = hidden_fact_examples(tokenizer, source, 1, length, depth, rng.randrange(2**31), task=task)
            except ValueError:  # the question and needles alone fill `length`: longer, else a passkey
                if length >= max_len and task == "passkey":
                    raise
                task, length = (task, min(2 * length, max_len)) if length < max_len else ("passkey", min_len)
                continue
            draws += 1
            best = example if best is None or len(example.ids) < len(best.ids) else best
            if len(best.ids) <= max_len:
                break
        docs.append(best.ids + [tokenizer.eos_token_id])
    return docs


def copy_units(vocab_size: int, min_span: int, max_span: int, bos: int, eos: int, rng) -> list[int]:
    """One copy unit, <s> span span </s>, the span random token ids (log-uniform length in [min_span,
    max_span]): its second copy is predictable only by attending back to the first."""
    span = round(math.exp(rng.uniform(math.log(min_span), math.log(max_span))))
    ids = rng.integers(5, vocab_size, span).tolist()  # ids below 5: special tokens
    return [bos, *ids, *ids, eos]


def copy_documents(vocab_size: int, count: int, length: int | None, min_span: int, max_span: int, bos: int,
                   eos: int, seed: int) -> list[list[int]]:
    """``count`` copy documents. ``length`` None: each document one copy unit (run 2). ``length`` an int: each
    document exactly ``length`` tokens of units back to back (the last one cut), so that one document fills one
    packed sequence and the trainer's attention makes one dense causal call per sequence (run 3); a unit's span
    then never exceeds ``length // 2 - 1``.

    Why copy documents (docs/quality.md, runs 2 and 3): retrieval rests on copying, which run 1's teacher never
    learned from text. Run 2's 512 warm-up steps on single units (spans of 8-511) taught nothing. The pilot
    benchmarks/quality/copy_pilot.py, on this architecture in the packed form, learned copying only after about
    1500 steps of 16K tokens at the muP LR 1e-2 with spans of 8-64; run 3's teacher, 2560 steps in the filled
    form, began copying near step 2200 but then learned text worse."""
    if length is not None:
        max_span = min(max_span, length // 2 - 1)
        if max_span < min_span:
            raise ValueError(f"copy_documents: length {length} leaves no room for spans of {min_span} tokens")
    rng, docs = np.random.default_rng(seed), []
    for _ in range(count):
        if length is None:
            docs.append(copy_units(vocab_size, min_span, max_span, bos, eos, rng))
            continue
        doc: list[int] = []
        while len(doc) < length:
            doc += copy_units(vocab_size, min_span, max_span, bos, eos, rng)
        docs.append(doc[:length])
    return docs


def write_id_arrays(docs: list[list[int]], path: Path) -> None:
    """<name>.bin (uint16 ids back to back) and <name>.idx (int64 offsets) of documents already tokenized: a
    `type: tokens` source (sala_train.data.pretokenize.write_token_arrays writes one from a text source)."""
    np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs]).tofile(path)
    np.cumsum([0] + [len(d) for d in docs], dtype=np.int64).tofile(path.with_suffix(".idx"))


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# -- evaluation ---------------------------------------------------------------------------------------------

def heldout_stream(study: Study, tokenizer) -> tuple[torch.Tensor, list[str]]:
    """The held-out documents, longest first (so that long contexts mostly stay inside one document), as one
    token stream of at most scale.heldout_tokens tokens; and the texts (the retrieval haystack)."""
    texts = [json.loads(line)["text"] for line in (study.text / "heldout.jsonl").read_text().splitlines()]
    texts.sort(key=len, reverse=True)
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)][: study.scale.heldout_tokens]
    return torch.tensor(stream, dtype=torch.int64), texts


@torch.no_grad()
def forward_cost(model, length: int, vocab: int, device: torch.device, repeats: int) -> dict:
    """Prefill of one sequence through the backbone (no LM head): seconds and peak memory above the weights,
    per token; memory only on CUDA."""
    ids = torch.randint(5, vocab, (1, length), device=device)
    backbone = getattr(model, "model", model)
    backbone(input_ids=ids)  # warm-up: kernel compilation and autotuning are first-call costs
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        backbone(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    memory = (torch.cuda.max_memory_allocated() - base) / length if device.type == "cuda" else None
    return {"seconds": seconds, "us_per_token": seconds / length * 1e6, "bytes_per_token": memory}


def evaluate_model(name: str, path: Path, study: Study) -> dict:
    from sala_train.generate import load_model
    from sala_train.layer_selection.tasks import HeldoutLoss, hidden_fact_examples, score_answers
    from sala_train.tokenizer import load_tokenizer

    if not (path / "config.json").exists():
        raise SystemExit(f"study: no model at {path}; run the steps before `evaluate {name}`")
    started = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = load_model(str(path), dtype="float32", device=study.device).eval()
    config = json.loads((path / "config.json").read_text())
    length = study.scale.teacher_len
    stream, texts = heldout_stream(study, tokenizer)
    pad = tokenizer.pad_token_id
    result = {"model": name, "path": str(path), "teacher_len": length, "device": str(study.device),
              "mixer_types": config.get("mixer_types"), "sparse_config": config.get("sparse_config"),
              "parameters": sum(p.numel() for p in model.parameters()),
              "loss": {}, "accuracy": {}, "logprob": {}, "logprob_control": {}, "cost": {}}
    for multiple in LOSS_MULTIPLES:
        seq_len = multiple * length
        if stream.numel() >= seq_len:
            result["loss"][str(multiple)] = HeldoutLoss(stream, seq_len, stream.numel() // seq_len,
                                                        study.scale.eval_batch)(model, tokenizer)["loss"]
    for t, task in enumerate(RETRIEVAL_TASKS):
        result["accuracy"][task], result["logprob"][task], result["logprob_control"][task] = {}, {}, {}
        for multiple in RETRIEVAL_MULTIPLES:
            accuracy, logprob, control = {}, {}, {}
            for depth in study.scale.depths:
                seed = 100_000 * t + 100 * multiple + DEPTHS.index(depth)  # the same examples for every model
                try:
                    examples = hidden_fact_examples(tokenizer, texts, study.scale.examples, multiple * length, depth,
                                                    seed, task=task)
                except ValueError:  # the question and needles alone fill the context (tiny scale): not measured
                    accuracy[str(depth)] = logprob[str(depth)] = control[str(depth)] = None
                    continue
                scores = score_answers(model, examples, study.scale.eval_batch, pad)
                accuracy[str(depth)], logprob[str(depth)] = scores["exact_match"], scores["logprob"]
                control[str(depth)] = score_answers(model, control_examples(tokenizer, examples, seed),
                                                    study.scale.eval_batch, pad)["logprob"]
            result["accuracy"][task][str(multiple)] = accuracy
            result["logprob"][task][str(multiple)] = logprob
            result["logprob_control"][task][str(multiple)] = control
    for multiple in RETRIEVAL_MULTIPLES:
        result["cost"][str(multiple)] = forward_cost(model, multiple * length, len(tokenizer), study.device,
                                                     study.scale.timing_repeats)
    result["seconds"] = round(time.perf_counter() - started, 1)
    summary = {f"{task} {m}x": (_fmt(_mean_accuracy(result, task, m), ".2f"), _fmt(_mean_gain(result, task, m), ".2f"))
               for task in RETRIEVAL_TASKS for m in (1, 4)}
    print(f"evaluated {name}: loss {result['loss']}; (accuracy, needle gain) {summary} in {result['seconds']} s",
          flush=True)
    return result


def control_examples(tokenizer, examples: list, seed: int) -> list:
    """The same prompts ending in a wrong answer: a random number of as many digits as the true one, found nowhere
    in the prompt. logprob(true) - logprob(control) is the needle gain: how much the hidden fact raised the
    answer's probability. It is about 0 for a model that ignores the context and grows with retrieval, so it
    tells models apart where exact-match accuracy is 0 for all of them."""
    import random

    from sala_train.layer_selection.tasks import RecallExample

    rng, out = random.Random(seed + 7), []
    for example in examples:
        (a, b), = example.answers
        true = tokenizer.decode(example.ids[a:b]).strip()
        prompt = tokenizer.decode(example.ids[:a])
        while True:
            number = str(rng.randint(10 ** (len(true) - 1), 10 ** len(true) - 1))
            if number != true and number not in prompt:
                break
        wrong = tokenizer(f" {number}", add_special_tokens=False)["input_ids"]
        out.append(RecallExample(example.ids[:a] + wrong, [(a, a + len(wrong))]))
    return out


def _mean_gain(result: dict, task: str, multiple: int) -> float | None:
    """Mean over depths of logprob(true answer) - logprob(control answer), nats per answer token."""
    true = result["logprob"].get(task, {}).get(str(multiple), {})
    control = result.get("logprob_control", {}).get(task, {}).get(str(multiple), {})
    gains = [true[d] - control[d] for d in true if true[d] is not None and control.get(d) is not None]
    return sum(gains) / len(gains) if gains else None


# -- report (from study.json alone) -------------------------------------------------------------------------

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def _mean_accuracy(result: dict, task: str, multiple: int) -> float | None:
    by_depth = [v for v in result["accuracy"].get(task, {}).get(str(multiple), {}).values() if v is not None]
    return sum(by_depth) / len(by_depth) if by_depth else None


def write_report(study_file: Path, doc: Path) -> None:
    """Tables and plots of study.json into the results section of ``doc`` (between the results markers; the
    rest of the document is kept) and PNG files beside it (quality_*.png)."""
    study = json.loads(Path(study_file).read_text())
    models = study["models"]
    plots = make_plots(study, doc.parent)
    lines = [RESULTS_START, "", f"Generated by `benchmarks/quality/study.py report` from `{study_file}`.", ""]
    if not models:
        lines += ["No model has been evaluated yet.", ""]
    teacher = models.get("teacher")
    lines += ["### Summary (loss: held-out cross-entropy, nats/token; accuracy: exact match of the answer, mean "
              "over depths; multiples of the teacher's training length)", "",
              "| model | layers (S sparse, L lightning) | loss 1x | vs teacher | loss 2x | loss 4x | loss 8x | "
              "passkey 4x | multi-key 4x | passkey 16x | multi-key 16x |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in models.items():
        pattern = "".join("L" if m == "lightning-attn" else "S" for m in r["mixer_types"]) if r["mixer_types"] \
            else "dense (RoPE)"
        loss1 = r["loss"].get("1")
        delta = f"{100 * (loss1 / teacher['loss']['1'] - 1):+.1f}%" if teacher and loss1 and name != "teacher" else ""
        lines.append(f"| {name} | `{pattern}` | {_fmt(loss1)} | {delta} | " + " | ".join(
            _fmt(r["loss"].get(str(m))) for m in (2, 4, 8)) + " | " + " | ".join(
            _fmt(_mean_accuracy(r, task, m), ".2f") for m in (4, 16) for task in RETRIEVAL_TASKS) + " |")
    for task in RETRIEVAL_TASKS:
        lines += ["", f"### {task} accuracy by length (mean over depths {list(DEPTHS)})", "",
                  "| model | " + " | ".join(f"{m}x" for m in RETRIEVAL_MULTIPLES) + " |",
                  "|---|" + "---|" * len(RETRIEVAL_MULTIPLES)]
        for name, r in models.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(_mean_accuracy(r, task, m), ".2f")
                                                     for m in RETRIEVAL_MULTIPLES) + " |")
        lines += ["", f"{task} accuracy at 4x by depth:", "", "| model | " + " | ".join(str(d) for d in DEPTHS) + " |",
                  "|---|" + "---|" * len(DEPTHS)]
        for name, r in models.items():
            by_depth = r["accuracy"].get(task, {}).get("4", {})
            lines.append(f"| {name} | " + " | ".join(_fmt(by_depth.get(str(d)), ".2f") for d in DEPTHS) + " |")
        if any("logprob_control" in r for r in models.values()):
            lines += ["", f"{task} needle gain by length (nats per answer token: log-probability of the true answer "
                      "minus that of a random number of as many digits; 0 = the fact is not used; mean over depths):",
                      "", "| model | " + " | ".join(f"{m}x" for m in RETRIEVAL_MULTIPLES) + " |",
                      "|---|" + "---|" * len(RETRIEVAL_MULTIPLES)]
            for name, r in models.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(_mean_gain(r, task, m), ".2f")
                                                         for m in RETRIEVAL_MULTIPLES) + " |")
    lines += ["", "### Cost of a prefill through the backbone (batch 1; memory: peak above the weights)", "",
              "| model | " + " | ".join(f"{m}x us/token | {m}x bytes/token" for m in RETRIEVAL_MULTIPLES) + " |",
              "|---|" + "---|---|" * len(RETRIEVAL_MULTIPLES)]
    for name, r in models.items():
        cells = [f"{_fmt(c.get('us_per_token'), '.2f')} | {_fmt(c.get('bytes_per_token'), '.0f')}"
                 for c in (r["cost"].get(str(m), {}) for m in RETRIEVAL_MULTIPLES)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" |")
    lines += ["", "### Goals (computed from the numbers above)", ""] + goal_lines(models)
    plans = {k: v for k, v in (study.get("plans") or {}).items() if v}
    if plans:
        lines += ["", "### Layer plans", "", "| variant | pattern | sparse layers |", "|---|---|---|"]
        lines += [f"| {k} | `{v['pattern']}` | {v['sparse_layers']} |" for k, v in plans.items()]
    if study.get("timings"):
        lines += ["", "### Wall time per step (seconds, summed over resumed commands)", "",
                  "| step | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in study["timings"].items()]
    lines += [""] + [f"![{title}]({path.name})" for title, path in plots] + ["", RESULTS_END]
    section = "\n".join(lines)
    text = doc.read_text() if doc.exists() else "# Conversion quality study\n\n"
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + section + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote {doc} and {len(plots)} plots", flush=True)


def goal_lines(models: dict) -> list[str]:
    teacher = models.get("teacher")
    if not teacher:
        return ["- the teacher has not been evaluated: no goal can be checked"]
    lines = []
    for name in VARIANTS:
        r = models.get(name)
        if r and r["loss"].get("1") is not None:
            gap = 100 * (r["loss"]["1"] / teacher["loss"]["1"] - 1)
            lines.append(f"- {name}: held-out loss at 1x is {gap:+.1f}% vs the teacher (goal: within 3%): "
                         f"{'met' if gap <= 3 else 'missed'}")
    for task in RETRIEVAL_TASKS:
        for name in ("halo_forced", "halo_free"):
            for other, goal, better in (("teacher", "above", lambda a, b: a > b),
                                        ("evenly", "at least as good", lambda a, b: a >= b)):
                if name not in models or other not in models:
                    continue
                mine, theirs = _mean_accuracy(models[name], task, 4), _mean_accuracy(models[other], task, 4)
                verdict = "not measured" if mine is None or theirs is None else \
                    ("met" if better(mine, theirs) else "missed")
                if mine == theirs == 0:
                    verdict = "not measured (no model retrieved)"
                gain = ""
                if "logprob_control" in models[name] and "logprob_control" in models[other]:
                    gain = (f"; needle gain {_fmt(_mean_gain(models[name], task, 4), '.2f')} vs "
                            f"{_fmt(_mean_gain(models[other], task, 4), '.2f')} nats/token")
                lines.append(f"- {task} at 4x: {name} {_fmt(mine, '.2f')} vs {other} {_fmt(theirs, '.2f')} "
                             f"(goal: {goal}): {verdict}{gain}")
    return lines


def make_plots(study: dict, folder: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    models, out = study["models"], []
    if models:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, r in models.items():
            xs = [int(m) for m in r["loss"]]
            ax.plot(xs, list(r["loss"].values()), marker="o", label=name)
        ax.set(xscale="log", xlabel="context (x teacher training length)", ylabel="held-out loss (nats/token)",
               title="loss vs length")
        ax.set_xticks(LOSS_MULTIPLES, [str(m) for m in LOSS_MULTIPLES])
        ax.grid(alpha=0.3)
        ax.legend()
        out.append(("held-out loss vs length", _save(fig, folder / "quality_loss.png")))

        fig, axes = plt.subplots(1, len(RETRIEVAL_TASKS), figsize=(10, 4), squeeze=False)
        for ax, task in zip(axes[0], RETRIEVAL_TASKS):
            for name, r in models.items():
                ax.plot(RETRIEVAL_MULTIPLES, [_or_nan(_mean_accuracy(r, task, m)) for m in RETRIEVAL_MULTIPLES],
                        marker="o",
                        label=name)
            ax.set(xscale="log", xlabel="context (x teacher training length)", ylabel="accuracy", ylim=(-0.05, 1.05),
                   title=f"{task} vs length")
            ax.set_xticks(RETRIEVAL_MULTIPLES, [str(m) for m in RETRIEVAL_MULTIPLES])
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        out.append(("retrieval accuracy vs length", _save(fig, folder / "quality_accuracy.png")))

        names = list(models)
        fig, axes = plt.subplots(len(RETRIEVAL_TASKS), len(names), figsize=(2.6 * len(names), 5), squeeze=False)
        for row, task in enumerate(RETRIEVAL_TASKS):
            for col, name in enumerate(names):
                acc = models[name]["accuracy"].get(task, {})
                grid = np.array([[_or_nan(acc.get(str(m), {}).get(str(d))) for m in RETRIEVAL_MULTIPLES]
                                 for d in DEPTHS])
                ax = axes[row][col]
                ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(RETRIEVAL_MULTIPLES)), [f"{m}x" for m in RETRIEVAL_MULTIPLES])
                ax.set_yticks(range(len(DEPTHS)), [str(d) for d in DEPTHS])
                ax.set_title(f"{name}\n{task}", fontsize=8)
        fig.supylabel("depth of the answer")
        fig.suptitle("accuracy by context length and depth (dark 0, yellow 1, blank: not measured)", fontsize=9)
        out.append(("accuracy by length and depth", _save(fig, folder / "quality_depth.png")))
    plan = (study.get("plans") or {}).get("halo_forced") or {}
    scores = plan.get("evidence", {}).get("scores")
    if scores:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        layers = range(len(scores))
        ax.bar(layers, scores, color="lightgray", label="HALO score")
        top = max(max(scores), 1e-9)
        for i, (variant, marker) in enumerate((("halo_forced", "v"), ("halo_free", "^"), ("evenly", "o"))):
            chosen = ((study.get("plans") or {}).get(variant) or {}).get("sparse_layers", [])
            ax.scatter(chosen, [top * (1.08 + 0.1 * i)] * len(chosen), marker=marker, color=f"C{i}",
                       label=f"{variant}: sparse layers")
        ax.set(xlabel="layer", ylabel="score (recall drop / general drop)", title="HALO selection scores")
        ax.set_xticks(list(layers))
        ax.legend(fontsize=7)
        out.append(("HALO selection scores", _save(fig, folder / "quality_scores.png")))
    return out


def _or_nan(value) -> float:
    return np.nan if value is None else value


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="The conversion quality study (docs/quality.md).")
    parser.add_argument("step", choices=("text", "teacher", "select", "convert", "train", "evaluate", "report", "all"))
    parser.add_argument("targets", nargs="*", default=["all"],
                        help="train: variants (default all); evaluate: models (default all)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--data", default="benchmarks/quality/data", help="prepare_corpus.py's output")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--doc", default="docs/quality.md", help="the report: its results section is rewritten")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="evaluate: redo models that have results")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--from-json", help="report: write the report from this study.json alone (no run needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.from_json:
        if args.step != "report":
            parser.error("--from-json goes with the report step")
        write_report(Path(args.from_json), Path(args.doc))
        return
    # TF32 matmuls on GPU (the trainer's torch backend trains in fp32): several times faster on an H100, and
    # well inside the precision this study needs. No effect on CPU.
    torch.set_float32_matmul_precision("high")
    study = Study(args)
    study.out.mkdir(parents=True, exist_ok=True)
    for step, allowed in (("train", VARIANTS), ("evaluate", MODELS)):
        wrong = [t for t in args.targets if t != "all" and t not in allowed]
        if args.step == step and wrong:
            parser.error(f"{step} {' '.join(wrong)}: expected all or some of {', '.join(allowed)}")
    whole = args.step == "all" or "all" in args.targets
    if args.step == "all":  # the teacher is evaluated right after its pretraining: does it retrieve at all?
        plan = [("text", ()), ("teacher", ()), ("evaluate", ("teacher",)), ("select", ()), ("convert", ()),
                ("train", VARIANTS), ("evaluate", VARIANTS), ("report", ())]
    else:
        plan = [(args.step, {"train": VARIANTS, "evaluate": MODELS}.get(args.step, ()) if whole else args.targets)]
    for step, targets in plan:
        started = time.perf_counter()
        if step == "train":
            for variant in targets:
                study.step_train(variant)
        elif step == "evaluate":
            for name in targets:
                study.step_evaluate(name, force=args.force)
        else:
            getattr(study, f"step_{step}")()
        label = step if whole or step not in ("train", "evaluate") else f"{step} {' '.join(targets)}"
        study.record_time(label, time.perf_counter() - started)

if __name__ == "__main__":
    main()
