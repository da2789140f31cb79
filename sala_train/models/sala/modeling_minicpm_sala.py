"""MiniCPM-SALA, the hybrid student (SPEC 2): MiniCPM-4's embeddings, MLPs, norms and muP scalings, with the
attention of each layer replaced by the mixer that ``config.mixer_types`` names for it:

    "minicpm4"        SparseMixer     GQA softmax attention without RoPE (HyPE), InfLLM-V2 block-sparse at or
                                      above sparse_config.dense_len tokens and dense below, output gate o_gate
    "lightning-attn"  LightningMixer  linear attention with a constant per-head decay (fp32 state), per-head
                                      QK-norm, RoPE, o_norm over the whole output and output gate z_proj

The ops behind the mixers come from two registries keyed by backend name, LIGHTNING_BACKENDS and
SPARSE_BACKENDS: sala_train's kernels ("triton"), the plain PyTorch references ("torch") or, for the
lightning layers, fla's ``chunk_simple_gla`` ("fla"). ``config.lightning_backend`` / ``sparse_backend`` or
``model.set_backends`` pick one; "auto" takes the kernels where they can run.

This file is also the modeling file of exported checkpoints (remote_code.py copies it next to the weights, and
transformers runs it with trust_remote_code=True). It therefore imports only torch and transformers at top
level: sala_train is imported inside a try block, and without sala_train the torch-only copies of its
modules that were saved beside this file take its place.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

import torch
from torch import nn

from .configuration_minicpm_sala import LIGHTNING, SPARSE, MiniCPMSALAConfig

try:
    # Inside sala_train: the teacher's modules, checkpoint streaming and the kernels.
    from sala_train.kernels import fused as fused_kernels
    from sala_train.kernels import lightning as lightning_kernels
    from sala_train.kernels import sparse as sparse_kernels
    from sala_train.kernels.lightning.naive import (
        lightning_attention_parallel,
        lightning_decode_reference,
        sala_decay,
    )
    from sala_train.kernels.sparse.naive import (
        compress_keys_reference,
        select_blocks_reference,
        sparse_attention_reference,
        sparse_decode_reference,
    )
    from sala_train.models.attention import causal_attention, masked_attention
    from sala_train.models.cache import KVCache
    from sala_train.models.generation import GenerationMixin
    from sala_train.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
    from sala_train.models.minicpm import MiniCPMForCausalLM, MiniCPMModel, MiniCPMPreTrainedModel
    from sala_train.models.sala.remote_code import write_remote_code
except ImportError:
    # Run by transformers from a checkpoint directory without sala_train: the same modules, copied there by
    # save_pretrained. The reference ops stand in for the kernels.
    if __name__.startswith("sala_train."):  # a real import error inside sala_train: show it
        raise
    from .attention import causal_attention, masked_attention
    from .cache import KVCache
    from .generation import GenerationMixin
    from .layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
    from .lightning_naive import lightning_attention_parallel, lightning_decode_reference, sala_decay
    from .minicpm import MiniCPMForCausalLM, MiniCPMModel, MiniCPMPreTrainedModel
    from .sparse_naive import (
        compress_keys_reference,
        select_blocks_reference,
        sparse_attention_reference,
        sparse_decode_reference,
    )

    fused_kernels = lightning_kernels = sparse_kernels = write_remote_code = None


# ---------------------------------------------------------------------------------------------------------
# Op backends
# ---------------------------------------------------------------------------------------------------------

class LightningOps(NamedTuple):
    """The ops of a lightning layer (signatures of sala_train.kernels.lightning and sala_train.kernels.fused):

    attention(q, k, v, decay, scale=, initial_state=, output_final_state=, cu_seqlens=) -> (o, final_state)
        q, k, v [B, T, H, D]; decay [H] log-decay; states [N, H, D, D] fp32
    decode(q, k, v, decay, state, scale) -> o
        q, k, v [N, H, D], one token per sequence; state [N, H, D, D] fp32, updated in place
    norm_rope(x, weight, cos, sin, eps, out_dtype) -> y
        x [B, T, H, D]: per-head RMSNorm (weight [D], or None), then RoPE (cos, sin [B, T, D] fp32, or None),
        returned in out_dtype
    """

    attention: Callable
    decode: Callable
    norm_rope: Callable


class SparseOps(NamedTuple):
    """The two ops of a sparse layer (signatures of sala_train.kernels.sparse):

    attention(q, k, v, sparse_config, cu_seqlens=, scale=) -> o
        q [B, T, H_q, D], k and v [B, T, H_kv, D]; dense below sparse_config["dense_len"], InfLLM-V2 above
    decode(q, k_cache, v_cache, sparse_config, scale=, compressed=) -> o
        q [N, H_q, D], one token per sequence, against its cache [N, S, H_kv, D] (its own k, v included)
    prefill(q, k, v, sparse_config, scale=) -> o
        a prefill chunk's queries q [B, T, H_q, D] at the last T of the S positions of k, v [B, S, H_kv, D]
    """

    attention: Callable
    decode: Callable
    prefill: Callable


# The torch lightning op runs the parallel reference over chunks of this many tokens and carries the state
# between them: memory O(T * chunk) instead of O(T^2), so a long prompt fits without the kernels.
TORCH_LIGHTNING_CHUNK = 256


def lightning_attention_torch(q, k, v, decay, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None):
    """Lightning attention from the plain PyTorch reference (``lightning_attention_parallel``), chunked."""
    if cu_seqlens is not None:  # packed documents (B = 1): each its own sequence with its own state
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = None if initial_state is None else initial_state[n : n + 1]
            o, final = lightning_attention_torch(q[:, start:end], k[:, start:end], v[:, start:end], decay,
                                                 scale, state, True)
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, dim=1), torch.cat(finals) if output_final_state else None
    B, T, H, D = q.shape
    state, outs = initial_state, []
    for start in range(0, T, TORCH_LIGHTNING_CHUNK):
        end = start + TORCH_LIGHTNING_CHUNK
        o, state = lightning_attention_parallel(q[:, start:end], k[:, start:end], v[:, start:end], decay,
                                                scale, state, True)
        outs.append(o)
    if state is None:  # T == 0
        state = q.new_zeros(B, H, D, D, dtype=torch.float32)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return o, state if output_final_state else None


def lightning_attention_fla(q, k, v, decay, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """fla's simple GLA with a constant per-head log-decay ``g_gamma`` is SALA's lightning attention
    (SPEC 2.2)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ImportError("the 'fla' lightning backend needs flash-linear-attention: "
                          "pip install 'sala-train[fla]'") from err
    return chunk_simple_gla(q, k, v, g_gamma=decay.to(q.device), scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _selection(sparse_config: dict) -> dict:
    """Keyword arguments of the InfLLM-V2 block selection from a ``sparse_config`` dict."""
    return dict(block_size=sparse_config["block_size"], kernel_size=sparse_config["kernel_size"],
                kernel_stride=sparse_config["kernel_stride"], init_blocks=sparse_config["init_blocks"],
                local_blocks=sparse_config["window_size"] // sparse_config["block_size"],
                topk=sparse_config["topk"])


def sparse_attention_torch(q, k, v, sparse_config: dict, cu_seqlens=None, scale=None):
    """InfLLM-V2 from the plain PyTorch pieces: per sequence, dense causal SDPA below ``dense_len`` tokens,
    the reference block selection and block-sparse attention at or above it (a packed document by its own
    length)."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        pieces, dim = [(slice(b, b + 1), slice(0, T)) for b in range(B)], 0
    else:
        bounds = cu_seqlens.tolist()
        pieces, dim = [(slice(0, 1), slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:])], 1
    outs = []
    for rows, span in pieces:
        qs, ks, vs = q[rows, span], k[rows, span], v[rows, span]
        if qs.shape[1] == 0:
            outs.append(qs)
        elif qs.shape[1] < sparse_config["dense_len"]:
            outs.append(causal_attention(qs, ks, vs, scale=scale))
        else:
            with torch.no_grad():  # the selection is not differentiated (SPEC 4)
                blocks = select_blocks_reference(qs, ks, scale=scale, **_selection(sparse_config))
            outs.append(sparse_attention_reference(qs, ks, vs, blocks, block_size=sparse_config["block_size"],
                                                   scale=scale))
    return torch.cat(outs, dim=dim)


def attend_last_rows(attention: Callable, q, k, v, sparse_config: dict, scale=None):
    """Queries q [B, T, H_q, D] at the last T of the S positions of k, v [B, S, H_kv, D] -> [B, T, H_q, D].

    Runs ``attention`` as a prefill of all S tokens with zero queries in front and keeps the last T rows: a
    row's block selection depends only on its own query and the keys up to it, so these are exactly the rows
    the full prefill would give. The zero rows are wasted work: this is the torch backend's chunked prefill
    (the Triton backend's ``infllmv2_prefill`` computes the last rows only).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    padded = q.new_zeros(B, S, *q.shape[2:])
    padded[:, S - T :] = q
    return attention(padded, k, v, sparse_config, scale=scale)[:, S - T :]


def sparse_prefill_torch(q, k, v, sparse_config: dict, scale=None):
    """A prefill chunk against the cache with the torch pieces (computes all S rows, keeps the last T)."""
    return attend_last_rows(sparse_attention_torch, q, k, v, sparse_config, scale=scale)


def sparse_decode_torch(q, k_cache, v_cache, sparse_config: dict, scale=None, compressed=None):
    """One token per sequence, q [N, H_q, D], against its cache [N, S, H_kv, D] -> [N, H_q, D]: dense below
    ``dense_len``, else the last-row block selection from the compressed keys (linear in S); ``compressed``
    the (fine, coarse) compressed-key caches when the caller keeps them."""
    if k_cache.shape[1] < sparse_config["dense_len"]:
        return masked_attention(q[:, None], k_cache, v_cache, None, scale=scale)[:, 0]
    return sparse_decode_reference(q, k_cache, v_cache, dense_len=sparse_config["dense_len"], scale=scale,
                                   compressed=compressed, **_selection(sparse_config))


def norm_rope_torch(x, weight, cos, sin, eps: float, out_dtype):
    """The q / k preprocessing of a lightning layer in torch ops: ``weight * rms_norm(x)`` (the RMSNorm
    module's math), then ``apply_rotary``, then the cast to ``out_dtype`` (under autocast the fp32 norm and
    rotary promote q and k; v is bf16)."""
    if weight is not None:
        x = weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)
    if cos is not None:
        x = apply_rotary(x, cos, sin)
    return x.to(out_dtype)


LIGHTNING_BACKENDS: dict[str, LightningOps] = {
    "torch": LightningOps(lightning_attention_torch, lightning_decode_reference, norm_rope_torch),
    "fla": LightningOps(lightning_attention_fla, lightning_decode_reference, norm_rope_torch),
}
SPARSE_BACKENDS: dict[str, SparseOps] = {
    "torch": SparseOps(sparse_attention_torch, sparse_decode_torch, sparse_prefill_torch),
}
if lightning_kernels is not None:
    # The kernels' public ops pick Triton on CUDA tensors (or under TRITON_INTERPRET=1) and their references
    # elsewhere.
    LIGHTNING_BACKENDS["triton"] = LightningOps(lightning_kernels.lightning_attention,
                                                lightning_kernels.lightning_decode, fused_kernels.norm_rope)
    LIGHTNING_BACKENDS["fla"] = LightningOps(lightning_attention_fla, lightning_kernels.lightning_decode,
                                             norm_rope_torch)
    SPARSE_BACKENDS["triton"] = SparseOps(sparse_kernels.infllmv2_attention, sparse_kernels.infllmv2_decode,
                                          sparse_kernels.infllmv2_prefill)


def resolve_backend(registry: dict, name: str, key: str):
    """The ops registered under ``name``. "auto" is "triton" on a machine with a GPU where sala_train's
    kernels and triton are installed, else "torch": on a CPU the kernels would run their unchunked references
    (or Triton's interpreter), slower than the torch ops."""
    if name == "auto":
        kernels_run = "triton" in registry and torch.cuda.is_available()
        name = "triton" if kernels_run and importlib.util.find_spec("triton") is not None else "torch"
    if name not in registry:
        raise ValueError(f"{key} = {name!r} is not available here; available: {sorted(registry)} "
                         "('triton' needs sala_train with triton installed)")
    return registry[name]


# ---------------------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------------------

def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [1, B*T, ...]: cu_seqlens address packed documents over the flattened tokens."""
    return x.reshape(1, -1, *x.shape[2:])


class SparseMixer(nn.Module):
    """The attention of a "minicpm4" layer (SPEC 2.1): GQA, no RoPE (HyPE; ``attn_use_rope`` turns it on),
    optional per-head QK-norm (``attn_qk_norm``), InfLLM-V2 from ``dense_len`` tokens on, and the output
    gate ``o_proj(attn * sigmoid(o_gate(x)))`` with x the normed layer input."""

    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sparse_config = dict(config.sparse_config)
        self.use_rope = config.attn_use_rope
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        kv_inner = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.v_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.o_gate = nn.Linear(hidden, inner, bias=False) if config.attn_use_output_gate else None
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.attn_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.attn_qk_norm else None
        self.set_backend(config.sparse_backend)

    @staticmethod
    def tensor_shapes(config: MiniCPMSALAConfig) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors of this mixer, relative to ``model.layers.{i}.self_attn.`` (SPEC 2.4)."""
        hidden, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_inner = config.num_key_value_heads * config.head_dim
        shapes = {"q_proj.weight": (inner, hidden), "k_proj.weight": (kv_inner, hidden),
                  "v_proj.weight": (kv_inner, hidden), "o_proj.weight": (hidden, inner)}
        if config.attn_use_output_gate:
            shapes["o_gate.weight"] = (inner, hidden)
        if config.attn_qk_norm:
            shapes["q_norm.weight"] = shapes["k_norm.weight"] = (config.head_dim,)
        return shapes

    def set_backend(self, name: str) -> None:
        self.ops: SparseOps = resolve_backend(SPARSE_BACKENDS, name, "sparse_backend")

    def forward(self, x, rope, attention, cache=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; ``rope`` {head_dim: (cos, sin)}; ``attention`` the
        AttentionInputs of this forward (packing, cache mask); ``cache`` a SALACache or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope[self.head_dim]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the fp32 norms / rotary promote q, k; v is bf16

        if cache is None and attention.cu_seqlens is not None:
            out = self.ops.attention(_flat(q), _flat(k), _flat(v), self.sparse_config,
                                     cu_seqlens=attention.cu_seqlens, scale=self.scale).reshape(q.shape)
        elif cache is None:
            out = self.ops.attention(q, k, v, self.sparse_config, scale=self.scale)
        else:
            out = self._attend_cached(q, k, v, attention, cache)
        out = out.reshape(B, T, -1)
        if self.o_gate is not None:
            out = out * torch.sigmoid(self.o_gate(x))
        return self.o_proj(out)

    def _attend_cached(self, q, k, v, attention, cache) -> torch.Tensor:
        """The new tokens' queries against the cache, their own keys appended first."""
        T = q.shape[1]
        k_all, v_all = cache.update(self.layer_idx, k, v)
        S = k_all.shape[1]
        compressed = cache.compressed(self.layer_idx, k_all, self.sparse_config)
        if T == 1:  # decode
            return self.ops.decode(q[:, 0], k_all, v_all, self.sparse_config, scale=self.scale,
                                   compressed=compressed)[:, None]
        if S == T:  # first chunk of a prefill: nothing cached before it
            return self.ops.attention(q, k, v, self.sparse_config, scale=self.scale)
        if S < self.sparse_config["dense_len"]:  # a later chunk, still dense: causal mask over the cache
            return attention.attend(q, k_all, v_all, self.scale)
        return self.ops.prefill(q, k_all, v_all, self.sparse_config, scale=self.scale)


class LightningMixer(nn.Module):
    """The attention of a "lightning-attn" layer (SPEC 2.2): full multi-head q, k, v; per-head RMSNorm of q
    and k (``qk_norm``); RoPE after it (``lightning_use_rope``); ``S_t = gamma_h S_{t-1} + k_t^T v_t``,
    ``o_t = scale q_t S_t`` with gamma_h = exp(-2^(-8h/H)) in every layer and an fp32 state; then o_norm over
    the whole H*d vector, the gate sigmoid(z_proj(x)) and o_proj."""

    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.lightning_nh, config.lightning_head_dim
        self.scale = config.lightning_attention_scale
        self.use_rope = config.lightning_use_rope
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.z_proj = nn.Linear(hidden, inner, bias=False) if config.use_output_gate else None
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.o_norm = RMSNorm(inner, eps=config.rms_norm_eps) if config.use_output_norm else None
        # The per-head log-decay: neither a parameter nor a buffer, so that model.to(bfloat16) cannot round
        # it (that would change gamma); fp32, built on the CPU (also under a meta-device context), copied to
        # each device once.
        self.decay = sala_decay(self.num_heads, device="cpu")
        self._decay_on_device: dict[torch.device, torch.Tensor] = {}
        self.set_backend(config.lightning_backend)

    @staticmethod
    def tensor_shapes(config: MiniCPMSALAConfig) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors of this mixer, relative to ``model.layers.{i}.self_attn.`` (SPEC 2.4)."""
        hidden, inner = config.hidden_size, config.lightning_nh * config.lightning_head_dim
        shapes = {"q_proj.weight": (inner, hidden), "k_proj.weight": (inner, hidden),
                  "v_proj.weight": (inner, hidden), "o_proj.weight": (hidden, inner)}
        if config.use_output_gate:
            shapes["z_proj.weight"] = (inner, hidden)
        if config.qk_norm:
            shapes["q_norm.weight"] = shapes["k_norm.weight"] = (config.lightning_head_dim,)
        if config.use_output_norm:
            shapes["o_norm.weight"] = (inner,)
        return shapes

    def set_backend(self, name: str) -> None:
        self.ops: LightningOps = resolve_backend(LIGHTNING_BACKENDS, name, "lightning_backend")

    def _decay(self, device: torch.device) -> torch.Tensor:
        if device not in self._decay_on_device:
            self._decay_on_device[device] = self.decay.to(device)
        return self._decay_on_device[device]

    def forward(self, x, rope, attention, cache=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; arguments as SparseMixer.forward."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (proj(x).view(B, T, H, D) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope[D] if self.use_rope else (None, None)
        if self.q_norm is not None or cos is not None:  # QK-norm, RoPE: one fused kernel on the Triton path
            weights = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
            eps = self.q_norm.eps if self.q_norm is not None else 0.0
            q, k = (self.ops.norm_rope(x, w, cos, sin, eps, v.dtype) for x, w in zip((q, k), weights))
        decay = self._decay(q.device)

        if cache is None and attention.cu_seqlens is not None:  # packed: the state restarts at every document
            o, _ = self.ops.attention(_flat(q), _flat(k), _flat(v), decay, scale=self.scale,
                                      cu_seqlens=attention.cu_seqlens)
        elif cache is None:
            o, _ = self.ops.attention(q, k, v, decay, scale=self.scale)
        elif T == 1:  # decode: one recurrent step, the state updated in place
            state = cache.lightning_state(self.layer_idx, B, H, D, q.device)
            o = self.ops.decode(q[:, 0], k[:, 0], v[:, 0], decay, state, self.scale)
        else:  # (chunked) prefill: continue from the cached state, keep the final one
            o, state = self.ops.attention(q, k, v, decay, scale=self.scale,
                                          initial_state=cache.states[self.layer_idx], output_final_state=True)
            cache.states[self.layer_idx] = state.contiguous()

        o = o.reshape(B, T, H * D)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.z_proj is not None:
            o = o * torch.sigmoid(self.z_proj(x))
        return self.o_proj(o)


MIXERS: dict[str, type[nn.Module]] = {SPARSE: SparseMixer, LIGHTNING: LightningMixer}


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------

class SALACache(KVCache):
    """The cache of one generation: K/V of the sparse layers in KVCache's buffers [B, capacity, H_kv, D]
    (grown by doubling), and the recurrent state [B, H, D, D] fp32 of every lightning layer, whose size does
    not depend on the context length. ``seq_len`` counts the tokens seen, as for the teacher."""

    def __init__(self, mixer_types: list[str], initial_capacity: int = 256):
        super().__init__(len(mixer_types), initial_capacity)
        self.mixer_types = list(mixer_types)
        self.states: list[torch.Tensor | None] = [None] * self.num_layers
        # The compressed-key caches of the sparse layers (InfLLM-V2's K_c and K_2, SPEC 4): (fine, coarse)
        # [B, n, H_kv, D], one entry more every kernel_stride / 4 * kernel_stride tokens, so that a decode
        # step scores compressed keys without pooling the whole cache again.
        self.compressed_keys: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer_types[layer] != SPARSE:
            raise ValueError(f"layer {layer} is a {self.mixer_types[layer]!r} layer: it keeps a recurrent "
                             "state, not keys and values")
        return super().update(layer, k, v)

    def lightning_state(self, layer: int, batch: int, heads: int, head_dim: int, device) -> torch.Tensor:
        """The state [B, H, D, D] fp32 of a lightning layer (zeros before its first token)."""
        if self.states[layer] is None:
            self.states[layer] = torch.zeros(batch, heads, head_dim, head_dim, dtype=torch.float32,
                                             device=device)
        return self.states[layer]

    def compressed(self, layer: int, keys: torch.Tensor, sparse_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (fine, coarse) compressed keys for ``keys`` [B, S, H_kv, D] (all cached keys), pooling
        only the windows completed since the last call."""
        w, s = sparse_config["kernel_size"], sparse_config["kernel_stride"]
        cached = self.compressed_keys[layer] or (keys[:, :0], keys[:, :0])
        grown = []
        for have, (window, stride) in zip(cached, ((w, s), (4 * w, 4 * s))):
            done = have.shape[1]
            total = (keys.shape[1] - window) // stride + 1 if keys.shape[1] >= window else 0
            if total > done:
                new, _ = compress_keys_reference(keys[:, done * stride : (total - 1) * stride + window], window, stride)
                have = torch.cat([have, new], dim=1)
            grown.append(have)
        self.compressed_keys[layer] = (grown[0], grown[1])
        return self.compressed_keys[layer]

    def reorder(self, batch_index: torch.Tensor) -> None:
        super().reorder(batch_index)
        self.states = [None if s is None else s[batch_index].contiguous() for s in self.states]
        self.compressed_keys = [None if c is None else (c[0][batch_index], c[1][batch_index])
                                for c in self.compressed_keys]

    def memory_bytes(self) -> int:
        states = sum(s.numel() * s.element_size() for s in self.states if s is not None)
        return super().memory_bytes() + states


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

class MiniCPMSALADecoderLayer(nn.Module):
    """The teacher's pre-norm layer (SwiGLU, muP residual scaling) with the mixer of this layer's kind."""

    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.self_attn = MIXERS[self.mixer_type](config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, h, rope, attention, cache=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, attention, cache) * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h


class MiniCPMSALAPreTrainedModel(MiniCPMPreTrainedModel):
    """The teacher's base (muP initialisation, checkpoint streaming) for the hybrid config. New projections
    (o_gate, z_proj) start like every other projection; the new norms at ones."""

    config_class = MiniCPMSALAConfig
    config: MiniCPMSALAConfig
    _no_split_modules = ["MiniCPMSALADecoderLayer"]

    @classmethod
    def expected_tensor_shapes(cls, config: MiniCPMSALAConfig) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every checkpoint tensor: the teacher's table with each layer's attention tensors
        replaced by those of its mixer (SPEC 2.4)."""
        teacher = MiniCPMPreTrainedModel.expected_tensor_shapes(config)
        shapes = {name: shape for name, shape in teacher.items() if ".self_attn." not in name}
        for i, kind in enumerate(config.mixer_types):
            for name, shape in MIXERS[kind].tensor_shapes(config).items():
                shapes[f"model.layers.{i}.self_attn.{name}"] = shape
        return shapes


def _rope_head_dims(config: MiniCPMSALAConfig) -> list[int]:
    """Head sizes that need RoPE (HyPE: by default only the lightning layers')."""
    dims = set()
    if config.lightning_use_rope and config.lightning_layers:
        dims.add(config.lightning_head_dim)
    if config.attn_use_rope and config.sparse_layers:
        dims.add(config.head_dim)
    return sorted(dims)


class MiniCPMSALAModel(MiniCPMSALAPreTrainedModel):
    def __init__(self, config: MiniCPMSALAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MiniCPMSALADecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # A plain dict (RotaryEmbedding has neither parameters nor buffers): {head_dim: RotaryEmbedding}.
        self.rotary_embs = {
            d: RotaryEmbedding(d, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
            for d in _rope_head_dims(config)
        }
        self.gradient_checkpointing = False
        self.checkpoint_layers = None  # with gradient_checkpointing: recompute only the first N layers (None: all)
        self.post_init()

    # The teacher's forward (embeddings, positions and packing, the layer loop, the final norm) with the
    # hooks below: one rotary table per head size, and the batches a lightning state cannot take refused.
    forward = MiniCPMModel.forward
    _plan_attention = staticmethod(MiniCPMModel._plan_attention)

    def _rotary(self, position_ids):
        return {d: rotary(position_ids) for d, rotary in self.rotary_embs.items()}

    def _check_batch(self, attention_mask, attention, cache) -> None:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "MiniCPM-SALA does not take padded batches (attention_mask has zeros): a lightning layer's "
                "state would absorb the padding. Batch prompts of equal length, run them one at a time, or "
                "pack them with cu_seqlens / position_ids that restart at 0 at every document")
        if cache is not None and attention.cu_seqlens is not None:
            raise ValueError("packed sequences (cu_seqlens or restarting position_ids) cannot fill a cache: "
                             "one lightning state per batch row; generate from one sequence per row instead")


class MiniCPMSALAForCausalLM(GenerationMixin, MiniCPMSALAPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPMSALAConfig):
        super().__init__(config)
        self.model = MiniCPMSALAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # The causal-LM head is the teacher's: logits lm_head(h / width_multiplier) in fp32, a loss that never
    # crosses a packed document boundary, ``use_cache`` creating ``self.new_cache()``.
    forward = MiniCPMForCausalLM.forward
    get_input_embeddings = MiniCPMForCausalLM.get_input_embeddings
    get_output_embeddings = MiniCPMForCausalLM.get_output_embeddings
    gradient_checkpointing_enable = MiniCPMForCausalLM.gradient_checkpointing_enable
    gradient_checkpointing_disable = MiniCPMForCausalLM.gradient_checkpointing_disable

    def new_cache(self, capacity: int = 256) -> SALACache:
        """An empty cache for ``forward(past_key_values=...)`` and ``generate``; the sparse layers' K/V buffers
        are first allocated for ``capacity`` tokens (prompt + new tokens, when known), then grow by doubling."""
        return SALACache(self.config.mixer_types, initial_capacity=capacity)

    def set_backends(self, lightning: str | None = None, sparse: str | None = None) -> None:
        """Switch the ops of all layers (names of LIGHTNING_BACKENDS / SPARSE_BACKENDS, or "auto")."""
        for layer in self.model.layers:
            mixer = layer.self_attn
            if isinstance(mixer, LightningMixer) and lightning is not None:
                mixer.set_backend(lightning)
            if isinstance(mixer, SparseMixer) and sparse is not None:
                mixer.set_backend(sparse)
        if lightning is not None:
            self.config.lightning_backend = lightning
        if sparse is not None:
            self.config.sparse_backend = sparse

    def save_pretrained(self, save_directory, **kwargs):
        """The checkpoint (sharded safetensors, index, config.json with auto_map, generation_config.json,
        tokenizer files) and the modeling files beside it (remote_code.py), so that
        ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs it without sala_train."""
        directory = super().save_pretrained(save_directory, **kwargs)
        if write_remote_code is not None:  # None when run from a checkpoint: transformers copies the code
            write_remote_code(directory)
        return directory


# The names the rest of sala_train uses; the classes keep the released names for config.json's architectures.
SALAForCausalLM = MiniCPMSALAForCausalLM
SALAModel = MiniCPMSALAModel
