"""Softmax attention through torch SDPA: causal, packed (varlen) and cached variants.

Layout everywhere: q [B, T, H_q, D], k and v [B, S, H_kv, D] with H_q a multiple of H_kv (GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal=False, mask=None, scale=None):
    # SDPA wants [B, H, T, D]; enable_gqa lets it broadcast the KV heads without a copy. CUDA's fp32 kernel
    # (memory-efficient attention) takes no GQA: SDPA would fall back to the math path, which builds the T x T
    # scores, so fp32 on CUDA repeats the KV heads instead (fp32 is the small-model training path; bf16 keeps
    # the copy-free GQA of the flash kernel).
    group = q.shape[2] // k.shape[2]
    if group > 1 and q.is_cuda and q.dtype == torch.float32:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
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


class _VarlenPlan:
    """How ``varlen_causal_attention`` batches the documents of one ``cu_seqlens``: groups of documents at least
    half as long as the group's longest, each padded to that length. ``gather`` [n * longest] is the token of
    every padded slot (a pad repeats its document's last token), ``kept`` the slots that are real tokens, and
    ``inverse`` puts the concatenated real rows of all groups back in token order. Built once on the CPU and
    copied to the device; every layer of a forward reuses it (cached by the boundaries)."""

    def __init__(self, bounds: tuple[int, ...], device: torch.device):
        docs = sorted(((start, end - start) for start, end in zip(bounds[:-1], bounds[1:]) if end > start),
                      key=lambda doc: -doc[1])
        self.groups = []
        order = []
        first = 0
        while first < len(docs):
            longest = docs[first][1]
            last = first
            while last < len(docs) and 2 * docs[last][1] >= longest:
                last += 1
            starts = torch.tensor([start for start, _ in docs[first:last]])
            lengths = torch.tensor([n for _, n in docs[first:last]])
            offsets = torch.arange(longest)
            gather = (starts[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)).flatten()
            kept = torch.nonzero((offsets[None, :] < lengths[:, None]).flatten()).flatten()
            self.groups.append((gather.to(device), kept.to(device), last - first, longest))
            order.append(gather[kept])
            first = last
        order = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        self.inverse = inverse.to(device)


_PLANS: dict = {}


def _varlen_plan(cu_seqlens: torch.Tensor) -> _VarlenPlan:
    key = (tuple(cu_seqlens.tolist()), cu_seqlens.device)  # by value: a freed tensor's address can come back
    plan = _PLANS.pop(key, None) or _VarlenPlan(key[0], cu_seqlens.device)
    _PLANS[key] = plan  # most recent last; a few batches are kept
    while len(_PLANS) > 8:
        _PLANS.pop(next(iter(_PLANS)))
    return plan


def varlen_causal_attention(q, k, v, cu_seqlens: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each packed document, nothing across documents.

    q, k, v: [1, total, H, D]; cu_seqlens: int [N + 1], cumulative document lengths starting at 0 and
    ending at ``total``. Documents of similar length are padded into one batch and go through one causal SDPA
    call (the fused kernels, no T x T mask): a group holds documents at least half as long as its longest, so
    padding at most doubles a group's tokens, and a packed batch of hundreds of documents costs a handful of
    calls instead of one per document (one call per document was launch-bound: 2.8x slower per training step
    of the quality study's teacher on an H100, docs/benchmarks.md). Padding sits after each document's last
    token, so causality keeps it out of every real row; the padded rows are dropped (their gradient is zero).
    Gathers are ``index_select`` (its backward is an ``index_add``, no sort).
    """
    plan = _varlen_plan(cu_seqlens)
    if len(plan.groups) == 1 and plan.groups[0][2] == 1:  # one document: nothing to gather
        return _sdpa(q, k, v, is_causal=True, scale=scale)
    if not plan.groups:
        return torch.empty_like(q)
    outputs = []
    for gather, kept, n, longest in plan.groups:
        padded = [x[0].index_select(0, gather).view(n, longest, *x.shape[2:]) for x in (q, k, v)]
        out = _sdpa(*padded, is_causal=True, scale=scale)  # [n, longest, H, D]
        outputs.append(out.flatten(0, 1).index_select(0, kept))
    return torch.cat(outputs).index_select(0, plan.inverse)[None]


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
