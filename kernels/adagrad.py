"""Adagrad with learning-rate decay, initial accumulator, weight decay and maximize.

References:
  Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
  Stochastic Optimization", JMLR 2011. Equations as torch.optim.Adagrad (torch 2.13):
  ``clr = lr / (1 + (t - 1) * lr_decay)``, ``sum += g^2``, ``p -= clr * g / (sqrt(sum) + eps)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple



class AdagradScalars(NamedTuple):
    clr: float
    eps: float
    weight_decay: float
    l2: bool
    maximize: bool


def adagrad_element(p, g, acc, unused1, unused2, h):
    """One Adagrad update of one element; returns (p, sum, -, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    acc = acc + g * g
    p = p - h.clr * (g / (math.sqrt(acc) + h.eps))
    return p, acc, unused1, unused2


def adagrad_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based)."""
    weight_decay = group["weight_decay"]
    return AdagradScalars(
        clr=cast(group["lr"] / (1.0 + (step - 1) * group["lr_decay"])),
        eps=cast(group["eps"]),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="Adagrad", functional="adagrad", element=adagrad_element, scalars=adagrad_scalars,
    hypers=(_s.lr(1e-2), _s.hyper("lr_decay", 0.0, _s.real(low=0.0)), _s.weight_decay(),
            _s.hyper("initial_accumulator_value", 0.0, _s.real(low=0.0), functional=False),
            _s.eps(1e-10), _s.maximize()),
    columns=(_s.Column("sum", initial="initial_accumulator_value", argument="state_sums",
                       unsigned=True),),
    reference=_reference.adagrad, sparse=_s.Sparse(check=_s.no_weight_decay),
    oracle="torch.optim.Adagrad",
    doc="""Adagrad with learning-rate decay.

    References:
      Duchi et al., JMLR 2011; torch.optim.Adagrad.
    State: ``sum``, ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.05), grid=(
        {},
        dict(lr_decay=0.01),
        dict(initial_accumulator_value=0.1, weight_decay=0.01),
        dict(lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01, eps=1e-6,
             maximize=True),
    ), full=dict(lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01, eps=1e-6,
                 maximize=True)),
    bench=(_s.BenchRow("adagrad", dict(lr=1e-2)),),
)
