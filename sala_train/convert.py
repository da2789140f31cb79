"""`python -m sala_train.convert`: MiniCPM-4 checkpoint + layer plan -> SALA checkpoint.

    python -m sala_train.convert teacher=runs/teacher plan=runs/select/plan.json output=runs/student
    python -m sala_train.convert teacher=runs/teacher plan=SLLS output=runs/student   # a pattern works too
    python -m sala_train.convert teacher=runs/teacher plan=SLLS output=runs/check verify=true stats=true
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    teacher: str = "???"
    # a plan.json written by layer selection, or a pattern such as "SLLLS"
    plan: str = "???"
    output: str = "???"
    # InfLLM-V2 settings of the student (empty: the released ones, SPEC 2.4)
    sparse_config: dict[str, Any] = field(default_factory=dict)
    # aligned lightning students from the selection run (safetensors file or directory)
    aligned: Optional[str] = None
    verify: bool = False
    seed: int = 0
    dtype: Optional[str] = None
    max_shard_size: str = "2GB"
    overwrite: bool = False
    # after converting: per-layer hidden-state statistics of student vs teacher on sample text
    # (printed, and written to <output>/layer_stats.csv)
    stats: bool = False


def load_plan(plan: str):
    from sala_train.layer_selection import LayerPlan

    return LayerPlan.load(plan) if plan.endswith(".json") or Path(plan).is_file() else LayerPlan.parse(plan)


@hydra.main(version_base="1.3", config_path="pkg://sala_train.recipes", config_name="convert")
def _main(cfg) -> None:
    from sala_train.conversion import convert

    cfg: ConvertConfig = OmegaConf.to_object(cfg)
    report = convert(cfg.teacher, load_plan(cfg.plan), cfg.output, sparse_config=cfg.sparse_config,
                     aligned=cfg.aligned, verify=cfg.verify, seed=cfg.seed,
                     dtype=getattr(torch, cfg.dtype) if cfg.dtype else None, max_shard_size=cfg.max_shard_size,
                     overwrite=cfg.overwrite)
    print(f"wrote {cfg.output}: {len(report.mapped)} tensors mapped, {len(report.created)} created, "
          f"{len(report.dropped)} dropped (conversion_report.md)")
    if cfg.stats:
        from sala_train.conversion import format_layer_statistics, layer_statistics, write_layer_statistics

        stats = layer_statistics(cfg.teacher, cfg.output)
        write_layer_statistics(stats, Path(cfg.output) / "layer_stats.csv")
        print(format_layer_statistics(stats))


def main() -> None:
    from sala_train.config import register_configs

    register_configs()
    _main()


if __name__ == "__main__":
    main()
