"""Softmax attention through torch SDPA: causal, packed (varlen) and cached variants.

Layout everywhere: q [B, T, H_q, D], k and v [B, S, H_kv, D] with H_q a multiple of H_kv (GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal=False, mask=None, scale=None):
    # SDPA wants [B, H, T, D]; enable_gqa lets it broadcast the KV heads without a copy.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def causal_attention(q, k, v, *, scale: float | None = None) -> torch.Tensor:
    """Plain causal attention, T == S."""
    return _sdpa(q, k, v, is_causal=True, scale=scale)


def varlen_causal_attention(q, k, v, cu_seqlens: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each packed document, nothing across documents.

    q, k, v: [1, total, H, D]; cu_seqlens: int [N + 1], cumulative document lengths starting at 0 and
    ending at ``total``. Runs SDPA per document (is_causal, so the fused kernels apply and no T x T mask
    is ever built).
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[:, start:end] = _sdpa(q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True, scale=scale)
    return out


def masked_attention(q, k, v, mask, *, scale: float | None = None) -> torch.Tensor:
    """Attention with a boolean mask [B, 1, T, S] (True = attend) or an SDPA bias object (the bottom-right
    causal mask of a chunk after a cache); used with a cache or padding."""
    return _sdpa(q, k, v, mask=mask, scale=scale)


def cached_causal_mask(
    query_len: int,
    past_len: int,
    key_padding: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Mask for queries that follow ``past_len`` cached keys: boolean [B, 1, T, past + T] with padding, else a
    lower-right causal bias object.

    Query i (absolute position past + i) sees keys j <= past + i. ``key_padding`` [B, past + T] marks real
    tokens with 1; padded keys are hidden, but every query keeps its own key so that rows of padding
    never softmax over an empty set. Returns None where plain ``is_causal`` suffices.
    """
    if key_padding is None and past_len == 0:
        return None
    if key_padding is None:
        # bottom-right aligned causal mask as an SDPA bias object: the fused kernels apply it without a
        # [T, past + T] tensor, so a chunk of 32K queries against a 1M-token cache costs no mask memory
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(query_len, past_len + query_len)
    total = past_len + query_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_padding is not None:
        diagonal = (k_pos == q_pos)[None, None]
        mask = mask & (key_padding[:, None, None, :].bool() | diagonal)
    return mask


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries of a packed batch: a document starts where the position id is 0.

    position_ids [B, T] -> cu_seqlens over the flattened B * T tokens (every row also starts a document),
    or None when no row restarts its positions (plain unpacked batch).
    """
    starts = position_ids == 0
    starts[:, 0] = True
    if int(starts.sum()) == position_ids.shape[0]:
        return None
    flat_starts = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([flat_starts, total]).to(torch.int64)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions that restart at 0 at every document start; [1, total]."""
    positions = torch.arange(total, device=cu_seqlens.device)
    doc_index = torch.searchsorted(cu_seqlens[1:], positions, right=True)
    return (positions - cu_seqlens[doc_index])[None]
