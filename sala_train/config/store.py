"""Registers every schema with Hydra's ConfigStore (once)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

_registered = False


def register_configs() -> None:
    global _registered
    if _registered:
        return
    from ..generate import GenerateConfig
    from ..make_teacher import MakeTeacherConfig

    store = ConfigStore.instance()
    store.store(name="make_teacher_schema", node=MakeTeacherConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    _registered = True
