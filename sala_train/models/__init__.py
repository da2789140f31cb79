"""Models: the MiniCPM-4 teacher and the SALA hybrid student."""

from .cache import KVCache
from .configuration_minicpm import MiniCPMConfig, UnsupportedConfigError
from .minicpm import MiniCPMForCausalLM, MiniCPMModel
from .sala import MiniCPMSALAConfig, MiniCPMSALAForCausalLM, SALACache, SALAConfig, SALAForCausalLM

__all__ = [
    "KVCache", "MiniCPMConfig", "MiniCPMForCausalLM", "MiniCPMModel", "MiniCPMSALAConfig", "MiniCPMSALAForCausalLM",
    "SALACache", "SALAConfig", "SALAForCausalLM", "UnsupportedConfigError",
]


def _register_with_transformers() -> None:
    """Let transformers' Auto classes (AutoConfig, AutoTokenizer reading config.json, AutoModelForCausalLM)
    resolve model_type "minicpm" and "minicpm_sala" to our classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type, config_class, model_class in (("minicpm", MiniCPMConfig, MiniCPMForCausalLM),
                                                  ("minicpm_sala", MiniCPMSALAConfig, MiniCPMSALAForCausalLM)):
        try:
            AutoConfig.register(model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered (by us, or by a transformers release with its own model_type)
            pass


_register_with_transformers()
