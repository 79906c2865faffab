"""AdEMAMix in vectorised NumPy, from the paper's equations: the independent reference.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv:2409.03137 (2024), Algorithm 1 (with ``exp_avg`` the fast EMA m1, ``exp_avg_slow``
the slow EMA m2, ``exp_avg_sq`` nu) and the schedulers of its section 3 (alpha linear,
beta3 linear in the EMA's half-life), with the weight-decay options, the order of
operations and the names of pytorch_optimizer.AdEMAMix 4.1.0. Written separately from
``kernels/ademamix.py``'s element: whole arrays, one tensor at a time, in place; Python
float scalars keep float32 arrays in float32 (NumPy 2 promotion).
"""
from __future__ import annotations

import math

import numpy as np


def _lerp(m, g, weight):
    """torch.lerp_(m, g, weight) in place: ``m + w (g - m)`` for ``w < 0.5``, else
    ``g - (g - m)(1 - w)`` (torch's two forms; they differ for infinite inputs)."""
    if weight < 0.5:
        m += weight * (g - m)
    else:
        w = m.dtype.type(weight)
        m[...] = g - (g - m) * (m.dtype.type(1) - w)


def alpha_at(step, alpha, t_alpha_beta3):
    """alpha_t = min(t alpha / T, alpha); alpha without warm-up."""
    return float(alpha) if t_alpha_beta3 is None else min(step * alpha / t_alpha_beta3, alpha)


def beta3_at(step, beta1, beta3, t_alpha_beta3):
    """beta3_t: the slow EMA's half-life grows linearly from beta1's to beta3's over T steps
    (the paper's f_beta3, section 3): ``exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1))`` at
    ``s = t / T``, capped at b3. Zero betas take the formula's limits."""
    if t_alpha_beta3 is None:
        return float(beta3)
    if beta3 == 0:
        return 0.0
    s = step / t_alpha_beta3
    if beta1 == 0:                       # ln b1 -> -inf
        return min(math.exp(math.log(beta3) / s), beta3)
    l1, l3 = math.log(beta1), math.log(beta3)
    return min(math.exp(l1 * l3 / ((1.0 - s) * l3 + s * l1)), beta3)


def ademamix(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, *, step, lr=1e-3, beta1=0.9,
             beta2=0.999, beta3=0.9999, alpha=5.0, t_alpha_beta3=None, eps=1e-8,
             weight_decay=0.0, weight_decouple=False, fixed_decay=False, maximize=False):
    """One AdEMAMix step in place (``step`` counts this step, 1 on the first)."""
    lr, beta1, beta2, beta3 = float(lr), float(beta1), float(beta2), float(beta3)
    eps, weight_decay, alpha = float(eps), float(weight_decay), float(alpha)
    alpha_t = alpha_at(step, alpha, t_alpha_beta3)
    beta3_t = beta3_at(step, beta1, beta3, t_alpha_beta3)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for p, g, m1, nu, m2 in zip(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows):
        g = -g if maximize else g
        if weight_decay != 0:
            if weight_decouple:
                p *= 1.0 - weight_decay * (1.0 if fixed_decay else lr)
            else:
                g = g + weight_decay * p
        _lerp(m1, g, 1.0 - beta1)
        nu *= beta2
        nu += ((1.0 - beta2) * g) * g
        _lerp(m2, g, 1.0 - beta3_t)
        denom = np.sqrt(nu) / bc2_sqrt + eps
        p += (-lr * (m1 / bc1 + alpha_t * m2)) / denom
