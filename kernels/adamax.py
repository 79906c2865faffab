"""Adamax: Adam with the infinity norm in place of the second moment.

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1.
  Equations and their order as torch.optim.Adamax (torch 2.13, single-tensor path):
  ``m = lerp(m, g, 1 - beta1)``, ``u = max(beta2 * u, |g| + eps)``,
  ``p -= lr / (1 - beta1^t) * m / u``.
"""
from __future__ import annotations

from typing import NamedTuple

SLOTS = ("exp_avg", "exp_inf", None)


class AdamaxScalars(NamedTuple):
    clr: float              # lr / (1 - beta1^t)
    one_minus_beta1: float
    lerp_back: float          # 1 - (1 - beta1) in storage precision (torch's lerp, weight >= 0.5)
    beta2: float
    eps: float
    weight_decay: float
    l2: bool
    lerp_from_end: bool       # torch's lerp takes its second form when the weight >= 0.5
    maximize: bool


def adamax_element(p, g, m, u, unused, h):
    """One Adamax update of one element; returns (p, exp_avg, exp_inf, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    if h.lerp_from_end:                  # torch.lerp(m, g, w), both of its forms
        m = g - (g - m) * h.lerp_back
    else:
        m = m + h.one_minus_beta1 * (g - m)
    u = u * h.beta2
    a = abs(g) + h.eps
    if a > u or a != a:      # torch.maximum: a NaN on either side propagates
        u = a
    p = p - h.clr * (m / u)
    return p, m, u, unused


def adamax_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize, cast):
    """Host scalars for step ``step`` (1-based), computed in float64 then cast."""
    return AdamaxScalars(
        clr=cast(lr / (1.0 - beta1 ** step)),
        one_minus_beta1=cast(1.0 - beta1),
        lerp_back=cast(1.0 - float(cast(1.0 - beta1))),
        beta2=cast(beta2),
        eps=cast(eps),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        lerp_from_end=bool(1.0 - beta1 >= 0.5),
        maximize=bool(maximize),
    )
