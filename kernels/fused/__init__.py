"""Fused per-head RMSNorm + rotary embedding of q or k, forward and backward in one Triton kernel each.

The lightning mixer normalises q and k per head (RMSNorm over head_dim, fp32) and rotates them (RoPE,
rotate-half), then casts them back to the activation dtype: in plain ops that is about ten passes over a
[B, T, H, D] tensor in fp32 each way, a visible share of the step (the elementwise ops were 27% of a 256K
prefill, docs/benchmarks.md). Here one pass reads x (and cos/sin) and writes the result; the backward reads x
and the output gradient once and writes dx, with the weight gradient reduced per program.

    y = norm_rope(x, weight, cos, sin, eps=1e-6, out_dtype=torch.bfloat16)

x [B, T, H, D] (D a power of two, >= 16); weight [D] (fp32) or None for RoPE alone; cos, sin [B, T, D] fp32
(``RotaryEmbedding``) or None for the norm alone. ``norm_rope_reference`` is the same math in torch ops (the CPU
path and the tests' reference). The lightning mixer's Triton op backend uses it (``LightningOps.norm_rope``);
its speed on an H100 is not measured yet (``benchmarks/fused.py``; ``ENABLED = False`` turns it off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import triton_runs_on

# False: norm_rope runs its torch reference everywhere (benchmarks compare the model with and without the kernel)
ENABLED = True


def norm_rope_reference(x, weight, cos, sin, eps: float = 1e-6, out_dtype=None) -> torch.Tensor:
    """torch ops, fp32 throughout: weight * rms_norm(x) then x * cos + rotate_half(x) * sin, cast at the end."""
    y = x.float()
    if weight is not None:
        y = F.rms_norm(y, (y.shape[-1],), eps=eps) * weight.float()
    if cos is not None:
        y1, y2 = y.chunk(2, dim=-1)
        y = y * cos[:, :, None, :] + torch.cat((-y2, y1), dim=-1) * sin[:, :, None, :]
    return y.to(out_dtype or x.dtype)


@triton.jit
def _load_halves(ptr, rows, cols, mask, HALF: tl.constexpr):
    first = tl.load(ptr + rows[:, None] * (2 * HALF) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    second = tl.load(ptr + rows[:, None] * (2 * HALF) + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _norm_rope_fwd(x, w, cos, sin, y, R, H, eps,
                   HALF: tl.constexpr, BR: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, HALF)
    mask = (rows < R)[:, None]
    rows = rows.to(tl.int64)
    x1, x2 = _load_halves(x, rows, cols, mask, HALF)
    if HAS_NORM:
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        x1 = x1 * r[:, None] * tl.load(w + cols)[None, :]
        x2 = x2 * r[:, None] * tl.load(w + HALF + cols)[None, :]
    if HAS_ROPE:
        tokens = rows // H
        c1, c2 = _load_halves(cos, tokens, cols, mask, HALF)
        s1, s2 = _load_halves(sin, tokens, cols, mask, HALF)
        x1, x2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    out = y + rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(out, x1.to(y.dtype.element_ty), mask=mask)
    tl.store(out + HALF, x2.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd(x, w, cos, sin, dy, dx, dw, R, H, eps,
                   HALF: tl.constexpr, BR: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, HALF)
    mask = (rows < R)[:, None]
    rows = rows.to(tl.int64)
    g1, g2 = _load_halves(dy, rows, cols, mask, HALF)
    if HAS_ROPE:  # the transpose of the rotation: out1 = y1 c1 - y2 s1, out2 = y2 c2 + y1 s2
        tokens = rows // H
        c1, c2 = _load_halves(cos, tokens, cols, mask, HALF)
        s1, s2 = _load_halves(sin, tokens, cols, mask, HALF)
        g1, g2 = g1 * c1 + g2 * s2, g2 * c2 - g1 * s1
    if HAS_NORM:
        x1, x2 = _load_halves(x, rows, cols, mask, HALF)
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        xh1, xh2 = x1 * r[:, None], x2 * r[:, None]
        # dweight: this program's rows summed; the host adds up the programs
        tl.store(dw + pid * (2 * HALF) + cols, tl.sum(g1 * xh1, axis=0))
        tl.store(dw + pid * (2 * HALF) + HALF + cols, tl.sum(g2 * xh2, axis=0))
        g1 = g1 * tl.load(w + cols)[None, :]
        g2 = g2 * tl.load(w + HALF + cols)[None, :]
        dot = (tl.sum(g1 * xh1, axis=1) + tl.sum(g2 * xh2, axis=1)) / (2 * HALF)
        g1 = r[:, None] * (g1 - xh1 * dot[:, None])
        g2 = r[:, None] * (g2 - xh2 * dot[:, None])
    out = dx + rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(out, g1.to(dx.dtype.element_ty), mask=mask)
    tl.store(out + HALF, g2.to(dx.dtype.element_ty), mask=mask)


def _rows_per_program(D: int) -> int:
    return max(1, min(64, 4096 // D))


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps, out_dtype):
        B, T, H, D = x.shape
        x = x.contiguous()
        cos = cos.contiguous() if cos is not None else None
        sin = sin.contiguous() if sin is not None else None
        w = weight.float().contiguous() if weight is not None else None
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        R, BR = B * T * H, _rows_per_program(D)
        _norm_rope_fwd[(triton.cdiv(R, BR),)](x, w, cos, sin, y, R, H, eps, HALF=D // 2, BR=BR,
                                              HAS_NORM=w is not None, HAS_ROPE=cos is not None, num_warps=4)
        ctx.save_for_backward(x, w, cos, sin)
        ctx.eps, ctx.weight_dtype = eps, weight.dtype if weight is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, cos, sin = ctx.saved_tensors
        D, H = x.shape[-1], x.shape[-2]
        R, BR = x.numel() // D, _rows_per_program(D)
        programs = triton.cdiv(R, BR)
        dx = torch.empty_like(x)
        dw = torch.empty(programs, D, dtype=torch.float32, device=x.device) if w is not None else None
        _norm_rope_bwd[(programs,)](x, w, cos, sin, dy.contiguous(), dx, dw, R, H, ctx.eps, HALF=D // 2, BR=BR,
                                    HAS_NORM=w is not None, HAS_ROPE=cos is not None, num_warps=4)
        dweight = dw.sum(0).to(ctx.weight_dtype) if w is not None and ctx.needs_input_grad[1] else None
        return dx, dweight, None, None, None, None


def _use_triton(x: torch.Tensor) -> bool:
    D = x.shape[-1]
    return D >= 16 and D & (D - 1) == 0 and triton_runs_on(x)


def norm_rope(x, weight, cos, sin, eps: float = 1e-6, out_dtype=None) -> torch.Tensor:
    """Per-head RMSNorm (weight [D], or None to skip) then RoPE (cos, sin [B, T, D], or None to skip) of
    x [B, T, H, D], in fp32, returned in ``out_dtype`` (default x's dtype). Gradients for x and weight."""
    if x.dim() != 4:
        raise ValueError(f"norm_rope: x must be [B, T, H, D], got shape {list(x.shape)}")
    B, T, _, D = x.shape
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"norm_rope: weight must have shape [{D}] (x's head_dim), got {list(weight.shape)}")
    if cos is not None and sin is not None and cos.shape[0] == sin.shape[0] == 1 and B > 1:
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)  # position ids [1, T] shared by the batch
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (t.shape != (B, T, D) or t.dtype != torch.float32):
            raise ValueError(f"norm_rope: {name} must be fp32 of shape {[B, T, D]}, got {t.dtype} {list(t.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("norm_rope: give both cos and sin, or neither")
    out_dtype = out_dtype or x.dtype
    if not ENABLED or not _use_triton(x) or (cos is not None and cos.requires_grad):
        return norm_rope_reference(x, weight, cos, sin, eps=eps, out_dtype=out_dtype)
    return _NormRope.apply(x, weight, cos, sin, float(eps), out_dtype)
