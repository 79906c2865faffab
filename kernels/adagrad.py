"""Adagrad with learning-rate decay, initial accumulator, weight decay and maximize.

References:
  Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
  Stochastic Optimization", JMLR 2011. Equations as torch.optim.Adagrad (torch 2.13):
  ``clr = lr / (1 + (t - 1) * lr_decay)``, ``sum += g^2``, ``p -= clr * g / (sqrt(sum) + eps)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

SLOTS = ("sum", None, None)


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


def adagrad_scalars(step, lr, lr_decay, eps, weight_decay, maximize, cast):
    return AdagradScalars(
        clr=cast(lr / (1.0 + (step - 1) * lr_decay)),
        eps=cast(eps),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        maximize=bool(maximize),
    )
