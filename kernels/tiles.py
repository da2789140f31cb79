"""Host-side tables of the kernels (query tiles, key blocks, time blocks), built with numpy in O(number of
sequences) Python steps.

A long prefill has hundreds of thousands of query tiles; a Python loop per tile costs seconds per call at
1M tokens, so the tables are computed with array arithmetic instead.
"""

from __future__ import annotations

import numpy as np


def tiles(seq_bounds: list[int], step: int, q_start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive spans of ``step`` tokens of every sequence (the last one may be shorter), leaving out
    the spans that lie wholly before position ``q_start`` of their sequence.

    Returns (start, length, sequence index), int64 arrays in sequence order, equal to the loop
    ``for t in range(s, e, step): if t + step > s + q_start: yield t, min(step, e - t), n``.
    """
    bounds = np.asarray(seq_bounds, dtype=np.int64)
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    first = q_start // step  # the first span j with (j + 1) * step > q_start
    count = np.maximum(-(-lengths // step) - first, 0)
    total = int(count.sum())
    seq = np.repeat(np.arange(len(starts)), count)
    offsets = np.cumsum(count) - count
    j = first + np.arange(total) - np.repeat(offsets, count)
    start = starts[seq] + j * step
    length = np.minimum(step, starts[seq] + lengths[seq] - start)
    return start, length, seq


def covered_tokens(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The token indices of the spans, concatenated in span order."""
    total = int(length.sum())
    offsets = np.cumsum(length) - length
    return np.repeat(start - offsets, length) + np.arange(total)
