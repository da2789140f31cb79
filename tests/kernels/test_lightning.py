"""Lightning attention: the Triton kernels against the naive references.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no
GPU) in fp32 on tiny shapes; `gpu` tests run bf16 at realistic shapes against fp64.
"""

import math

import pytest
import torch

from sala_train.kernels.lightning import _use_triton, lightning_attention, lightning_decode, sala_decay
from sala_train.kernels.lightning.naive import (
    lightning_attention_parallel,
    lightning_attention_recurrent,
    lightning_decode_reference,
)
from sala_train.testing import assert_close, requires_gpu

# fp32 inputs take exact (ieee) fp32 dots; the chunked sums reorder additions only, so the relative RMS
# error against fp64 stays near 1e-7. 2e-6 leaves room for long decays while catching any real bug.
FP32_RATIO = 2e-6


def decays_spanning(H: int) -> torch.Tensor:
    """log-decays from gamma = 0.43 (SALA's fastest head) to 0.996 (its slowest)."""
    return torch.linspace(math.log(0.43), math.log(0.996), H)


def run_and_grad(fn, q, k, v, s0, do, dfinal):
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s = s0.detach().clone().requires_grad_() if s0 is not None else None
    o, final = fn(*inputs, s)
    loss = (o.double() * do).sum()
    if final is not None:
        loss = loss + (final.double() * dfinal).sum()
    loss.backward()
    return o, final, [x.grad for x in inputs] + ([s.grad] if s is not None else [])


def compare(case, cu_seqlens=None, use_initial=True, block_len=None, D=16, H=4, B=2, T=65, want_final=True):
    torch.manual_seed(hash(case) % 2**31)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    s0 = torch.randn(N, H, D, D, dtype=torch.float64) if use_initial else None
    do = torch.randn(B, T, H, D, dtype=torch.float64)
    dfinal = torch.randn(N, H, D, D, dtype=torch.float64)
    g = decays_spanning(H)
    ref = run_and_grad(lambda a, b, c, s: lightning_attention_parallel(a, b, c, g, None, s, True, cu_seqlens),
                       q, k, v, s0, do, dfinal)
    cast = lambda x: x.float() if x is not None else None  # noqa: E731
    if not want_final:  # the reference's loss must not see the final state either
        ref = run_and_grad(lambda a, b, c, s: lightning_attention_parallel(a, b, c, g, None, s, False, cu_seqlens),
                           q, k, v, s0, do, dfinal)
    ours = run_and_grad(
        lambda a, b, c, s: lightning_attention(a, b, c, g, initial_state=s, output_final_state=want_final,
                                               cu_seqlens=cu_seqlens, block_len=block_len),
        cast(q), cast(k), cast(v), cast(s0), do, dfinal)
    names = ["o", "final state", "dq", "dk", "dv"] + (["d initial state"] if use_initial else [])
    for name, mine, theirs in zip(names, [ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]):
        if name == "final state" and not want_final:
            assert mine is None
            continue
        assert_close(mine, theirs, ratio=FP32_RATIO, name=f"{case}: {name}")


def test_references_agree_with_each_other():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 8, dtype=torch.float64) for _ in range(3))
    s0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    g = decays_spanning(3)
    o1, f1 = lightning_attention_recurrent(q, k, v, g, None, s0, True)
    o2, f2 = lightning_attention_parallel(q, k, v, g, None, s0, True)
    assert_close(o2, o1, ratio=1e-12, name="parallel vs recurrent o")
    assert_close(f2, f1, ratio=1e-12, name="parallel vs recurrent final state")
    # the decay matters: with gamma = 1 the outputs differ
    o3, _ = lightning_attention_parallel(q, k, v, torch.zeros(3), None, s0, True)
    assert (o3 - o1).abs().max() > 1e-2


def test_triton_path_is_used_on_cpu_under_the_interpreter():
    assert _use_triton(torch.empty(1, 1, 1, 16)), "tests/conftest.py must set TRITON_INTERPRET=1 without a GPU"


@pytest.mark.parametrize("T", [1, 63, 65, 300])
@pytest.mark.parametrize("use_initial", [True, False], ids=["h0", "no-h0"])
def test_forward_state_and_gradients(poisoned, T, use_initial):
    compare(f"T={T}", use_initial=use_initial, T=T, B=2 if T < 300 else 1)


@pytest.mark.parametrize("block_len", [32, 64])
def test_blocks_of_several_chunks(poisoned, block_len):
    compare(f"block_len={block_len}", block_len=block_len, T=150, B=2)


@pytest.mark.parametrize("use_initial", [True, False], ids=["h0", "no-h0"])
def test_blocks_without_final_state(poisoned, use_initial):
    """Without a final state (and without an initial state) the kernels skip the contributions of each
    sequence's last (first) block; the outputs and gradients must not change."""
    compare("no final state", block_len=32, T=150, B=2, use_initial=use_initial, want_final=False)
    compare("no final state varlen", cu_seqlens=torch.tensor([0, 40, 41, 133]), block_len=32, B=1, T=133,
            use_initial=use_initial, want_final=False)


@pytest.fixture
def kernel_overrides():
    """The launch-configuration dicts the benchmarks sweep, emptied again after the test."""
    from sala_train.kernels.lightning import chunk, recurrent

    yield chunk.KERNEL_OVERRIDES, recurrent.DECODE_OVERRIDES
    chunk.KERNEL_OVERRIDES.clear()
    recurrent.DECODE_OVERRIDES.clear()


@pytest.mark.parametrize("override", [{"BV": 8}, {"BV": 8, "v_first": True}, {"C": 32}, {"block_policy": "programs"}],
                         ids=["two-V-tiles", "two-V-tiles-v-first", "C32", "programs-policy"])
def test_launch_configurations_the_benchmark_sweeps(poisoned, kernel_overrides, override):
    """Every configuration benchmarks/lightning.py --sweep may pick as a default computes the same thing:
    V split into tiles (with either grid order) and a larger chunk, over blocks of several chunks and varlen."""
    kernel_overrides[0].update(override)
    compare(f"{override}", block_len=64, T=150, B=2)
    compare(f"{override} varlen", cu_seqlens=torch.tensor([0, 1, 17, 40, 100, 133]), B=1, T=133, block_len=32)


def test_waves_block_policy_takes_the_longest_blocks_that_fill_the_sms(kernel_overrides):
    from sala_train.kernels.lightning.chunk import choose_block_len_waves

    # H100/H200 (132 SMs), 32 heads, one V tile: 4 x 64K is 128 programs with whole sequences (>= 0.9 x 132)
    assert choose_block_len_waves([65536] * 4, 32, 64, 132) == 65536
    assert choose_block_len_waves([262144], 32, 64, 132) == 65536  # 1 x 256K: 4 blocks, 128 programs
    assert choose_block_len_waves([4096], 32, 64, 132) == 1024  # 1 x 4K: 4 blocks
    assert choose_block_len_waves([4096] * 64, 32, 64, 132) == 4096
    # 112 -> 64 -> 32 tokens: 4 + 2 blocks (the empty sequence has none) >= 0.9 x 6 SMs
    assert choose_block_len_waves([100, 0, 37], 1, 16, 6) == 32
    assert choose_block_len_waves([5], 1, 16, 132) == 16  # never below one chunk
    assert choose_block_len_waves([], 32, 64, 132) == 64
    # the policy is used when no block length is given; an unknown one is refused by name
    torch.manual_seed(0)
    q = torch.randn(1, 40, 1, 16)
    kernel_overrides[0].update({"block_policy": "waves"})
    o, _ = lightning_attention(q, q, q, decays_spanning(1))
    o_ref, _ = lightning_attention_parallel(q.double(), q.double(), q.double(), decays_spanning(1))
    assert_close(o, o_ref, ratio=FP32_RATIO, name="waves policy o")
    kernel_overrides[0].update({"block_policy": "longest"})
    with pytest.raises(ValueError, match="block_policy must be 'programs' or 'waves', not 'longest'"):
        lightning_attention(q, q, q, decays_spanning(1))


@pytest.mark.parametrize("override", [{"BV": 16}, {"BV": 8, "warps": 2}])
def test_decode_launch_configurations(poisoned, kernel_overrides, override):
    kernel_overrides[1].update(override)
    test_decode_kernel_matches_reference(poisoned)


def test_head_dim_32_and_a_single_head(poisoned):
    compare("D=32", D=32, H=1, T=40, B=1)


@pytest.mark.parametrize("use_initial", [True, False], ids=["h0", "no-h0"])
def test_varlen_uneven_documents(poisoned, use_initial):
    cu = torch.tensor([0, 1, 17, 40, 40, 41, 100, 133])  # includes an empty and one-token documents
    compare("varlen", cu_seqlens=cu, use_initial=use_initial, B=1, T=133, block_len=32)


def test_varlen_equals_separate_sequences():
    torch.manual_seed(5)
    H, D = 2, 16
    lengths = [20, 3, 45]
    docs = [torch.randn(3, 1, n, H, D) for n in lengths]
    g = sala_decay(H)
    packed = [torch.cat([d[i] for d in docs], dim=1) for i in range(3)]
    cu = torch.tensor([0, 20, 23, 68])
    o, final = lightning_attention(*packed, g, output_final_state=True, cu_seqlens=cu)
    for n, d in enumerate(docs):
        o_n, f_n = lightning_attention(d[0], d[1], d[2], g, output_final_state=True)
        assert_close(o[:, cu[n]:cu[n + 1]], o_n, ratio=FP32_RATIO, name=f"document {n}")
        assert_close(final[n:n + 1], f_n, ratio=FP32_RATIO, name=f"final state {n}")


def test_decode_steps_continue_a_prefill():
    torch.manual_seed(6)
    B, T, H, D = 3, 21, 2, 16
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    g = decays_spanning(H)
    full, full_state = lightning_attention_parallel(q, k, v, g, None, None, True)
    _, state = lightning_attention(q[:, :15], k[:, :15], v[:, :15], g, output_final_state=True)
    steps = []
    for t in range(15, T):
        steps.append(lightning_decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g, state))
    assert_close(torch.cat(steps, dim=1), full[:, 15:], ratio=FP32_RATIO, name="decoded o")
    assert_close(state, full_state, ratio=FP32_RATIO, name="state after decoding")


def test_decode_kernel_matches_reference(poisoned):
    torch.manual_seed(7)
    N, H, D = 5, 3, 32
    q, k, v = (torch.randn(N, H, D) for _ in range(3))
    g = decays_spanning(H)
    state = torch.randn(N, H, D, D)
    state_ref = state.clone()
    o = lightning_decode(q, k, v, g, state)
    o_ref = lightning_decode_reference(q, k, v, g, state_ref)
    assert_close(o, o_ref, ratio=FP32_RATIO, name="decode o")
    assert_close(state, state_ref, ratio=FP32_RATIO, name="decode state")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k": torch.zeros(1, 4, 2, 8)}, "k must have q's shape"),
        ({"decay": torch.zeros(3)}, r"decay must be the per-head log-decay of shape \[H\] = \[2\]"),
        ({"decay": torch.full((2,), 0.5)}, "must be <= 0"),
        ({"cu_seqlens": torch.tensor([0, 2, 5])}, "rise from 0 to T = 4"),
        ({"initial_state": torch.zeros(2, 2, 16, 16)}, r"initial_state must be \[N, H, D, D\]"),
    ],
)
def test_bad_inputs_name_the_tensor(kwargs, message):
    args = {"q": torch.zeros(1, 4, 2, 16), "k": torch.zeros(1, 4, 2, 16), "v": torch.zeros(1, 4, 2, 16),
            "decay": sala_decay(2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lightning_attention(**args)


def test_sala_decay_values():
    g = sala_decay(32)
    assert math.isclose(g.exp()[0].item(), 0.4313, abs_tol=1e-4)
    assert math.isclose(g.exp()[-1].item(), 0.9961, abs_tol=1e-4)


# -- GPU: bf16 at realistic shapes ----------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_gpu_bf16_against_fp64(D, varlen):
    """bf16 inputs, fp32 state: relative error vs fp64 below 1e-2 (bf16 operand rounding is ~4e-3), and
    (D = 128) no worse than fla's chunk_simple_gla on the same inputs where fla is installed."""
    torch.manual_seed(8)
    H, T = 8, 3001
    B = 1 if varlen else 2
    cu = torch.tensor([0, 1000, 1001, 2900, T], device="cuda") if varlen else None
    N = 4 if varlen else B
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.float64) for _ in range(3))
    s0 = torch.randn(N, H, D, D, device="cuda", dtype=torch.float64) * 0.1
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.float64)
    dfinal = torch.randn(N, H, D, D, device="cuda", dtype=torch.float64)
    g = sala_decay(H, device="cuda")
    ref = run_and_grad(lambda a, b, c, s: lightning_attention_parallel(a, b, c, g, None, s, True, cu), q, k, v, s0, do, dfinal)
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    ours = run_and_grad(lambda a, b, c, s: lightning_attention(a, b, c, g, initial_state=s, output_final_state=True, cu_seqlens=cu),
                        bf(q), bf(k), bf(v), s0.float(), do, dfinal)
    names = ["o", "final", "dq", "dk", "dv", "dh0"]
    ours_flat, ref_flat = [ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]
    for name, mine, theirs in zip(names, ours_flat, ref_flat):
        assert_close(mine, theirs, ratio=1e-2, name=f"bf16 {name}")
    if D != 128:  # fla's comparison at the SALA head size only: its autotuning takes minutes per shape
        return
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return
    fla = run_and_grad(lambda a, b, c, s: chunk_simple_gla(a, b, c, g_gamma=g, scale=D**-0.5, initial_state=s,
                                                           output_final_state=True, cu_seqlens=cu),
                       bf(q), bf(k), bf(v), s0.float(), do, dfinal)
    for name, mine, theirs, ref_x in zip(names, ours_flat, [fla[0], fla[1], *fla[2]], ref_flat):
        from sala_train.testing import error_ratio

        assert error_ratio(mine, ref_x) <= 1.25 * error_ratio(theirs, ref_x) + 1e-4, name


@requires_gpu
def test_gpu_decode_matches_reference():
    torch.manual_seed(9)
    N, H, D = 16, 32, 128
    q, k, v = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = sala_decay(H, device="cuda")
    state = torch.randn(N, H, D, D, device="cuda")
    state_ref = state.clone()
    o = lightning_decode(q, k, v, g, state)
    o_ref = lightning_decode_reference(q, k, v, g, state_ref)
    assert_close(o, o_ref, ratio=1e-2, name="decode o")
    assert_close(state, state_ref, ratio=1e-6, name="decode state")
