"""Fused per-head RMSNorm + RoPE (sala_train.kernels.fused) against the torch composition.

CPU: the Triton kernels under the interpreter (tests/conftest.py) in fp32 on tiny odd shapes, against an fp64
reference; `gpu`: bf16 at the lightning mixer's shape."""

import pytest
import torch
from sala_train.kernels.fused import _use_triton, norm_rope, norm_rope_reference

from sala_train.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from sala_train.testing import assert_close, requires_gpu


def inputs(B, T, H, D, dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    x = torch.randn(B, T, H, D, device=device).mul(3.0).to(dtype)
    weight = (1 + 0.3 * torch.randn(D, device=device))
    positions = torch.randint(0, 5000, (B, T), device=device)
    cos, sin = RotaryEmbedding(D)(positions)
    return x, weight, cos, sin


def forward_and_grads(fn, x, weight, cos, sin, dy, **kw):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_() if weight is not None else None
    y = fn(x, weight, cos, sin, **kw)
    (y.double() * dy).sum().backward()
    return y, x.grad, weight.grad if weight is not None else None


@pytest.mark.parametrize("norm, rope", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("B, T, H, D", [(2, 7, 3, 16), (1, 13, 2, 32)])
def test_matches_the_reference(poisoned, norm, rope, B, T, H, D):
    x, weight, cos, sin = inputs(B, T, H, D, torch.float32, seed=T)
    assert _use_triton(x), "tests/conftest.py must set TRITON_INTERPRET=1 without a GPU"
    weight = weight if norm else None
    cos, sin = (cos, sin) if rope else (None, None)
    dy = torch.randn(B, T, H, D, dtype=torch.float64)
    y, dx, dw = forward_and_grads(norm_rope, x, weight, cos, sin, dy, eps=1e-5)
    to64 = lambda t: t.double() if t is not None else None
    y_ref, dx_ref, dw_ref = forward_and_grads(norm_rope_reference, to64(x), to64(weight), to64(cos), to64(sin), dy,
                                              eps=1e-5)
    assert y.dtype == torch.float32
    assert_close(y.double(), y_ref, ratio=1e-6, name="y")
    assert_close(dx.double(), dx_ref, ratio=1e-6, name="dx")
    if norm:
        assert_close(dw.double(), dw_ref, ratio=1e-6, name="dweight")


def test_reference_is_the_mixer_composition():
    """norm_rope_reference is what the lightning mixer computes today: RMSNorm module, then apply_rotary."""
    x, weight, cos, sin = inputs(2, 9, 3, 32, torch.float32)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight)
    torch.testing.assert_close(norm_rope_reference(x, weight, cos, sin, eps=1e-6), apply_rotary(norm(x), cos, sin))


def test_one_row_of_positions_serves_the_batch():
    """cos, sin [1, T, D] (position ids [1, T]) rotate every row of the batch, as apply_rotary broadcasts them."""
    x, weight, cos, sin = inputs(3, 6, 2, 16, torch.float32)
    shared = norm_rope(x, weight, cos[:1], sin[:1])
    expanded = norm_rope(x, weight, cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1))
    torch.testing.assert_close(shared, expanded)
    torch.testing.assert_close(shared, norm_rope_reference(x, weight, cos[:1], sin[:1]), atol=1e-5, rtol=1e-5)


def test_out_dtype_and_errors():
    x, weight, cos, sin = inputs(1, 5, 2, 16, torch.float32)
    assert norm_rope(x, weight, cos, sin, out_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="weight must have shape \\[16\\]"):
        norm_rope(x, weight[:8], cos, sin)
    with pytest.raises(ValueError, match="cos must be fp32 of shape"):
        norm_rope(x, weight, cos[:, :3], sin)
    with pytest.raises(ValueError, match="both cos and sin"):
        norm_rope(x, weight, cos, None)
    with pytest.raises(ValueError, match="x must be \\[B, T, H, D\\]"):
        norm_rope(x[0], weight, cos, sin)


@requires_gpu
def test_gpu_bf16_against_fp64():
    """bf16 in and out at the lightning mixer's shape; the fused kernel computes in fp32 and rounds once, so its
    error is the output's bf16 rounding (relative RMS about 2e-3). The bf16 output's gradient reaches the kernel
    rounded to bf16, so the reference gets that same rounded dy: dweight (an fp32 sum over all tokens) then
    differs only by accumulation order."""
    x, weight, cos, sin = inputs(1, 4099, 32, 128, torch.bfloat16, device="cuda")
    dy = torch.randn(*x.shape, device="cuda").to(torch.bfloat16).double()
    y, dx, dw = forward_and_grads(norm_rope, x, weight, cos, sin, dy)
    y_ref, dx_ref, dw_ref = forward_and_grads(norm_rope_reference, x.double(), weight.double(), cos.double(),
                                              sin.double(), dy)
    assert_close(y.double(), y_ref, ratio=5e-3, name="y")
    assert_close(dx.double(), dx_ref, ratio=5e-3, name="dx")
    assert_close(dw.double(), dw_ref, ratio=1e-4, name="dweight")
