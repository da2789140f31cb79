"""Models: the MiniCPM-4 teacher (and, with later issues, the SALA hybrid student)."""

from .cache import KVCache
from .configuration_minicpm import MiniCPMConfig, UnsupportedConfigError
from .minicpm import MiniCPMForCausalLM, MiniCPMModel

__all__ = ["KVCache", "MiniCPMConfig", "MiniCPMForCausalLM", "MiniCPMModel", "UnsupportedConfigError"]
