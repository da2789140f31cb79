"""`sala-generate`: load a checkpoint and its tokenizer, generate a continuation of a prompt.

    sala-generate model_dir=runs/demo/teacher prompt="Once upon a time" max_new_tokens=40
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import hydra
import torch
from omegaconf import OmegaConf

from .models import MiniCPMForCausalLM
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    model_dir: str = "???"
    prompt: str = "The"
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: Optional[str] = None
    # tokenizer directory; null = the one saved with the checkpoint
    tokenizer: Optional[str] = None


def load_model(model_dir: str, **kwargs):
    """The teacher or the SALA student, by the model_type of the checkpoint's config.json."""
    import json
    from pathlib import Path

    config_file = Path(model_dir) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type == "minicpm_sala":
        from .models.sala import MiniCPMSALAForCausalLM

        return MiniCPMSALAForCausalLM.from_pretrained(model_dir, **kwargs)
    return MiniCPMForCausalLM.from_pretrained(model_dir, **kwargs)


def generate_text(cfg: GenerateConfig) -> str:
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model_dir)
    model = load_model(cfg.model_dir, dtype=cfg.dtype, device=cfg.device)
    ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(cfg.device)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    new = out.shape[1] - ids.shape[1]
    log.info("generated %d tokens in %.2f s", new, time.perf_counter() - start)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@hydra.main(version_base="1.3", config_path="pkg://sala_train.recipes", config_name="generate")
def _main(cfg) -> None:
    cfg: GenerateConfig = OmegaConf.to_object(cfg)
    text = generate_text(cfg)
    print(f"prompt:     {cfg.prompt}")
    print(f"generated:  {text}")


def main() -> None:
    from .config import register_configs

    register_configs()
    _main()


if __name__ == "__main__":
    main()
