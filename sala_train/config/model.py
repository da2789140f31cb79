"""The model group of the recipes: the keys of an official MiniCPM-4 config.json, typed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class MiniCPMModelSpec:
    """A MiniCPM-4 architecture; field names and meanings are those of the official config.json."""

    vocab_size: int = 73448
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    max_position_embeddings: int = 32768
    initializer_range: float = 0.1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "longrope", "long_factor": [...], "short_factor": [...], "original_max_position_embeddings": N}
    rope_scaling: Optional[dict[str, Any]] = None
    scale_emb: float = 12.0
    scale_depth: Optional[float] = 1.4
    dim_model_base: Optional[int] = 256
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: Any = field(default_factory=lambda: [2, 73440])
    pad_token_id: int = 2

    def to_hf_config(self):
        from ..models import MiniCPMConfig

        return MiniCPMConfig(**asdict(self))
