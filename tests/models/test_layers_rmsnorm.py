"""RMSNorm: torch's rms_norm must give MiniCPM's formula (variance in fp32, scaled in fp32, rounded once to the
input dtype, then times the weight) for fp32 and bf16 inputs, values and gradients."""

import pytest
import torch

from sala_train.models.layers import RMSNorm
from sala_train.testing import assert_close


def reference(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_minicpm_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = norm(x), reference(norm, x_ref)
    assert out.dtype == expected.dtype
    if dtype == torch.float32:
        assert_close(out, expected, ratio=1e-6, name="fp32 output")
    else:  # one rounding to bf16 of the same fp32 product
        assert torch.equal(out, expected)
    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert_close(x.grad.float(), x_ref.grad.float(), ratio=1e-5 if dtype == torch.float32 else 1e-2, name="dx")
