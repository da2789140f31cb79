"""The SALA hybrid student (SPEC 2): config, model, mixers, op backends, hybrid cache, remote-code export."""

from .configuration_minicpm_sala import LIGHTNING, MIXER_KINDS, SPARSE, MiniCPMSALAConfig, SALAConfig
from .modeling_minicpm_sala import (
    LIGHTNING_BACKENDS,
    MIXERS,
    SPARSE_BACKENDS,
    LightningMixer,
    MiniCPMSALAForCausalLM,
    MiniCPMSALAModel,
    SALACache,
    SALAForCausalLM,
    SALAModel,
    SparseMixer,
)

__all__ = [
    "LIGHTNING", "LIGHTNING_BACKENDS", "MIXERS", "MIXER_KINDS", "SPARSE", "SPARSE_BACKENDS", "LightningMixer",
    "MiniCPMSALAConfig", "MiniCPMSALAForCausalLM", "MiniCPMSALAModel", "SALACache", "SALAConfig",
    "SALAForCausalLM", "SALAModel", "SparseMixer",
]
