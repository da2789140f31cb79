"""Configuration shared by all tests: GPU auto-skip, the ``poisoned`` fixture, Triton's interpreter on CPU.

The markers ``gpu``, ``multi_gpu`` and ``slow`` are declared in setup.cfg; the decorators that use them
(``requires_gpu``, ``requires_multi_gpu``, ``requires_module``) live in ``sala_train.testing``. Because
of the skip below, both ``pytest`` and ``pytest -m "not gpu"`` run cleanly on a CPU-only machine.
"""

import os

import pytest
import torch

from sala_train.testing import gpu_skip_reason, poison_empty

# tests/test_testing.py runs pytest on small generated test files to check the skipping below.
pytest_plugins = ["pytester"]

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so kernel tests exercise the
# kernel code instead of falling back to the PyTorch reference. Set here, before any test module imports
# sala_train.kernels (which reads it at import time); an explicit TRITON_INTERPRET=0 is respected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Checked in this order: a test marked with both gets the more specific reason.
_GPUS_NEEDED_BY_MARKER = {"multi_gpu": 2, "gpu": 1}


def pytest_collection_modifyitems(config, items):
    skip_reasons = {marker: gpu_skip_reason(needed) for marker, needed in _GPUS_NEEDED_BY_MARKER.items()}
    for item in items:
        for marker, reason in skip_reasons.items():
            if reason is not None and item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=f"marked {marker}: {reason}"))
                break


@pytest.fixture
def poisoned():
    """Fill torch.empty / empty_like / empty_strided / Tensor.new_empty results with NaN for this test,
    so an op that leaves part of its output unwritten fails its comparison (see sala_train.testing.poison)."""
    with poison_empty():
        yield
