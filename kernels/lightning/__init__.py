"""Lightning attention: linear attention with a constant per-head decay (SALA's linear mixer).

Public ops (shapes as in fla): ``lightning_attention`` for training and prefill, ``lightning_decode`` for
one token per sequence. The Triton kernels run on CUDA tensors (and on the CPU under
``TRITON_INTERPRET=1``); elsewhere the plain PyTorch reference of ``naive.py`` runs.
"""

from __future__ import annotations

import torch

from .naive import (
    lightning_attention_parallel,
    lightning_attention_recurrent,
    lightning_decode_reference,
    sala_decay,
)

TRITON_HEAD_DIMS = (16, 32, 64, 128)

__all__ = ["lightning_attention", "lightning_decode", "sala_decay"]


def _use_triton(x: torch.Tensor) -> bool:
    from .. import triton_runs_on

    return x.shape[-1] in TRITON_HEAD_DIMS and triton_runs_on(x)


def _check_inputs(q, k, v, decay, initial_state, cu_seqlens) -> int:
    """Validate shapes and dtypes; return N, the number of sequences."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {list(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {list(q.shape)}, got {list(x.shape)}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"q, k, v must be float32, bfloat16 or float16, got {q.dtype}")
    B, T, H, D = q.shape
    if decay.shape != (H,):
        raise ValueError(f"decay must be the per-head log-decay of shape [H] = [{H}], got {list(decay.shape)}")
    if bool((decay > 0).any()):
        raise ValueError("decay is the log of the per-head decay and must be <= 0 (SALA: -2**(-8*h/H))")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be 1 packed sequence, got B = {B}")
        if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N + 1], got shape {list(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None and initial_state.shape != (N, H, D, D):
        raise ValueError(f"initial_state must be [N, H, D, D] = [{N}, {H}, {D}, {D}], got {list(initial_state.shape)}")
    return N


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    block_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t = scale * q_t S_t with S_t = exp(decay) * S_{t-1} + k_t^T v_t, per head.

    Args:
        q, k, v: [B, T, H, D], fp32/bf16/fp16; the state and all accumulation are fp32.
        decay: [H] per-head log-decay (<= 0); no gradient flows to it.
        scale: default 1/sqrt(D).
        initial_state: [N, H, D, D] fp32, N = B (or the number of packed sequences); differentiable.
        output_final_state: also return the final states [N, H, D, D] fp32.
        cu_seqlens: [N + 1] cumulative lengths of packed sequences (B = 1); the state resets at each.
        block_len: tokens per parallel block of the Triton path (default: chosen from the size).
    Returns:
        (o [B, T, H, D] in q's dtype, final state or None).
    """
    N = _check_inputs(q, k, v, decay, initial_state, cu_seqlens)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if not _use_triton(q):
        return lightning_attention_parallel(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    from .chunk import chunk_lightning_attention

    seq_bounds = cu_seqlens.tolist() if cu_seqlens is not None else [b * T for b in range(B + 1)]
    flat = lambda x: x.contiguous().view(B * T, H, D)  # noqa: E731
    o, final = chunk_lightning_attention(flat(q), flat(k), flat(v), decay.to(q.device), scale, initial_state,
                                         output_final_state, seq_bounds, block_len)
    return o.view(B, T, H, D), final


def lightning_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step for N sequences: q, k, v [N, H, D] (or [N, 1, H, D]); ``state`` [N, H, D, D] fp32
    is updated in place to gamma * state + k^T v; returns o = scale * q state, shaped like q."""
    shape = q.shape
    if q.dim() == 4:
        if q.shape[1] != 1:
            raise ValueError(f"lightning_decode takes one token per sequence, got q of shape {list(q.shape)}")
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    N, H, D = q.shape
    if state.shape != (N, H, D, D) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 [N, H, D, D] = [{N}, {H}, {D}, {D}], got {state.dtype} {list(state.shape)}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    scale = D**-0.5 if scale is None else float(scale)
    if _use_triton(q):
        from .recurrent import decode_lightning_attention

        o = decode_lightning_attention(q.contiguous(), k.contiguous(), v.contiguous(), decay.to(q.device), state, scale)
    else:
        o = lightning_decode_reference(q, k, v, decay, state, scale)
    return o.view(shape)
