"""MiniCPMSALAConfig: the ``minicpm_sala`` config.json of the released MiniCPM-SALA (SPEC 2.4).

The MiniCPM-4 keys keep their meaning (this class extends the teacher's config); the hybrid keys are:

    mixer_types           per layer: "minicpm4" (InfLLM-V2 sparse attention) or "lightning-attn" (linear)
    sparse_config         InfLLM-V2 settings of the sparse layers (kernel_size, kernel_stride, block_size,
                          init_blocks, window_size, topk, use_nope, dense_len)
    attn_use_rope         RoPE in the sparse layers (false: HyPE, SPEC 2.3)
    attn_use_output_gate  o_proj(attn * sigmoid(o_gate(x))) in the sparse layers
    lightning_use_rope    RoPE in the lightning layers (true)
    lightning_nh/_nkv     lightning query / key-value heads (equal: GQA is expanded at conversion)
    lightning_head_dim    lightning head size
    lightning_scale       "1/sqrt(d)" (released) or "1/d", the factor on q S
    qk_norm               per-head RMSNorm of q and k in the lightning layers (the released code applies
                          it to the lightning layers only; the sparse layers have none)
    use_output_gate       lightning output gate sigmoid(z_proj(x))
    use_output_norm       lightning o_norm over the whole H*d output vector

Keys of this project (not in the released file; a SALA-aware engine ignores them):

    attn_qk_norm          per-head RMSNorm of q and k in the sparse layers (SPEC 2.1 "default here: off")
    lightning_backend     op behind the lightning layers: "auto", "triton", "torch" or "fla"
    sparse_backend        op behind the sparse layers: "auto", "triton" or "torch"

``sparse_config.use_nope`` is kept as released; nothing here reads it (the sparse layers are NoPE through
``attn_use_rope``).

This file is copied into exported checkpoints (see remote_code.py): it imports sala_train only inside a try
block and, without sala_train, takes MiniCPMConfig from the copy saved next to it.
"""

from __future__ import annotations

try:
    from sala_train.models.configuration_minicpm import MiniCPMConfig, UnsupportedConfigError
except ImportError:  # run by transformers from a checkpoint without sala_train: the copy beside this file
    if __name__.startswith("sala_train."):  # a real import error inside sala_train: show it
        raise
    from .configuration_minicpm import MiniCPMConfig, UnsupportedConfigError

SPARSE = "minicpm4"
LIGHTNING = "lightning-attn"
MIXER_KINDS = (SPARSE, LIGHTNING)

# MiniCPM-SALA (32 layers): layers 0, 9, 16, 17, 22, 29, 30, 31 keep (sparse) attention (SPEC 2).
SALA_SPARSE_LAYERS = (0, 9, 16, 17, 22, 29, 30, 31)
SALA_MIXER_TYPES = tuple(SPARSE if i in SALA_SPARSE_LAYERS else LIGHTNING for i in range(32))

SALA_SPARSE_CONFIG = {
    "kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1, "window_size": 2048,
    "topk": 64, "use_nope": False, "dense_len": 8192,
}

LIGHTNING_SCALES = ("1/sqrt(d)", "1/d")
# Op backends by name; "auto" picks "triton" (sala_train's kernels) on a GPU, else "torch".
BACKENDS = {
    "lightning_backend": ("auto", "triton", "torch", "fla"),
    "sparse_backend": ("auto", "triton", "torch"),
}

AUTO_MAP = {
    "AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
    "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM",
}


class MiniCPMSALAConfig(MiniCPMConfig):
    model_type = "minicpm_sala"

    def __init__(
        self,
        mixer_types: list[str] | None = None,
        sparse_config: dict | None = None,
        attn_use_rope: bool = False,
        attn_use_output_gate: bool = True,
        attn_qk_norm: bool = False,
        lightning_use_rope: bool = True,
        lightning_nh: int = 32,
        lightning_nkv: int = 32,
        lightning_head_dim: int = 128,
        lightning_scale: str = "1/sqrt(d)",
        qk_norm: bool = True,
        use_output_gate: bool = True,
        use_output_norm: bool = True,
        lightning_backend: str = "auto",
        sparse_backend: str = "auto",
        max_position_embeddings: int = 524288,
        **kwargs,
    ):
        # Set before MiniCPMConfig.__init__, which ends by calling validate() (ours, below).
        if isinstance(mixer_types, str) or not isinstance(mixer_types, (list, tuple, type(None))):
            raise UnsupportedConfigError(f"config key 'mixer_types' = {mixer_types!r} is not supported: "
                                         f"expected a list with one of {list(MIXER_KINDS)} per layer")
        if not isinstance(sparse_config, (dict, type(None))):
            raise UnsupportedConfigError(f"config key 'sparse_config' = {sparse_config!r} is not supported: "
                                         "expected a dict or null")
        self.mixer_types = list(SALA_MIXER_TYPES if mixer_types is None else mixer_types)
        # Missing sparse_config keys take the released values, so that every layer sees the full dict.
        self.sparse_config = {**SALA_SPARSE_CONFIG, **(sparse_config or {})}
        self.attn_use_rope = attn_use_rope
        self.attn_use_output_gate = attn_use_output_gate
        self.attn_qk_norm = attn_qk_norm
        self.lightning_use_rope = lightning_use_rope
        self.lightning_nh = lightning_nh
        self.lightning_nkv = lightning_nkv
        self.lightning_head_dim = lightning_head_dim
        self.lightning_scale = lightning_scale
        self.qk_norm = qk_norm
        self.use_output_gate = use_output_gate
        self.use_output_norm = use_output_norm
        self.lightning_backend = lightning_backend
        self.sparse_backend = sparse_backend
        # Always ours: save_pretrained copies these modeling files next to the weights, whatever auto_map the
        # loaded config.json had (a hub export may name other files or prefix them with a repo id).
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(max_position_embeddings=max_position_embeddings, **kwargs)

    # -- derived quantities --------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.mixer_types) if kind == SPARSE]

    @property
    def lightning_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.mixer_types) if kind == LIGHTNING]

    @property
    def lightning_attention_scale(self) -> float:
        """The factor on ``q S`` in the lightning layers (``lightning_scale`` as a number)."""
        d = self.lightning_head_dim
        return {"1/sqrt(d)": d**-0.5, "1/d": 1.0 / d}[self.lightning_scale]

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """MiniCPM-4's checks, then the hybrid keys; errors name the key (UnsupportedConfigError)."""
        super().validate()

        def fail(key, value, why):
            raise UnsupportedConfigError(f"config key '{key}' = {value!r} is not supported: {why}")

        kinds = self.mixer_types
        if len(kinds) != self.num_hidden_layers:
            fail("mixer_types", f"a list of {len(kinds)}",
                 f"expected one mixer kind per layer, num_hidden_layers = {self.num_hidden_layers}")
        for i, kind in enumerate(kinds):
            if kind not in MIXER_KINDS:
                fail(f"mixer_types[{i}]", kind, f"known mixer kinds: {list(MIXER_KINDS)}")

        sparse = self.sparse_config
        unknown = sorted(set(sparse) - set(SALA_SPARSE_CONFIG))
        if unknown:
            fail("sparse_config", unknown, f"unknown keys; known: {sorted(SALA_SPARSE_CONFIG)}")
        if not isinstance(sparse["use_nope"], bool):
            fail("sparse_config.use_nope", sparse["use_nope"], "expected true or false")
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size", "dense_len"):
            value = sparse[key]
            if not _is_int(value) or value <= 0:
                fail(f"sparse_config.{key}", value, "expected a positive integer")
        for key in ("init_blocks", "topk"):
            value = sparse[key]
            if not _is_int(value) or value < 0:
                fail(f"sparse_config.{key}", value, "expected an integer >= 0")
        if sparse["block_size"] % sparse["kernel_stride"]:
            fail("sparse_config.block_size", sparse["block_size"],
                 f"must be a multiple of sparse_config.kernel_stride ({sparse['kernel_stride']})")
        if sparse["window_size"] % sparse["block_size"]:
            fail("sparse_config.window_size", sparse["window_size"],
                 f"must be a multiple of sparse_config.block_size ({sparse['block_size']})")

        for key in ("lightning_nh", "lightning_nkv", "lightning_head_dim"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                fail(key, value, "expected a positive integer")
        if self.lightning_nkv != self.lightning_nh:
            fail("lightning_nkv", self.lightning_nkv,
                 f"lightning layers are full multi-head (lightning_nh = {self.lightning_nh}); expand the KV "
                 "heads when converting (SPEC 3)")
        if self.lightning_use_rope and self.lightning_head_dim % 2:
            fail("lightning_head_dim", self.lightning_head_dim, "rotary embeddings need an even head_dim")
        lightning_longrope = self.lightning_use_rope and self.rope_scaling is not None
        if lightning_longrope and self.lightning_head_dim != self.head_dim:
            fail("rope_scaling", "longrope", f"its factors are per head_dim ({self.head_dim}) but "
                                             f"lightning_head_dim is {self.lightning_head_dim}")
        if self.lightning_scale not in LIGHTNING_SCALES:
            fail("lightning_scale", self.lightning_scale, f"supported: {list(LIGHTNING_SCALES)}")
        for key in ("attn_use_rope", "attn_use_output_gate", "attn_qk_norm", "lightning_use_rope", "qk_norm",
                    "use_output_gate", "use_output_norm"):
            if not isinstance(getattr(self, key), bool):
                fail(key, getattr(self, key), "expected true or false")
        for key, names in BACKENDS.items():
            if getattr(self, key) not in names:
                fail(key, getattr(self, key), f"supported: {list(names)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The name the brief and the rest of sala_train use; the class keeps the released name for config.json.
SALAConfig = MiniCPMSALAConfig
