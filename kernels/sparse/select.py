"""Block selection of InfLLM-V2 in Triton (stage 1): score compressed keys, max-pool to blocks, top-k.

One program serves BT consecutive tokens of one sequence and one KV head, i.e. BT x G query rows:
  1. log-sum-exp of each row over the visible coarse keys (the one-pass normaliser of InfLLM-V2);
     rows with no coarse key visible yet use the exact LSE over the visible fine keys instead;
  2. blocks in tiles of NBT: probabilities of the windows of the tile (and of each block's left
     neighbour window), summed over the G heads, max-pooled to block scores; init / local blocks forced,
     future blocks dropped;
  3. a running top-k per token: (score, block) packed into one int64 that sorts like the score, merged
     with tl.sort, so memory stays O(T * slots) (never T x blocks).
Restricted to kernel_size == 2 * kernel_stride and block_size / kernel_stride a power of two (the official
32 / 16 / 64); other configurations use the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .naive import compress_keys_reference
from ..tiles import tiles


@triton.jit
def _sortable(x):
    """fp32 -> int64 that orders like x (for finite values and +-inf)."""
    bits = x.to(tl.int32, bitcast=True)
    flipped = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return flipped.to(tl.int64)


@triton.jit
def _cat(a, b):
    """Concatenate two [R, N] tensors along the last axis (via join + permute + reshape)."""
    R: tl.constexpr = a.shape[0]
    N: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [R, 2 * N])


EMPTY: tl.constexpr = tl.constexpr(-0x7FFFFFFFFFFFFFFF)  # a packed key that sorts after every real one


@triton.jit
def _merge_top(best, keys, PAD_STEPS: tl.constexpr, LOG_KP: tl.constexpr):
    """best [R, KP] sorted descending, keys [R, NBT] in any order -> the KP largest of both, sorted descending
    (exactly the first half of a full sort of the two). The new keys are sorted ascending and padded in front
    with EMPTY to KP, so best followed by them is a bitonic sequence: one compare at distance KP (an
    elementwise max) keeps its KP largest, still bitonic, and LOG_KP half-cleaner stages sort them. A sort of
    NBT keys plus log2(KP) stages, against log2(2 KP)^2 / 2 stages over twice the keys for a full sort."""
    R: tl.constexpr = best.shape[0]
    KP: tl.constexpr = best.shape[1]
    asc = tl.sort(keys, dim=1, descending=False)
    for _ in tl.static_range(PAD_STEPS):
        asc = _cat(tl.full(asc.shape, EMPTY, dtype=tl.int64), asc)
    x = tl.maximum(best, asc)
    for i in tl.static_range(LOG_KP):
        # compare each element with the one KP >> (i + 1) further, in groups of twice that
        pairs = tl.permute(tl.reshape(x, [R, 1 << i, 2, KP >> (i + 1)]), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(tl.maximum(a, b), tl.minimum(a, b)), (0, 1, 3, 2)), [R, KP])
    return x


@triton.jit
def _select_kernel(q, kc, k2, idx, tok_pos, tok_seq, seq_start, seq_len, seq_c_off, seq_2_off, scale, TT,
                   HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                   BT: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr, STRIDE: tl.constexpr,
                   W2: tl.constexpr, STRIDE2: tl.constexpr, M: tl.constexpr, NBT: tl.constexpr,
                   INIT: tl.constexpr, LOCAL: tl.constexpr, SLOTS: tl.constexpr, KP: tl.constexpr,
                   C2T: tl.constexpr, PAD_STEPS: tl.constexpr,
                   LOG_KP: tl.constexpr, BITONIC_MERGE: tl.constexpr):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    # the tile's first token (global); tiles never cross sequences (see the host side)
    t0 = tl.load(tok_pos + tile).to(tl.int64)
    n = tl.load(tok_seq + tile)
    s_start = tl.load(seq_start + n).to(tl.int64)
    s_len = tl.load(seq_len + n)
    c_off = tl.load(seq_c_off + n).to(tl.int64)
    c_cnt = tl.load(seq_c_off + n + 1).to(tl.int64) - c_off
    off2 = tl.load(seq_2_off + n).to(tl.int64)
    cnt2 = tl.load(seq_2_off + n + 1).to(tl.int64) - off2

    rows = tl.arange(0, BT * BG)
    r_tok = rows // BG
    r_head = rows % BG
    local_t = (t0 - s_start) + r_tok  # position of each row's token inside its sequence
    r_valid = (local_t < s_len) & (r_head < G)
    rd = tl.arange(0, D)
    qr = tl.load(q + ((s_start + local_t)[:, None] * HQ + hk * G + r_head[:, None]) * D + rd[None, :],
                 mask=r_valid[:, None], other=0.0)

    # 1. row LSE over the visible coarse keys
    m2 = tl.full([BT * BG], float("-inf"), dtype=tl.float32)
    l2 = tl.zeros([BT * BG], dtype=tl.float32)
    last_t = tl.minimum(t0 - s_start + BT - 1, s_len - 1)
    n2_vis = tl.minimum(tl.maximum((last_t - W2 + 1) // STRIDE2 + 1, 0), cnt2)
    rc2 = tl.arange(0, C2T)
    for j0 in range(0, n2_vis, C2T):
        j = j0 + rc2
        kt = tl.load(k2 + ((off2 + j)[:, None] * HK + hk) * D + rd[None, :], mask=(j < cnt2)[:, None], other=0.0)
        sc = tl.dot(qr, tl.trans(kt)) * scale
        vis = (j[None, :] * STRIDE2 + W2 - 1 <= local_t[:, None]) & (j[None, :] < cnt2)
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m2, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l2 = l2 * tl.exp(m2 - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), 1)
        m2 = m_new
    lse = tl.where(l2 > 0, m2 + tl.log(tl.maximum(l2, 1e-30)), float("-inf"))
    # rows too early for any coarse key: exact LSE over the visible fine windows (only the first tokens)
    first_t = t0 - s_start
    if first_t < W2 - 1:
        n_fine = tl.minimum(tl.maximum((last_t - W + 1) // STRIDE + 1, 0), c_cnt)
        mc = tl.full([BT * BG], float("-inf"), dtype=tl.float32)
        lc = tl.zeros([BT * BG], dtype=tl.float32)
        for j0 in range(0, n_fine, C2T):
            j = j0 + rc2
            kt = tl.load(kc + ((c_off + j)[:, None] * HK + hk) * D + rd[None, :], mask=(j < c_cnt)[:, None], other=0.0)
            sc = tl.dot(qr, tl.trans(kt)) * scale
            vis = (j[None, :] * STRIDE + W - 1 <= local_t[:, None]) & (j[None, :] < c_cnt)
            sc = tl.where(vis, sc, float("-inf"))
            m_new = tl.maximum(mc, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            lc = lc * tl.exp(mc - m_safe) + tl.sum(tl.exp(sc - m_safe[:, None]), 1)
            mc = m_new
        lse = tl.where(l2 > 0, lse, tl.where(lc > 0, mc + tl.log(tl.maximum(lc, 1e-30)), 0.0))

    # 2./3. block scores tile by tile, running top-k of packed (score, block) keys
    best = tl.full([BT, KP], EMPTY, dtype=tl.int64)
    tok_local = (t0 - s_start) + tl.arange(0, BT)
    own = tok_local // BLOCK
    n_blocks_vis = tl.minimum(last_t // BLOCK + 1, tl.cdiv(s_len, BLOCK))
    rb = tl.arange(0, NBT)
    rw = tl.arange(0, NBT * M)
    carry = tl.full([BT], float("-inf"), dtype=tl.float32)  # last window of the previous tile's last block
    for b0 in range(0, n_blocks_vis, NBT):
        # the M windows that start inside each block of the tile; a block's score also takes its left
        # neighbour window M*b - 1, which is the previous block's last window: taken from the same
        # product (tl.gather, or the carry from the previous tile) so that the two blocks sharing that
        # window see bit-identical values and break the tie the same way as the reference
        j_main = b0 * M + rw
        km = tl.load(kc + ((c_off + j_main)[:, None] * HK + hk) * D + rd[None, :], mask=(j_main < c_cnt)[:, None],
                     other=0.0)
        s_main = tl.dot(qr, tl.trans(km)) * scale - lse[:, None]
        vis_main = r_valid[:, None] & (j_main[None, :] < c_cnt) & (j_main[None, :] * STRIDE + W - 1 <= local_t[:, None])
        p_main = tl.sum(tl.reshape(tl.where(vis_main, tl.exp(s_main), 0.0), [BT, BG, NBT * M]), 1)
        # a window counts for a token when some head of it sees it: the token is real and the window visible
        any_main = (tok_local < s_len)[:, None] & (j_main[None, :] < c_cnt) & \
            (j_main[None, :] * STRIDE + W - 1 <= tok_local[:, None])
        p3 = tl.reshape(tl.where(any_main, p_main, float("-inf")), [BT, NBT, M])
        last = tl.sum(tl.where((tl.arange(0, M) == M - 1)[None, None, :], p3, 0.0), 2)  # [BT, NBT]
        shifted = tl.gather(last, tl.broadcast_to(tl.maximum(rb - 1, 0)[None, :], [BT, NBT]), 1)
        p_left = tl.where(rb[None, :] == 0, carry[:, None], shifted)
        carry = tl.sum(tl.where(rb[None, :] == NBT - 1, last, 0.0), 1)
        block_score = tl.maximum(tl.max(p3, 2), p_left)
        blk = b0 + rb
        forced = (blk[None, :] < INIT) | ((blk[None, :] > own[:, None] - LOCAL) & (blk[None, :] <= own[:, None]))
        block_score = tl.where(forced, float("inf"), block_score)
        future = blk[None, :] > own[:, None]
        keys = (_sortable(block_score) << 32) | (0x7FFFFFFF - blk[None, :]).to(tl.int64)
        empty = future | (block_score == float("-inf"))
        keys = tl.where(empty, EMPTY, keys)
        # merge with the running best, keep the KP largest. (Skipping the merge when no key beats a token's
        # SLOTS-th best was measured on H200, 2026-12-03: 11% slower at 128K x 2, the branch costs more than
        # the sorts it saves.)
        if BITONIC_MERGE:
            best = _merge_top(best, keys, PAD_STEPS, LOG_KP)
        else:  # pad the tile's NBT keys to KP with empties, sort them with the running best, keep the first half
            for _ in tl.static_range(PAD_STEPS):
                keys = _cat(keys, tl.full(keys.shape, EMPTY, dtype=tl.int64))
            merged = tl.sort(_cat(best, keys), dim=1, descending=True)
            best = tl.split(tl.permute(tl.reshape(merged, [BT, 2, KP]), (0, 2, 1)))[0]

    # 4. slots -> block indices ascending, -1 padded
    col = tl.arange(0, KP)
    taken = (best > EMPTY) & (col[None, :] < SLOTS)
    block_id = (0x7FFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
    block_id = tl.where(taken, block_id, 0x3FFFFFFF)
    block_id = tl.sort(block_id, dim=1)
    block_id = tl.where(block_id == 0x3FFFFFFF, -1, block_id)
    tok_valid = tok_local < s_len
    out = idx + (hk * TT + s_start + tok_local)[:, None].to(tl.int64) * SLOTS + col[None, :]
    tl.store(out, block_id, mask=tok_valid[:, None] & (col[None, :] < SLOTS))


# -- host side --------------------------------------------------------------------------------------

# Benchmarks sweep the selection's launch through this dict; empty = defaults. Keys: "NBT" (key blocks scored
# per step, one top-k merge each: a power of two, at most the slots rounded up), "BT" (tokens per program),
# "warps", "stages", "merge" ("sort": a full sort of the running best with the new keys; "bitonic": _merge_top,
# fewer stages, not yet timed on a GPU). On H200 (2026-12-03) 8 warps were 2x slower than 4.
SELECT_OVERRIDES: dict = {}

def triton_supports(block_size: int, kernel_size: int, kernel_stride: int, D: int) -> bool:
    m = block_size // kernel_stride
    return (kernel_size == 2 * kernel_stride and block_size % kernel_stride == 0 and m >= 1 and m & (m - 1) == 0
            and D in (16, 32, 64, 128))


@torch.no_grad()
def triton_select_blocks(q, k, seq_bounds, *, block_size, kernel_size, kernel_stride, init_blocks, local_blocks, topk,
                         scale, q_start: int = 0) -> torch.Tensor:
    """q [TT, H_q, D], k [TT, H_kv, D] (flattened tokens) -> block indices [H_kv, TT, slots] int32.

    ``q_start``: only the rows at positions >= q_start of each sequence are selected (chunked prefill: the
    queries of the new chunk against the whole cache); earlier rows stay -1 (a row's selection depends
    only on its own query and the keys up to it, so the computed rows equal a full selection's)."""
    TT, Hq, D = q.shape
    Hk = k.shape[1]
    G = Hq // Hk
    device = q.device
    cu = torch.tensor(seq_bounds, device=device)
    kc, cu_c = compress_keys_reference(k[None], kernel_size, kernel_stride, cu)
    k2, cu_2 = compress_keys_reference(k[None], 4 * kernel_size, 4 * kernel_stride, cu)
    kc = kc[0].to(q.dtype).contiguous() if kc.shape[1] else q.new_zeros(1, Hk, D)
    k2 = k2[0].to(q.dtype).contiguous() if k2.shape[1] else q.new_zeros(1, Hk, D)
    slots = init_blocks + local_blocks + topk
    KP = triton.next_power_of_2(slots)
    BG = triton.next_power_of_2(G)
    cfg = {"NBT": 32, "BT": max(1, 64 // BG), "warps": 4, "stages": 3, "merge": "sort", **SELECT_OVERRIDES}
    if cfg["merge"] not in ("sort", "bitonic"):
        raise ValueError(f"selection merge must be 'sort' or 'bitonic', not {cfg['merge']!r}")
    NBT, BT = min(cfg["NBT"], KP), cfg["BT"]
    if NBT & (NBT - 1) or BT & (BT - 1) or BT * BG < 16:
        raise ValueError(f"selection launch NBT={NBT}, BT={BT}: need powers of two and BT x {BG} heads >= 16 rows")
    tile_pos, _, tile_seq = tiles(seq_bounds, BT, q_start)
    idx = torch.full((Hk, TT, slots), -1, dtype=torch.int32, device=device)
    if not len(tile_pos):
        return idx
    as_i32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int32, device=device)  # noqa: E731
    starts, ends = seq_bounds[:-1], seq_bounds[1:]
    pad_steps = (KP // NBT).bit_length() - 1
    _select_kernel[(len(tile_pos), Hk)](
        q, kc, k2, idx, as_i32(tile_pos), as_i32(tile_seq), as_i32(starts),
        as_i32([e - s for s, e in zip(starts, ends)]), cu_c.to(torch.int32), cu_2.to(torch.int32), scale, TT,
        HQ=Hq, HK=Hk, G=G, BG=BG, D=D, BT=BT, BLOCK=block_size, W=kernel_size, STRIDE=kernel_stride,
        W2=4 * kernel_size, STRIDE2=4 * kernel_stride, M=block_size // kernel_stride, NBT=NBT, INIT=init_blocks,
        LOCAL=local_blocks, SLOTS=slots, KP=KP, C2T=32, PAD_STEPS=pad_steps, LOG_KP=KP.bit_length() - 1,
        BITONIC_MERGE=cfg["merge"] == "bitonic", num_warps=cfg["warps"],
        num_stages=cfg["stages"])
    return idx
