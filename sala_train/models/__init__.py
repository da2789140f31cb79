"""Models: the MiniCPM-4 teacher (and, with later issues, the SALA hybrid student)."""

from .cache import KVCache
from .configuration_minicpm import MiniCPMConfig, UnsupportedConfigError
from .minicpm import MiniCPMForCausalLM, MiniCPMModel

__all__ = ["KVCache", "MiniCPMConfig", "MiniCPMForCausalLM", "MiniCPMModel", "UnsupportedConfigError"]


def _register_with_transformers() -> None:
    """Let transformers' Auto classes (AutoConfig, AutoTokenizer reading config.json, AutoModelForCausalLM)
    resolve model_type "minicpm" to our classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("minicpm", MiniCPMConfig)
        AutoModelForCausalLM.register(MiniCPMConfig, MiniCPMForCausalLM)
    except ValueError:  # already registered (by us, or by a transformers release with its own "minicpm")
        pass


_register_with_transformers()
