"""Block-sparse attention in Triton: each query attends exactly to the keys of its selected blocks.

Selections are per token (``block_indices`` [H_kv, TT, S], ascending, -1 = empty), shared by the G query
heads of a KV group, so one program serves a token and all G heads at once: each K/V block is loaded
once per group.

forward   one program per (token, KV head): online softmax over the token's blocks -> o, lse
backward  dq: one program per (token, KV head), the forward loop again with the saved lse
          dk, dv: one program per (key block, KV head) over the tokens that selected the block (an
          inverted index built with a sort, linear in T), so no atomics and no T x T tensor
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_fwd_kernel(q, k, v, o, lse, idx, tok_seq_start, scale, TT,
                       HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, S: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    start = tl.load(tok_seq_start + t).to(tl.int64)
    rg = tl.arange(0, BG)
    rd = tl.arange(0, D)
    rs = tl.arange(0, BS)
    heads = hk * G + rg
    gmask = rg < G
    qt = tl.load(q + (t * HQ + heads[:, None]) * D + rd[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, D], dtype=tl.float32)
    for s in range(S):
        blk = tl.load(idx + (hk * TT + t) * S + s)
        if blk >= 0:
            kpos = start + blk.to(tl.int64) * BS + rs
            kmask = kpos <= t
            kb = tl.load(k + (kpos[:, None] * HK + hk) * D + rd[None, :], mask=kmask[:, None], other=0.0)
            vb = tl.load(v + (kpos[:, None] * HK + hk) * D + rd[None, :], mask=kmask[:, None], other=0.0)
            scores = tl.dot(qt, tl.trans(kb)) * scale
            scores = tl.where(kmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            acc_l = acc_l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
            m = m_new
    out = acc / acc_l[:, None]
    tl.store(o + (t * HQ + heads[:, None]) * D + rd[None, :], out.to(o.dtype.element_ty), mask=gmask[:, None])
    tl.store(lse + t * HQ + heads, m + tl.log(acc_l), mask=gmask)


@triton.jit
def _sparse_dq_kernel(q, k, v, do, lse, delta, dq, idx, tok_seq_start, scale, TT,
                      HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                      BS: tl.constexpr, S: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    start = tl.load(tok_seq_start + t).to(tl.int64)
    rg = tl.arange(0, BG)
    rd = tl.arange(0, D)
    rs = tl.arange(0, BS)
    heads = hk * G + rg
    gmask = rg < G
    rows = (t * HQ + heads[:, None]) * D + rd[None, :]
    qt = tl.load(q + rows, mask=gmask[:, None], other=0.0)
    dot_ = tl.load(do + rows, mask=gmask[:, None], other=0.0)
    lse_t = tl.load(lse + t * HQ + heads, mask=gmask, other=0.0)
    delta_t = tl.load(delta + t * HQ + heads, mask=gmask, other=0.0)
    acc = tl.zeros([BG, D], dtype=tl.float32)
    for s in range(S):
        blk = tl.load(idx + (hk * TT + t) * S + s)
        if blk >= 0:
            kpos = start + blk.to(tl.int64) * BS + rs
            kmask = kpos <= t
            kb = tl.load(k + (kpos[:, None] * HK + hk) * D + rd[None, :], mask=kmask[:, None], other=0.0)
            vb = tl.load(v + (kpos[:, None] * HK + hk) * D + rd[None, :], mask=kmask[:, None], other=0.0)
            scores = tl.dot(qt, tl.trans(kb)) * scale
            p = tl.where(kmask[None, :], tl.exp(scores - lse_t[:, None]), 0.0)
            dp = tl.dot(dot_, tl.trans(vb))
            ds = p * (dp - delta_t[:, None])
            acc += tl.dot(ds.to(kb.dtype), kb)
    tl.store(dq + rows, (acc * scale).to(dq.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _sparse_dkv_kernel(q, k, v, do, lse, delta, dk, dv, blk_key_start, blk_key_len, csr_offsets, csr_tokens, scale,
                       NB, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, BQ: tl.constexpr):
    """One key block of one KV head; rows = BQ tokens x BG heads of the tokens that selected the block."""
    gb = tl.program_id(0)
    hk = tl.program_id(1)
    kstart = tl.load(blk_key_start + gb).to(tl.int64)
    klen = tl.load(blk_key_len + gb)
    rs = tl.arange(0, BS)
    rd = tl.arange(0, D)
    kvalid = rs < klen
    kpos = kstart + rs
    kv_rows = (kpos[:, None] * HK + hk) * D + rd[None, :]
    kb = tl.load(k + kv_rows, mask=kvalid[:, None], other=0.0)
    vb = tl.load(v + kv_rows, mask=kvalid[:, None], other=0.0)
    dk_acc = tl.zeros([BS, D], dtype=tl.float32)
    dv_acc = tl.zeros([BS, D], dtype=tl.float32)
    lo = tl.load(csr_offsets + hk * NB + gb)
    hi = tl.load(csr_offsets + hk * NB + gb + 1)
    rr = tl.arange(0, BQ * BG)
    slot = rr // BG
    head = hk * G + rr % BG
    for i0 in range(lo, hi, BQ):
        tvalid = (i0 + slot < hi) & (rr % BG < G)
        tok = tl.load(csr_tokens + i0 + slot, mask=tvalid, other=0).to(tl.int64)
        rows = (tok[:, None] * HQ + head[:, None]) * D + rd[None, :]
        qr = tl.load(q + rows, mask=tvalid[:, None], other=0.0)
        dor = tl.load(do + rows, mask=tvalid[:, None], other=0.0)
        lse_r = tl.load(lse + tok * HQ + head, mask=tvalid, other=0.0)
        delta_r = tl.load(delta + tok * HQ + head, mask=tvalid, other=0.0)
        visible = tvalid[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
        scores = tl.dot(qr, tl.trans(kb)) * scale
        p = tl.where(visible, tl.exp(scores - lse_r[:, None]), 0.0)
        dv_acc += tl.dot(tl.trans(p.to(dor.dtype)), dor)
        dp = tl.dot(dor, tl.trans(vb))
        ds = p * (dp - delta_r[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(qr.dtype)), qr)
    tl.store(dk + kv_rows, (dk_acc * scale).to(dk.dtype.element_ty), mask=kvalid[:, None])
    tl.store(dv + kv_rows, dv_acc.to(dv.dtype.element_ty), mask=kvalid[:, None])


# -- host side --------------------------------------------------------------------------------------

class SparseLayout:
    """Per-token sequence starts and the global numbering of key blocks (blocks never cross sequences)."""

    def __init__(self, seq_bounds: list[int], block_size: int, device):
        starts, block_start, block_len, block_offset = [], [], [], []
        for s, e in zip(seq_bounds[:-1], seq_bounds[1:]):
            block_offset.append(len(block_start))
            starts.append(torch.full((e - s,), s, dtype=torch.int32))
            for b0 in range(s, e, block_size):
                block_start.append(b0)
                block_len.append(min(block_size, e - b0))
        self.num_blocks = len(block_start)
        self.tok_seq_start = torch.cat(starts).to(device) if starts else torch.zeros(0, dtype=torch.int32, device=device)
        self.blk_key_start = torch.tensor(block_start or [0], dtype=torch.int32, device=device)
        self.blk_key_len = torch.tensor(block_len or [0], dtype=torch.int32, device=device)
        lengths = [e - s for s, e in zip(seq_bounds[:-1], seq_bounds[1:])]
        self.tok_block_offset = torch.repeat_interleave(
            torch.tensor(block_offset, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)).to(device)


def inverted_index(idx: torch.Tensor, layout: SparseLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [H_kv, TT, S] -> CSR (offsets [H_kv * NB + 1], tokens) listing, for every (KV head, key block),
    the tokens that selected it, in ascending token order. O(H_kv * TT * S) memory."""
    Hk, TT, S = idx.shape
    NB = layout.num_blocks
    valid = idx >= 0
    global_block = idx.long() + layout.tok_block_offset[None, :, None] + NB * torch.arange(Hk, device=idx.device)[:, None, None]
    keys = global_block[valid]
    tokens = torch.arange(TT, device=idx.device)[None, :, None].expand(Hk, TT, S)[valid]
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=Hk * NB)
    offsets = torch.zeros(Hk * NB + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, tokens[order].to(torch.int32).contiguous()


def _config(G: int, D: int) -> dict:
    BG = max(16, triton.next_power_of_2(G))
    dkv_BG = triton.next_power_of_2(G)
    return {"BG": BG, "dkv_BG": dkv_BG, "BQ": max(1, 64 // dkv_BG) if dkv_BG < 64 else 1,
            "warps": 4 if D <= 64 else 8}


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, seq_bounds, block_size, scale):
        TT, Hq, D = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        S = idx.shape[-1]
        cfg = _config(G, D)
        layout = SparseLayout(seq_bounds, block_size, q.device)
        o = torch.empty_like(q)
        lse = torch.empty(TT, Hq, dtype=torch.float32, device=q.device)
        if TT:
            _sparse_fwd_kernel[(TT, Hk)](q, k, v, o, lse, idx, layout.tok_seq_start, scale, TT, HQ=Hq, HK=Hk, G=G,
                                         BG=cfg["BG"], D=D, BS=block_size, S=S, num_warps=cfg["warps"])
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.layout, ctx.block_size, ctx.scale, ctx.cfg = layout, block_size, scale, cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx = ctx.saved_tensors
        layout, block_size, scale, cfg = ctx.layout, ctx.block_size, ctx.scale, ctx.cfg
        TT, Hq, D = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        S = idx.shape[-1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # [TT, Hq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if TT:
            _sparse_dq_kernel[(TT, Hk)](q, k, v, do, lse, delta, dq, idx, layout.tok_seq_start, scale, TT, HQ=Hq,
                                        HK=Hk, G=G, BG=cfg["BG"], D=D, BS=block_size, S=S, num_warps=cfg["warps"])
            offsets, tokens = inverted_index(idx, layout)
            _sparse_dkv_kernel[(layout.num_blocks, Hk)](
                q, k, v, do, lse, delta, dk, dv, layout.blk_key_start, layout.blk_key_len, offsets, tokens, scale,
                layout.num_blocks, HQ=Hq, HK=Hk, G=G, BG=cfg["dkv_BG"], D=D, BS=block_size, BQ=cfg["BQ"],
                num_warps=cfg["warps"])
        return dq, dk, dv, None, None, None, None


def triton_sparse_attention(q, k, v, idx, seq_bounds, block_size: int, scale: float) -> torch.Tensor:
    """q [TT, H_q, D], k, v [TT, H_kv, D], idx [H_kv, TT, S] (int32, contiguous) -> o [TT, H_q, D]."""
    return SparseAttentionFunction.apply(q, k, v, idx, seq_bounds, block_size, scale)
