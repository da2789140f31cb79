"""Typed config schemas (dataclasses) for the Hydra recipes; registered in Hydra's ConfigStore."""

from .model import MiniCPMModelSpec
from .store import register_configs

__all__ = ["MiniCPMModelSpec", "register_configs"]
