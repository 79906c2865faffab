"""Adadelta: per-element step sizes from running averages of squared gradients and steps.

References:
  Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701 (2012).
  Equations and their order as torch.optim.Adadelta (torch 2.13, single-tensor path):
  ``s = rho s + (1 - rho) g^2``, ``delta = sqrt(a + eps) / sqrt(s + eps) * g``,
  ``a = rho a + (1 - rho) delta^2``, ``p -= lr * delta``.
"""
from __future__ import annotations

import math
from typing import NamedTuple



class AdadeltaScalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    eps: float
    weight_decay: float
    l2: bool
    maximize: bool


def adadelta_element(p, g, square_avg, acc_delta, unused, h):
    """One Adadelta update of one element; returns (p, square_avg, acc_delta, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    square_avg = square_avg * h.rho + (h.one_minus_rho * g) * g
    # torch: sqrt(a + eps) / sqrt(s + eps) * g. One square root of the quotient is the same
    # number up to rounding and saves a square root per element (GPU-bound otherwise).
    delta = math.sqrt((acc_delta + h.eps) / (square_avg + h.eps)) * g
    acc_delta = acc_delta * h.rho + h.one_minus_rho * (delta * delta)
    p = p - h.lr * delta
    return p, square_avg, acc_delta, unused


def adadelta_scalars(group, step, cast):
    """Host scalars of param group ``group`` (the same at every step)."""
    rho, weight_decay = group["rho"], group["weight_decay"]
    return AdadeltaScalars(
        lr=cast(group["lr"]),
        rho=cast(rho),
        one_minus_rho=cast(1.0 - rho),
        eps=cast(group["eps"]),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="Adadelta", functional="adadelta", element=adadelta_element, scalars=adadelta_scalars,
    hypers=(_s.lr(1.0), _s.hyper("rho", 0.9, _s.real(low=0.0, high=1.0)), _s.eps(1e-6),
            _s.weight_decay(), _s.maximize()),
    columns=(_s.Column("square_avg", unsigned=True), _s.Column("acc_delta", unsigned=True)),
    reference=_reference.adadelta, oracle="torch.optim.Adadelta",
    doc="""Adadelta.

    References:
      Zeiler, arXiv:1212.5701 (2012); torch.optim.Adadelta.
    State: ``square_avg``, ``acc_delta``, ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.5), grid=(
        {},
        dict(rho=0.5, eps=1e-4, weight_decay=0.1, maximize=True),
    ), full=dict(rho=0.5, eps=1e-4, weight_decay=0.1, maximize=True)),
    bench=(_s.BenchRow("adadelta", dict(lr=1.0)),),
)
