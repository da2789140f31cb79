"""Reusable test markers: what a test needs (GPUs, an optional package) and the skip when it is absent.

The marker names (``gpu``, ``multi_gpu``, ``slow``) are declared once in setup.cfg; ``tests/conftest.py``
skips tests marked ``gpu`` / ``multi_gpu`` on machines without enough GPUs. The decorators here carry
their own skip as well, so they also work where that conftest is not loaded.

    @requires_gpu
    def test_kernel_matches_reference(): ...

    pytestmark = requires_multi_gpu                      # a whole module
    pytestmark = [*requires_gpu, pytest.mark.slow]       # groups are lists: unpack them to combine

    @requires_module("deepspeed")
    def test_zero_stage_2(): ...
"""

import pytest
import torch

from sala_train.testing.optional import install_hint, module_available


def gpu_skip_reason(gpus_needed: int) -> str | None:
    """Why a test that needs ``gpus_needed`` CUDA devices cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return (
            f"needs {gpus_needed} CUDA GPU{'s' if gpus_needed > 1 else ''}, but torch {torch.__version__} "
            "sees none (torch.cuda.is_available() is False)"
        )
    found = torch.cuda.device_count()
    if found < gpus_needed:
        return f"needs {gpus_needed} CUDA GPUs, found {found}"
    return None


class MarkGroup(list):
    """Several pytest marks used as one.

    Works as a decorator on a test function or class, as ``pytestmark = group`` and as
    ``pytest.param(..., marks=group)``, because pytest accepts a list of marks in those places.
    To combine with other marks, unpack it: ``pytestmark = [*requires_gpu, pytest.mark.slow]``.
    """

    def __call__(self, test):
        for mark in self:
            test = mark(test)
        return test


def _skip_without_gpus(gpus_needed: int) -> pytest.MarkDecorator:
    reason = gpu_skip_reason(gpus_needed)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# `-m "not gpu"` deselects both: a multi-GPU test is also a GPU test.
requires_gpu = MarkGroup([pytest.mark.gpu, _skip_without_gpus(1)])
requires_multi_gpu = MarkGroup([pytest.mark.gpu, pytest.mark.multi_gpu, _skip_without_gpus(2)])


def requires_module(module_name: str) -> pytest.MarkDecorator:
    """Skip the test unless ``module_name`` is installed; the reason says what to install."""
    return pytest.mark.skipif(
        not module_available(module_name),
        reason=f"needs {module_name}: install it with {install_hint(module_name)}",
    )
