"""Training building blocks: LR schedules, trainable-parameter selection and muP parameter groups, losses."""

from .losses import (
    IGNORE_INDEX,
    assistant_labels,
    chunked_causal_lm_loss,
    chunked_cross_entropy,
    chunked_kl_distillation,
    cross_entropy,
    kl_distillation,
    layer_alignment_mse,
    next_token_mask,
    next_token_targets,
    sft_cross_entropy,
)
from .params import SHORTCUTS, TrainableSelectionError, build_adamw, match_parameters, param_groups, select_trainable
from .schedules import (
    ScheduleConfig,
    ScheduleError,
    WarmupStableDecay,
    build_schedule,
    constant,
    cosine_decay,
    exponential_decay,
    lambda_lr,
    set_learning_rate,
    wsd,
)

__all__ = [
    "IGNORE_INDEX", "SHORTCUTS", "ScheduleConfig", "ScheduleError", "TrainableSelectionError", "WarmupStableDecay",
    "assistant_labels", "build_adamw", "build_schedule", "chunked_causal_lm_loss", "chunked_cross_entropy",
    "chunked_kl_distillation", "constant", "cosine_decay", "cross_entropy", "exponential_decay", "kl_distillation",
    "lambda_lr", "layer_alignment_mse", "match_parameters", "next_token_mask", "next_token_targets", "param_groups",
    "select_trainable", "set_learning_rate", "sft_cross_entropy", "wsd",
]
