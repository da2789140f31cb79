"""Tests of the test harness itself (sala_train.testing and tests/conftest.py)."""

import multiprocessing
import os
import random
import re
import sys
import textwrap
import time

import numpy
import pytest
import torch
import torch.distributed as dist

from sala_train.testing import (
    DistributedRunError,
    assert_close,
    error_ratio,
    install_hint,
    optional_import,
    poison_empty,
    requires_module,
    run_distributed,
    seed_everything,
)

# ---------------------------------------------------------------------------------------------------------
# assert_close / error_ratio


def test_error_ratio_of_a_scaled_tensor_is_the_scale_error():
    expected = torch.randn(7, 63, dtype=torch.float64)
    # RMS(1.1 e - e) / RMS(e) = 0.1 exactly, up to float64 rounding.
    assert error_ratio(expected * 1.1, expected) == pytest.approx(0.1, rel=1e-9)
    assert error_ratio(expected, expected) == 0.0


def test_assert_close_passes_on_equal_and_nearly_equal_tensors():
    expected = torch.randn(3, 63, 5)
    assert_close(expected.clone(), expected, ratio=0.0, name="identical")
    # A perturbation of relative size 1e-4 has an error ratio of about 1e-4.
    assert_close(expected + 1e-4 * torch.randn_like(expected), expected, ratio=1e-3, name="perturbed")


def test_assert_close_accepts_bf16_rounding_of_an_fp32_reference():
    expected = torch.randn(4, 100)
    # bf16 keeps 8 significant bits: relative rounding error <= 2^-9 per element, so the ratio is < 4e-3.
    assert_close(expected.bfloat16(), expected, ratio=4e-3, name="bf16 output")


def test_assert_close_fails_on_a_real_difference_and_says_where():
    expected = torch.randn(5, 17)
    actual = expected.clone()
    actual[3, 11] += 100.0
    with pytest.raises(AssertionError, match=r"output: error ratio .* > allowed 1\.0e-03") as raised:
        assert_close(actual, expected, ratio=1e-3, name="output")
    message = str(raised.value)
    assert "index (3, 11)" in message
    assert "max abs diff 1.000e+02" in message
    assert "shape (5, 17)" in message and "torch.float32" in message


def test_assert_close_atol_rescues_tensors_near_zero():
    expected = torch.zeros(9)
    actual = torch.full((9,), 1e-9)
    with pytest.raises(AssertionError, match="error ratio"):
        assert_close(actual, expected, ratio=1e-3)
    assert_close(actual, expected, ratio=1e-3, atol=1e-8)


def test_assert_close_fails_on_shape_mismatch():
    with pytest.raises(AssertionError, match=r"grad_q: shape mismatch, actual \(2, 3\) vs expected \(3, 2\)"):
        assert_close(torch.zeros(2, 3), torch.zeros(3, 2), ratio=1.0, name="grad_q")


def test_assert_close_fails_on_nan_in_actual_and_counts_it():
    expected = torch.randn(4, 6)
    actual = expected.clone()
    actual[1, 2] = float("nan")
    actual[3, 0] = float("nan")
    actual[0, 5] = float("inf")
    expected_message = r"state: 2 NaN and 1 Inf value\(s\) in actual where expected has none"
    with pytest.raises(AssertionError, match=expected_message):
        assert_close(actual, expected, ratio=1.0, name="state")


def test_assert_close_allows_nan_where_expected_has_nan_but_not_the_reverse():
    expected = torch.randn(10)
    expected[4] = float("nan")
    actual = expected.clone()
    assert_close(actual, expected, ratio=0.0)
    actual[4] = 0.0
    expected_message = r"1 position\(s\) where expected is NaN/Inf but actual is finite"
    with pytest.raises(AssertionError, match=expected_message):
        assert_close(actual, expected, ratio=1.0)


# ---------------------------------------------------------------------------------------------------------
# poison_empty


def test_poison_empty_fills_new_allocations_and_restores_torch():
    original_functions = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    like = torch.zeros(2, 3)
    with poison_empty():
        assert torch.empty(3, 5).isnan().all()
        assert torch.empty_like(like).isnan().all()
        assert like.new_empty(4).isnan().all()
        assert torch.empty_strided((2, 2), (1, 2)).isnan().all()
        assert torch.empty(3, dtype=torch.bfloat16).isnan().all()
        assert (torch.empty(3, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
        assert (like.new_empty(3, dtype=torch.int64) == torch.iinfo(torch.int64).max).all()
        leaf = torch.empty(3, requires_grad=True)  # filling a leaf that requires grad must not fail
        assert leaf.requires_grad and leaf.isnan().all()
    assert (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty) == original_functions
    assert "new_empty" not in vars(torch.Tensor)


def test_poison_empty_restores_torch_after_an_exception():
    original_empty, original_new_empty = torch.empty, torch.Tensor.new_empty
    with pytest.raises(ValueError, match="boom"), poison_empty():
        assert torch.empty is not original_empty
        raise ValueError("boom")
    assert torch.empty is original_empty
    assert torch.Tensor.new_empty is original_new_empty


def test_poison_empty_nests():
    original_empty = torch.empty
    with poison_empty():
        with poison_empty():
            assert torch.empty(2).isnan().all()
        assert torch.empty(2).isnan().all()
    assert torch.empty is original_empty


def _cumulative_sum_that_skips_the_last_column(x):
    """A deliberately buggy op: allocates its output with empty_like and never writes the last column."""
    out = torch.empty_like(x)
    out[:, :-1] = x[:, :-1].cumsum(dim=1)
    return out


def test_poisoned_fixture_exposes_an_unwritten_output(poisoned):
    x = torch.randn(3, 7)
    with pytest.raises(AssertionError, match=r"(?s)3 NaN and 0 Inf.*never wrote"):
        assert_close(_cumulative_sum_that_skips_the_last_column(x), x.cumsum(1), ratio=1e-6, name="cumsum")


# ---------------------------------------------------------------------------------------------------------
# run_distributed (each call spawns 2 processes that import torch: a few seconds)


def _all_reduce_rank_plus_one(rank, world_size, scale):
    """Module level on purpose: run_distributed imports it by name in each rank."""
    import os

    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["LOCAL_RANK"] == str(rank)
    total = torch.tensor([scale * (rank + 1.0)])
    dist.all_reduce(total)
    return {"rank": rank, "total": total}


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one exploded on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a peer that is gone, as in a real failure
    return rank


def _sleep_on_rank_zero(rank, world_size):
    if rank == 0:
        time.sleep(600)
    return rank


def _exit_without_a_word_on_rank_one(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def test_run_distributed_all_reduce_returns_every_rank_in_order():
    results = run_distributed(_all_reduce_rank_plus_one, world_size=2, args=(10.0,))
    assert [result["rank"] for result in results] == [0, 1]
    for result in results:
        torch.testing.assert_close(result["total"], torch.tensor([30.0]))  # 10 * (1 + 2)
    assert not dist.is_initialized()  # the parent process never joins the group
    assert multiprocessing.active_children() == []


def test_run_distributed_surfaces_a_failing_rank_traceback():
    with pytest.raises(DistributedRunError) as raised:
        run_distributed(_raise_on_rank_one, world_size=2)
    message = str(raised.value)
    # Rank 0 fails too ("connection closed by peer"); it usually reports second, but that is a race.
    assert re.search(r"rank\(s\) \[(1|0, 1|1, 0)\] failed", message)
    assert "--- rank 1 ---" in message and "Traceback (most recent call last)" in message
    assert "in _raise_on_rank_one" in message
    assert "ValueError: rank one exploded on purpose" in message
    assert multiprocessing.active_children() == []


def test_run_distributed_reports_a_rank_that_dies_without_a_traceback():
    with pytest.raises(DistributedRunError, match="rank 1 exited with code 3 without reporting a result"):
        run_distributed(_exit_without_a_word_on_rank_one, world_size=2)
    assert multiprocessing.active_children() == []


def test_run_distributed_kills_a_hung_rank_after_the_timeout():
    # Rank 1 may or may not have finished by then (start-up alone takes seconds on 2 cores); rank 0 never
    # does.
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0.* did not finish within 4 s"):
        run_distributed(_sleep_on_rank_zero, world_size=2, timeout_s=4)
    assert multiprocessing.active_children() == []


def test_run_distributed_rejects_a_function_it_cannot_import_by_name():
    def nested(rank, world_size):
        return rank

    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(nested)
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank)


# ---------------------------------------------------------------------------------------------------------
# seeding, optional imports


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    def draw():
        return random.random(), float(numpy.random.rand()), torch.randn(3)

    seed_everything(1234)
    first = draw()
    seed_everything(1234)
    second = draw()
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2])


def test_optional_import_of_a_missing_stack_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail, installed or not
    expected_message = r"deepspeed is not installed; .*pip install 'sala-train\[deepspeed\]'"
    with pytest.raises(ModuleNotFoundError, match=expected_message):
        optional_import("deepspeed")
    mark = requires_module("deepspeed")
    assert mark.args == (True,)
    assert "pip install 'sala-train[deepspeed]'" in mark.kwargs["reason"]
    assert install_hint("megatron.core") == "pip install 'sala-train[megatron]'"
    assert optional_import("json") is sys.modules["json"]


# ---------------------------------------------------------------------------------------------------------
# tests/conftest.py: gpu / multi_gpu auto-skip, checked by running pytest on a generated test file with the
# real conftest and the real pytest configuration.


def test_conftest_skips_gpu_tests_on_machines_without_enough_gpus(pytester, request):
    pytester.path.joinpath(request.config.inipath.name).write_text(request.config.inipath.read_text())
    pytester.makeconftest(request.config.rootpath.joinpath("tests", "conftest.py").read_text())
    pytester.makepyfile(
        test_markers=textwrap.dedent(
            """
            import pytest
            from sala_train.testing import requires_gpu, requires_module, requires_multi_gpu

            def test_cpu():
                pass

            @pytest.mark.gpu
            def test_marked_gpu():
                pass

            @pytest.mark.multi_gpu
            def test_marked_multi_gpu():
                pass

            @requires_gpu
            def test_requires_gpu():
                pass

            @requires_multi_gpu
            def test_requires_multi_gpu():
                pass

            @requires_module("sala_train_no_such_module")
            def test_requires_missing_module():
                pass
            """
        ),
        # A mark group as a module's pytestmark, combined with another mark.
        test_module_marks=textwrap.dedent(
            """
            import pytest
            from sala_train.testing import requires_gpu

            pytestmark = [*requires_gpu, pytest.mark.slow]

            class TestOnGpu:
                def test_in_class(self):
                    pass
            """
        ),
    )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runnable_gpu_tests = 3 * (gpus >= 1) + 2 * (gpus >= 2)

    result = pytester.runpytest("-rs", "-p", "no:cacheprovider", "test_markers.py", "test_module_marks.py")
    result.assert_outcomes(passed=1 + runnable_gpu_tests, skipped=6 - runnable_gpu_tests)
    result.stdout.fnmatch_lines(
        ["*needs sala_train_no_such_module: install it with pip install sala_train_no_such_module*"]
    )
    if gpus == 0:
        result.stdout.fnmatch_lines(
            [
                "SKIPPED *marked gpu: needs 1 CUDA GPU, but torch * sees none*",
                "SKIPPED *marked multi_gpu: needs 2 CUDA GPUs, but torch * sees none*",
            ],
            consecutive=False,
        )
    elif gpus == 1:
        result.stdout.fnmatch_lines(["SKIPPED *marked multi_gpu: needs 2 CUDA GPUs, found 1*"])

    # `-m "not gpu"` deselects GPU tests, multi-GPU ones included (requires_multi_gpu also marks `gpu`).
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "-m", "not gpu", "test_markers.py", "test_module_marks.py"
    )
    # Left: test_cpu, test_marked_multi_gpu (a bare multi_gpu mark: not deselected, skipped by conftest
    # below 2 GPUs) and the missing-module test.
    result.assert_outcomes(passed=1 + (gpus >= 2), skipped=2 - (gpus >= 2), deselected=4)
