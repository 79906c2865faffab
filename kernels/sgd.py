"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize.

References:
  Sutskever et al., "On the importance of initialization and momentum in deep
  learning", ICML 2013. Equations as torch.optim.SGD (torch 2.13): the momentum buffer
  is the gradient itself on its first step, then ``mu * b + (1 - dampening) * g``.
"""
from __future__ import annotations

from typing import NamedTuple

SLOTS = ("momentum_buffer", None, None)


class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    one_minus_dampening: float
    weight_decay: float
    l2: bool
    has_momentum: bool
    first: bool       # the momentum buffer does not exist yet: it becomes the gradient
    nesterov: bool
    maximize: bool

    # Flags that change between steps stay run-time values (kernels/specialize.py),
    # so one compiled driver serves every step.
    RUNTIME_FLAGS = ("first",)


def sgd_element(p, g, buf, unused1, unused2, h):
    """One SGD update of one element; returns (p, momentum_buffer, -, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    if h.has_momentum:
        if h.first:
            buf = g
        else:
            buf = h.momentum * buf + h.one_minus_dampening * g
        if h.nesterov:
            g = g + h.momentum * buf
        else:
            g = buf
    p = p - h.lr * g
    return p, buf, unused1, unused2


def sgd_scalars(first, lr, momentum, dampening, weight_decay, nesterov, maximize, cast):
    return SGDScalars(
        lr=cast(lr),
        momentum=cast(momentum),
        one_minus_dampening=cast(1.0 - dampening),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        has_momentum=bool(momentum != 0),
        first=bool(first),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
    )
