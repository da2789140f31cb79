"""Context-parallel primitives against the single-process ops: zigzag placement, LASP-2 lightning attention
and gathered-K/V sparse attention on 2 gloo processes, with packed documents that cross the CP borders.

Tolerance: fp32 everywhere; the CP ops regroup the same sums (chunk states combined across ranks, the
incoming state added after the local output), so the outputs and gradients agree to fp32 rounding: an error
ratio of 1e-5 leaves two orders of margin over what we see (~1e-7) and fails on any wrong term (~1e-1).
"""

import pytest
import torch

from sala_train.parallel.context_parallel import (
    ContextParallelShard,
    lightning_attention_cp,
    sparse_attention_cp,
    sparse_pieces,
    zigzag_split,
    zigzag_split_cu_seqlens,
    zigzag_token_index,
    zigzag_unsplit,
)
from sala_train.testing import assert_close, run_distributed

RATIO = 1e-5
SEQ_LEN = 128  # 4 chunks of 32 over 2 ranks
# Per row, the document starts: row 0 has a 100-token document (sparse at dense_len 96) over three borders,
# row 1 a document that starts mid-chunk and runs across the border of the zigzag pair.
DOCUMENTS = [[0, 20, 120], [0, 70, 77]]
SPARSE_CONFIG = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=2, init_blocks=1,
                     dense_len=96)


def _position_ids() -> torch.Tensor:
    rows = []
    for starts in DOCUMENTS:
        bounds = starts + [SEQ_LEN]
        rows.append(torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])]))
    return torch.stack(rows)


def _cu_seqlens() -> torch.Tensor:
    """The documents of both rows over the flattened B * T tokens (the single-process ops' packing)."""
    bounds = [b * SEQ_LEN + s for b, starts in enumerate(DOCUMENTS) for s in starts] + [len(DOCUMENTS) * SEQ_LEN]
    return torch.tensor(bounds)


def _inputs(heads_q: int, heads_kv: int, dim: int = 16):
    g = torch.Generator().manual_seed(0)
    B = len(DOCUMENTS)
    q = torch.randn(B, SEQ_LEN, heads_q, dim, generator=g)
    k = torch.randn(B, SEQ_LEN, heads_kv, dim, generator=g)
    v = torch.randn(B, SEQ_LEN, heads_kv, dim, generator=g)
    weight = torch.randn(B, SEQ_LEN, heads_q, dim, generator=g)  # the loss: sum(o * weight)
    return q, k, v, weight


def test_zigzag_split_and_unsplit_are_inverse():
    x = torch.randn(2, 36, 3)
    for size in (1, 2, 3):
        pieces = [zigzag_split(x, r, size) for r in range(size)]
        assert all(p.shape == (2, 36 // size, 3) for p in pieces)
        assert torch.equal(zigzag_unsplit(pieces, size), x)
    # rank 0 of 3 holds chunks 0 and 5 (of 6 chunks of 6 tokens)
    assert zigzag_token_index(36, 0, 3).tolist() == list(range(0, 6)) + list(range(30, 36))
    assert zigzag_token_index(36, 2, 3).tolist() == list(range(12, 24))


def test_zigzag_split_cu_seqlens():
    # documents [0, 5), [5, 14), [14, 16) over 16 tokens, 2 ranks: chunks of 4, rank 0 holds 0 and 3
    cu = torch.tensor([0, 5, 14, 16])
    assert zigzag_split_cu_seqlens(cu, 16, 0, 2).tolist() == [0, 4, 6, 8]  # [0,4) | [12,14), [14,16)
    assert zigzag_split_cu_seqlens(cu, 16, 1, 2).tolist() == [0, 1, 4, 8]  # [4,5), [5,8) | [8,12)


def test_split_needs_a_multiple_of_twice_the_ranks():
    with pytest.raises(ValueError, match="multiple of 4"):
        zigzag_split(torch.zeros(1, 6), 0, 2)


def _local_leaves(tensors, shard):
    return [shard.split(t).clone().requires_grad_() for t in tensors]


def lightning_rank(rank, world_size):
    import torch.distributed as dist

    from sala_train.kernels.lightning.naive import sala_decay
    from sala_train.models.sala.modeling_minicpm_sala import lightning_attention_torch

    q, k, v, weight = _inputs(4, 4)
    shard = ContextParallelShard.of(_position_ids(), dist.group.WORLD)
    lq, lk, lv = _local_leaves((q, k, v), shard)
    o = lightning_attention_cp(lightning_attention_torch, lq, lk, lv, sala_decay(4), shard, scale=0.25)
    (o * shard.split(weight)).sum().backward()
    return o.detach(), lq.grad, lk.grad, lv.grad


def test_lightning_attention_cp_matches_one_process():
    from sala_train.kernels.lightning.naive import sala_decay
    from sala_train.models.sala.modeling_minicpm_sala import lightning_attention_torch

    q, k, v, weight = _inputs(4, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flat = [t.reshape(1, -1, *t.shape[2:]) for t in leaves]
    o, _ = lightning_attention_torch(*flat, sala_decay(4), scale=0.25, cu_seqlens=_cu_seqlens())
    o = o.reshape(q.shape)
    (o * weight).sum().backward()
    expected = [o.detach()] + [t.grad for t in leaves]

    results = run_distributed(lightning_rank, world_size=2, timeout_s=120)
    for index, name in enumerate(("o", "dq", "dk", "dv")):
        actual = zigzag_unsplit([r[index] for r in results], 2)
        assert_close(actual, expected[index], ratio=RATIO, name=f"lightning {name}")


def sparse_rank(rank, world_size, kernels):
    import torch.distributed as dist

    from sala_train.models.sala.modeling_minicpm_sala import sparse_attention_torch

    q, k, v, weight = _inputs(4, 2)
    shard = ContextParallelShard.of(_position_ids(), dist.group.WORLD)
    lq, lk, lv = _local_leaves((q, k, v), shard)
    # kernels: the public ops, the Triton kernels (Triton's interpreter on CPU: TRITON_INTERPRET is inherited
    # from tests/conftest.py), skipping the zero rows in front of the local queries (query_start)
    pieces = None if kernels else sparse_pieces(sparse_attention_torch)
    o = sparse_attention_cp(lq, lk, lv, SPARSE_CONFIG, shard, scale=0.25, pieces=pieces)
    (o * shard.split(weight)).sum().backward()
    return o.detach(), lq.grad, lk.grad, lv.grad


@pytest.mark.parametrize("kernels", [False, True], ids=["references", "kernels"])
def test_sparse_attention_cp_matches_one_process(kernels):
    from sala_train.models.sala.modeling_minicpm_sala import sparse_attention_torch

    q, k, v, weight = _inputs(4, 2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flat = [t.reshape(1, -1, *t.shape[2:]) for t in leaves]
    o = sparse_attention_torch(*flat, SPARSE_CONFIG, cu_seqlens=_cu_seqlens(), scale=0.25).reshape(q.shape)
    (o * weight).sum().backward()
    expected = [o.detach()] + [t.grad for t in leaves]
    # the long document is really sparse here: dense attention would give another output
    dense = sparse_attention_torch(*flat, {**SPARSE_CONFIG, "dense_len": 10**9}, cu_seqlens=_cu_seqlens(), scale=0.25)
    assert (dense.reshape(q.shape) - o).abs().max() > 1e-3

    results = run_distributed(sparse_rank, world_size=2, args=(kernels,), timeout_s=240)
    for index, name in enumerate(("o", "dq", "dk", "dv")):
        actual = zigzag_unsplit([r[index] for r in results], 2)
        assert_close(actual, expected[index], ratio=RATIO, name=f"sparse {name}")
