"""MiniCPMConfig: reads and writes the official MiniCPM-4 ``config.json`` (8B, 0.5B, any size).

Keys and meanings follow the released checkpoints (see SPEC section 1). Unknown keys of the official
file (``auto_map``, ``sparse_config``, ``mup_denominator``, ...) are kept and written back unchanged.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class UnsupportedConfigError(ValueError):
    """A config value this implementation does not support; the message names the key and the value."""


SUPPORTED_ROPE_TYPES = ("longrope",)


class MiniCPMConfig(PretrainedConfig):
    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 73448,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 2,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = (2, 73440),
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        # muP scalings. A missing key is neutral: scale_emb 1, no residual scaling (scale_depth null),
        # no logit scaling (dim_model_base null).
        scale_emb: float = 1.0,
        scale_depth: float | None = None,
        dim_model_base: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        # Stored under another attribute name: transformers 5 turns a `rope_scaling` attribute into its own
        # `rope_parameters` format; we keep the official MiniCPM dict as is (see `rope_scaling` below).
        self.rope_scaling_dict = _normalise_rope_scaling(rope_scaling)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        if isinstance(eos_token_id, tuple):
            eos_token_id = list(eos_token_id)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Some transformers versions keep these only as init arguments; make sure they are attributes.
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.validate()

    # -- the official key name --------------------------------------------------------------------------
    @property
    def rope_scaling(self) -> dict | None:
        return self.rope_scaling_dict

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        self.rope_scaling_dict = _normalise_rope_scaling(value)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["rope_scaling"] = out.pop("rope_scaling_dict", None)
        out.pop("rope_parameters", None)
        # The official files say `torch_dtype`; transformers 5 says `dtype`. Write both.
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return out

    def to_diff_dict(self) -> dict:
        out = self.to_dict()
        return out

    # -- derived quantities --------------------------------------------------------------------------
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def width_multiplier(self) -> float:
        """muP width multiplier ``hidden_size / dim_model_base`` (1 when the config has no base width)."""
        return self.hidden_size / self.dim_model_base if self.dim_model_base else 1.0

    @property
    def residual_scale(self) -> float:
        """Factor on every residual branch: ``scale_depth / sqrt(num_hidden_layers)`` (1 without scale_depth)."""
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise UnsupportedConfigError naming the key for values this implementation cannot run."""

        def fail(key, value, why):
            raise UnsupportedConfigError(f"config key '{key}' = {value!r} is not supported: {why}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, value, "expected a positive integer")
        if self.hidden_act != "silu":
            fail("hidden_act", self.hidden_act, "MiniCPM-4 uses a SwiGLU MLP, set it to 'silu'")
        if self.attention_bias:
            fail("attention_bias", self.attention_bias, "MiniCPM-4 has no biases; set it to false")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of it")
        if self.head_dim % 2:
            fail("head_dim", self.head_dim, "rotary embeddings need an even head_dim")
        if self.dim_model_base is not None and (not isinstance(self.dim_model_base, (int, float)) or self.dim_model_base <= 0):
            fail("dim_model_base", self.dim_model_base, "expected a positive number or null")
        for key in ("scale_emb", "scale_depth", "rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if value is None and key == "scale_depth":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                fail(key, value, "expected a positive number")
        rope = self.rope_scaling_dict
        if rope is not None:
            rope_type = rope.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                fail("rope_scaling.rope_type", rope_type, f"supported: {list(SUPPORTED_ROPE_TYPES)} or rope_scaling null")
            for key in ("long_factor", "short_factor"):
                factors = rope.get(key)
                if not isinstance(factors, (list, tuple)) or len(factors) != self.head_dim // 2:
                    found = len(factors) if isinstance(factors, (list, tuple)) else factors
                    fail(f"rope_scaling.{key}", found, f"expected a list of head_dim / 2 = {self.head_dim // 2} numbers")
                if any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
                    fail(f"rope_scaling.{key}", factors, "factors must be positive numbers")
            orig = rope.get("original_max_position_embeddings")
            if not isinstance(orig, int) or orig <= 1:
                fail("rope_scaling.original_max_position_embeddings", orig, "expected an integer > 1")


def _normalise_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Accept the legacy ``type`` key for ``rope_type``; keep everything else as given."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise UnsupportedConfigError(f"config key 'rope_scaling' = {rope_scaling!r} is not supported: expected a dict or null")
    rope_scaling = dict(rope_scaling)
    if "rope_type" not in rope_scaling and "type" in rope_scaling:
        rope_scaling["rope_type"] = rope_scaling.pop("type")
    return rope_scaling
