"""`python -m sala_train.select`: HALO layer selection, MiniCPM-4 checkpoint -> layer plan + aligned students.

    python -m sala_train.select teacher=runs/teacher output=runs/select
    python -m sala_train.select teacher=runs/teacher output=runs/select selection.method=evenly_spaced
    torchrun --nproc_per_node 8 -m sala_train.select teacher=/data/mc4-8b output=runs/select-8b \
        dtype=bfloat16 align.tokens=320000000

Rerunning a command into the same output directory resumes the alignment from its last checkpoint and reuses a
finished sweep (a new selection.* then costs seconds). The output feeds the conversion:

    python -m sala_train.convert teacher=runs/teacher plan=runs/select/plan.json output=runs/student \
        aligned=runs/select/students.safetensors
"""

from __future__ import annotations

import hydra
from omegaconf import OmegaConf

from sala_train.layer_selection import HaloConfig, run_halo


@hydra.main(version_base="1.3", config_path="pkg://sala_train.recipes", config_name="select")
def _main(cfg) -> None:
    config: HaloConfig = OmegaConf.to_object(cfg)
    plan = run_halo(config)
    if plan is not None:
        print(f"plan {plan.format()}: sparse layers {plan.sparse_layers} ({plan.evidence['method']}); "
              f"wrote {config.output}/plan.json, scores.csv, scores.png, students.safetensors")


def main() -> None:
    from sala_train.config import register_configs

    register_configs()
    _main()


if __name__ == "__main__":
    main()
