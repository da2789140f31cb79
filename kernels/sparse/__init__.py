"""InfLLM-V2 sparse attention (SALA's sparse mixer): key compression, block selection, block-sparse
attention, and the dense/sparse switch. Semantics: see ``naive.py``; math: ``README.md``.

Triton kernels run on CUDA tensors (and on the CPU under TRITON_INTERPRET=1); elsewhere the references of
``naive.py`` run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import (
    compress_keys_reference,
    decode_block_selection_reference,
    dense_causal_attention_reference,
    select_blocks_reference,
    sparse_attention_reference,
    sparse_decode_reference,
)

__all__ = ["SparseConfig", "compress_keys", "select_blocks", "sparse_attention", "infllmv2_attention",
           "infllmv2_prefill", "infllmv2_decode"]


@dataclass(frozen=True)
class SparseConfig:
    """The `sparse_config` of the released MiniCPM-SALA config (SPEC 2.4)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False

    @property
    def local_blocks(self) -> int:
        """Blocks of the sliding window, the query's own block included."""
        return self.window_size // self.block_size

    @property
    def slots(self) -> int:
        return self.init_blocks + self.local_blocks + self.topk

    def selection(self) -> dict:
        """The keyword arguments of ``select_blocks`` (and of the decode references) from this config."""
        return dict(block_size=self.block_size, kernel_size=self.kernel_size, kernel_stride=self.kernel_stride,
                    init_blocks=self.init_blocks, local_blocks=self.local_blocks, topk=self.topk)

    @classmethod
    def from_dict(cls, values: dict | None) -> "SparseConfig":
        values = dict(values or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"sparse_config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.block_size % self.kernel_stride:
            raise ValueError(f"sparse_config.block_size ({self.block_size}) must be a multiple of kernel_stride "
                             f"({self.kernel_stride})")
        if self.window_size % self.block_size:
            raise ValueError(f"sparse_config.window_size ({self.window_size}) must be a multiple of block_size "
                             f"({self.block_size})")
        for key in ("kernel_size", "kernel_stride", "block_size", "window_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"sparse_config.{key} must be positive, got {getattr(self, key)}")


def _check(q, k, v=None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D], got {list(q.shape)} and {list(k.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {list(k.shape)} does not match q {list(q.shape)} in batch, length or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")


def compress_keys(k, kernel_size: int = 32, stride: int = 16, cu_seqlens=None):
    """Mean-pooled keys over full windows: (k_c, cu_c). See ``naive.compress_keys_reference``."""
    return compress_keys_reference(k, kernel_size, stride, cu_seqlens)


def _positions(cu_seqlens, B: int, T: int, device) -> torch.Tensor:
    """[B, T]: each row's position in its sequence."""
    position = torch.arange(T, device=device)[None].expand(B, T)
    if cu_seqlens is not None:
        bounds = cu_seqlens.to(device)
        position = position - bounds[torch.searchsorted(bounds[1:], position[0], right=True)][None]
    return position


def _rows_before(q_start: int, cu_seqlens, B: int, T: int, device) -> torch.Tensor:
    """[B, T] bool: the rows whose position in their sequence is below ``q_start``."""
    return _positions(cu_seqlens, B, T, device) < q_start


@torch.no_grad()
def select_blocks(q, k, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=32, topk=64,
                  scale=None, cu_seqlens=None, q_start: int = 0) -> torch.Tensor:
    """Block indices [B, H_kv, T, init + local + topk] (int32, ascending, -1 = empty). No gradient.

    ``q_start``: the first rows of every sequence are not scored (all -1): queries that only stand in
    front of the ones wanted, e.g. a context-parallel rank's own queries at the end of their document's prefix.
    """
    _check(q, k)
    from .select import triton_select_blocks, triton_supports

    B, T, Hq, D = q.shape
    if not (_use_triton(q, block_size) and triton_supports(block_size, kernel_size, kernel_stride, D)):
        idx = select_blocks_reference(q, k, block_size=block_size, kernel_size=kernel_size,
                                      kernel_stride=kernel_stride, init_blocks=init_blocks, local_blocks=local_blocks,
                                      topk=topk, scale=scale, cu_seqlens=cu_seqlens)
        if q_start:
            idx = idx.masked_fill(_rows_before(q_start, cu_seqlens, B, T, q.device)[:, None, :, None], -1)
        return idx
    scale = D**-0.5 if scale is None else float(scale)
    flat = lambda x: x.contiguous().view(B * T, x.shape[2], D)  # noqa: E731
    idx = triton_select_blocks(flat(q), flat(k), _seq_bounds(cu_seqlens, B, T), block_size=block_size,
                               kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=init_blocks,
                               local_blocks=local_blocks, topk=topk, scale=scale, q_start=q_start)
    idx = idx.view(k.shape[2], B, T, -1).permute(1, 0, 2, 3)
    if q_start:  # the tile that crosses q_start scores its earlier rows too: clear them as promised
        idx = idx.masked_fill(_rows_before(q_start, cu_seqlens, B, T, q.device)[:, None, :, None], -1)
    return idx


TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _use_triton(x: torch.Tensor, block_size: int) -> bool:
    from .. import triton_runs_on

    pow2 = block_size >= 16 and block_size & (block_size - 1) == 0
    return pow2 and x.shape[-1] in TRITON_HEAD_DIMS and triton_runs_on(x)


def _seq_bounds(cu_seqlens, B: int, T: int) -> list[int]:
    return cu_seqlens.tolist() if cu_seqlens is not None else [b * T for b in range(B + 1)]


def sparse_attention(q, k, v, block_indices, *, block_size=64, scale=None, cu_seqlens=None,
                     q_start: int = 0) -> torch.Tensor:
    """Exact softmax attention of each query over the keys of its selected blocks (causal).

    q [B, T, H_q, D], k, v [B, T, H_kv, D], block_indices [B, H_kv, T, S] (from ``select_blocks``;
    relative to each sequence's start) -> o [B, T, H_q, D]. Differentiable in q, k, v. The first
    ``q_start`` rows of every sequence are not computed (zeros, no gradient; see ``select_blocks``).
    """
    _check(q, k, v)
    B, T, Hq, D = q.shape
    if block_indices.shape[:3] != (B, k.shape[2], T):
        raise ValueError(f"block_indices must be [B, H_kv, T, S] = [{B}, {k.shape[2]}, {T}, S], "
                         f"got {list(block_indices.shape)}")
    scale = D**-0.5 if scale is None else float(scale)
    if not _use_triton(q, block_size):
        if not q_start:
            return sparse_attention_reference(q, k, v, block_indices, block_size=block_size, scale=scale,
                                              cu_seqlens=cu_seqlens)
        # the skipped rows attend to their own block (a finite softmax, so no NaN reaches the gradients) and
        # are zeroed after
        before = _rows_before(q_start, cu_seqlens, B, T, q.device)
        own_block = _positions(cu_seqlens, B, T, q.device) // block_size
        indices = torch.where(before[:, None, :, None], own_block[:, None, :, None].to(block_indices.dtype),
                              block_indices)
        o = sparse_attention_reference(q, k, v, indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens)
        return o.masked_fill(before[:, :, None, None], 0.0)
    from .attention import triton_sparse_attention

    Hk = k.shape[2]
    flat = lambda x: x.contiguous().view(B * T, x.shape[2], D)  # noqa: E731
    idx = block_indices.permute(1, 0, 2, 3).reshape(Hk, B * T, -1).to(torch.int32).contiguous()
    o = triton_sparse_attention(flat(q), flat(k), flat(v), idx, _seq_bounds(cu_seqlens, B, T), block_size, scale,
                                q_start)
    if q_start:  # the tile that crosses q_start computes its earlier rows too: zero them as promised
        o = o.masked_fill(_rows_before(q_start, cu_seqlens, B, T, q.device).reshape(B * T)[:, None, None], 0.0)
    return o.view(B, T, Hq, D)


def _dense(q, k, v, scale, cu_seqlens):
    if q.device.type == "cuda" or q.shape[1] > 4096:
        from sala_train.models.attention import causal_attention, varlen_causal_attention

        if cu_seqlens is None:
            return causal_attention(q, k, v, scale=scale)
        return varlen_causal_attention(q, k, v, cu_seqlens, scale=scale)
    return dense_causal_attention_reference(q, k, v, scale=scale, cu_seqlens=cu_seqlens)


def infllmv2_attention(q, k, v, config: SparseConfig | dict | None = None, cu_seqlens=None, scale=None) -> torch.Tensor:
    """Dense causal attention for sequences shorter than ``config.dense_len``, block selection + sparse
    attention for the others (each packed document decides by its own length).

    q [B, T, H_q, D], k and v [B, T, H_kv, D] (B = 1 with ``cu_seqlens``) -> o [B, T, H_q, D].
    """
    config = config if isinstance(config, SparseConfig) else SparseConfig.from_dict(config)
    _check(q, k, v)
    B, T = q.shape[:2]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if cu_seqlens is not None else [T] * B
    if all(n < config.dense_len for n in lengths):
        return _dense(q, k, v, scale, cu_seqlens)
    select = dict(config.selection(), scale=scale)
    if all(n >= config.dense_len for n in lengths):
        indices = select_blocks(q, k, cu_seqlens=cu_seqlens, **select)
        return sparse_attention(q, k, v, indices, block_size=config.block_size, scale=scale, cu_seqlens=cu_seqlens)
    # packed documents on both sides of dense_len: each group through its own path
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for long in (False, True):
        docs = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if (e - s >= config.dense_len) == long]
        if not docs:
            continue
        index = torch.cat([torch.arange(s, e) for s, e in docs]).to(q.device)  # built on the CPU, copied once
        cu = torch.tensor([0] + [e - s for s, e in docs], device=q.device).cumsum(0)
        sub = [x.index_select(1, index) for x in (q, k, v)]  # backward: an index_add (advanced indexing sorts)
        if long:
            indices = select_blocks(sub[0], sub[1], cu_seqlens=cu, **select)
            part = sparse_attention(*sub, indices, block_size=config.block_size, scale=scale, cu_seqlens=cu)
        else:
            part = _dense(*sub, scale, cu)
        out[:, index] = part
    return out


@torch.no_grad()
def infllmv2_prefill(q, k, v, config: SparseConfig | dict | None = None, scale=None) -> torch.Tensor:
    """The queries of one prefill chunk against the cache: q [B, T, H_q, D] at the last T of the S
    positions of k, v [B, S, H_kv, D] (the chunk's own keys appended) -> o [B, T, H_q, D]. Inference only.

    Each row gets exactly what the full prefill of S tokens gives it: dense causal below ``dense_len``,
    else its own block selection and sparse attention (a row depends only on its query and the keys up to
    it). ``select_blocks`` and ``sparse_attention`` run with ``q_start = S - T``: the Triton path scores and
    attends for the T new rows only, so a long prompt prefilled in chunks costs what one prefill costs; the
    reference path computes the S rows and keeps the last T.
    """
    config = config if isinstance(config, SparseConfig) else SparseConfig.from_dict(config)
    _check(q[:, :1], k[:, :1], v[:, :1])
    B, T, Hq, D = q.shape
    S = k.shape[1]
    if k.shape[0] != B or T > S:
        raise ValueError(f"infllmv2_prefill: q [B={B}, T={T}] must be the last rows of k [B, S={S}] "
                         f"(got k {list(k.shape)})")
    if T == S:
        return infllmv2_attention(q, k, v, config, scale=scale)
    if S < config.dense_len:
        from sala_train.models.attention import cached_causal_mask, masked_attention

        return masked_attention(q, k, v, cached_causal_mask(T, S - T), scale=scale)
    # queries of zeros in front (their rows are neither scored nor attended on the Triton path)
    padded = q.new_zeros(B, S, Hq, D)
    padded[:, S - T:] = q
    indices = select_blocks(padded, k, scale=scale, q_start=S - T, **config.selection())
    o = sparse_attention(padded, k, v, indices, block_size=config.block_size, scale=scale, q_start=S - T)
    return o[:, S - T:]


@torch.no_grad()
def infllmv2_decode(q, k_cache, v_cache, config: SparseConfig | dict | None = None, scale=None,
                    compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one new token per sequence against its cache (the token's own k, v already appended).

    q [N, H_q, D]; k_cache, v_cache [N, S, H_kv, D] with S the tokens so far (this one included). Dense below
    ``dense_len``; else the blocks the prefill would select for its last row, attention over those only:
    linear in S. ``compressed``: the (fine, coarse) compressed-key caches [N, n, H_kv, D] if the caller keeps
    them. See ``naive.sparse_decode_reference``. The Triton path (sparse range) selects with the reference's
    vectorised torch ops and attends in one kernel over the selected blocks.
    """
    config = config if isinstance(config, SparseConfig) else SparseConfig.from_dict(config)
    S = k_cache.shape[1]
    if S >= config.dense_len and _use_triton(q, config.block_size):
        from .attention import triton_sparse_decode

        scale = q.shape[-1] ** -0.5 if scale is None else scale
        indices = decode_block_selection(q, k_cache, config, scale, compressed=compressed)
        return triton_sparse_decode(q, k_cache, v_cache, indices, config.block_size, scale)
    return sparse_decode_reference(q, k_cache, v_cache, dense_len=config.dense_len, scale=scale, compressed=compressed,
                                   **config.selection())


def decode_block_selection(q, k_cache, config: SparseConfig, scale: float, compressed=None) -> torch.Tensor:
    """The blocks the last token of each cached sequence selects: [N, H_kv, slots] (see the reference)."""
    return decode_block_selection_reference(q, k_cache, scale=scale, compressed=compressed, **config.selection())
