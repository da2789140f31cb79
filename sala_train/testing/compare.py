"""Relative-error comparison of a tensor against a reference, in the style of flash-linear-attention.

Kernel outputs in bf16/fp16 differ from an fp32 reference by rounding everywhere, so an elementwise
``rtol`` either fails on a few unlucky elements or has to be so loose it hides real bugs. The error
ratio RMS(actual - expected) / RMS(expected) measures the error of the whole tensor relative to its
size: about 4e-3 for a bf16 rounding of the reference, 1e-7 for fp32 rounding, and of order 1 for a
wrong result.
"""

import torch

from sala_train.testing.poison import poison_is_active

# Keeps the ratio finite when `expected` is all zeros. Such tensors have no scale to be relative to:
# compare them with `atol`.
_TINY = 1e-12


def _as_float64_pair(actual, expected) -> tuple[torch.Tensor, torch.Tensor]:
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.is_complex() or expected.is_complex():
        raise TypeError("assert_close compares real tensors; compare .real and .imag separately")
    actual64 = actual.detach().to(torch.float64)
    expected64 = expected.detach().to(device=actual64.device, dtype=torch.float64)
    return actual64, expected64


def _rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item() if x.numel() > 0 else 0.0


def error_ratio(actual, expected) -> float:
    """RMS(actual - expected) / (RMS(expected) + 1e-12), computed in float64.

    NaN or Inf anywhere makes the result NaN; ``assert_close`` reports those separately.
    """
    actual64, expected64 = _as_float64_pair(actual, expected)
    if actual64.shape != expected64.shape:
        raise ValueError(
            f"shape mismatch: actual {tuple(actual64.shape)} vs expected {tuple(expected64.shape)}"
        )
    return _rms(actual64 - expected64) / (_rms(expected64) + _TINY)


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat_index, position = divmod(flat_index, size)
        index.append(position)
    return tuple(reversed(index))


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return _unravel(int(mask.reshape(-1).nonzero()[0].item()), mask.shape)


def _values_at(actual64: torch.Tensor, expected64: torch.Tensor, index: tuple[int, ...]) -> str:
    return f"actual={actual64[index].item():.6g}, expected={expected64[index].item():.6g}"


def assert_close(actual, expected, *, ratio: float, name: str = "tensor", atol: float = 0.0) -> None:
    """Fail unless ``actual`` matches ``expected`` within an error ratio (see ``error_ratio``).

    Raises AssertionError when
      - the shapes differ (no broadcasting);
      - ``actual`` has NaN/Inf where ``expected`` does not have the same value, or ``expected`` has
        NaN/Inf where ``actual`` is finite (matching NaN/Inf positions are allowed);
      - the error ratio over the finite elements exceeds ``ratio`` and the largest absolute
        difference also exceeds ``atol`` (``atol`` rescues tensors that are near zero everywhere).
    Dtypes may differ (e.g. a bf16 kernel against an fp32 reference); everything is compared in float64
    on ``actual``'s device. ``name`` appears in the message, e.g. ``"dq"`` or ``"final_state"``.
    """
    actual64, expected64 = _as_float64_pair(actual, expected)
    actual_dtype = getattr(actual, "dtype", actual64.dtype)
    expected_dtype = getattr(expected, "dtype", expected64.dtype)
    described = f"shape {tuple(actual64.shape)}, dtypes actual {actual_dtype} / expected {expected_dtype}"
    if actual64.shape != expected64.shape:
        raise AssertionError(
            f"{name}: shape mismatch, actual {tuple(actual64.shape)} vs expected {tuple(expected64.shape)} "
            f"(dtypes actual {actual_dtype} / expected {expected_dtype})"
        )
    if actual64.numel() == 0:
        return

    actual_finite = torch.isfinite(actual64)
    expected_finite = torch.isfinite(expected64)
    same_nonfinite = (
        ~actual_finite
        & ~expected_finite
        & ((actual64 == expected64) | (actual64.isnan() & expected64.isnan()))
    )
    unexpected_nonfinite = ~actual_finite & ~same_nonfinite
    if unexpected_nonfinite.any():
        nan_count = int((unexpected_nonfinite & actual64.isnan()).sum())
        inf_count = int(unexpected_nonfinite.sum()) - nan_count
        index = _first_index(unexpected_nonfinite)
        hint = ""
        if nan_count and poison_is_active():
            hint = "\n  poison_empty() is active: NaN here usually marks output the op never wrote"
        raise AssertionError(
            f"{name}: {nan_count} NaN and {inf_count} Inf value(s) in actual where expected has none "
            f"(first at index {index}: {_values_at(actual64, expected64, index)}); {described}{hint}"
        )
    missing_nonfinite = ~expected_finite & actual_finite
    if missing_nonfinite.any():
        index = _first_index(missing_nonfinite)
        raise AssertionError(
            f"{name}: {int(missing_nonfinite.sum())} position(s) where expected is NaN/Inf but actual is "
            f"finite (first at index {index}: {_values_at(actual64, expected64, index)}); {described}"
        )

    both_finite = actual_finite & expected_finite
    observed_ratio = error_ratio(actual64[both_finite], expected64[both_finite])
    abs_diff = torch.where(both_finite, (actual64 - expected64).abs(), 0.0)
    max_diff = abs_diff.max().item()
    if observed_ratio > ratio and max_diff > atol:
        index = _unravel(int(abs_diff.reshape(-1).argmax().item()), abs_diff.shape)
        raise AssertionError(
            f"{name}: error ratio {observed_ratio:.3e} > allowed {ratio:.1e} "
            f"(RMS(actual - expected) / RMS(expected)), and max abs diff {max_diff:.3e} > atol {atol:.1e}\n"
            f"  largest difference at index {index}: {_values_at(actual64, expected64, index)}\n"
            f"  {described}"
        )
