"""RMSprop, plain or centered, with momentum, weight decay and maximize.

References:
  Hinton, Lecture 6.5 of "Neural Networks for Machine Learning" (2012); the centered
  form from Graves, "Generating Sequences With Recurrent Neural Networks" (2013).
  Equations as torch.optim.RMSprop (torch 2.13).
"""
from __future__ import annotations

import math
from typing import NamedTuple



class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    momentum: float
    weight_decay: float
    l2: bool
    has_momentum: bool
    centered: bool
    maximize: bool


def rmsprop_element(p, g, square_avg, buf, grad_avg, h):
    """One RMSprop update of one element; returns (p, square_avg, momentum_buffer, grad_avg)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    square_avg = h.alpha * square_avg + (h.one_minus_alpha * g) * g
    if h.centered:
        grad_avg = grad_avg + h.one_minus_alpha * (g - grad_avg)   # lerp
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + h.eps
    else:
        avg = math.sqrt(square_avg) + h.eps
    if h.has_momentum:
        buf = h.momentum * buf + g / avg
        p = p - h.lr * buf
    else:
        p = p - h.lr * (g / avg)
    return p, square_avg, buf, grad_avg


def rmsprop_scalars(group, step, cast):
    """Host scalars of param group ``group`` (the same at every step)."""
    alpha, momentum, weight_decay = group["alpha"], group["momentum"], group["weight_decay"]
    return RMSpropScalars(
        lr=cast(group["lr"]),
        alpha=cast(alpha),
        one_minus_alpha=cast(1.0 - alpha),
        eps=cast(group["eps"]),
        momentum=cast(momentum),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        has_momentum=bool(momentum > 0),
        centered=bool(group["centered"]),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="RMSprop", functional="rmsprop", element=rmsprop_element, scalars=rmsprop_scalars,
    hypers=(_s.lr(1e-2), _s.hyper("alpha", 0.99, _s.real(low=0.0, high=1.0)), _s.eps(1e-8),
            _s.weight_decay(), _s.hyper("momentum", 0.0, _s.real(low=0.0)),
            _s.hyper("centered", False, _s.flag()), _s.maximize()),
    columns=(_s.Column("square_avg", unsigned=True),
             _s.Column("momentum_buffer", when=lambda g: g["momentum"] > 0),
             _s.Column("grad_avg", when=lambda g: g["centered"])),
    reference=_reference.rmsprop, oracle="torch.optim.RMSprop",
    doc="""RMSprop, optionally centered, with momentum.

    References:
      Hinton, Coursera lecture 6.5 (2012); Graves, arXiv:1308.0850; torch.optim.RMSprop.
    State: ``square_avg``, ``step``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """,
    examples=_s.Examples(base=dict(lr=1e-3), grid=(
        {},
        dict(centered=True),
        dict(momentum=0.5),
        dict(alpha=0.9, eps=1e-6, weight_decay=0.01),
        dict(centered=True, momentum=0.5, weight_decay=0.01, maximize=True),
    ), full=dict(centered=True, momentum=0.5, weight_decay=0.01, maximize=True)),
    bench=(_s.BenchRow("rmsprop", dict(lr=1e-2), variants=(
               dict(momentum=0.9), dict(centered=True), dict(momentum=0.9, centered=True))),
           _s.BenchRow("rmsprop-centered", dict(lr=1e-2, momentum=0.9, centered=True))),
)
