"""Adam and AdamW: the per-element update and its host-side scalars.

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  Equations and their order as in torch.optim.Adam / AdamW (torch 2.13, single-tensor path).
"""
from __future__ import annotations

import math
from typing import NamedTuple

SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamScalars(NamedTuple):
    step_size: float            # lr / (1 - beta1^t)
    beta2: float
    one_minus_beta1: float
    lerp_back: float            # 1 - (1 - beta1) in storage precision (torch's lerp, weight >= 0.5)
    one_minus_beta2: float
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t)
    eps: float
    weight_decay: float         # L2 coefficient added to the gradient (Adam)
    decay_factor: float         # 1 - lr * weight_decay (AdamW), 1 otherwise
    l2: bool
    decoupled: bool
    amsgrad: bool
    maximize: bool
    lerp_from_end: bool         # torch's lerp takes its second form when the weight >= 0.5


def adam_element(p, g, m, v, v_max, h):
    """One Adam(W) update of one element; returns (p, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    if h.maximize:
        g = -g
    if h.decoupled:
        p = p * h.decay_factor
    elif h.l2:
        g = g + h.weight_decay * p
    if h.lerp_from_end:                           # torch.lerp(m, g, 1 - beta1), both forms:
        m = g - (g - m) * h.lerp_back             # they differ for infinite gradients
    else:
        m = m + h.one_minus_beta1 * (g - m)
    v = h.beta2 * v + (h.one_minus_beta2 * g) * g
    if h.amsgrad:
        v_max = v_max if v_max >= v else v        # NaN in v propagates, as torch.maximum
        second = v_max
    else:
        second = v
    denom = math.sqrt(second) / h.bias_correction2_sqrt + h.eps
    p = p - h.step_size * (m / denom)
    return p, m, v, v_max


def adam_scalars(step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                 decoupled_weight_decay, cast):
    """Host scalars for step ``step`` (1-based), computed in float64 then cast."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return AdamScalars(
        step_size=cast(lr / bias_correction1),
        beta2=cast(beta2),
        one_minus_beta1=cast(1.0 - beta1),
        lerp_back=cast(cast(1.0) - cast(1.0 - beta1)),
        one_minus_beta2=cast(1.0 - beta2),
        bias_correction2_sqrt=cast(math.sqrt(bias_correction2)),
        eps=cast(eps),
        weight_decay=cast(weight_decay),
        decay_factor=cast(1.0 - lr * weight_decay if decoupled_weight_decay else 1.0),
        l2=bool(weight_decay != 0 and not decoupled_weight_decay),
        decoupled=bool(decoupled_weight_decay and weight_decay != 0),
        amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        lerp_from_end=bool(1.0 - beta1 >= 0.5),
    )
