"""Registers every schema with Hydra's ConfigStore (once)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

_registered = False


def register_configs() -> None:
    global _registered
    if _registered:
        return
    from ..convert import ConvertConfig
    from ..generate import GenerateConfig
    from ..layer_selection import HaloConfig
    from ..make_teacher import MakeTeacherConfig
    from ..train.config import TrainConfig

    from omegaconf import OmegaConf

    from ..tokenizer import DEFAULT_SAMPLE_TEXT

    # ${sample_text:} in a recipe: the English text committed with sala-train (demo and test data)
    OmegaConf.register_new_resolver("sample_text", lambda: str(DEFAULT_SAMPLE_TEXT), replace=True)
    store = ConfigStore.instance()
    store.store(name="convert_schema", node=ConvertConfig)
    store.store(name="make_teacher_schema", node=MakeTeacherConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="select_schema", node=HaloConfig)
    store.store(name="train_schema", node=TrainConfig)
    _registered = True
