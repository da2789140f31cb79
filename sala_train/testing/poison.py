"""Fill freshly allocated tensors with NaN so that an op which leaves part of its output unwritten fails.

``torch.empty`` hands back whatever memory was lying around, often zeros or stale correct values, so a
kernel that skips the last partial block can pass its tests by luck. While ``poison_empty()`` is active,
``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and ``Tensor.new_empty`` return tensors
filled with a poison value:
  - floating point and complex dtypes: NaN (``assert_close`` reports NaN that the reference lacks);
  - integer dtypes: the dtype's maximum, an out-of-range index (not -1, which index tensors often use
    as legitimate padding);
  - bool: True.

What it does not reach: C++/ATen ops that allocate their outputs internally (``torch.matmul``,
``x + y``, ...) and names bound before the patch (``from torch import empty``). That is fine for what it
is for: Triton kernel wrappers allocate their outputs in Python through ``torch.empty(...)``,
``torch.empty_like(x)`` or ``x.new_empty(...)``, looked up on the ``torch`` module at call time.

The patch is process-global (not thread-safe); contexts nest, and the originals are restored on exit,
also when the body raises.
"""

import functools
from contextlib import contextmanager

import torch

_PATCHED_TORCH_FUNCTIONS = ("empty", "empty_like", "empty_strided")
_active_depth = 0


def poison_is_active() -> bool:
    return _active_depth > 0


def _fill_with_poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout != torch.strided:
        return tensor
    dtype = tensor.dtype
    if dtype.is_floating_point or dtype.is_complex:
        poison = float("nan")
    elif dtype == torch.bool:
        poison = True
    else:
        try:
            poison = torch.iinfo(dtype).max
        except TypeError:  # quantized and other exotic dtypes: leave as allocated
            return tensor
    with torch.no_grad():  # empty(..., requires_grad=True) gives a leaf; filling it is not part of the graph
        tensor.fill_(poison)
    return tensor


def _poisoned(allocate):
    @functools.wraps(allocate)
    def allocate_poisoned(*args, **kwargs):
        return _fill_with_poison(allocate(*args, **kwargs))

    return allocate_poisoned


@contextmanager
def poison_empty():
    """While active, uninitialised allocations from Python come back filled with NaN (see module doc)."""
    global _active_depth
    original_functions = {name: getattr(torch, name) for name in _PATCHED_TORCH_FUNCTIONS}
    # new_empty is defined on torch._C.TensorBase; remember whether torch.Tensor had its own (an outer
    # poison_empty) so that exiting leaves the class exactly as it was.
    tensor_had_own_new_empty = "new_empty" in vars(torch.Tensor)
    original_new_empty = torch.Tensor.new_empty
    _active_depth += 1
    try:
        for name, function in original_functions.items():
            setattr(torch, name, _poisoned(function))
        torch.Tensor.new_empty = _poisoned(original_new_empty)
        yield
    finally:
        _active_depth -= 1
        for name, function in original_functions.items():
            setattr(torch, name, function)
        if tensor_had_own_new_empty:
            torch.Tensor.new_empty = original_new_empty
        elif "new_empty" in vars(torch.Tensor):
            del torch.Tensor.new_empty
