"""HALO layer selection (SPEC 5): which layers of the teacher stay (sparse) attention in the hybrid.

    students = build_students(teacher); align_students(...)          # stage 1 (align.py)
    for each layer i:  M(i) = the teacher with only attention i replaced by its aligned student
        R(i) = mean score of the recall tasks on M(i), C(i) = mean score of the general tasks   (tasks.py)
    s(i) = (max_j R(j) - R(i)) / (max_j C(j) - C(i) + eps), clipped to [0, 50]
    keep the top floor(L * ratio) layers by s as sparse (forced layers, SALA: first and last, counted inside)

A high s(i): replacing layer i costs much recall and little general ability, so i keeps attention.
Baselines for comparison: evenly spaced, retrieval drop only (rank by max R - R(i)), a user-given pattern.

``run_halo(config)`` runs the whole pipeline into an output directory:

    plan.json              the LayerPlan, its evidence: method, ratio, forced layers, R, C, scores, ...
    scores.csv             layer, recall, general, recall_drop, general_drop, score, chosen (+ task metrics)
    scores.png             the bar chart of plot.py
    students.safetensors   the aligned students, named as the conversion's ``aligned`` input expects
    sweep.json             every task metric of the teacher and of every M(i); reused by a rerun with the same
                           tasks and students (to re-select with another method or ratio in seconds)
    align/                 checkpoint/ (resumable alignment) and log.jsonl
    run.json               the resolved config, git revision, world size
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import os
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from sala_train.checkpoint import write_json_atomic

from .align import (
    RESUME_KEYS,
    AlignConfig,
    align_students,
    build_students,
    rank_and_world,
    run_student,
    save_students,
)
from .corpus import load_corpus
from .plan import LayerPlan, LayerPlanError
from .tasks import Task, TaskConfig, build_tasks

log = logging.getLogger(__name__)

METHODS = ("halo", "recall_drop", "evenly_spaced", "pattern")


@dataclass
class SelectionConfig:
    method: str = "halo"  # halo | recall_drop | evenly_spaced | pattern
    ratio: float = 0.25  # floor(L * ratio) sparse layers
    forced_layers: list[int] = field(default_factory=lambda: [0, -1])  # kept sparse, counted inside the k (SALA)
    pattern: Optional[str] = None  # method=pattern: e.g. "SLLLLLLLLSLLLLLLSSLLLLSLLLLLLSSS"
    eps: float = 1e-6
    clip: float = 50.0


@dataclass
class DataConfig:
    text_files: list[str] = field(default_factory=list)  # empty: the English sample shipped with sala_train
    heldout_fraction: float = 0.05  # of the documents, for the general task and the needle haystack


@dataclass
class HaloConfig:
    """Everything ``python -m sala_train.select`` runs (registered as the select_schema of Hydra)."""

    teacher: str = "???"  # MiniCPM-4 checkpoint directory
    output: str = "???"  # run directory; rerunning into it resumes
    tokenizer: Optional[str] = None  # default: the teacher directory's tokenizer
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "float32"  # of the teacher (students train in fp32, under autocast for bf16)
    lightning_backend: str = "auto"  # auto | triton | torch | fla
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    import_modules: list[str] = field(default_factory=list)  # modules that register user tasks
    # "i/n": score only layers i, i + n, ... and write sweep-shard-i-of-n.json (one task of a job array,
    # launch/slurm/select_sweep.sbatch); a later run without it merges the n shard files into sweep.json
    sweep_shard: Optional[str] = None
    align_only: bool = False  # stop after the alignment (and students.safetensors): the first job of an array


# ---------------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------------

class StudentAttention(nn.Module):
    """A lightning student behind the teacher attention's call ``(x, cos, sin, attention, cache)``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x, cos, sin, attention, cache=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("a lightning student in the teacher cannot use the teacher's KV cache; evaluate "
                             "the sweep's models without a cache (the built-in tasks do)")
        return run_student(self.student, x, cos, sin, attention).to(x.dtype)


@contextmanager
def student_in_place(teacher: nn.Module, layer: int, student: nn.Module):
    """The teacher with only attention ``layer`` replaced by ``student`` (the module is swapped, no weights are
    copied); the teacher's own attention is back on exit."""
    decoder_layer = teacher.model.layers[layer]
    original = decoder_layer.self_attn
    decoder_layer.self_attn = StudentAttention(student)
    try:
        yield teacher
    finally:
        decoder_layer.self_attn = original


def evaluate_tasks(model, tokenizer, tasks: list[Task]) -> dict[str, dict[str, float]]:
    """{task name: its metrics and "score"}."""
    with torch.no_grad():
        return {task.name: task(model, tokenizer) for task in tasks}


def sweep(teacher, students, tokenizer, tasks: list[Task], *, progress: bool = True,
          layers: list[int] | None = None) -> dict:
    """Every task on the teacher and on each M(i). Under torch.distributed, rank r takes layers r, r + W, ...
    and all ranks return the gathered result: {"teacher": metrics, "layers": [metrics of M(0), ...]}.
    ``layers``: only these (a shard of a job array); the others' entries are None."""
    rank, world = rank_and_world()
    students.eval()
    todo = list(range(len(students))) if layers is None else list(layers)
    mine = {}
    for i in tqdm(todo[rank::world], desc="sweep", unit="layer", disable=not progress or rank != 0):
        with student_in_place(teacher, i, students[i]) as model:
            mine[i] = evaluate_tasks(model, tokenizer, tasks)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {i: m for part in gathered for i, m in part.items()}
    return {"teacher": evaluate_tasks(teacher, tokenizer, tasks),
            "layers": [mine.get(i) for i in range(len(students))]}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"i/n" -> (i, n) with 0 <= i < n; None -> None."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"sweep_shard = {text!r}: expected 'i/n' with integers, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"sweep_shard = {text!r}: need 0 <= i < n")
    return i, n


def shard_file(output: Path, i: int, n: int) -> Path:
    return output / f"sweep-shard-{i}-of-{n}.json"


def merge_shards(output: Path, key: dict, num_layers: int) -> dict | None:
    """The sweep from a complete set of shard files written with this ``key`` (None if there is none).
    Files of another key (other tasks, students or teacher) or an incomplete set are not used."""
    by_count: dict[int, dict[int, dict]] = {}
    for path in sorted(output.glob("sweep-shard-*-of-*.json")):
        data = _read_json(path)
        if data is None or data.get("key") != key:
            continue
        by_count.setdefault(data["num_shards"], {})[data["shard"]] = data
    for n, parts in by_count.items():
        if len(parts) != n:
            missing = sorted(set(range(n)) - set(parts))
            log.info("sweep shards of %d: %s missing, not merged", n, missing)
            continue
        layers = [None] * num_layers
        for data in parts.values():
            for i, metrics in enumerate(data["layers"]):
                if metrics is not None:
                    layers[i] = metrics
        if any(m is None for m in layers):
            continue
        return {"teacher": parts[0]["teacher"], "layers": layers}
    return None


def task_means(metrics: dict[str, dict[str, float]], names: list[str]) -> float:
    """The mean score of the named tasks (R from the recall tasks, C from the general ones)."""
    return sum(metrics[n]["score"] for n in names) / len(names)


# ---------------------------------------------------------------------------------------------------------
# Scores and selection
# ---------------------------------------------------------------------------------------------------------

def importance_scores(recall: list[float], general: list[float], *, eps: float = 1e-6,
                      clip: float = 50.0) -> list[float]:
    """s_i = (max_j R_j - R_i) / (max_j C_j - C_i + eps), clipped to [0, clip] (SPEC 5.4)."""
    if len(recall) != len(general) or not recall:
        raise ValueError(f"need one recall and one general value per layer, got {len(recall)} and {len(general)}")
    r_max, c_max = max(recall), max(general)
    return [min(clip, max(0.0, (r_max - r) / (c_max - c + eps))) for r, c in zip(recall, general)]


def num_sparse_layers(num_layers: int, ratio: float) -> int:
    """floor(L * ratio); the 1e-9 keeps 32 * 0.25 from flooring to 7 through rounding."""
    k = math.floor(num_layers * ratio + 1e-9)
    if not 1 <= k <= num_layers:
        raise LayerPlanError(f"selection.ratio = {ratio} gives floor({num_layers} * {ratio}) = {k} sparse layers; "
                             f"choose a ratio that keeps between 1 and {num_layers} of the {num_layers} layers")
    return k


def resolve_forced(forced: list[int], num_layers: int) -> list[int]:
    """Forced layer indices, negative ones counted from the end (-1 = the last), sorted and deduplicated."""
    out_of_range = [i for i in forced if not -num_layers <= i < num_layers]
    if out_of_range:
        raise LayerPlanError(f"selection.forced_layers {out_of_range} are outside the {num_layers} layers")
    return sorted({i % num_layers for i in forced})


def top_layers(values: list[float], k: int, forced: list[int], tie_break: list[float] | None = None) -> list[int]:
    """The forced layers plus the k - len(forced) other layers of highest value (ties: higher tie_break, then
    the lower index), sorted."""
    if len(forced) > k:
        raise LayerPlanError(f"{len(forced)} forced layers {forced} do not fit in the {k} sparse layers of the "
                             "ratio; raise selection.ratio or shorten selection.forced_layers")
    tie_break = tie_break or [0.0] * len(values)
    rest = sorted((i for i in range(len(values)) if i not in forced), key=lambda i: (-values[i], -tie_break[i], i))
    return sorted(forced + rest[: k - len(forced)])


def select_plan(config: SelectionConfig, num_layers: int, recall: list[float] | None = None,
                general: list[float] | None = None) -> LayerPlan:
    """The plan of ``config.method``; halo and recall_drop need the sweep's R and C per layer. The evidence holds
    the method, ratio, forced layers and, when given, R, C, the drops and the scores."""
    if config.method not in METHODS:
        raise ValueError(f"selection.method = {config.method!r}; expected one of {METHODS}")
    evidence = {"method": config.method}
    if recall is not None and general is not None:
        scores = importance_scores(recall, general, eps=config.eps, clip=config.clip)
        evidence.update(recall=recall, general=general, recall_drop=[max(recall) - r for r in recall],
                        general_drop=[max(general) - c for c in general], scores=scores,
                        eps=config.eps, clip=config.clip)
    if config.method == "pattern":
        if not config.pattern:
            raise LayerPlanError("selection.method = pattern needs selection.pattern, e.g. 'SLLLLLLS'")
        plan = LayerPlan.parse(config.pattern).validate(num_layers, source=f"selection.pattern {config.pattern!r}")
        return LayerPlan(plan.kinds, evidence)

    k = num_sparse_layers(num_layers, config.ratio)
    evidence.update(ratio=config.ratio, num_sparse=k)
    if config.method == "evenly_spaced":
        return LayerPlan(LayerPlan.evenly_spaced(num_layers, k).kinds, evidence)
    if recall is None or general is None:
        raise ValueError(f"selection.method = {config.method} needs the sweep's recall and general values")
    forced = resolve_forced(config.forced_layers, num_layers)
    evidence["forced_layers"] = forced
    if config.method == "halo":
        chosen = top_layers(evidence["scores"], k, forced, tie_break=evidence["recall_drop"])
    else:  # recall_drop
        chosen = top_layers(evidence["recall_drop"], k, forced)
    return LayerPlan.from_sparse_layers(num_layers, chosen, evidence)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("layer", "recall", "general", "recall_drop", "general_drop", "score", "chosen")


def write_scores_csv(path: str | os.PathLike, plan: LayerPlan, layer_metrics: list[dict] | None = None) -> Path:
    """scores.csv from the plan's evidence: the columns of CSV_COLUMNS, then ``<task>.<metric>`` of every task
    (floats written with repr, so they read back exactly)."""
    e = plan.evidence
    extra = sorted({f"{task}.{m}" for metrics in layer_metrics or [] for task, ms in metrics.items() for m in ms
                    if m != "score"})  # a task's score is one of its metrics, already a column
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS + tuple(extra))
        for i in range(len(plan)):
            row = [i, e["recall"][i], e["general"][i], e["recall_drop"][i], e["general_drop"][i], e["scores"][i],
                   int(i in plan.sparse_layers)]
            if layer_metrics:
                row += [layer_metrics[i][name.split(".", 1)[0]][name.split(".", 1)[1]] for name in extra]
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def write_outputs(output: Path, plan: LayerPlan, layer_metrics: list[dict]) -> None:
    """plan.json, scores.csv and scores.png (the caller writes students.safetensors and sweep.json)."""
    from .plot import plot_scores

    plan.save(output / "plan.json")
    write_scores_csv(output / "scores.csv", plan, layer_metrics)
    e = plan.evidence
    plot_scores(output / "scores.png", e["recall_drop"], e["general_drop"], e["scores"], plan.sparse_layers,
                title=f"HALO sweep: {plan.format()} ({e['method']})")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextmanager
def _distributed(device: torch.device):
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1) and nobody did yet."""
    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owned = True
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def run_halo(config: HaloConfig, *, progress: bool = True) -> LayerPlan | None:
    """The whole selection into ``config.output`` (see the module docstring). Returns the plan, or None when the
    alignment stopped early at ``align.stop_at`` (rerun to continue), with ``align_only``, or for a sweep shard.

    Job arrays (launch/slurm/select_sweep.sbatch): one run with ``align_only=true``, then n runs with
    ``sweep_shard=i/n`` (each scores layers i, i + n, ...), then one plain run that merges the shards."""
    from sala_train.models import MiniCPMForCausalLM
    from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer

    for module in config.import_modules:
        importlib.import_module(module)
    output, teacher_dir = Path(config.output), Path(config.teacher)
    shard = parse_shard(config.sweep_shard)  # a bad value fails before any model work
    if shard is not None and not (output / "students.safetensors").is_file():
        raise FileNotFoundError(f"sweep_shard={config.sweep_shard}: {output / 'students.safetensors'} is missing; "
                                "run the alignment first (the same command with align_only=true, no sweep_shard)")
    device = _pick_device(config.device)
    with _distributed(device):
        rank, world = rank_and_world()
        teacher = MiniCPMForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, config.dtype), device=device)
        teacher.requires_grad_(False)
        num_layers = teacher.config.num_hidden_layers
        select_plan(config.selection, num_layers, [0.0] * num_layers, [0.0] * num_layers)  # fail before training
        tokenizer = load_tokenizer(config.tokenizer or teacher_dir)
        corpus = load_corpus(config.data.text_files or [DEFAULT_SAMPLE_TEXT], tokenizer, config.data.heldout_fraction)
        recall_tasks, general_tasks = build_tasks(config.tasks, tokenizer, corpus)  # fail early on a bad task name
        if rank == 0:
            output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(output / "run.json", {"config": asdict(config), "git_revision": _git_revision(),
                                                    "world_size": world})

        students = build_students(teacher, lightning_backend=config.lightning_backend, seed=config.align.seed)
        result = align_students(teacher, students, corpus.train_sequences(config.align.seq_len), config.align,
                                output / "align", data_fingerprint=corpus.fingerprint, progress=progress)
        if not result.finished:
            if rank == 0:
                log.info("alignment stopped at step %d of %d (align.stop_at); rerun the same command to continue",
                         result.step, result.total_steps)
            return None
        if rank == 0:
            save_students(students, output / "students.safetensors")
        if config.align_only:
            log.info("alignment finished (%d steps); students in %s", result.step, output / "students.safetensors")
            if world > 1:
                dist.barrier()
            return None

        # The sweep is reused when its tasks and students are those of this run.
        sweep_key = {"tasks": asdict(config.tasks), "align": {k: getattr(config.align, k) for k in RESUME_KEYS},
                     "data": asdict(config.data), "teacher": str(teacher_dir.resolve()), "dtype": config.dtype,
                     "alignment_step": result.step}
        sweep_key = json.loads(json.dumps(sweep_key))  # as it reads back from JSON
        if shard is not None:  # one task of a job array: score its layers, leave the merge to a later run
            i, n = shard
            layers = list(range(i, len(students), n))
            metrics = sweep(teacher, students, tokenizer, recall_tasks + general_tasks, progress=progress,
                            layers=layers)
            if rank == 0:
                write_json_atomic(shard_file(output, i, n), {**metrics, "key": sweep_key, "shard": i, "num_shards": n})
                log.info("sweep shard %d/%d scored layers %s; run without sweep_shard to merge and select", i, n,
                         layers)
            if world > 1:
                dist.barrier()
            return None
        cached = _read_json(output / "sweep.json")
        if cached is not None and cached.get("key") == sweep_key:
            metrics = cached
        else:
            metrics = merge_shards(output, sweep_key, len(students))
            if metrics is None:
                metrics = sweep(teacher, students, tokenizer, recall_tasks + general_tasks, progress=progress)
            metrics["key"] = sweep_key
            if rank == 0:
                write_json_atomic(output / "sweep.json", metrics)

        recall_names, general_names = [t.name for t in recall_tasks], [t.name for t in general_tasks]
        recall = [task_means(m, recall_names) for m in metrics["layers"]]
        general = [task_means(m, general_names) for m in metrics["layers"]]
        plan = select_plan(config.selection, len(students), recall, general)
        plan.evidence.update(
            recall_tasks=recall_names, general_tasks=general_names, recall_metric=config.tasks.recall_metric,
            general_metric=config.tasks.general_metric,
            teacher={"recall": task_means(metrics["teacher"], recall_names),
                     "general": task_means(metrics["teacher"], general_names)},
            alignment={"steps": result.step, "tokens": result.tokens, "first_mse": result.first_mse,
                       "last_mse": result.last_mse},
            baselines=_baselines(config.selection, len(students), recall, general),
        )
        if rank == 0:
            write_outputs(output, plan, metrics["layers"])
            log.info("selected %s (%s): sparse layers %s; wrote %s", plan.format(), config.selection.method,
                     plan.sparse_layers, output)
        if world > 1:
            dist.barrier()
        return plan


def _baselines(config: SelectionConfig, num_layers: int, recall, general) -> dict[str, str]:
    """The pattern every other method would choose with the same ratio and forced layers, for comparison."""
    patterns = {}
    for method in ("halo", "recall_drop", "evenly_spaced"):
        try:
            patterns[method] = select_plan(SelectionConfig(**{**asdict(config), "method": method}), num_layers,
                                           recall, general).format()
        except (LayerPlanError, ValueError) as err:
            patterns[method] = f"n/a: {err}"
    return patterns


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

