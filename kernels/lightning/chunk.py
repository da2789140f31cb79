"""Chunked lightning attention in Triton: forward and backward, varlen, fp32 state.

Work is split along time into blocks of L tokens (a multiple of the chunk size C) that never cross a
sequence boundary, so that long sequences still give thousands of parallel programs:

forward   1. block_state:  each block's own state contribution dS_b = sum_t gamma^(L_b-1-t) k_t^T v_t
          2. scan:         S_start_b = gamma^(L_{b-1}) S_start_{b-1} + dS_{b-1}, per sequence (in place)
          3. output:       each block walks its chunks from S_start_b: o = ((q k^T) * M) v + gamma^(i+1) q S
backward  1. block_dstate: dG_b = scale * sum_t gamma^(t+1) q_t^T do_t (the block's pull on S_start_b)
          2. scan (reverse) gives G_end_b, the gradient w.r.t. each block's final state
          3. dq walks forward from S_start_b; dk, dv walk backward from G_end_b

The decay inside a chunk is always applied as gamma^(i-j) with i >= j (or gamma^n, n >= 0): never as
gamma^-i on q and gamma^j on k, which overflows fp32 for fast heads (gamma = 0.43: 0.43^-64 = 3e23).
The states S_start_b are saved for the backward pass (L times smaller than q).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import INTERPRET
from ..tiles import tiles


@triton.jit
def _program_ids(V_FIRST: tl.constexpr):
    """(block, head, V tile) of this program. V_FIRST: the grid is (V tiles, blocks, heads), so that the V
    tiles of one (block, head), which read the same q and k, run side by side and share them in L2."""
    if V_FIRST:
        return tl.program_id(1), tl.program_id(2), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1), tl.program_id(2)


@triton.jit
def _block_state_kernel(k, v, g, blk_ids, blk_start, blk_len, states,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                        PRECISION: tl.constexpr, V_FIRST: tl.constexpr):
    b, h, iv = _program_ids(V_FIRST)
    b = tl.load(blk_ids + b)
    start = tl.load(blk_start + b).to(tl.int64)
    n_tok = tl.load(blk_len + b)
    gh = tl.load(g + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    S = tl.zeros([K, BV], dtype=tl.float32)
    for c0 in range(0, n_tok, C):
        cl = tl.minimum(n_tok - c0, C)
        valid = rc < cl
        rows = start + c0 + rc
        kc = tl.load(k + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        vc = tl.load(v + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        w_k = tl.where(valid, tl.exp(gh * tl.maximum(cl - 1 - rc, 0).to(tl.float32)), 0.0)
        kw = (kc * w_k[:, None]).to(vc.dtype)
        S = S * tl.exp(gh * cl.to(tl.float32)) + tl.dot(tl.trans(kw), vc, input_precision=PRECISION)
    base = states + (b.to(tl.int64) * H + h) * (K * V)
    tl.store(base + rk[:, None] * V + rv[None, :], S)


@triton.jit
def _scan_kernel(states, g, blk_len, seq_first_blk, init, final,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                 HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr):
    """In place over `states`: block contributions in, the state at each block's start (forward) or the
    gradient at each block's end (REVERSE) out. `init` is the initial state (forward) or the gradient of
    the final state (reverse); `final` gets the final state (forward) or the initial-state gradient."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    gh = tl.load(g + h).to(tl.float32)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    tile = rk[:, None] * V + rv[None, :]
    first = tl.load(seq_first_blk + n)
    last = tl.load(seq_first_blk + n + 1)
    seq_base = (n.to(tl.int64) * H + h) * (K * V)
    if HAS_INIT:
        S = tl.load(init + seq_base + tile).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, last - first):
        if REVERSE:
            b = last - 1 - i
        else:
            b = first + i
        ptr = states + (b.to(tl.int64) * H + h) * (K * V) + tile
        # (the contribution of a sequence's last block, forward, or first block, reverse, is never written
        # unless the final / initial state is wanted: then the S it produces is not stored either)
        contribution = tl.load(ptr)
        tl.store(ptr, S)
        S = S * tl.exp(gh * tl.load(blk_len + b).to(tl.float32)) + contribution
    if STORE_FINAL:
        tl.store(final + seq_base + tile, S)


@triton.jit
def _output_kernel(q, k, v, o, states, g, blk_start, blk_len, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                   PRECISION: tl.constexpr, V_FIRST: tl.constexpr):
    b, h, iv = _program_ids(V_FIRST)
    start = tl.load(blk_start + b).to(tl.int64)
    n_tok = tl.load(blk_len + b)
    gh = tl.load(g + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    S = tl.load(states + (b.to(tl.int64) * H + h) * (K * V) + rk[:, None] * V + rv[None, :])
    diff = rc[:, None] - rc[None, :]
    causal = diff >= 0
    decay_ij = tl.exp(gh * tl.maximum(diff, 0).to(tl.float32))
    decay_q = tl.exp(gh * (rc + 1).to(tl.float32))
    for c0 in range(0, n_tok, C):
        cl = tl.minimum(n_tok - c0, C)
        valid = rc < cl
        rows = start + c0 + rc
        qc = tl.load(q + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        kc = tl.load(k + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        vc = tl.load(v + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        qk = tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
        A = tl.where(causal, qk * decay_ij, 0.0).to(vc.dtype)
        # the decay gamma^(i+1) multiplies the fp32 product, not the bf16 operand: one rounding fewer
        oc = tl.dot(A, vc, input_precision=PRECISION) \
            + tl.dot(qc, S.to(vc.dtype), input_precision=PRECISION) * decay_q[:, None]
        tl.store(o + rows[:, None] * (H * V) + h * V + rv[None, :], (oc * scale).to(o.dtype.element_ty),
                 mask=valid[:, None])
        w_k = tl.where(valid, tl.exp(gh * tl.maximum(cl - 1 - rc, 0).to(tl.float32)), 0.0)
        kw = (kc * w_k[:, None]).to(vc.dtype)
        S = S * tl.exp(gh * cl.to(tl.float32)) + tl.dot(tl.trans(kw), vc, input_precision=PRECISION)


@triton.jit
def _block_dstate_kernel(q, do, g, blk_ids, blk_start, blk_len, dstates, scale,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                         PRECISION: tl.constexpr):
    b = tl.load(blk_ids + tl.program_id(0))
    h = tl.program_id(1)
    iv = tl.program_id(2)
    start = tl.load(blk_start + b).to(tl.int64)
    n_tok = tl.load(blk_len + b)
    gh = tl.load(g + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    G = tl.zeros([K, BV], dtype=tl.float32)
    for c0 in range(0, n_tok, C):
        valid = rc < n_tok - c0
        rows = start + c0 + rc
        qc = tl.load(q + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        doc = tl.load(do + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        w_q = tl.where(valid, tl.exp(gh * (c0 + rc + 1).to(tl.float32)), 0.0)
        G += tl.dot(tl.trans((qc * w_q[:, None]).to(doc.dtype)), doc, input_precision=PRECISION)
    base = dstates + (b.to(tl.int64) * H + h) * (K * V)
    tl.store(base + rk[:, None] * V + rv[None, :], G * scale)


@triton.jit
def _dq_kernel(do, k, v, dq, states, g, blk_start, blk_len, scale,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
    """dq = scale * [((do v^T) * M) k + gamma^(i+1) do S^T], walking the block forward from S_start."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(blk_start + b).to(tl.int64)
    n_tok = tl.load(blk_len + b)
    gh = tl.load(g + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    S = tl.load(states + (b.to(tl.int64) * H + h) * (K * V) + rk[:, None] * V + rv[None, :])
    diff = rc[:, None] - rc[None, :]
    causal = diff >= 0
    decay_ij = tl.exp(gh * tl.maximum(diff, 0).to(tl.float32))
    decay_q = tl.exp(gh * (rc + 1).to(tl.float32))
    for c0 in range(0, n_tok, C):
        cl = tl.minimum(n_tok - c0, C)
        valid = rc < cl
        rows = start + c0 + rc
        doc = tl.load(do + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        kc = tl.load(k + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        vc = tl.load(v + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        dov = tl.dot(doc, tl.trans(vc), input_precision=PRECISION)
        A = tl.where(causal, dov * decay_ij, 0.0).to(kc.dtype)
        dqc = tl.dot(A, kc, input_precision=PRECISION) \
            + tl.dot(doc, tl.trans(S.to(kc.dtype)), input_precision=PRECISION) * decay_q[:, None]
        tl.store(dq + rows[:, None] * (H * K) + h * K + rk[None, :], (dqc * scale).to(dq.dtype.element_ty),
                 mask=valid[:, None])
        w_k = tl.where(valid, tl.exp(gh * tl.maximum(cl - 1 - rc, 0).to(tl.float32)), 0.0)
        kw = (kc * w_k[:, None]).to(vc.dtype)
        S = S * tl.exp(gh * cl.to(tl.float32)) + tl.dot(tl.trans(kw), vc, input_precision=PRECISION)


@triton.jit
def _dkv_kernel(q, k, v, do, dk, dv, dstates, g, blk_start, blk_len, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
    """dk = scale ((do v^T) * M)^T q + w (v G^T),  dv = scale ((q k^T) * M)^T do + w (k G), with
    w_j = gamma^(cl-1-j) and G the gradient w.r.t. the chunk's final state, walking the block backward."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(blk_start + b).to(tl.int64)
    n_tok = tl.load(blk_len + b)
    gh = tl.load(g + h).to(tl.float32)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    G = tl.load(dstates + (b.to(tl.int64) * H + h) * (K * V) + rk[:, None] * V + rv[None, :])
    diff = rc[:, None] - rc[None, :]
    causal = diff >= 0
    decay_ij = tl.exp(gh * tl.maximum(diff, 0).to(tl.float32))
    decay_q = tl.exp(gh * (rc + 1).to(tl.float32))
    n_chunks = tl.cdiv(n_tok, C)
    for i in range(0, n_chunks):
        c0 = (n_chunks - 1 - i) * C
        cl = tl.minimum(n_tok - c0, C)
        valid = rc < cl
        rows = start + c0 + rc
        qc = tl.load(q + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        kc = tl.load(k + rows[:, None] * (H * K) + h * K + rk[None, :], mask=valid[:, None], other=0.0)
        vc = tl.load(v + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        doc = tl.load(do + rows[:, None] * (H * V) + h * V + rv[None, :], mask=valid[:, None], other=0.0)
        dtype = qc.dtype
        w_k = tl.where(valid, tl.exp(gh * tl.maximum(cl - 1 - rc, 0).to(tl.float32)), 0.0)
        dov = tl.dot(doc, tl.trans(vc), input_precision=PRECISION)
        A_do = tl.where(causal, dov * decay_ij, 0.0).to(dtype)
        qk = tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
        A_qk = tl.where(causal, qk * decay_ij, 0.0).to(dtype)
        G_low = G.to(dtype)
        dkc = tl.dot(tl.trans(A_do), qc, input_precision=PRECISION) * scale \
            + tl.dot(vc, tl.trans(G_low), input_precision=PRECISION) * w_k[:, None]
        dvc = tl.dot(tl.trans(A_qk), doc, input_precision=PRECISION) * scale \
            + tl.dot(kc, G_low, input_precision=PRECISION) * w_k[:, None]
        tl.store(dk + rows[:, None] * (H * K) + h * K + rk[None, :], dkc.to(dk.dtype.element_ty), mask=valid[:, None])
        tl.store(dv + rows[:, None] * (H * V) + h * V + rv[None, :], dvc.to(dv.dtype.element_ty), mask=valid[:, None])
        w_q = tl.where(valid, decay_q, 0.0)
        G = G * tl.exp(gh * cl.to(tl.float32)) \
            + tl.dot(tl.trans((qc * w_q[:, None]).to(dtype)), doc, input_precision=PRECISION) * scale


# -- host side --------------------------------------------------------------------------------------

class BlockTable:
    """Blocks of at most L tokens that never cross a sequence boundary (int32 tensors on the device)."""

    def __init__(self, seq_bounds: list[int], block_len: int, device: torch.device):
        starts, lengths, seq = tiles(seq_bounds, block_len)
        first = np.searchsorted(seq, np.arange(len(seq_bounds))).tolist()  # each sequence's first block; + total
        self.num_blocks = len(starts)
        self.num_seqs = len(seq_bounds) - 1
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        self.start, self.length = as_tensor(starts.tolist() or [0]), as_tensor(lengths.tolist() or [0])
        self.seq_first = as_tensor(first)
        # A block's own state contribution only matters when a later block (or the final state) uses it;
        # its pull on the state before it only when an earlier block (or the initial state) receives it.
        last_of_seq = set(b - 1 for b in first[1:] if b > 0)
        first_of_seq = set(first[:-1])
        self.all_ids = list(range(self.num_blocks))
        self.not_last = [b for b in self.all_ids if b not in last_of_seq]
        self.not_first = [b for b in self.all_ids if b not in first_of_seq]
        self.device = device

    def ids(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks or [0], dtype=torch.int32, device=self.device)


def choose_block_len(total_tokens: int, num_heads: int, chunk: int, target_programs: int = 1024,
                     max_block: int = 8192) -> int:
    """Tokens per block: long enough that few blocks need the separate state pass (a sequence that fits
    one block needs none), short enough that there are about `target_programs` (block, head) programs.
    Measured on H100 (2026-11-27, H=32, D=128, bf16): at 64 x 4K, 4 x 64K and 1 x 256K tokens the forward
    is fastest with 8192-token blocks (4K: one block per sequence), 8-17% faster than 2048. (On H200,
    2026-12-03, with 3 stages, 16384-token blocks were 3% faster still at 4 x 64K and 1 x 256K: not taken.)"""
    block = chunk
    while block < max_block and (total_tokens // (2 * block)) * num_heads >= target_programs:
        block *= 2
    return block


def choose_block_len_waves(seq_lens: list[int], programs_per_block: int, chunk: int, num_sms: int,
                           fill: float = 0.9) -> int:
    """Tokens per block under the "waves" policy: the longest blocks that still give one wave of programs.

    The output and dq/dk/dv kernels hold one program per SM (their tiles fill its shared memory and registers),
    and a program walks its block's chunks one after another, so the time is about (tokens per SM) x (time per
    chunk) whatever the block length, and every block that is not the last of its sequence costs an extra
    read of its k and v in the state pass (and of q and do in the backward's). Longer blocks are therefore
    better as long as there are programs enough for the SMs: start from the longest sequence (one block per
    sequence: no state pass at all) and halve while fewer than ``fill`` x ``num_sms`` programs
    (blocks x ``programs_per_block``: heads x V tiles) would run. Never below ``chunk``."""
    if not seq_lens or max(seq_lens) == 0:
        return chunk
    block = -(-max(seq_lens) // chunk) * chunk
    while block > chunk:
        programs = sum(-(-n // block) for n in seq_lens if n) * programs_per_block
        if programs >= fill * num_sms:
            break
        block = max(chunk, -(-(block // 2) // chunk) * chunk)
    return block


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a small machine, so that tests split sequences into several blocks


# Benchmarks sweep the launch configuration through this dict (keys of _kernel_config); empty = defaults.
KERNEL_OVERRIDES: dict = {}


def _kernel_config(D: int, dtype: torch.dtype) -> dict:
    config = {
        "C": 16 if INTERPRET else 64,
        # one V tile per head (BV = D): q and k are read once, not once per V tile
        "BV": D if INTERPRET else min(D, 128),
        # fp32 inputs get exact fp32 dots (the reference-grade path); bf16/fp16 use tensor cores natively
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "warps_fwd": 8 if D >= 128 else 4,
        "warps_bwd": 8 if D >= 128 else 4,
        # sweeps of benchmarks/lightning.py: on H100 (2026-11-27) with BV = 128 and 8 warps, 2 stages beat 1 by
        # 4-7% in the forward; on H200 (2026-12-03) 3 stages beat 2 by 16-22% at 64 x 4K, 4 x 64K, 1 x 256K
        # (docs/benchmarks.md). The backward is best with 8 warps and 2 stages (3: 7% slower).
        "stages_fwd": 3,
        "stages_bwd": 2,
        # forward grid (V tiles, blocks, heads) instead of (blocks, heads, V tiles): matters when BV < D
        "v_first": False,
        # block length when the caller gives none: "waves" (choose_block_len_waves: the longest blocks that fill
        # the SMs once) or "programs" (choose_block_len: about 1024 programs, blocks of at most 8192 tokens).
        # H200, 2026-12-03, side by side: waves 11% / 13% faster forward at 16 x 16K / 4 x 64K, 7% / 11% faster
        # forward+backward, equal at 64 x 4K (both take whole sequences) and 1 x 256K (docs/benchmarks.md)
        "block_policy": "waves",
    }
    config.update(KERNEL_OVERRIDES)
    return config


class LightningAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, output_final_state, seq_bounds, block_len):
        TT, H, D = q.shape  # flattened tokens
        cfg = _kernel_config(D, q.dtype)
        C, BV = cfg["C"], cfg["BV"]
        if block_len:
            L = block_len
        elif cfg["block_policy"] == "waves":
            lens = np.diff(np.asarray(seq_bounds)).tolist()
            L = choose_block_len_waves(lens, H * triton.cdiv(D, BV), C, _num_sms(q.device))
        elif cfg["block_policy"] == "programs":
            L = choose_block_len(TT, H, C)
        else:
            raise ValueError(f"lightning: block_policy must be 'programs' or 'waves', not {cfg['block_policy']!r}")
        table = BlockTable(seq_bounds, L, q.device)
        N = table.num_seqs
        g = decay.float().contiguous()
        states = torch.empty(max(table.num_blocks, 1), H, D, D, dtype=torch.float32, device=q.device)
        final = torch.empty(N, H, D, D, dtype=torch.float32, device=q.device) if output_final_state else None
        o = torch.empty_like(v)
        state_blocks = table.all_ids if output_final_state else table.not_last
        # grid dimensions 1 and 2 hold at most 65535 programs: V-first only where the blocks fit there
        v_first = bool(cfg["v_first"]) and table.num_blocks <= 65535
        grid = lambda blocks: (triton.cdiv(D, BV), blocks, H) if v_first else (blocks, H, triton.cdiv(D, BV))  # noqa: E731
        if state_blocks:
            _block_state_kernel[grid(len(state_blocks))](
                k, v, g, table.ids(state_blocks), table.start, table.length, states, H=H, K=D, V=D, C=C, BV=BV,
                PRECISION=cfg["PRECISION"], V_FIRST=v_first, num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"])
        _scan_kernel[(N, H, triton.cdiv(D, BV))](
            states, g, table.length, table.seq_first, initial_state, final, H=H, K=D, V=D, BV=BV,
            HAS_INIT=initial_state is not None, STORE_FINAL=final is not None, REVERSE=False, num_warps=4)
        if table.num_blocks:
            _output_kernel[grid(table.num_blocks)](
                q, k, v, o, states, g, table.start, table.length, scale, H=H, K=D, V=D, C=C, BV=BV,
                PRECISION=cfg["PRECISION"], V_FIRST=v_first, num_warps=cfg["warps_fwd"],
                num_stages=cfg["stages_fwd"])
        ctx.save_for_backward(q, k, v, g, states)
        ctx.table, ctx.scale, ctx.cfg = table, scale, cfg
        ctx.has_initial_state = initial_state is not None
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, states = ctx.saved_tensors
        table, scale, cfg = ctx.table, ctx.scale, ctx.cfg
        TT, H, D = q.shape
        C, BV = cfg["C"], cfg["BV"]
        N = table.num_seqs
        do = do.contiguous()
        dstates = torch.empty_like(states)
        dinit = torch.empty(N, H, D, D, dtype=torch.float32, device=q.device) if ctx.has_initial_state else None
        if dfinal is not None:
            dfinal = dfinal.float().contiguous()
        pull_blocks = table.all_ids if ctx.has_initial_state else table.not_first
        if pull_blocks:
            _block_dstate_kernel[(len(pull_blocks), H, triton.cdiv(D, BV))](
                q, do, g, table.ids(pull_blocks), table.start, table.length, dstates, scale, H=H, K=D, V=D, C=C, BV=BV,
                PRECISION=cfg["PRECISION"], num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"])
        _scan_kernel[(N, H, triton.cdiv(D, BV))](
            dstates, g, table.length, table.seq_first, dfinal, dinit, H=H, K=D, V=D, BV=BV,
            HAS_INIT=dfinal is not None, STORE_FINAL=dinit is not None, REVERSE=True, num_warps=4)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if table.num_blocks:
            grid = (table.num_blocks, H)
            _dq_kernel[grid](do, k, v, dq, states, g, table.start, table.length, scale, H=H, K=D, V=D, C=C,
                             PRECISION=cfg["PRECISION"], num_warps=cfg["warps_bwd"], num_stages=cfg["stages_bwd"])
            _dkv_kernel[grid](q, k, v, do, dk, dv, dstates, g, table.start, table.length, scale, H=H, K=D, V=D,
                              C=C, PRECISION=cfg["PRECISION"], num_warps=cfg["warps_bwd"], num_stages=cfg["stages_bwd"])
        return dq, dk, dv, None, None, dinit, None, None, None


def chunk_lightning_attention(q, k, v, decay, scale, initial_state, output_final_state, seq_bounds,
                              block_len: int | None = None):
    """Triton path on flattened tokens: q, k, v [TT, H, D]; seq_bounds the sequence starts + total."""
    return LightningAttentionFunction.apply(q, k, v, decay, scale, initial_state, output_final_state,
                                            seq_bounds, block_len)
