"""`python -m sala_train.train`: train a converted SALA checkpoint through the stages of a recipe.

    python -m sala_train.train +experiment=tiny_cpu student=runs/demo/student teacher=runs/demo/teacher \
        run_dir=runs/demo/train
    torchrun --nproc-per-node 2 -m sala_train.train +experiment=tiny_cpu ...      # data parallel
    launch/torchrun.sh, sbatch launch/slurm/train.sbatch, -m +launcher=slurm     # see docs/launch.md

On SIGUSR1 / SIGTERM the trainer writes a checkpoint and exits with code 75 (sala_train.train.preemption); the
same command resumes from it. Under Hydra's submitit launcher, rank 0 then requeues the SLURM job itself.

The resolved config and the git revision are written to run_dir before training starts.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import hydra
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@hydra.main(version_base="1.3", config_path="pkg://sala_train.recipes", config_name="train")
def _main(cfg) -> None:
    import os

    from .config import TrainConfig
    from .preemption import Preempted, requeue_submitit_job
    from .trainer import Trainer

    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        # Hydra's submitit launcher starts one process per SLURM task: torch.distributed's variables from SLURM's
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # MASTER_ADDR: the first node's name
        if os.environ.get("SLURM_JOB_NUM_NODES") == "1":
            os.environ["MASTER_ADDR"] = "127.0.0.1"  # one node: loopback, however (or whether) its name resolves
    resolved = OmegaConf.to_yaml(cfg, resolve=True)  # run_dir of a submitit sweep comes from ${hydra:...}
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)
    trainer = Trainer(train_cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = Path(train_cfg.run_dir)
        (run_dir / "config.yaml").write_text(resolved)
        (run_dir / "git_revision.txt").write_text(git_revision() + "\n")
    try:
        trainer.run()
    except Preempted:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            requeue_submitit_job()  # under sbatch, launch/slurm/train.sbatch requeues instead
        close_process_group()  # every rank stopped after the same step
        raise
    close_process_group()


def close_process_group() -> None:
    """After a run that every rank finished (not after an error: a rank stuck in a collective would hang it):
    NCCL warns about leaked communicators at exit otherwise."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    from ..config import register_configs
    from .preemption import watch_preemption

    register_configs()
    with watch_preemption():  # from the start: a signal while the model loads stops the run after its first step
        _main()


if __name__ == "__main__":
    main()
