"""Block-sparse attention in Triton: each query attends exactly to the keys of its selected blocks.

Selections are per token (``block_indices`` [H_kv, TT, S], ascending, -1 = empty) and shared by the G query
heads of a KV group. Consecutive tokens select mostly the same blocks (the local window, similar top-k),
so the kernels work on query tiles: BQ consecutive tokens of one sequence x G heads = BQ*G rows. For each
tile the host builds the union of its tokens' blocks and, per union entry, a bit mask of the tokens that
chose it; each K/V block of the union is then loaded once for the whole tile and rows that did not
choose it are masked out.

forward   one program per (query tile, KV head): online softmax over the tile's union -> o, lse
backward  dq: one program per (query tile, KV head), the forward loop with the saved lse
          dk, dv: one program per (key block, KV head) over exactly the tokens that chose the block (an
          inverted index built with a sort, linear in T), BT of them at a time: no union waste, no atomics,
          no T x T tensor
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..tiles import covered_tokens, tiles


@triton.jit
def _tile_rows(q_tile_start, q_tile_len, hk, G: tl.constexpr, BG: tl.constexpr, BQ: tl.constexpr):
    """Row r of a tile = token r // BG of the tile, query head hk * G + r % BG."""
    rows = tl.arange(0, BQ * BG)
    slot = rows // BG
    head = hk * G + rows % BG
    valid = (slot < q_tile_len) & (rows % BG < G)
    tok = q_tile_start + slot
    return slot, head, valid, tok


@triton.jit
def _union_block(k, v, union, member, base, u, slot, valid, tok, start, last, hk, HK: tl.constexpr,
                 D: tl.constexpr, BS: tl.constexpr):
    """Union entry u of a tile: its key block's K and V [BS, D] (zeros past the tile's last token ``last``)
    and which (row, key) pairs are visible: the row's token chose the block and the key is not in its future."""
    blk = tl.load(union + base + u)
    chose = (tl.load(member + base + u) >> slot) & 1
    kpos = start + blk.to(tl.int64) * BS + tl.arange(0, BS)
    rows = (kpos[:, None] * HK + hk) * D + tl.arange(0, D)[None, :]
    in_range = (kpos <= last)[:, None]
    kb = tl.load(k + rows, mask=in_range, other=0.0)
    vb = tl.load(v + rows, mask=in_range, other=0.0)
    visible = (valid & (chose == 1))[:, None] & (kpos[None, :] <= tok[:, None])
    return kb, vb, visible


@triton.jit
def _online_softmax_step(scores, vb, m, acc_l, acc):
    """Fold one key block (scores [rows, BS] with -inf where hidden, values vb [BS, D]) into the running
    max m, sum acc_l and output acc of an online softmax; rows with nothing visible yet stay at zero."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    acc_l = acc_l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
    return m_new, acc_l, acc


@triton.jit
def _sparse_fwd_kernel(q, k, v, o, lse, union, union_len, member, tile_start, tile_len, tile_seq_start, scale, NT,
                       U, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, BQ: tl.constexpr):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    t0 = tl.load(tile_start + tile).to(tl.int64)
    n_tok = tl.load(tile_len + tile)
    start = tl.load(tile_seq_start + tile).to(tl.int64)
    slot, head, valid, tok = _tile_rows(t0, n_tok, hk, G, BG, BQ)
    rd = tl.arange(0, D)
    rows = (tok[:, None] * HQ + head[:, None]) * D + rd[None, :]
    qt = tl.load(q + rows, mask=valid[:, None], other=0.0)
    m = tl.full([BQ * BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BQ * BG], dtype=tl.float32)
    acc = tl.zeros([BQ * BG, D], dtype=tl.float32)
    base = (hk * NT + tile).to(tl.int64) * U
    # the union's valid entries come first: a loop without branches, which Triton can software-pipeline
    n_union = tl.load(union_len + hk * NT + tile)
    for u in range(n_union):
        kb, vb, visible = _union_block(k, v, union, member, base, u, slot, valid, tok, start, t0 + n_tok - 1, hk,
                                       HK, D, BS)
        scores = tl.where(visible, tl.dot(qt, tl.trans(kb)) * scale, float("-inf"))
        m, acc_l, acc = _online_softmax_step(scores, vb, m, acc_l, acc)
    out = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
    tl.store(o + rows, out.to(o.dtype.element_ty), mask=valid[:, None])
    tl.store(lse + tok * HQ + head, m + tl.log(tl.where(acc_l > 0, acc_l, 1.0)), mask=valid)


@triton.jit
def _sparse_dq_kernel(q, k, v, do, lse, delta, dq, union, union_len, member, tile_start, tile_len, tile_seq_start,
                      scale, NT, U, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                      D: tl.constexpr, BS: tl.constexpr, BQ: tl.constexpr):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    t0 = tl.load(tile_start + tile).to(tl.int64)
    n_tok = tl.load(tile_len + tile)
    start = tl.load(tile_seq_start + tile).to(tl.int64)
    slot, head, valid, tok = _tile_rows(t0, n_tok, hk, G, BG, BQ)
    rd = tl.arange(0, D)
    rows = (tok[:, None] * HQ + head[:, None]) * D + rd[None, :]
    qt = tl.load(q + rows, mask=valid[:, None], other=0.0)
    dot_ = tl.load(do + rows, mask=valid[:, None], other=0.0)
    lse_t = tl.load(lse + tok * HQ + head, mask=valid, other=0.0)
    delta_t = tl.load(delta + tok * HQ + head, mask=valid, other=0.0)
    acc = tl.zeros([BQ * BG, D], dtype=tl.float32)
    base = (hk * NT + tile).to(tl.int64) * U
    n_union = tl.load(union_len + hk * NT + tile)
    for u in range(n_union):
        kb, vb, visible = _union_block(k, v, union, member, base, u, slot, valid, tok, start, t0 + n_tok - 1, hk,
                                       HK, D, BS)
        p = tl.where(visible, tl.exp(tl.dot(qt, tl.trans(kb)) * scale - lse_t[:, None]), 0.0)
        dp = tl.dot(dot_, tl.trans(vb))
        ds = p * (dp - delta_t[:, None])
        acc += tl.dot(ds.to(kb.dtype), kb)
    tl.store(dq + rows, (acc * scale).to(dq.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _sparse_dkv_kernel(q, k, v, do, lse, delta, dk, dv, blk_key_start, blk_key_len, csr_offsets, csr_token, scale,
                       NB, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, BT: tl.constexpr):
    """One key block of one KV head, over exactly the tokens that chose it, BT tokens x G heads at a time (the
    tokens need not be neighbours: every row of an iteration chose the block, no row is masked for not having)."""
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
    rows = tl.arange(0, BT * BG)
    slot = rows // BG
    head = hk * G + rows % BG
    for i in range(lo, hi, BT):
        entry = i + slot
        valid = (entry < hi) & (rows % BG < G)
        tok = tl.load(csr_token + entry, mask=valid, other=0).to(tl.int64)
        q_rows = (tok[:, None] * HQ + head[:, None]) * D + rd[None, :]
        qr = tl.load(q + q_rows, mask=valid[:, None], other=0.0)
        dor = tl.load(do + q_rows, mask=valid[:, None], other=0.0)
        lse_r = tl.load(lse + tok * HQ + head, mask=valid, other=0.0)
        delta_r = tl.load(delta + tok * HQ + head, mask=valid, other=0.0)
        visible = valid[:, None] & kvalid[None, :] & (kpos[None, :] <= tok[:, None])
        p = tl.where(visible, tl.exp(tl.dot(qr, tl.trans(kb)) * scale - lse_r[:, None]), 0.0)
        dv_acc += tl.dot(tl.trans(p.to(dor.dtype)), dor)
        dp = tl.dot(dor, tl.trans(vb))
        ds = p * (dp - delta_r[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(qr.dtype)), qr)
    tl.store(dk + kv_rows, (dk_acc * scale).to(dk.dtype.element_ty), mask=kvalid[:, None])
    tl.store(dv + kv_rows, dv_acc.to(dv.dtype.element_ty), mask=kvalid[:, None])


# -- host side --------------------------------------------------------------------------------------

class SparseLayout:
    """Query tiles (BQ consecutive tokens of one sequence), the union of their tokens' blocks with a bit
    mask of the choosing tokens, and the global numbering of key blocks (never across sequences)."""

    def __init__(self, idx: torch.Tensor, seq_bounds: list[int], block_size: int, BQ: int, q_start: int = 0):
        """``q_start``: tiles wholly before position q_start of their sequence are left out (their rows
        are not computed): a chunked prefill's new queries, or a context-parallel rank's own queries, are the
        last rows."""
        device = idx.device
        Hk, TT, S = idx.shape
        t_start, t_len, t_seq = tiles(seq_bounds, BQ, q_start)
        b_start, b_len, b_seq = tiles(seq_bounds, block_size)
        bounds = np.asarray(seq_bounds, dtype=np.int64)

        def as_i32(x: np.ndarray) -> torch.Tensor:  # (one 0 for an empty table: kernels take a valid pointer)
            return torch.from_numpy(x if len(x) else np.zeros(1, np.int64)).to(device, torch.int32)

        self.num_tiles, self.num_blocks = len(t_start), len(b_start)
        self.tile_start, self.tile_len, self.tile_seq_start = as_i32(t_start), as_i32(t_len), as_i32(bounds[t_seq])
        self.blk_key_start, self.blk_key_len = as_i32(b_start), as_i32(b_len)
        # per tile: [Hk, NT, BQ * S] block ids (-1 empty) and the token slot each came from
        NT = self.num_tiles
        tokens_np = covered_tokens(t_start, t_len)  # all tokens unless q_start leaves some out
        tile_of_token = torch.from_numpy(np.repeat(np.arange(NT), t_len)).to(device) if NT else None
        tokens = torch.from_numpy(tokens_np).to(device) if NT else None
        slot_of_token = torch.from_numpy(tokens_np - np.repeat(t_start, t_len)).to(device) if NT else None
        # each token's sequence's first global key block
        block_offset = np.searchsorted(b_seq, np.arange(len(bounds) - 1)) if len(b_seq) else np.zeros(len(bounds) - 1,
                                                                                                       np.int64)
        self.tok_block_offset = torch.from_numpy(np.repeat(block_offset, bounds[1:] - bounds[:-1])).to(device) \
            if NT else None
        self.tokens = tokens  # the rows the kernels compute
        grid = torch.full((Hk, NT, BQ, S), -1, dtype=torch.int64, device=device)
        if NT:
            grid[:, tile_of_token, slot_of_token] = idx[:, tokens].long()
        flat = grid.reshape(Hk, NT, BQ * S)
        bit = (torch.ones((), dtype=torch.int64, device=device) << torch.arange(BQ, device=device)).repeat_interleave(S)
        # union: sort the tile's ids, keep the first of each run, OR the token bits of the run
        order = flat.sort(dim=-1, stable=True)
        ids = order.values
        bits = bit[order.indices]
        new_run = torch.ones_like(ids, dtype=torch.bool)
        new_run[..., 1:] = ids[..., 1:] != ids[..., :-1]
        new_run &= ids >= 0
        run_id = new_run.long().cumsum(-1) - 1  # index of the run each entry belongs to
        U = max(int(new_run.sum(-1).max()) if NT else 0, 1)
        self.U = U
        union = torch.full((Hk, NT, U), -1, dtype=torch.int64, device=device)
        member = torch.zeros((Hk, NT, U), dtype=torch.int64, device=device)
        keep = ids >= 0
        h_i, t_i, _ = torch.nonzero(keep, as_tuple=True)
        r_i = run_id[keep]
        union[h_i, t_i, r_i] = ids[keep]
        member.index_put_((h_i, t_i, r_i), bits[keep], accumulate=True)  # distinct tokens: sum == OR
        self.union = union.to(torch.int32).contiguous()
        # valid entries per (KV head, tile): the union's runs are numbered from 0, so they come first
        self.union_len = new_run.sum(-1).to(torch.int32).contiguous()
        self.member = member.to(torch.int32).contiguous()

    def token_index(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For every (KV head, key block): the computed tokens that chose it, ascending (CSR: offsets
        [Hk * NB + 1], tokens). Built with one sort, linear in the number of selections."""
        Hk = idx.shape[0]
        NB, device = self.num_blocks, idx.device
        sel = idx[:, self.tokens].to(torch.int32)  # [Hk, n, S] local block ids, -1 empty (int32: Hk * NB < 2^31)
        valid = sel >= 0
        first_block = self.tok_block_offset[self.tokens].to(torch.int32)[None, :, None]
        head_base = NB * torch.arange(Hk, device=device, dtype=torch.int32)[:, None, None]
        keys = (sel + first_block + head_base)[valid]
        tokens = self.tokens.to(torch.int32)[None, :, None].expand_as(sel)[valid]
        order = torch.argsort(keys, stable=True)  # token order kept within a block
        offsets = torch.zeros(Hk * NB + 1, dtype=torch.int32, device=device)
        offsets[1:] = torch.bincount(keys, minlength=Hk * NB).cumsum(0)
        return offsets, tokens[order].contiguous()


# Benchmarks sweep the launch configuration through this dict (keys of _config); empty = defaults.
KERNEL_OVERRIDES: dict = {}


def _config(G: int, D: int) -> dict:
    BG = triton.next_power_of_2(G)
    # 64 rows per tile (tl.dot needs >= 16), at most 32 tokens (one bit each in an int32 mask)
    # H200 sweep (2026-12-03, benchmarks/sparse.py --sweep, 32K x 2, G = 16, D = 128): the forward and dq
    # kernels with 4 warps instead of 8 are 1.8x / 1.3x faster; dq with 2 stages another 20%; dk/dv over 8 tokens
    # per iteration (128 rows) instead of 4 is 30% faster (with 8 warps: 4 need more shared memory than there is)
    config = {"BG": BG, "BQ": min(32, max(1, 64 // BG)), "warps": 4, "stages": 3, "stages_dq": 2}
    # the dk/dv kernel: tokens per iteration (any power of two: no bit masks there), its own warps and stages
    config.update(BT=2 * config["BQ"], warps_dkv=4 if D <= 64 else 8, stages_dkv=3)
    config.update(KERNEL_OVERRIDES)
    if config["BQ"] * BG < 16 or config["BQ"] > 32:
        raise ValueError(f"sparse attention tile of {config['BQ']} tokens x {BG} heads: need >= 16 rows, <= 32 "
                         "tokens")
    if config["BT"] * BG < 16:
        raise ValueError(f"sparse dk/dv iteration of {config['BT']} tokens x {BG} heads: need >= 16 rows")
    return config


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, seq_bounds, block_size, scale, q_start=0):
        TT, Hq, D = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        cfg = _config(G, D)
        layout = SparseLayout(idx, seq_bounds, block_size, cfg["BQ"], q_start)
        # rows of the left-out tiles are not written: zeros there (and in their dq), so that training works too
        empty = torch.zeros if q_start else torch.empty
        o = torch.zeros_like(q) if q_start else torch.empty_like(q)
        lse = empty(TT, Hq, dtype=torch.float32, device=q.device)
        if layout.num_tiles:
            _sparse_fwd_kernel[(layout.num_tiles, Hk)](
                q, k, v, o, lse, layout.union, layout.union_len, layout.member, layout.tile_start, layout.tile_len,
                layout.tile_seq_start, scale, layout.num_tiles, layout.U, HQ=Hq, HK=Hk, G=G, BG=cfg["BG"], D=D,
                BS=block_size, BQ=cfg["BQ"], num_warps=cfg["warps"], num_stages=cfg["stages"])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.block_size, ctx.scale, ctx.cfg, ctx.q_start = layout, block_size, scale, cfg, q_start
        ctx.idx = idx
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        layout, block_size, scale, cfg = ctx.layout, ctx.block_size, ctx.scale, ctx.cfg
        TT, Hq, D = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # [TT, Hq]
        dq = torch.zeros_like(q) if ctx.q_start else torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if layout.num_tiles:
            common = dict(HQ=Hq, HK=Hk, G=G, BG=cfg["BG"], D=D, BS=block_size, BQ=cfg["BQ"], num_warps=cfg["warps"],
                          num_stages=cfg["stages"])
            _sparse_dq_kernel[(layout.num_tiles, Hk)](
                q, k, v, do, lse, delta, dq, layout.union, layout.union_len, layout.member, layout.tile_start,
                layout.tile_len, layout.tile_seq_start, scale, layout.num_tiles, layout.U,
                **{**common, "num_stages": cfg["stages_dq"]})
            offsets, tokens = layout.token_index(ctx.idx)
            dkv = {**common, "BT": cfg["BT"], "num_warps": cfg["warps_dkv"], "num_stages": cfg["stages_dkv"]}
            del dkv["BQ"]
            _sparse_dkv_kernel[(layout.num_blocks, Hk)](
                q, k, v, do, lse, delta, dk, dv, layout.blk_key_start, layout.blk_key_len, offsets, tokens, scale,
                layout.num_blocks, **dkv)
        return dq, dk, dv, None, None, None, None, None


def triton_sparse_attention(q, k, v, idx, seq_bounds, block_size: int, scale: float, q_start: int = 0) -> torch.Tensor:
    """q [TT, H_q, D], k, v [TT, H_kv, D], idx [H_kv, TT, S] (int32, contiguous) -> o [TT, H_q, D].
    ``q_start`` > 0: the query tiles wholly before position q_start of each sequence are not computed (zeros
    and no gradient there; rows before q_start in the tile that crosses it are computed as usual)."""
    return SparseAttentionFunction.apply(q, k, v, idx, seq_bounds, block_size, scale, q_start)


# -- decode ---------------------------------------------------------------------------------------------

@triton.jit
def _sparse_decode_kernel(q, k, v, o, idx, S, scale, stride_kn, stride_ks, SLOTS,
                          HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr):
    """One new token of sequence n, the G query heads of KV head hk: online softmax over the keys of its
    selected blocks (``idx`` [N, H_kv, SLOTS], -1 = empty) among the S cached positions."""
    n = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    rows = tl.arange(0, BG)
    row_ok = rows < G
    rd = tl.arange(0, D)
    q_rows = (n * HQ + hk * G + rows)[:, None] * D + rd[None, :]
    qt = tl.load(q + q_rows, mask=row_ok[:, None], other=0.0)
    m = tl.full([BG], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, D], dtype=tl.float32)
    base = (n * HK + hk) * SLOTS
    for j in range(SLOTS):
        blk = tl.load(idx + base + j)
        kpos = blk.to(tl.int64) * BS + tl.arange(0, BS)
        kvalid = (blk >= 0) & (kpos < S)
        kv_rows = n * stride_kn + kpos[:, None] * stride_ks + hk * D + rd[None, :]
        kb = tl.load(k + kv_rows, mask=kvalid[:, None], other=0.0)
        vb = tl.load(v + kv_rows, mask=kvalid[:, None], other=0.0)
        scores = tl.where(row_ok[:, None] & kvalid[None, :], tl.dot(qt, tl.trans(kb)) * scale, float("-inf"))
        m, acc_l, acc = _online_softmax_step(scores, vb, m, acc_l, acc)
    out = acc / tl.where(acc_l > 0, acc_l, 1.0)[:, None]
    tl.store(o + q_rows, out.to(o.dtype.element_ty), mask=row_ok[:, None])


def triton_sparse_decode(q, k_cache, v_cache, indices, block_size: int, scale: float) -> torch.Tensor:
    """q [N, H_q, D], k_cache, v_cache [N, S, H_kv, D] (heads and head_dim contiguous; a slice of a longer
    buffer is fine), indices [N, H_kv, slots] (block ids, -1 empty) -> o [N, H_q, D]. One program per
    (sequence, KV head) reads only its selected blocks: no gather copy of the keys."""
    N, S, Hk, D = k_cache.shape
    Hq = q.shape[1]
    G = Hq // Hk
    if k_cache.stride(3) != 1 or k_cache.stride(2) != D or v_cache.stride() != k_cache.stride():
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    q = q.contiguous()
    indices = indices.to(torch.int32).contiguous()
    o = torch.empty_like(q)
    BG = max(16, triton.next_power_of_2(G))  # tl.dot needs 16 rows; the padding rows are masked
    _sparse_decode_kernel[(N, Hk)](q, k_cache, v_cache, o, indices, S, scale, k_cache.stride(0), k_cache.stride(1),
                                   indices.shape[-1], HQ=Hq, HK=Hk, G=G, BG=BG, D=D, BS=block_size,
                                   num_warps=4 if D <= 64 else 8)
    return o
