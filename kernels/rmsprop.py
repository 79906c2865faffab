"""RMSprop, plain or centered, with momentum, weight decay and maximize.

References:
  Hinton, Lecture 6.5 of "Neural Networks for Machine Learning" (2012); the centered
  form from Graves, "Generating Sequences With Recurrent Neural Networks" (2013).
  Equations as torch.optim.RMSprop (torch 2.13).
"""
from __future__ import annotations

import math
from typing import NamedTuple

SLOTS = ("square_avg", "momentum_buffer", "grad_avg")


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


def rmsprop_scalars(lr, alpha, eps, weight_decay, momentum, centered, maximize, cast):
    return RMSpropScalars(
        lr=cast(lr),
        alpha=cast(alpha),
        one_minus_alpha=cast(1.0 - alpha),
        eps=cast(eps),
        momentum=cast(momentum),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        has_momentum=bool(momentum > 0),
        centered=bool(centered),
        maximize=bool(maximize),
    )
