"""varlen_causal_attention (documents grouped by length and padded) against one SDPA call per document."""

import pytest
import torch
import torch.nn.functional as F

from sala_train.models.attention import varlen_causal_attention


def per_document(q, k, v, cu_seqlens, scale):
    out = torch.full_like(q, float("nan"))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            piece = [x[0, start:end].transpose(0, 1) for x in (q, k, v)]  # [H, n, D]
            group = q.shape[2] // k.shape[2]
            piece[1], piece[2] = (x.repeat_interleave(group, dim=0) for x in piece[1:])
            out[0, start:end] = F.scaled_dot_product_attention(*piece, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("lengths, Hq, Hk", [
    ([1, 300, 7, 64, 65, 2, 150, 33, 1, 90], 4, 2),  # groups of very different lengths, single tokens, GQA
    ([40, 40, 40], 3, 3),  # one group, no padding
    ([257], 2, 1),  # one document: the plain causal call
    ([5, 0, 12, 0, 3], 2, 2),  # empty documents in cu_seqlens
])
def test_equals_one_call_per_document(lengths, Hq, Hk):
    torch.manual_seed(sum(lengths))
    cu = torch.tensor([0, *lengths]).cumsum(0)
    total, D, scale = int(cu[-1]), 16, 0.3
    q = torch.randn(1, total, Hq, D, requires_grad=True)
    k = torch.randn(1, total, Hk, D, requires_grad=True)
    v = torch.randn(1, total, Hk, D, requires_grad=True)
    grad = torch.randn(1, total, Hq, D)
    out = varlen_causal_attention(q, k, v, cu, scale=scale)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = per_document(q, k, v, cu, scale)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_plans_are_cached_by_boundaries_not_by_tensor():
    """Two packings of the same total length, one after the other, reuse no stale plan."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 100, 2, 8) for _ in range(3))
    for lengths in ([30, 70], [70, 30], [30, 70], [10, 10, 80]):
        cu = torch.tensor([0, *lengths]).cumsum(0)
        torch.testing.assert_close(varlen_causal_attention(q, k, v, cu), per_document(q, k, v, cu, None))
