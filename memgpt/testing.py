"""Test helpers: one tolerance table, the 2x rule for low precision, canonical memory states.

Use them in your own tests as memgpt's tests do::

    from memgpt.testing import assert_close_dtype, assert_close_to_ref, canonical_memory

    assert_close_dtype(fast, ref)                                 # same dtype, table tolerance
    assert_close_to_ref(fast_bf16, ref_lowp=ref_bf16, ref_exact=ref_fp64)   # the 2x rule

The tolerances are set from first principles, never after a test went red:

- float64/float32: the ops sum O(m + n) products and go through ``exp``/``log``; two correct
  implementations that only differ in summation order agree to a few hundred units of
  roundoff on unit-scale data, so ``rtol = atol = 2**8 * eps``.
- bfloat16/float16: both sides compute in float32 or wider and round the result once, so they
  may differ by one unit in the last place: ``rtol = atol = 2 * eps``. Comparisons of a fast
  low-precision result against a float64 oracle use :func:`assert_close_to_ref` instead.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor

__all__ = ["TOLERANCES", "Tolerance", "tolerance", "assert_close_dtype", "assert_close_to_ref", "canonical_memory"]


class Tolerance(TypedDict):
    """The keyword arguments of ``torch.testing.assert_close`` that set its tolerance."""

    rtol: float
    atol: float


def _eps_times(dtype: torch.dtype, factor: float) -> Tolerance:
    eps = torch.finfo(dtype).eps
    return Tolerance(rtol=factor * eps, atol=factor * eps)


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: _eps_times(torch.float64, 2**8),  # ~5.7e-14
    torch.float32: _eps_times(torch.float32, 2**8),  # ~3.1e-5
    torch.bfloat16: _eps_times(torch.bfloat16, 2),  # ~1.6e-2
    torch.float16: _eps_times(torch.float16, 2),  # ~2.0e-3
}
"""The one tolerance table: ``rtol``/``atol`` per floating dtype (the module docstring says why)."""


def tolerance(dtype: torch.dtype) -> Tolerance:
    """``dict(rtol=..., atol=...)`` for ``dtype``; exact (zeros) for integer and bool dtypes."""
    if not dtype.is_floating_point:
        return Tolerance(rtol=0.0, atol=0.0)
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {sorted(map(str, TOLERANCES))}")
    return TOLERANCES[dtype].copy()


def assert_close_dtype(actual: Tensor, expected: Tensor, *, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``actual.dtype``.

    Dtypes and devices must match exactly; integer and bool tensors must be equal.
    """
    torch.testing.assert_close(actual, expected, **tolerance(actual.dtype), msg=msg)


def assert_close_to_ref(
    fast: Tensor,
    ref_lowp: Tensor,
    ref_exact: Tensor,
    *,
    name: str = "result",
    dtype: torch.dtype | None = None,
) -> None:
    """The flash-attention rule for low precision.

    ``fast`` (a fast op in a low dtype) must be as close to ``ref_exact`` (a float64 oracle fed
    the same, upcast inputs) as twice the error of ``ref_lowp`` (the plain reference run in the
    same low dtype), plus a floor of one unit in the last place of the largest exact value,
    which covers a float32 intermediate that rounds to the other neighbour. Errors are the
    largest absolute differences over the whole tensor.

    ``dtype`` is the precision the op ran in (default ``fast.dtype``) and sets the floor: the
    float32 gradient of a gate (memory metadata are float32) in a bfloat16 op is judged at
    bfloat16's unit in the last place.
    """
    if fast.shape != ref_lowp.shape or fast.shape != ref_exact.shape:
        raise AssertionError(
            f"{name}: shapes differ: fast {tuple(fast.shape)}, ref_lowp {tuple(ref_lowp.shape)}, "
            f"ref_exact {tuple(ref_exact.shape)}"
        )
    if fast.dtype != ref_lowp.dtype:
        raise AssertionError(f"{name}: dtypes differ: fast {fast.dtype}, ref_lowp {ref_lowp.dtype}")
    exact = ref_exact.detach().to(device=fast.device, dtype=torch.float64)
    if not torch.isfinite(fast).all():
        raise AssertionError(f"{name}: fast result has non-finite values")
    fast_err = (fast.detach().double() - exact).abs().max().item() if fast.numel() else 0.0
    ref_err = (ref_lowp.detach().double() - exact).abs().max().item() if fast.numel() else 0.0
    floor = torch.finfo(dtype or fast.dtype).eps * (exact.abs().max().item() if fast.numel() else 0.0)
    if not fast_err <= 2 * ref_err + floor:
        raise AssertionError(
            f"{name}: fast {fast.dtype} error {fast_err:.3e} exceeds 2 x reference error {ref_err:.3e} "
            f"+ floor {floor:.3e} (largest |exact| {exact.abs().max().item():.3e})"
        )


def canonical_memory(state) -> dict[str, Tensor]:
    """The fields of a ``MemoryState`` with slots sorted by (valid first, then write step ascending).

    Two states that hold the same set of (key, value, metadata) slots per sample and head
    canonicalise to the same tensors, whatever slot each pair sits in (the ``strength`` and
    ``usage`` policies may place pairs differently from the reference). Steps are unique among
    the valid slots of a sample and head, so the order is total there; empty slots keep their
    relative order. Differentiable in keys, values and strength. ``count`` is returned as is.
    """
    last = torch.iinfo(state.step.dtype).max
    order = torch.where(state.valid, state.step, torch.full_like(state.step, last)).argsort(dim=-1, stable=True)

    def by_slot(t: Tensor) -> Tensor:
        index = order if t.dim() == 3 else order[..., None].expand_as(t)
        return t.gather(2, index)

    out = {name: by_slot(getattr(state, name)) for name in ("keys", "values", "valid", "strength", "step", "usage")}
    out["count"] = state.count
    return out
