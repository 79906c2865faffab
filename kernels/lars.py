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
ratio, which the per-tensor driver passes in the third state position. With int8 state
the reduction leaves the trace's codes undecoded (it does not read them) and the step
decodes the trace, updates it and stores it re-encoded, as any int8 step.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np



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


def lars_scalars(group, step, cast):
    """Host scalars of ``group`` (LARS has no step-dependent scalars), cast."""
    return LarsScalars(
        neg_lr=cast(-group["lr"]),
        momentum=cast(group["momentum"]),
        weight_decay=cast(group["weight_decay"]),
        grad_scale=cast(1.0),
        wide=np.float64(1.0),
        decay=bool(group["weight_decay"] != 0),
        nesterov=bool(group["nesterov"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


def _ratios(group, sums):
    from .lamb import trust_ratios
    return trust_ratios(sums[:, 0], sums[:, 1], group["trust_coefficient"], group["eps"])


SPEC = _s.Spec(
    name="LARS", functional="lars", element=lars_element, scalars=lars_scalars,
    hypers=(_s.lr(1.0), _s.hyper("momentum", 0.9, _s.real(low=0.0)), _s.weight_decay(),
            _s.hyper("trust_coefficient", 1e-3, _s.real(low=0.0)), _s.eps(0.0),
            _s.hyper("nesterov", False, _s.flag())),
    columns=(_s.Column("trace"),), step_state=False,
    per_tensor=_s.PerTensor(reducer=lars_norms, values=_ratios),
    reference=_reference.lars, oracle="optax.lars",
    doc="""LARS: momentum SGD whose step is scaled per tensor by tc ||p|| / (||g + wd p|| + eps).

    References:
      You, Gitman & Ginsburg, arXiv:1708.03888 (2017); optax.lars.
    Names: ``lr`` is optax's ``learning_rate`` (no default in optax; 1.0 here, as with a
    trust coefficient of 1e-3 the effective step is ``1e-3 lr ||p|| / ||u||``);
    ``momentum = 0.9``, ``nesterov = False``, ``trust_coefficient = 1e-3``, ``eps = 0``,
    ``weight_decay = 0`` as optax. Optax's masks are param groups here: give biases and
    norms their own group with ``weight_decay=0``.
    State: ``trace`` (optax's trace, which holds ``-lr`` times the scaled update).
    """,
    examples=_s.Examples(base=dict(lr=1.0), grid=(
        {}, dict(momentum=0.5, weight_decay=0.1, trust_coefficient=1e-2, eps=1e-8, nesterov=True),
    ), full=dict(momentum=0.5, weight_decay=0.1, trust_coefficient=1e-2, eps=1e-8, nesterov=True)),
    bench=(_s.BenchRow("lars", dict(lr=1e-1), passes=("reduce: p g ->", "p g s0 -> p s0")),),
)
