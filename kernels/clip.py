"""Gradient clipping: norm reducers, the scaling and clamping elements, torch's coefficient.

References:
  torch.nn.utils.clip_grad_norm_ / clip_grad_value_ (torch 2.13): the total norm is the
  p-norm of all gradients seen as one vector; the gradients are multiplied by
  ``min(max_norm / (total_norm + 1e-6), 1)``; value clipping clamps to
  ``[-clip_value, clip_value]`` (clamp_min, then clamp_max).

Reducers follow the driver's reducer signature ``fn(p, g, s0, s1, s2, h) -> (a, b)`` and
read only ``g`` (the table's gradient column), so an optimizer can reduce over the same
chunk table it steps with. They widen ``g`` to float64 (``g * h.one``; note that numba's
``float(g)`` keeps a float32 a float32) and accumulate in float64 whatever the storage
dtype: deliberately, as this is a sum over millions of terms, not per-element math.
Elements follow the step signature and write the table's ``params`` column, so clipping
runs them with the gradients in both the params and the grads position (an elementwise
read-then-write of one address is safe).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# torch's guard against a zero norm in max_norm / (total_norm + eps).
CLIP_EPS = 1e-6


class NormScalars(NamedTuple):
    p: float        # the norm's order (float64), used by the general p-norm reducer only
    # float64 1: ``g * one`` widens a float32 g (numba's float(g) does not; a NumPy
    # float64, not a Python float, so the CUDA simulator's Python arithmetic widens too).
    one: float = np.float64(1.0)


class ScaleScalars(NamedTuple):
    factor: float   # in the storage dtype


class ClampScalars(NamedTuple):
    low: float      # -clip_value, in the storage dtype
    high: float     # clip_value, in the storage dtype


# -- reducers: (a, b) partials, summed (or maxed) per chunk by the driver --------------------
def sumsq_reducer(p, g, s0, s1, s2, h):
    """(g^2, 0) in float64: the 2-norm's sum of squares."""
    x = g * h.one
    return x * x, 0.0


def abssum_reducer(p, g, s0, s1, s2, h):
    """(|g|, 0) in float64: the 1-norm."""
    return abs(g * h.one), 0.0


def pow_reducer(p, g, s0, s1, s2, h):
    """(|g|^p, 0) in float64: any other p-norm."""
    return math.pow(abs(g * h.one), h.p), 0.0


def nonzero_reducer(p, g, s0, s1, s2, h):
    """(g != 0, 0): the "0-norm" (number of non-zeros), as torch.linalg.vector_norm(ord=0)."""
    return (1.0 if g != 0 else 0.0), 0.0


def maxabs_reducer(p, g, s0, s1, s2, h):
    """(|g|, isnan(g)) for a max reduction: the inf-norm, with NaN tracked apart
    (a running max of floats does not propagate NaN reliably)."""
    x = abs(g * h.one)
    return x, (1.0 if x != x else 0.0)


def nonfinite_reducer(p, g, s0, s1, s2, h):
    """(count of non-finite g, 0): the mixed-precision overflow check."""
    x = g * h.one
    return (1.0 if x - x != 0.0 else 0.0), 0.0     # inf - inf and NaN - NaN are NaN


# -- elements: write the params column -------------------------------------------------------
def scale_element(p, g, s0, s1, s2, h):
    """p * factor (the clip coefficient, or an unscale factor)."""
    return p * h.factor, s0, s1, s2


def clamp_element(p, g, s0, s1, s2, h):
    """clamp(p, low, high) as torch's clamp_min_ then clamp_max_ (NaN stays NaN)."""
    if p < h.low:
        p = h.low
    if p > h.high:
        p = h.high
    return p, s0, s1, s2


# -- host side ---------------------------------------------------------------------------------
def norm_plan(norm_type: float):
    """``(reducer, maximum, scalars)`` for the norm of order ``norm_type``, or None for
    -inf (a minimum, which the max-only driver does not express; callers use NumPy)."""
    if norm_type == 2.0:
        return sumsq_reducer, False, NormScalars(2.0)
    if norm_type == 1.0:
        return abssum_reducer, False, NormScalars(1.0)
    if norm_type == math.inf:
        return maxabs_reducer, True, NormScalars(norm_type)
    if norm_type == 0.0:
        return nonzero_reducer, False, NormScalars(0.0)
    if norm_type == -math.inf:
        return None
    return pow_reducer, False, NormScalars(float(norm_type))


def finish_norm(partials: np.ndarray, norm_type: float) -> float:
    """The total norm from per-chunk partials ``(n_chunks, 2)`` of :func:`norm_plan`'s
    reducer, combined in a fixed order (the same bits for any thread count)."""
    if norm_type == math.inf:
        if partials.shape[0] == 0:
            return 0.0
        if partials[:, 1].max() > 0:
            return math.nan
        return float(partials[:, 0].max())
    total = float(np.sum(partials[:, 0])) if partials.shape[0] else 0.0
    if norm_type == 2.0:
        return math.sqrt(total)
    if norm_type in (1.0, 0.0):
        return total
    return _root(total, norm_type)


def _root(total: float, norm_type: float) -> float:
    """total ** (1 / p), with IEEE semantics for the inf / 0 cases (Python's ``**`` raises)."""
    with np.errstate(all="ignore"):
        return float(np.power(np.float64(total), 1.0 / norm_type))


def clip_coefficient(total_norm: float, max_norm: float, cast):
    """torch's ``clamp(max_norm / (total_norm + 1e-6), max=1)`` in the gradients' dtype.

    torch holds the total norm as a tensor of the gradients' dtype and evaluates
    ``max_norm / t`` as ``t.reciprocal() * max_norm``; each operation below rounds to
    ``cast`` in the same order, so the coefficient has torch's bits for the same norm.
    """
    with np.errstate(all="ignore"):
        t = cast(total_norm)
        denom = cast(t + cast(CLIP_EPS))
        coef = cast(cast(1.0) / denom) * cast(max_norm)
        coef = cast(coef)
        # clamp(max=1): NaN stays NaN, as torch.clamp.
        return coef if not coef > 1 else cast(1.0)
