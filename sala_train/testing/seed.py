"""One call that makes a test's random draws repeatable."""

import random

import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator (when NumPy is installed) and torch (CPU and all
    CUDA devices)."""
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
