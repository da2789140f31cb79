"""Typed schema of a training run (Hydra ConfigStore): stages, optimizer, backend, logging.

A run trains a converted SALA checkpoint through ``stages`` in order. Each stage has its own sequence
length, token budget, global batch (in tokens), data, trainable parameters, loss, LR schedule and sparse
setting; the number of optimizer steps and the gradient accumulation follow from the budget:

    accumulation = global_batch_tokens / (seq_len * micro_batch_size * data_parallel_size)
    steps        = ceil(tokens / global_batch_tokens)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..data.config import DataConfig
from .schedules import ScheduleConfig

LOSSES = ("ce", "sft", "kl", "ce+kl")
BACKENDS = ("torch", "deepspeed", "megatron")
WANDB_MODES = ("disabled", "offline", "online")


class RecipeError(ValueError):
    """A recipe asks for something impossible; raised before any model or data work, naming the key."""


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    mup: bool = True  # matrix LRs divided by the width multiplier (the paper's LRs are muP base rates)


@dataclass
class StageConfig:
    name: str = "stage"
    # parameter patterns (shortcuts: all, lightning, sparse, mixers, mlp, norms, embeddings; globs; re:...)
    trainable: List[str] = field(default_factory=lambda: ["all"])
    frozen: List[str] = field(default_factory=list)
    loss: str = "ce"  # ce | sft (labels already masked to assistant turns by the data) | kl | ce+kl
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    seq_len: int = 4096
    tokens: int = 0  # training-token budget of the stage
    global_batch_tokens: int = 0  # tokens per optimizer step over all ranks (0: one micro-batch per rank)
    micro_batch_size: int = 1  # packed sequences per rank per forward
    sparse: bool = False  # InfLLM-V2 on (the model's dense_len) or off (dense attention at any length)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end of the stage)
    export: bool = True  # HF-format export at the end of the stage

    def plan(self, data_parallel_size: int) -> tuple[int, int]:
        """(gradient accumulation, optimizer steps); a RecipeError names the key that makes it impossible."""
        key = f"stages[{self.name}]"
        if self.loss not in LOSSES:
            raise RecipeError(f"{key}.loss = {self.loss!r}; expected one of {list(LOSSES)}")
        if self.seq_len < 2 or self.micro_batch_size < 1:
            raise RecipeError(f"{key}: seq_len ({self.seq_len}) must be >= 2 and micro_batch_size "
                              f"({self.micro_batch_size}) >= 1")
        per_micro = self.seq_len * self.micro_batch_size * data_parallel_size
        global_batch = self.global_batch_tokens or per_micro
        if global_batch % per_micro:
            raise RecipeError(
                f"{key}.global_batch_tokens = {global_batch} is not a multiple of seq_len x micro_batch_size x "
                f"data-parallel size = {self.seq_len} x {self.micro_batch_size} x {data_parallel_size} = {per_micro}")
        if self.tokens < global_batch:
            raise RecipeError(f"{key}.tokens = {self.tokens} is smaller than one optimizer step "
                              f"(global_batch_tokens = {global_batch})")
        return global_batch // per_micro, math.ceil(self.tokens / global_batch)


@dataclass
class BackendConfig:
    name: str = "torch"  # torch (one process or DDP) | deepspeed | megatron
    zero_stage: int = 2
    offload_optimizer: bool = False
    bf16: bool = False
    activation_checkpointing: bool = False
    # with activation_checkpointing: recompute only the first N layers; the others keep their activations
    # (memory traded for less recomputation, as Megatron's recompute-num-layers). null: every layer
    checkpoint_layers: Optional[int] = None
    tensor_parallel: int = 1  # megatron: ranks that split heads and MLP columns
    context_parallel: int = 1  # megatron: ranks that split every sequence (zigzag); seq_len % (2 x this) == 0
    # megatron: AdamW state split over the ranks that hold the same parameters (data x context parallel, one
    # TP rank; ZeRO-1). null: on wherever more than one rank holds them. deepspeed shards with zero_stage.
    shard_optimizer: Optional[bool] = None


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # disabled | offline | online
    project: str = "sala-train"
    run_name: Optional[str] = None
    progress: bool = True  # a progress bar on rank 0; false: a log line every log_seconds instead (batch jobs)
    log_seconds: float = 30.0


@dataclass
class TrainConfig:
    # a SALA checkpoint directory (the conversion's output, or an export of a run); a dense MiniCPM-4 checkpoint
    # (model_type "minicpm") trains as the dense model, e.g. to pretrain a teacher from `sala-make-teacher`
    student: str = "???"
    teacher: Optional[str] = None  # the frozen MiniCPM-4 teacher, for KL distillation
    tokenizer: Optional[str] = None  # default: the student's directory
    run_dir: str = "???"
    stages: List[StageConfig] = field(default_factory=list)
    start_stage: int = 0  # begin at this stage (a run can start at any stage from any checkpoint)
    seed: int = 0
    resume: bool = True  # continue from the latest checkpoint in run_dir if there is one
    keep_last: int = 2  # checkpoints kept per run
    max_bad_steps: int = 5  # consecutive steps with a NaN/inf loss or gradient before the run stops
    # stop as on preemption (checkpoint after the current step, exit code 75; the same command resumes) once this
    # many minutes have passed since the trainer started: for jobs under a wall-clock limit. Leave room for one
    # step and one checkpoint write. null: no limit
    time_limit_minutes: Optional[float] = None
    eval_lengths: List[int] = field(default_factory=list)  # held-out loss at these lengths at stage ends
    backend: BackendConfig = field(default_factory=BackendConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, data_parallel_size: int = 1) -> None:
        if not self.stages:
            raise RecipeError("stages is empty: a run needs at least one stage")
        if not 0 <= self.start_stage < len(self.stages):
            raise RecipeError(f"start_stage = {self.start_stage} is outside 0..{len(self.stages) - 1}")
        if self.backend.checkpoint_layers is not None and self.backend.checkpoint_layers < 0:
            raise RecipeError(f"backend.checkpoint_layers = {self.backend.checkpoint_layers}: the number of layers "
                              "to recompute (>= 0), or null for all of them")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise RecipeError(f"time_limit_minutes = {self.time_limit_minutes}: a positive number of minutes, or "
                              "null for no limit")
        if self.backend.name not in BACKENDS:
            raise RecipeError(f"backend.name = {self.backend.name!r}; expected one of {list(BACKENDS)}")
        if self.logging.wandb not in WANDB_MODES:
            raise RecipeError(f"logging.wandb = {self.logging.wandb!r}; expected one of {list(WANDB_MODES)}")
        if self.backend.shard_optimizer and self.backend.name != "megatron":
            raise RecipeError(f"backend.shard_optimizer = true is the megatron backend's ZeRO-1, not "
                              f"backend.name={self.backend.name}: deepspeed shards the optimizer with "
                              "backend.zero_stage, the torch backend keeps AdamW whole on every rank")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            if "kl" in stage.loss and not self.teacher:
                raise RecipeError(f"stages[{stage.name}].loss = {stage.loss!r} needs a teacher checkpoint: set teacher=DIR")
            stage.plan(data_parallel_size)
            chunks = 2 * self.backend.context_parallel
            if chunks > 2 and stage.seq_len % chunks:
                raise RecipeError(f"stages[{stage.name}].seq_len = {stage.seq_len} must be a multiple of 2 x "
                                  f"backend.context_parallel = {chunks} (the zigzag split cuts every sequence "
                                  f"into {chunks} chunks)")
