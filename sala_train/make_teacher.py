"""`sala-make-teacher`: write a random-initialised MiniCPM-4 checkpoint in the official HF layout.

    sala-make-teacher model=tiny output_dir=runs/teacher            # recipes/model/tiny.yaml
    sala-make-teacher model=minicpm4_8b output_dir=/data/mc4-8b-random dtype=bfloat16

Tensors are generated and written one at a time into shards, so an 8B-shaped checkpoint needs about one
shard of RAM, not the whole model. The same seed gives the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from .checkpoint import ShardedCheckpointWriter, parse_size
from .config.model import MiniCPMModelSpec
from .models import MiniCPMConfig, MiniCPMForCausalLM
from .models.minicpm import init_std
from .tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class MakeTeacherConfig:
    model: MiniCPMModelSpec = field(default_factory=MiniCPMModelSpec)
    output_dir: str = "???"
    seed: int = 0
    dtype: str = "float32"
    max_shard_size: str = "5GB"
    # a local HF tokenizer directory to ship with the checkpoint; null = the tokenizer of sala-train
    tokenizer: Optional[str] = None


def make_teacher(
    config: MiniCPMConfig,
    output_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write a random MiniCPM-4 checkpoint of ``config``; returns the directory."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but model.vocab_size is "
                         f"{config.vocab_size}; raise model.vocab_size to at least {len(tokenizer)}")
    generator = torch.Generator().manual_seed(seed)
    shapes = MiniCPMForCausalLM.expected_tensor_shapes(config)
    hf_config = config.to_dict()
    hf_config["architectures"] = ["MiniCPMForCausalLM"]
    hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with ShardedCheckpointWriter(output_dir, max_shard_bytes=parse_size(max_shard_size)) as writer:
        for name, shape in tqdm(shapes.items(), desc="writing teacher", unit="tensor", disable=not progress):
            std = init_std(config, name)
            if std is None:
                tensor = torch.ones(shape)
            else:
                tensor = torch.empty(shape).normal_(0.0, std, generator=generator)
            writer.add(name, tensor.to(dtype))
        writer.write_json("config.json", hf_config)
        writer.write_json("generation_config.json", generation)
        for path in sorted(tokenizer_dir.iterdir()):
            if path.is_file():
                writer.copy_file(path, path.name)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    log.info("wrote a random MiniCPM-4 teacher with %.2fM parameters to %s", n_params / 1e6, output_dir)
    return Path(output_dir)


@hydra.main(version_base="1.3", config_path="pkg://sala_train.recipes", config_name="make_teacher")
def _main(cfg) -> None:
    cfg: MakeTeacherConfig = OmegaConf.to_object(cfg)
    make_teacher(
        cfg.model.to_hf_config(),
        cfg.output_dir,
        seed=cfg.seed,
        dtype=getattr(torch, cfg.dtype),
        max_shard_size=cfg.max_shard_size,
        tokenizer_dir=cfg.tokenizer,
    )


def main() -> None:
    from .config import register_configs

    register_configs()
    _main()


if __name__ == "__main__":
    main()
