"""InfLLM-V2 sparse attention: Triton selection and block-sparse attention against the naive references.

CPU: the Triton kernels under the interpreter, fp32, tiny block and window sizes (block 16, windows 8 / 4,
so sequences of ~100-200 tokens have several blocks). GPU (`gpu`): bf16 at real shapes.
"""

import pytest
import torch

from sala_train.kernels.sparse import (
    SparseConfig,
    compress_keys,
    infllmv2_attention,
    infllmv2_decode,
    infllmv2_prefill,
    select_blocks,
    sparse_attention,
)
from sala_train.kernels.sparse.naive import (
    dense_causal_attention_reference,
    select_blocks_reference,
    sparse_attention_reference,
    sparse_decode_reference,
)
from sala_train.testing import assert_close, requires_gpu

TINY = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2, topk=3)
TINY_CONFIG = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3,
                           dense_len=64)
# fp32 dots in the interpreter vs fp64 references: relative RMS error near 1e-7
FP32_RATIO = 2e-6


def qkv(B, T, Hq, Hk, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hq, D, generator=g, dtype=dtype), torch.randn(B, T, Hk, D, generator=g, dtype=dtype),
            torch.randn(B, T, Hk, D, generator=g, dtype=dtype))


def test_compress_keys_means_full_windows_per_sequence():
    k = torch.randn(1, 45, 2, 4)
    kc, cu = compress_keys(k, kernel_size=8, stride=4, cu_seqlens=torch.tensor([0, 7, 45]))
    # first document (7 tokens) has no full window; the second has floor((38 - 8) / 4) + 1 = 8
    assert cu.tolist() == [0, 0, 8]
    assert_close(kc[0, 3], k[0, 7 + 12 : 7 + 20].mean(0), ratio=1e-6, name="window 3 of doc 2")


@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 2), (16, 1)], ids=["group1", "group2", "group16"])
@pytest.mark.parametrize("T", [47, 150])
def test_triton_selection_equals_reference(Hq, Hk, T):
    q, k, _ = qkv(2, T, Hq, Hk, dtype=torch.float32, seed=T + Hq)
    ref = select_blocks_reference(q, k, **TINY)
    got = select_blocks(q, k, **TINY)
    assert got.shape == (2, Hk, T, 6)
    assert torch.equal(got, ref.to(got.dtype))


@pytest.mark.parametrize("override", [{"NBT": 2}, {"NBT": 4, "BT": 8}, {"BT": 16, "warps": 2}, {"merge": "bitonic"},
                                      {"merge": "bitonic", "NBT": 2}],
                         ids=["2-blocks-per-merge", "4-blocks-8-tokens", "16-tokens-2-warps", "bitonic",
                              "bitonic-2-blocks-per-merge"])
def test_selection_launch_configurations_the_benchmark_sweeps(monkeypatch, override):
    """Fewer blocks per top-k merge (more merges, padded keys) and other tile sizes select exactly the same
    blocks: 13 blocks over 2 documents, so the running top-k is merged several times per tile."""
    from sala_train.kernels.sparse import select as select_module

    monkeypatch.setattr(select_module, "SELECT_OVERRIDES", override)
    q, k, _ = qkv(1, 200, 4, 2, dtype=torch.float32, seed=5)
    cu = torch.tensor([0, 150, 200])
    got = select_blocks(q, k, cu_seqlens=cu, **TINY)
    assert torch.equal(got, select_blocks_reference(q, k, cu_seqlens=cu, **TINY).to(got.dtype))


def test_selection_launch_configuration_is_checked(monkeypatch):
    from sala_train.kernels.sparse import select as select_module

    q, k, _ = qkv(1, 40, 4, 2, dtype=torch.float32)
    for override, message in (({"NBT": 3}, "NBT=3"), ({"merge": "heap"}, "merge must be 'sort' or 'bitonic'")):
        monkeypatch.setattr(select_module, "SELECT_OVERRIDES", override)
        with pytest.raises(ValueError, match=message):
            select_blocks(q, k, **TINY)


def test_triton_selection_varlen_equals_reference_and_separate_documents():
    q, k, _ = qkv(1, 190, 4, 2, dtype=torch.float32, seed=3)
    cu = torch.tensor([0, 33, 34, 120, 190])
    got = select_blocks(q, k, cu_seqlens=cu, **TINY)
    assert torch.equal(got, select_blocks_reference(q, k, cu_seqlens=cu, **TINY).to(got.dtype))
    alone = select_blocks(q[:, 34:120], k[:, 34:120], **TINY)
    assert torch.equal(got[:, :, 34:120], alone)


def test_selection_properties():
    q, k, _ = qkv(1, 200, 4, 2, dtype=torch.float32, seed=4)
    idx = select_blocks(q, k, **TINY)
    t = torch.arange(200)
    own = t // 16
    for row in range(200):
        chosen = [b for b in idx[0, 0, row].tolist() if b >= 0]
        assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
        assert max(chosen) == own[row] and 0 in chosen  # own block and init block
        assert own[row] - 1 in chosen or own[row] == 0  # the local window (2 blocks)
        assert len(chosen) == min(6, own[row] + 1)  # every slot used once enough blocks are visible
    assert (idx[0, :, :, -1] == -1).any()  # early rows are padded


@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 2), (16, 1)], ids=["group1", "group2", "group16"])
def test_sparse_attention_forward_and_gradients(poisoned, Hq, Hk):
    B, T = 2, 83
    q, k, v = qkv(B, T, Hq, Hk, seed=Hq)
    idx = select_blocks_reference(q.float(), k.float(), **TINY)
    do = torch.randn(B, T, Hq, 16, dtype=torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = sparse_attention_reference(*ref_in, idx, block_size=16)
    (o_ref * do).sum().backward()
    ours_in = [x.float().requires_grad_() for x in (q, k, v)]
    o = sparse_attention(*ours_in, idx, block_size=16)
    (o.double() * do).sum().backward()
    assert_close(o, o_ref, ratio=FP32_RATIO, name="o")
    for name, mine, theirs in zip(("dq", "dk", "dv"), ours_in, ref_in):
        assert_close(mine.grad, theirs.grad, ratio=FP32_RATIO, name=name)


@pytest.mark.parametrize("Hq,Hk,override", [(16, 1, {"BT": 1}), (4, 2, {"BT": 8}), (2, 2, {"BQ": 16, "BT": 32})],
                         ids=["group16-bt1", "group2-bt8", "group1-bq16-bt32"])
def test_sparse_attention_launch_shapes_give_the_same_gradients(poisoned, monkeypatch, Hq, Hk, override):
    """dk/dv go over the tokens that chose each block BT at a time, the forward and dq over BQ-token tiles:
    other sizes than the defaults (a last group cut short, tiles of one token) change nothing."""
    from sala_train.kernels.sparse import attention

    B, T = 1, 99
    q, k, v = qkv(B, T, Hq, Hk, seed=5)
    idx = select_blocks_reference(q.float(), k.float(), **TINY)
    do = torch.randn(B, T, Hq, 16, dtype=torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    (sparse_attention_reference(*ref_in, idx, block_size=16) * do).sum().backward()
    monkeypatch.setattr(attention, "KERNEL_OVERRIDES", override)
    ours_in = [x.float().requires_grad_() for x in (q, k, v)]
    (sparse_attention(*ours_in, idx, block_size=16).double() * do).sum().backward()
    for name, mine, theirs in zip(("dq", "dk", "dv"), ours_in, ref_in):
        assert_close(mine.grad, theirs.grad, ratio=FP32_RATIO, name=f"{override} {name}")


def test_sparse_attention_varlen(poisoned):
    q, k, v = qkv(1, 120, 4, 2, seed=9)
    cu = torch.tensor([0, 17, 18, 120])
    idx = select_blocks_reference(q.float(), k.float(), cu_seqlens=cu, **TINY)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = sparse_attention_reference(*ref_in, idx, block_size=16, cu_seqlens=cu)
    o_ref.square().sum().backward()
    ours_in = [x.float().requires_grad_() for x in (q, k, v)]
    o = sparse_attention(*ours_in, idx, block_size=16, cu_seqlens=cu)
    o.double().square().sum().backward()
    assert_close(o, o_ref, ratio=FP32_RATIO, name="varlen o")
    for name, mine, theirs in zip(("dq", "dk", "dv"), ours_in, ref_in):
        assert_close(mine.grad, theirs.grad, ratio=FP32_RATIO, name=f"varlen {name}")


def test_selecting_every_block_is_dense_attention():
    q, k, v = qkv(1, 70, 4, 2, dtype=torch.float32, seed=11)
    idx = select_blocks(q, k, **{**TINY, "local_blocks": 5})  # 5 local blocks cover all of 70 tokens
    assert_close(sparse_attention(q, k, v, idx, block_size=16), dense_causal_attention_reference(q, k, v),
                 ratio=FP32_RATIO, name="all blocks")


def test_dense_below_dense_len_and_sparse_above():
    q, k, v = qkv(1, 100, 4, 2, dtype=torch.float32, seed=12)
    short = infllmv2_attention(q[:, :50], k[:, :50], v[:, :50], TINY_CONFIG)
    assert_close(short, dense_causal_attention_reference(q[:, :50], k[:, :50], v[:, :50]), ratio=FP32_RATIO,
                 name="below dense_len")
    long = infllmv2_attention(q, k, v, TINY_CONFIG)
    expected = sparse_attention_reference(q, k, v, select_blocks_reference(q, k, **TINY), block_size=16)
    assert_close(long, expected, ratio=FP32_RATIO, name="above dense_len")
    assert (long - dense_causal_attention_reference(q, k, v)).abs().max() > 1e-3  # really sparse


def test_packed_documents_on_both_sides_of_dense_len():
    """Forward and gradients of a packed batch with a short (dense) and a long (sparse) document, against the
    two documents run alone."""
    q, k, v = (x.requires_grad_() for x in qkv(1, 130, 4, 2, dtype=torch.float32, seed=13))
    cu = torch.tensor([0, 30, 130])
    grad = torch.randn(1, 130, 4, 16)
    packed = infllmv2_attention(q, k, v, TINY_CONFIG, cu_seqlens=cu)
    got = torch.autograd.grad(packed, (q, k, v), grad)
    first = infllmv2_attention(q[:, :30], k[:, :30], v[:, :30], TINY_CONFIG)
    second = infllmv2_attention(q[:, 30:], k[:, 30:], v[:, 30:], TINY_CONFIG)
    alone = torch.cat([first, second], dim=1)
    want = torch.autograd.grad(alone, (q, k, v), grad)
    assert_close(packed, alone, ratio=FP32_RATIO, name="packed")
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, ratio=FP32_RATIO, name=name)


@pytest.mark.parametrize("S", [40, 64, 97, 150, 301])
def test_decode_equals_last_row_of_prefill(S):
    q, k, v = qkv(2, S, 4, 2, dtype=torch.float32, seed=S)
    full = infllmv2_attention(q, k, v, TINY_CONFIG)
    step = infllmv2_decode(q[:, -1], k, v, TINY_CONFIG)
    assert_close(step, full[:, -1], ratio=FP32_RATIO, name=f"decode at {S}")
    # with compressed-key caches kept by the caller (here: computed once up front)
    caches = (compress_keys(k, 8, 4)[0], compress_keys(k, 32, 16)[0])
    assert_close(infllmv2_decode(q[:, -1], k, v, TINY_CONFIG, compressed=caches), full[:, -1], ratio=FP32_RATIO,
                 name=f"decode with compressed caches at {S}")


@pytest.mark.parametrize("S,T", [(150, 37), (150, 150), (97, 1), (60, 20), (301, 128)])
@torch.no_grad()
def test_prefill_chunk_equals_last_rows_of_full_prefill(poisoned, S, T):
    # the Triton path computes only the chunk's rows (tiles before the chunk are left out; the outputs are
    # poisoned, so a chunk row left unwritten fails); the rows must be those of the full prefill, below
    # dense_len (60) as above it
    q, k, v = qkv(2, S, 4, 2, dtype=torch.float32, seed=S + T)
    full = infllmv2_attention(q, k, v, TINY_CONFIG)
    chunk = infllmv2_prefill(q[:, S - T:].clone(), k, v, TINY_CONFIG)
    assert chunk.shape == (2, T, 4, 16)
    assert_close(chunk, full[:, S - T:], ratio=FP32_RATIO, name=f"prefill chunk {T} of {S}")


def test_prefill_chunk_checks_shapes():
    # (q_start also trains: test_q_start_skips_the_leading_rows_of_every_sequence checks its gradients)
    q, k, v = qkv(1, 100, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="must be the last rows"):
        infllmv2_prefill(q, k[:, :50], v[:, :50], TINY_CONFIG)


@pytest.mark.parametrize("Hq,Hk", [(16, 1), (4, 2), (2, 2)], ids=["group16", "group2", "group1"])
def test_triton_decode_kernel_equals_the_reference(poisoned, monkeypatch, Hq, Hk):
    """The decode kernel reads the selected blocks of a cache that is a slice of a longer buffer (as a
    preallocated cache is), with empty slots and a last block cut short; infllmv2_decode goes through it."""
    from sala_train.kernels.sparse import attention, decode_block_selection

    S, N, D = 150, 2, 16
    g = torch.Generator().manual_seed(Hq)
    q = torch.randn(N, Hq, D, generator=g)
    buffer = torch.randn(2, N, 200, Hk, D, generator=g)  # room for 200 tokens, S of them filled
    k, v = buffer[0, :, :S], buffer[1, :, :S]
    expected = sparse_decode_reference(q.double(), k.double(), v.double(), dense_len=64, **TINY)
    calls = []
    original = attention.triton_sparse_decode
    monkeypatch.setattr(attention, "triton_sparse_decode", lambda *a: calls.append(a) or original(*a))
    got = infllmv2_decode(q, k, v, TINY_CONFIG)
    assert len(calls) == 1
    assert_close(got, expected, ratio=FP32_RATIO, name="decode kernel")
    indices = decode_block_selection(q, k, TINY_CONFIG, D**-0.5)
    indices[:, :, 0] = -1  # an emptied slot changes the answer exactly as the gathered attention says
    o = original(q, k, v, indices, 16, D**-0.5)
    positions = indices.long()[..., None] * 16 + torch.arange(16)  # [N, Hk, slots, 16]
    valid = ((positions >= 0) & (positions < S)).flatten(2)
    index = positions.clamp(0, S - 1).flatten(2)[..., None].expand(-1, -1, -1, D)
    keys, values = (x.double().permute(0, 2, 1, 3).gather(2, index) for x in (k, v))
    scores = torch.einsum("nkgd,nkld->nkgl", q.double().view(N, Hk, Hq // Hk, D), keys) * D**-0.5
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    ref = torch.einsum("nkgl,nkld->nkgd", scores.softmax(-1), values).reshape(N, Hq, D)
    assert_close(o, ref, ratio=FP32_RATIO, name="decode kernel with an empty slot")


def test_decode_selection_equals_the_reference_last_row():
    from sala_train.kernels.sparse import decode_block_selection

    for S in (64, 150, 301):
        q, k, _ = qkv(2, S, 4, 2, dtype=torch.float32, seed=S + 1)
        ref = select_blocks_reference(q, k, **TINY)[:, :, -1]
        assert torch.equal(decode_block_selection(q[:, -1], k, TINY_CONFIG, 16**-0.5), ref)


def test_bad_inputs():
    q, k, v = qkv(1, 20, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_attention(q, k, v, torch.zeros(1, 2, 20, 3, dtype=torch.int32), block_size=16)
    with pytest.raises(ValueError, match=r"unknown keys \['topk_blocks'\]"):
        SparseConfig.from_dict({"topk_blocks": 3})
    with pytest.raises(ValueError, match="window_size"):
        SparseConfig.from_dict({"window_size": 100})


@requires_gpu
@pytest.mark.parametrize("G", [16, 2])
def test_gpu_bf16_real_shapes(G):
    torch.manual_seed(0)
    Hk, D, T = 1, 128, 4500
    q = torch.randn(1, T, G * Hk, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, T, Hk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cfg = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=8, topk=16)
    got = select_blocks(q, k, **cfg)
    # the reference upcasts internally; given the same bf16 inputs it also rounds the compressed keys to
    # bf16 as the kernel does, so only the summation order differs (rare flips between near-equal blocks)
    ref = select_blocks_reference(q, k, **cfg)
    same_rows = (got == ref.to(got.dtype)).all(-1).float().mean().item()
    assert same_rows > 0.995, f"only {same_rows:.4f} of the rows select the same blocks"
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    o_ref = sparse_attention_reference(q32, k32, v32, got, block_size=64)
    do = torch.randn_like(o_ref)
    (o_ref * do).sum().backward()
    ours = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = sparse_attention(*ours, got, block_size=64)
    (o.float() * do).sum().backward()
    assert_close(o, o_ref, ratio=1e-2, name="bf16 o")
    for name, mine, theirs in zip(("dq", "dk", "dv"), ours, (q32, k32, v32)):
        assert_close(mine.grad, theirs.grad, ratio=1e-2, name=f"bf16 {name}")


@pytest.mark.parametrize("D", [16, 8], ids=["triton", "reference"])  # head_dim 8: the public ops' reference path
def test_q_start_skips_the_leading_rows_of_every_sequence(D):
    """Context parallelism puts a rank's queries at the end of their document's prefix behind rows it does not
    need: with q_start those rows are neither scored nor attended (-1, zeros, no gradient), and the
    others are exactly what the full computation gives."""
    q, k, v = qkv(1, 150, 4, 2, D=D, dtype=torch.float32, seed=11)
    cu, start = torch.tensor([0, 60, 150]), 23
    keep = torch.ones(1, 150, dtype=torch.bool)
    keep[0, :start] = keep[0, 60 : 60 + start] = False
    full = select_blocks_reference(q, k, cu_seqlens=cu, **TINY)
    idx = select_blocks(q, k, cu_seqlens=cu, q_start=start, **TINY)
    assert torch.equal(idx, full.to(idx.dtype).masked_fill(~keep[:, None, :, None], -1))

    do = torch.randn(1, 150, 4, D)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref = sparse_attention_reference(*ref_in, full, block_size=16, cu_seqlens=cu)
    (o_ref * do.double() * keep[..., None, None]).sum().backward()
    ours_in = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sparse_attention(*ours_in, idx, block_size=16, cu_seqlens=cu, q_start=start)
    (o * do).sum().backward()
    assert torch.equal(o[~keep], torch.zeros_like(o[~keep]))
    assert_close(o[keep], o_ref[keep], ratio=FP32_RATIO, name="o")
    for name, mine, theirs in zip(("dq", "dk", "dv"), ours_in, ref_in):
        assert_close(mine.grad, theirs.grad, ratio=FP32_RATIO, name=name)


@pytest.mark.parametrize("step", [1, 4, 16])
@pytest.mark.parametrize("q_start", [0, 3, 16, 40, 500])
def test_tile_tables_equal_the_loop(step, q_start):
    from sala_train.kernels.tiles import covered_tokens, tiles

    bounds = [0, 0, 37, 38, 100, 164, 165, 300]  # empty, odd and one-token sequences
    expected = [(t, min(step, e - t), n) for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
                for t in range(s, e, step) if t + step > s + q_start]
    start, length, seq = tiles(bounds, step, q_start)
    assert list(zip(start.tolist(), length.tolist(), seq.tolist())) == expected
    assert covered_tokens(start, length).tolist() == [t + i for t, n, _ in expected for i in range(n)]
