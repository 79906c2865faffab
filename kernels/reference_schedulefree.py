"""The independent NumPy reference of schedule-free AdamW and SGD (and their weight swap).

Written from the published equations (Defazio, Yang, Mehta, Mishchenko, Khaled &
Cutkosky, "The Road Less Scheduled", NeurIPS 2024, Algorithm 1 and its AdamW variant)
in the order the ``schedulefree`` package's ``AdamWScheduleFree`` and
``SGDScheduleFree`` (schedulefree 1.4) apply them, vectorised over whole tensors. It
shares nothing with the element functions of ``kernels/schedulefree.py``: the schedule
(warm-up, the weight of the average, its running sum) is computed here again from the
group's values before the step.

The params hold ``y``, the point where gradients are taken; ``z`` is the base
(SGD/Adam) iterate and ``x`` the weighted average that is evaluated::

    y = (1 - beta) z + beta x          (beta: AdamW's beta1, SGD's momentum)
    x = (1 - c) x + c z                (c = ckp1, the weight of this step in the average)

With ``g`` the step's gradient (AdamW: divided by ``sqrt(v / (1 - beta2^(k+1))) + eps``
after ``v = beta2 v + (1 - beta2) g^2``), plus ``weight_decay * y``, the new ``y`` and
``z`` follow without ``x``::

    y = lerp(y, z, c) + lr (beta (1 - c) - 1) g
    z = z - lr g
"""
from __future__ import annotations

import numpy as np


def schedule(*, k, lr, warmup_steps, r, weight_lr_power, weight_sum, lr_max):
    """This step's ``(scheduled lr, new lr_max, new weight_sum, c)`` from the group's
    values before it (``k`` steps taken so far)."""
    t = k + 1
    warm = t / warmup_steps if k < warmup_steps else 1.0
    scheduled = lr * warm
    top = max(scheduled, lr_max)
    weight = t ** r * top ** weight_lr_power
    total = weight_sum + weight
    c = weight / total if total != 0 else 0.0
    return scheduled, top, total, c


def _lerp(start, end, weight):
    """torch.lerp with a scalar weight (its two forms: ``|weight| < 0.5`` or not)."""
    dt = start.dtype.type
    w = dt(weight)
    if abs(w) < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (dt(1.0) - w)


def adamw_schedulefree(params, grads, zs, exp_avg_sqs, *, first, k, lr, beta1, beta2, eps,
                       weight_decay, warmup_steps, r, weight_lr_power, weight_sum, lr_max):
    """One schedule-free AdamW step in place; ``first``: the params' first step (``z``
    starts as a copy of the param)."""
    scheduled, _, _, c = schedule(k=k, lr=lr, warmup_steps=warmup_steps, r=r,
                                  weight_lr_power=weight_lr_power, weight_sum=weight_sum,
                                  lr_max=lr_max)
    correction = 1.0 - beta2 ** (k + 1)
    for y, g, z, v in zip(params, grads, zs, exp_avg_sqs):
        dt = y.dtype.type
        if first:
            z[...] = y
        v *= dt(beta2)
        v += dt(1.0 - beta2) * g * g
        d = g / (np.sqrt(v / dt(correction)) + dt(eps))
        if weight_decay != 0:
            d = d + dt(weight_decay) * y
        y[...] = _lerp(y, z, c) + dt(scheduled * (beta1 * (1.0 - c) - 1.0)) * d
        z -= dt(scheduled) * d


def sgd_schedulefree(params, grads, zs, *, first, k, lr, momentum, weight_decay, warmup_steps,
                     r, weight_lr_power, weight_sum, lr_max):
    """One schedule-free SGD step in place (see :func:`adamw_schedulefree`)."""
    scheduled, _, _, c = schedule(k=k, lr=lr, warmup_steps=warmup_steps, r=r,
                                  weight_lr_power=weight_lr_power, weight_sum=weight_sum,
                                  lr_max=lr_max)
    for y, g, z in zip(params, grads, zs):
        dt = y.dtype.type
        if first:
            z[...] = y
        d = g + dt(weight_decay) * y if weight_decay != 0 else g
        y[...] = _lerp(y, z, c) + dt(scheduled * (momentum * (1.0 - c) - 1.0)) * d
        z -= dt(scheduled) * d


def to_eval(params, zs, beta):
    """The params from ``y`` to ``x``: ``x = (y - (1 - beta) z) / beta``, as
    ``lerp(y, z, 1 - 1/beta)``."""
    for p, z in zip(params, zs):
        p[...] = _lerp(p, z.astype(p.dtype, copy=False), 1.0 - 1.0 / beta)


def to_train(params, zs, beta):
    """The params from ``x`` to ``y = (1 - beta) z + beta x``, as ``lerp(x, z, 1 - beta)``."""
    for p, z in zip(params, zs):
        p[...] = _lerp(p, z.astype(p.dtype, copy=False), 1.0 - beta)
