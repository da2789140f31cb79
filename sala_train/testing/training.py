"""A tiny teacher, its converted student and a two-stage run, shared by the trainer and backend tests
(module-level functions, so that processes started by ``run_distributed`` can build them too)."""

from __future__ import annotations

import json
from pathlib import Path

# InfLLM-V2 scaled down so that 128-token sequences use the sparse path
TINY_SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=2, dense_len=96)


def make_tiny_checkpoints(root: str | Path, num_attention_heads: int = 2, num_key_value_heads: int = 1) -> Path:
    """root/teacher: a random 2-layer MiniCPM-4 (width multiplier 2, so the muP groups differ);
    root/student: its SALA conversion with plan "SL". Tensor parallelism over 2 ranks needs 2 KV heads."""
    from sala_train.conversion import convert
    from sala_train.layer_selection import LayerPlan
    from sala_train.make_teacher import make_teacher
    from sala_train.models import MiniCPMConfig

    root = Path(root)
    config = MiniCPMConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=num_attention_heads,
                           num_key_value_heads=num_key_value_heads, head_dim=16, max_position_embeddings=512,
                           scale_emb=12.0, scale_depth=1.4, dim_model_base=16, eos_token_id=[2, 4])
    make_teacher(config, root / "teacher", progress=False)
    convert(root / "teacher", LayerPlan.parse("SL"), root / "student", sparse_config=TINY_SPARSE, progress=False)
    return root


def tiny_train_config(checkpoints: str | Path, run_dir: str | Path, **overrides):
    """Two stages on the committed text: KL alignment of the lightning mixer only (2 steps), then everything
    with cross-entropy, sparse on (2 steps; accumulation 2 on one process, 1 on two); a checkpoint after every
    step. ``overrides`` set TrainConfig fields (backend=..., eval_lengths=..., teacher=None, ...)."""
    from sala_train.data.config import DataConfig, SourceConfig
    from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT
    from sala_train.train.config import StageConfig, TrainConfig
    from sala_train.train.schedules import ScheduleConfig

    checkpoints = Path(checkpoints)
    data = DataConfig(sources=[SourceConfig(path=str(DEFAULT_SAMPLE_TEXT), type="text")],
                      cache_dir=str(checkpoints / "data_cache"))
    stages = [
        StageConfig(name="align", trainable=["lightning"], loss="kl", seq_len=32, tokens=256, global_batch_tokens=128,
                    micro_batch_size=2, schedule=ScheduleConfig(kind="cosine", lr=1e-3, final_lr=1e-4), data=data,
                    save_every=1, export=False),
        StageConfig(name="long", seq_len=128, tokens=512, global_batch_tokens=256, micro_batch_size=1, sparse=True,
                    schedule=ScheduleConfig(kind="exponential", lr=1e-3, final_lr=1e-4), data=data, save_every=1),
    ]
    cfg = TrainConfig(student=str(checkpoints / "student"), teacher=str(checkpoints / "teacher"), run_dir=str(run_dir),
                      stages=stages, keep_last=50)
    cfg.logging.wandb = "disabled"
    cfg.logging.progress = False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_losses(run_dir: str | Path) -> dict[int, float]:
    """Training loss by global step (evaluation records left out)."""
    return {r["global_step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
