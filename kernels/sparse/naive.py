"""Plain PyTorch references for InfLLM-V2 sparse attention (SPEC section 4). They build dense masks and
score matrices explicitly: O(T^2) memory, for tests, the CPU path and documentation of the semantics.

Layout: q [B, T, H_q, D], k and v [B, T, H_kv, D], H_q = G * H_kv (query head h uses KV head h // G).
Positions are relative to the start of each sequence (packed sequences: ``cu_seqlens`` with B = 1).

Semantics, per sequence and KV head:
1. Compressed keys: k_c[j] = mean(k[s*j : s*j + w]) over full windows (w = kernel_size, s = kernel_stride),
   n_c = floor((T - w) / s) + 1 windows (0 when T < w). Coarse keys k_2 use window 4w... InfLLM-V2 uses
   (128, 64): here ``coarse_kernel_size`` / ``coarse_stride`` (default 4x the fine ones).
2. Window j is visible to token t when it ends at or before t: s*j + w - 1 <= t. For query token t and
   query head h: p_hj = exp(scale * q_th . k_c[j] - LSE_th) over visible j, where LSE_th is the
   log-sum-exp of scale * q_th . k_2[i] over the visible coarse windows (the estimate InfLLM-V2 uses to
   score in one pass); where no coarse window is visible yet, the exact LSE over the visible fine windows.
   The scores of the G query heads of a KV group are summed.
3. Block score (blocks of ``block_size`` tokens): the max over the visible windows that overlap the block.
4. Selection: the ``init_blocks`` first blocks and the ``local_blocks`` blocks ending at the query's own
   block (that block included) are forced in; then the ``topk`` best other blocks with a score (equal
   scores: the smaller block index first); nothing in the future of the query's block. Indices
   ascending, padded with -1, ``init + local + topk`` slots.
5. Attention: exact softmax of each query over the keys of its selected blocks, causal (key <= query).
"""

from __future__ import annotations

import math

import torch


def _sequences(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def compress_keys_reference(k: torch.Tensor, kernel_size: int = 32, stride: int = 16,
                            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled keys over full windows.

    k [B, T, H, D] -> (k_c [B, n_c, H, D] or, packed, [1, sum n_c, H, D]; cu_c [N + 1] offsets of each
    sequence's windows). Accumulates in fp32; returns k's dtype.
    """
    B, T, H, D = k.shape
    outs, counts = [], [0]
    for b, s, e in _sequences(cu_seqlens, B, T):
        length = e - s
        n = (length - kernel_size) // stride + 1 if length >= kernel_size else 0
        windows = k[b, s:e].float().unfold(0, kernel_size, stride)[:n] if n else k.new_zeros(0, H, D, kernel_size)
        outs.append(windows.mean(-1).to(k.dtype))  # [n, H, D]
        counts.append(counts[-1] + n)
    cu_c = torch.tensor(counts, device=k.device)
    if cu_seqlens is None:
        return torch.stack(outs), cu_c
    return torch.cat(outs)[None], cu_c


def block_scores_reference(q, k, *, block_size=64, kernel_size=32, kernel_stride=16, coarse_kernel_size=None,
                           coarse_stride=None, scale=None, cu_seqlens=None) -> list[torch.Tensor]:
    """Per sequence: block scores [H_kv, T_n, n_blocks] (fp32; -inf where no visible window overlaps)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    scale = D**-0.5 if scale is None else scale
    coarse_kernel_size = coarse_kernel_size or 4 * kernel_size
    coarse_stride = coarse_stride or 4 * kernel_stride
    results = []
    for b, s, e in _sequences(cu_seqlens, B, T):
        L = e - s
        qn = q[b, s:e].float()
        # compressed keys are stored in the input dtype (bf16 in training), as the kernels keep them
        kc, _ = compress_keys_reference(k[b:b + 1, s:e], kernel_size, kernel_stride)
        k2, _ = compress_keys_reference(k[b:b + 1, s:e], coarse_kernel_size, coarse_stride)
        kc, k2 = kc[0].float(), k2[0].float()  # [n, Hk, D]
        n_c, n_2 = kc.shape[0], k2.shape[0]
        t = torch.arange(L, device=q.device)
        vis_c = (kernel_stride * torch.arange(n_c, device=q.device) + kernel_size - 1)[None, :] <= t[:, None]
        vis_2 = (coarse_stride * torch.arange(n_2, device=q.device) + coarse_kernel_size - 1)[None, :] <= t[:, None]
        qh = qn.view(L, Hk, G, D)
        s_c = torch.einsum("tkgd,nkd->kgtn", qh, kc) * scale  # [Hk, G, L, n_c]
        s_2 = torch.einsum("tkgd,nkd->kgtn", qh, k2) * scale
        neg = torch.tensor(float("-inf"), device=q.device)
        lse_2 = torch.where(vis_2, s_2, neg).logsumexp(-1)
        lse_c = torch.where(vis_c, s_c, neg).logsumexp(-1)
        lse = torch.where(vis_2.any(-1), lse_2, lse_c)  # [Hk, G, L]
        p = torch.where(vis_c, torch.exp(s_c - lse[..., None]), torch.zeros((), device=q.device))
        p = p.sum(1)  # [Hk, L, n_c]: summed over the query heads of the group
        n_blocks = math.ceil(L / block_size)
        blocks = torch.full((Hk, L, n_blocks), float("-inf"), device=q.device)
        for blk in range(n_blocks):
            lo = max(0, -((kernel_size - 1 - block_size * blk) // kernel_stride))  # ceil((B*blk - w + 1) / s)
            hi = min(n_c - 1, (block_size * blk + block_size - 1) // kernel_stride)
            if lo > hi:
                continue
            window_visible = vis_c[:, lo:hi + 1]  # [L, m]
            cand = torch.where(window_visible[None], p[..., lo:hi + 1], neg)
            blocks[..., blk] = cand.max(-1).values
        results.append(blocks)
    return results


def select_blocks_reference(q, k, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=32,
                            topk=64, coarse_kernel_size=None, coarse_stride=None, scale=None,
                            cu_seqlens=None) -> torch.Tensor:
    """Selected block indices [B, H_kv, T, init + local + topk] (int32, ascending, -1 = empty)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    slots = init_blocks + local_blocks + topk
    out = torch.full((B, Hk, T, slots), -1, dtype=torch.int32, device=q.device)
    scores = block_scores_reference(q, k, block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride,
                                    coarse_kernel_size=coarse_kernel_size, coarse_stride=coarse_stride, scale=scale,
                                    cu_seqlens=cu_seqlens)
    for (b, s, e), blocks in zip(_sequences(cu_seqlens, B, T), scores):
        L = e - s
        n_blocks = blocks.shape[-1]
        t = torch.arange(L, device=q.device)
        own = t // block_size
        blk = torch.arange(n_blocks, device=q.device)
        future = blk[None, :] > own[:, None]
        forced = (blk[None, :] < init_blocks) | ((blk[None, :] > own[:, None] - local_blocks) & ~future)
        ranked = blocks.clone()
        ranked[:, forced] = float("inf")
        ranked[:, future] = float("-inf")
        keep = min(slots, n_blocks)
        # Ties are structural (adjacent blocks share a boundary window, so both can take the same max):
        # a stable sort makes the smaller block index win, as the Triton kernel does.
        values, index = ranked.sort(dim=-1, descending=True, stable=True)
        values, index = values[..., :keep], index[..., :keep]
        index = torch.where(values > float("-inf"), index, torch.full_like(index, n_blocks))  # empty -> sorts last
        index = index.sort(-1).values
        index = torch.where(index == n_blocks, torch.full_like(index, -1), index)
        out[b, :, s:e, :keep] = index.to(torch.int32)
    return out


def block_mask_reference(block_indices: torch.Tensor, T: int, block_size: int) -> torch.Tensor:
    """[B, H_kv, T, slots] block indices -> dense boolean mask [B, H_kv, T, T] (causal applied)."""
    B, Hk, _, slots = block_indices.shape
    n_blocks = math.ceil(T / block_size)
    chosen = torch.zeros(B, Hk, T, n_blocks + 1, dtype=torch.bool, device=block_indices.device)
    idx = torch.where(block_indices < 0, n_blocks, block_indices).long()
    chosen.scatter_(-1, idx, True)
    key_block = torch.arange(T, device=block_indices.device) // block_size
    mask = chosen[..., :n_blocks].gather(-1, key_block.expand(B, Hk, T, T))
    causal = torch.ones(T, T, dtype=torch.bool, device=block_indices.device).tril()
    return mask & causal


def sparse_attention_reference(q, k, v, block_indices, *, block_size=64, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Softmax attention of each query over its selected blocks (dense mask; differentiable; fp32 math)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q, dtype=torch.float32)
    for b, s, e in _sequences(cu_seqlens, B, T):
        L = e - s
        mask = block_mask_reference(block_indices[b:b + 1, :, s:e], L, block_size)[0]  # [Hk, L, L]
        qh = q[b, s:e].float().transpose(0, 1)  # [Hq, L, D]
        kh = k[b, s:e].float().transpose(0, 1).repeat_interleave(G, 0)
        vh = v[b, s:e].float().transpose(0, 1).repeat_interleave(G, 0)
        scores = (qh @ kh.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask.repeat_interleave(G, 0), float("-inf"))
        out[b, s:e] = (scores.softmax(-1) @ vh).transpose(0, 1)
    return out.to(q.dtype)


def dense_causal_attention_reference(q, k, v, *, scale=None, cu_seqlens=None) -> torch.Tensor:
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q, dtype=torch.float32)
    for b, s, e in _sequences(cu_seqlens, B, T):
        qh = q[b, s:e].float().transpose(0, 1)
        kh = k[b, s:e].float().transpose(0, 1).repeat_interleave(G, 0)
        vh = v[b, s:e].float().transpose(0, 1).repeat_interleave(G, 0)
        L = e - s
        scores = (qh @ kh.transpose(1, 2)) * scale
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out[b, s:e] = (scores.softmax(-1) @ vh).transpose(0, 1)
    return out.to(q.dtype)


@torch.no_grad()
def sparse_decode_reference(q, k_cache, v_cache, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                            local_blocks=32, topk=64, dense_len=8192, scale=None, compressed=None) -> torch.Tensor:
    """One new token per sequence: q [N, H_q, D] against k_cache, v_cache [N, S, H_kv, D] (its own k, v
    included) -> [N, H_q, D]. Dense below ``dense_len``; else the last-row selection of a prefill and
    attention over the gathered blocks: linear in S (no T x T work)."""
    N, S, Hk, D = k_cache.shape
    Hq = q.shape[1]
    G = Hq // Hk
    scale = D**-0.5 if scale is None else scale
    qh = q.float().view(N, Hk, G, D)
    if S < dense_len:
        scores = torch.einsum("nkgd,nskd->nkgs", qh, k_cache.float()) * scale
        out = torch.einsum("nkgs,nskd->nkgd", scores.softmax(-1), v_cache.float())
        return out.reshape(N, Hq, D).to(q.dtype)
    indices = decode_block_selection_reference(q, k_cache, block_size=block_size, kernel_size=kernel_size,
                                               kernel_stride=kernel_stride, init_blocks=init_blocks,
                                               local_blocks=local_blocks, topk=topk, scale=scale,
                                               compressed=compressed)  # [N, Hk, slots]
    positions = indices.long()[..., None] * block_size + torch.arange(block_size, device=q.device)
    valid = (indices[..., None] >= 0) & (positions < S)
    positions = positions.clamp(0, S - 1).flatten(2)  # [N, Hk, L]
    gather = lambda cache: cache.permute(0, 2, 1, 3).gather(  # noqa: E731
        2, positions[..., None].expand(-1, -1, -1, D)).float()  # [N, Hk, L, D]
    keys, values = gather(k_cache), gather(v_cache)
    scores = torch.einsum("nkgd,nkld->nkgl", qh, keys) * scale
    scores = scores.masked_fill(~valid.flatten(2)[:, :, None], float("-inf"))
    out = torch.einsum("nkgl,nkld->nkgd", scores.softmax(-1), values)
    return out.reshape(N, Hq, D).to(q.dtype)


@torch.no_grad()
def decode_block_selection_reference(q, k_cache, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                                     local_blocks=32, topk=64, scale=None, compressed=None) -> torch.Tensor:
    """The blocks the last token of each cached sequence selects: [N, H_kv, slots] int32 (ascending, -1),
    the same as ``select_blocks_reference``'s last row, computed from the compressed keys only."""
    N, S, Hk, D = k_cache.shape
    G = q.shape[1] // Hk
    w, s, B = kernel_size, kernel_stride, block_size
    scale = D**-0.5 if scale is None else scale
    if compressed is None:
        kc, _ = compress_keys_reference(k_cache, w, s)
        k2, _ = compress_keys_reference(k_cache, 4 * w, 4 * s)
    else:
        kc, k2 = compressed
    qh = q.float().view(N, Hk, G, D)
    # every complete window ends at or before the last token, so all of them are visible to it
    s_c = torch.einsum("nkgd,njkd->nkgj", qh, kc.float()) * scale
    s_2 = torch.einsum("nkgd,njkd->nkgj", qh, k2.float()) * scale
    lse = (s_2 if s_2.shape[-1] else s_c).logsumexp(-1, keepdim=True)
    p = torch.exp(s_c - lse).sum(2)  # [N, Hk, n_c]
    n_c = p.shape[-1]
    n_blocks = -(-S // B)
    blk = torch.arange(n_blocks, device=q.device)
    lo = torch.div(B * blk - w + s, s, rounding_mode="floor").clamp(min=0)  # ceil((B b - w + 1) / s)
    hi = torch.div(B * blk + B - 1, s, rounding_mode="floor").clamp(max=n_c - 1)
    neg = torch.tensor(float("-inf"), device=q.device)
    block_score = torch.full((N, Hk, n_blocks), float("-inf"), device=q.device)
    if n_c:
        for offset in range(-(-(B + w - 1) // s) + 1):  # at most this many windows overlap one block
            j = lo + offset
            block_score = torch.maximum(block_score, torch.where(j <= hi, p[..., j.clamp(max=n_c - 1)], neg))
    own = (S - 1) // B
    forced = (blk < init_blocks) | (blk > own - local_blocks)
    block_score = torch.where(forced, torch.tensor(float("inf"), device=q.device), block_score)
    slots = init_blocks + local_blocks + topk
    keep = min(slots, n_blocks)
    values, index = block_score.sort(dim=-1, descending=True, stable=True)
    index = torch.where(values[..., :keep] > float("-inf"), index[..., :keep], n_blocks).sort(-1).values
    out = torch.full((N, Hk, slots), -1, dtype=torch.int32, device=q.device)
    out[..., :keep] = torch.where(index == n_blocks, -1, index).to(torch.int32)
    return out
