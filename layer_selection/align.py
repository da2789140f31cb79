"""HALO stage 1 (SPEC 5.1-5.2): one lightning student per teacher layer, aligned to that layer's attention.

    students = build_students(teacher)           # LightningMixer l from the weights of attention l (SPEC 3)
    for every batch of training text:
        the teacher (frozen) runs its forward as usual; right after the attention of layer l runs,
            x_l = its input (the normed hidden state, detached), y_l = its output (before the residual scale)
            loss_l = MSE(student_l(x_l), y_l); loss_l.backward()     # gradients reach student l only
        clip each student's gradient norm; one AdamW step for all students

The students never feed the teacher: its forward continues with its own outputs, so each student learns from
exactly the inputs its layer sees in the teacher, independently of the others. Each backward runs inside the
teacher's forward, right after its layer, so only one student's activations are alive at a time.

Distributed (torchrun, WORLD_SIZE > 1): each student is its own DistributedDataParallel module (one forward and
one backward per step each; its gradients are all-reduced while the teacher computes the next layers) and rank r
reads slice r of every global batch. The teacher is replicated on every rank. Not implemented: ZeRO / FSDP
sharding of the students and their optimizer state (fp32 students + AdamW of an 8B teacher: about 43 GB per rank).

Resumable: every ``checkpoint_every`` steps rank 0 replaces ``<run_dir>/checkpoint/`` atomically (students,
optimizer, step, RNG state; the learning rate is a function of the step). The data order is a function of the
step too, so a rerun continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from sala_train.checkpoint import atomic_directory
from sala_train.models.minicpm import MiniCPMAttention, MiniCPMForCausalLM, init_std
from sala_train.models.sala import LightningMixer

from .plan import LIGHTNING, LayerPlan

log = logging.getLogger(__name__)

# The tensors of one student, relative to model.layers.{i}.self_attn. (SPEC 2.4; the conversion's `aligned` input)
STUDENT_PREFIX = "model.layers.{}.self_attn."


@dataclass
class AlignConfig:
    """Stage-1 alignment; the defaults are HALO's (length 512, AdamW (0.9, 0.95), wd 0, lr 1e-3 cosine to 1e-5,
    50 warmup steps, clip 1.0). HALO aligns on about 320M tokens: ``tokens=320_000_000``."""

    steps: int = 1000
    tokens: Optional[int] = None  # when set, steps = ceil(tokens / (batch_size * world_size * seq_len))
    seq_len: int = 512
    batch_size: int = 8  # sequences per rank and step
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # on each student's gradient norm separately: the students are independent problems
    seed: int = 0  # data order and z_proj initialisation
    checkpoint_every: int = 200
    log_every: int = 10
    stop_at: Optional[int] = None  # stop (checkpointed) after this step; a rerun continues the same schedule

    def total_steps(self, world_size: int = 1) -> int:
        if self.tokens is None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * world_size * self.seq_len))


# Settings that a resumed run must share with the checkpoint (the others only say when to stop, log or save).
RESUME_KEYS = ("steps", "tokens", "seq_len", "batch_size", "lr", "min_lr", "warmup_steps", "beta1", "beta2",
                "weight_decay", "grad_clip", "seed")


class AlignmentResumeError(ValueError):
    """A checkpoint in the run directory belongs to a different alignment run."""


# ---------------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------------

def student_config(teacher_config, lightning_backend: str = "auto"):
    """The MiniCPMSALAConfig of an all-lightning student of this teacher (the conversion's config rewrite)."""
    from sala_train.conversion import sala_config_for  # lazy: conversion imports this package

    config = sala_config_for(teacher_config, LayerPlan((LIGHTNING,) * teacher_config.num_hidden_layers))
    config.lightning_backend = lightning_backend
    return config


def initial_student_weights(attention: MiniCPMAttention, config, generator: torch.Generator) -> dict:
    """A lightning student's weights from a teacher attention layer (SPEC 3), fp32 on the CPU: q_proj, o_proj
    copied; k_proj, v_proj expanded from the KV heads to all heads (head i takes KV head i // group); q_norm,
    k_norm, o_norm ones; z_proj normal(0, init_std) like the conversion's new projections."""
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    group = heads // kv_heads

    def expand(weight):  # [kv_heads * d, hidden] -> [heads * d, hidden]
        hidden = weight.shape[-1]
        return weight.view(kv_heads, d, hidden).repeat_interleave(group, dim=0).reshape(heads * d, hidden)

    def copy(weight):
        return weight.detach().float().cpu().clone()

    z_shape = (heads * d, config.hidden_size)
    return {
        "q_proj.weight": copy(attention.q_proj.weight),
        "k_proj.weight": expand(copy(attention.k_proj.weight)),
        "v_proj.weight": expand(copy(attention.v_proj.weight)),
        "o_proj.weight": copy(attention.o_proj.weight),
        "z_proj.weight": torch.empty(z_shape).normal_(0.0, init_std(config, "z_proj.weight"), generator=generator),
        "q_norm.weight": torch.ones(d),
        "k_norm.weight": torch.ones(d),
        "o_norm.weight": torch.ones(heads * d),
    }


def build_students(teacher: MiniCPMForCausalLM, *, lightning_backend: str = "auto", seed: int = 0) -> nn.ModuleList:
    """One LightningMixer per teacher layer (fp32, on the teacher's device), initialised from its attention."""
    config = student_config(teacher.config, lightning_backend)
    generator = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    students = nn.ModuleList()
    for i, layer in enumerate(teacher.model.layers):
        with torch.device("meta"):  # no random init of weights that are replaced at once
            student = LightningMixer(config, i)
        student.load_state_dict(initial_student_weights(layer.self_attn, config, generator), strict=True, assign=True)
        students.append(student.to(device))
    return students


def student_state_dict(students: nn.ModuleList) -> dict[str, torch.Tensor]:
    """{model.layers.{i}.self_attn.{name}: tensor}, fp32 on the CPU: the naming of the conversion's ``aligned``."""
    return {STUDENT_PREFIX.format(i) + name: t.detach().cpu().contiguous()
            for i, student in enumerate(students) for name, t in student.state_dict().items()}


def load_student_state_dict(students: nn.ModuleList, path: str | os.PathLike) -> None:
    tensors = load_file(str(path))
    for i, student in enumerate(students):
        prefix = STUDENT_PREFIX.format(i)
        own = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
        try:
            student.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise AlignmentResumeError(f"{path}: the tensors of student {i} ({prefix}*) do not fit this teacher: "
                                       f"{err}") from err


def save_students(students: nn.ModuleList, path: str | os.PathLike) -> Path:
    """Write ``students.safetensors`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(student_state_dict(students), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unwrap(student: nn.Module) -> nn.Module:
    return student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student


def run_student(student: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention) -> torch.Tensor:
    """A lightning student on the inputs of a teacher attention: x [B, T, hidden] (the normed layer input), the
    teacher's rotary cos, sin [B, T, head_dim] and AttentionInputs -> [B, T, hidden] (the student's dtype, or
    x's under autocast). A bf16 teacher runs its fp32 students under autocast to bf16."""
    mixer = _unwrap(student)
    if cos.shape[-1] != mixer.head_dim:
        raise ValueError(f"student {mixer.layer_idx} has head_dim {mixer.head_dim}, the teacher's rotary "
                         f"embedding {cos.shape[-1]}")
    lower_precision = x.dtype != mixer.q_proj.weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=lower_precision):
        return student(x, {mixer.head_dim: (cos, sin)}, attention)


@contextmanager
def attention_tap(teacher: MiniCPMForCausalLM, fn: Callable):
    """While active, ``fn(layer_idx, x, cos, sin, attention, output)`` runs right after every attention layer of
    the teacher, with that layer's inputs and its output [B, T, hidden] (before the residual scale)."""
    signature = inspect.signature(MiniCPMAttention.forward)

    def hook(layer_idx, module, args, kwargs, output):
        a = signature.bind(module, *args, **kwargs).arguments
        fn(layer_idx, a["x"], a["cos"], a["sin"], a["attention"], output)

    handles = [layer.self_attn.register_forward_hook(partial(hook, i), with_kwargs=True)
               for i, layer in enumerate(teacher.model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def alignment_mse(teacher: MiniCPMForCausalLM, students, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer MSE [L] of the students against the teacher's attention outputs on input_ids [B, T]."""
    mse = torch.zeros(len(students))

    def measure(i, x, cos, sin, attention, output):
        mse[i] = F.mse_loss(run_student(students[i], x, cos, sin, attention).float(), output.float()).cpu()

    with attention_tap(teacher, measure):
        teacher.model(input_ids=input_ids)
    return mse


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def learning_rate(step: int, config: AlignConfig, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


class SequenceOrder:
    """Which training sequences make up the global batch of each step: epoch after epoch, each a permutation
    seeded by (seed, epoch). A function of the step alone, so a resumed run reads what the first would have."""

    def __init__(self, num_sequences: int, seed: int):
        self.num_sequences, self.seed = num_sequences, seed
        self._epoch, self._permutation = -1, None

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.num_sequences)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_sequences, generator=generator)
        return int(self._permutation[i])

    def batch(self, step: int, global_batch: int) -> torch.Tensor:
        """int64 [global_batch] sequence indices of this step; rank r takes slice r of it."""
        start = step * global_batch
        return torch.tensor([self._index(p) for p in range(start, start + global_batch)], dtype=torch.int64)


def alignment_step(teacher: MiniCPMForCausalLM, students, input_ids: torch.Tensor) -> torch.Tensor:
    """One teacher forward on input_ids [B, T] with every student's MSE backward inside it (gradients
    accumulate into the students); returns the per-layer MSE [L], detached."""
    mse = torch.zeros(len(students), device=input_ids.device)

    def train_student(i, x, cos, sin, attention, output):
        with torch.enable_grad():
            loss = F.mse_loss(run_student(students[i], x.detach(), cos, sin, attention).float(),
                              output.detach().float())
            loss.backward()
        mse[i] = loss.detach()

    with torch.no_grad(), attention_tap(teacher, train_student):
        teacher.model(input_ids=input_ids)
    return mse


@dataclass
class AlignmentResult:
    step: int  # steps done (all of them when finished)
    total_steps: int
    tokens: int  # tokens seen by all ranks
    first_mse: list[float]  # per layer, at step 1
    last_mse: list[float]  # per layer, at the last step

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_identity(config: AlignConfig, world_size: int, data_fingerprint: str, students) -> dict:
    return {**{k: getattr(config, k) for k in RESUME_KEYS}, "world_size": world_size,
            "data_fingerprint": data_fingerprint, "num_students": len(students)}


def save_checkpoint(directory: Path, students, optimizer, state: dict) -> None:
    """Replace ``directory`` atomically with students.safetensors, optimizer.pt and state.json."""
    with atomic_directory(directory) as staging:
        save_file(student_state_dict(students), str(staging / "students.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_checkpoint(directory: Path, students, optimizer, identity: dict) -> dict:
    """Restore students, optimizer and RNG from ``directory``; returns its state.json. Raises
    AlignmentResumeError when the checkpoint was made with other settings or data."""
    state_file = directory / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise AlignmentResumeError(f"{state_file}: not valid JSON ({err}); delete {directory} to start over") from err
    for key, value in identity.items():
        if state.get("identity", {}).get(key) != value:
            raise AlignmentResumeError(
                f"{state_file}: the checkpoint was made with {key} = {state.get('identity', {}).get(key)!r}, this "
                f"run has {value!r}. Use the same settings to resume, or another output directory to start over")
    load_student_state_dict(students, directory / "students.safetensors")
    device = next(students.parameters()).device
    saved = torch.load(directory / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["cpu_rng"].cpu())
    return state


def align_students(
    teacher: MiniCPMForCausalLM,
    students: nn.ModuleList,
    sequences: torch.Tensor,
    config: AlignConfig,
    run_dir: str | os.PathLike,
    *,
    data_fingerprint: str = "",
    progress: bool = True,
) -> AlignmentResult:
    """Train ``students`` in place on ``sequences`` (int64 [N, seq_len], the same on every rank), resuming from
    ``run_dir/checkpoint`` when it exists. Stops after ``config.stop_at`` steps if set, else at the end of the
    schedule. Writes ``run_dir/checkpoint/`` and ``run_dir/log.jsonl`` (rank 0)."""
    rank, world = rank_and_world()
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoint"
    device = next(teacher.parameters()).device
    teacher.eval().requires_grad_(False)
    students.train().requires_grad_(True)
    if sequences.ndim != 2 or sequences.shape[1] != config.seq_len:
        raise ValueError(f"sequences must be [num_sequences, align.seq_len = {config.seq_len}], "
                         f"got {list(sequences.shape)}")

    total = config.total_steps(world)
    end = total if config.stop_at is None else min(total, config.stop_at)
    optimizer = torch.optim.AdamW(students.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                  weight_decay=config.weight_decay)
    identity = _run_identity(config, world, data_fingerprint, students)
    step, first_mse, last_mse = 0, None, None
    if (checkpoint_dir / "state.json").is_file():
        state = load_checkpoint(checkpoint_dir, students, optimizer, identity)
        step, first_mse, last_mse = state["step"], state["first_mse"], state["last_mse"]
        if rank == 0:
            log.info("resuming the alignment from %s at step %d of %d", checkpoint_dir, step, total)

    if world > 1:  # after loading: DDP broadcasts rank 0's parameters when it wraps them
        device_ids = [device.index] if device.type == "cuda" else None
        replicas = [nn.parallel.DistributedDataParallel(s, device_ids=device_ids) for s in students]
    else:
        replicas = list(students)
    order = SequenceOrder(sequences.shape[0], config.seed)
    b = config.batch_size
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=end, initial=step, desc="aligning students", unit="step", disable=not progress or rank != 0)
    while step < end:
        lr = learning_rate(step, config, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = order.batch(step, b * world)[rank * b : (rank + 1) * b]
        optimizer.zero_grad(set_to_none=True)
        mse = alignment_step(teacher, replicas, sequences[indices].to(device))
        for student in students:
            nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        step += 1

        if world > 1:
            dist.all_reduce(mse)
            mse /= world
        last_mse = mse.tolist()
        first_mse = first_mse or last_mse
        bar.update(1)
        bar.set_postfix(mse=f"{sum(last_mse) / len(last_mse):.4g}", lr=f"{lr:.2e}")
        if rank == 0 and (step % config.log_every == 0 or step == end):
            log.info("align step %d/%d lr %.3e mse per layer %s", step, total, lr,
                     " ".join(f"{m:.4g}" for m in last_mse))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "lr": lr, "mse": last_mse}) + "\n")
        if step % config.checkpoint_every == 0 or step == end:
            if rank == 0:
                save_checkpoint(checkpoint_dir, students, optimizer,
                                {"step": step, "total_steps": total, "identity": identity, "first_mse": first_mse,
                                 "last_mse": last_mse, "config": asdict(config)})
            if world > 1:
                dist.barrier()
    bar.close()
    return AlignmentResult(step, total, step * b * world * config.seq_len, first_mse or [], last_mse or [])
