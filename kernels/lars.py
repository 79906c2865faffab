"""LARS: SGD with momentum whose step is scaled per tensor by a trust ratio.

References:
  You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks",
  arXiv:1708.03888 (2017).
  Equations as optax.lars (``chain(add_decayed_weights(wd), scale_by_trust_ratio(
  trust_coefficient, eps), scale(-lr), trace(momentum, nesterov))``):
  ``u = g + wd p``, ``ratio = tc ||p|| / (||u|| + eps)`` per tensor (1 where either
  norm is 0), ``s = -lr * ratio * u``, ``t = s + momentum t``,
  ``p += (s + momentum t) if nesterov else t``. The state ``trace`` is optax's trace:
  it already holds the learning rate and the sign of the step.

Two passes (:mod:`fastopt.kernels.per_tensor`): :func:`lars_norms` reduces ``||p||^2``
and ``||u||^2`` per tensor (reads p and g only), then :func:`lars_element` applies the
ratio, which the per-tensor driver passes in the third state position.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

SLOTS = ("trace", None, None)


class LarsScalars(NamedTuple):
    neg_lr: float
    momentum: float
    weight_decay: float
    grad_scale: float          # the step's gradient multiplier (norm pass only)
    wide: float                # 1.0 in float64: squares are taken in float64
    decay: bool
    nesterov: bool


def lars_norms(p, g, t, unused, unused2, h):
    """(p^2, u^2) of one element in float64 (exact squares of float32 values: no
    overflow or underflow), u = g + wd p as the step computes it."""
    u = g * h.grad_scale
    if h.decay:
        u = u + h.weight_decay * p
    x = p * h.wide
    y = u * h.wide
    return x * x, y * y


def lars_element(p, g, t, unused, ratio, h):
    """One LARS update of one element; ``ratio`` is its tensor's trust ratio (read-only).

    Returns (p, trace, -, ratio).
    """
    u = g
    if h.decay:
        u = u + h.weight_decay * p
    s = h.neg_lr * (u * ratio)
    t = s + h.momentum * t
    if h.nesterov:
        p = p + (s + h.momentum * t)
    else:
        p = p + t
    return p, t, unused, ratio


def lars_scalars(lr, momentum, weight_decay, nesterov, cast):
    return LarsScalars(
        neg_lr=cast(-lr),
        momentum=cast(momentum),
        weight_decay=cast(weight_decay),
        grad_scale=cast(1.0),
        wide=np.float64(1.0),
        decay=bool(weight_decay != 0),
        nesterov=bool(nesterov),
    )
