"""Adan: adaptive Nesterov momentum, the per-element update and its host-side scalars.

References:
  Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
  Optimizing Deep Models", arXiv:2208.06677 (2022); IEEE TPAMI 46(12), 2024.
  Equations, defaults, state names and their order of operations as
  ``pytorch_optimizer.Adan`` (pytorch-optimizer 4.1.0), which follows the authors' code
  (github.com/sail-sg/Adan, ``no_prox`` there is ``weight_decouple`` here).

With ``g`` the (maximize-negated) gradient and ``d = g_t - g_{t-1}`` (``d = 0`` on the
first step: the previous gradient is taken to be the first one)::

    exp_avg      = lerp(exp_avg, g, 1 - beta1)
    exp_avg_diff = lerp(exp_avg_diff, d, 1 - beta2)
    exp_avg_sq   = beta3 * exp_avg_sq + (1 - beta3) * (g + beta2 * d)^2
    denom        = sqrt(exp_avg_sq) / sqrt(1 - beta3^t) + eps
    p            = p * (1 - lr * wd)                          (weight_decouple)
    p           -= lr / (1 - beta1^t) * exp_avg / denom
                  + lr * beta2 / (1 - beta2^t) * exp_avg_diff / denom
    p            = p / (1 + lr * wd)                          (proximal, the default)

Hyperparameters (the oracle's defaults): ``lr=1e-3``, ``betas=(0.98, 0.92, 0.99)``,
``eps=1e-8``, ``weight_decay=0.0``, ``weight_decouple=False``, ``maximize=False``.
The paper writes its betas as ``1 - beta`` of these.

State columns, in order: ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``,
``previous_grad``, all zeros initially. ``previous_grad`` holds the previous gradient
*negated*, as the oracle's state of that name (and the authors' ``neg_pre_grad``) does,
so its state dicts load unchanged. On step 1 the element ignores it (``first``) and
takes the step's own gradient, which is what the oracle's initial value
(``-grad``) amounts to.

Deliberate difference: with ``maximize=True`` the oracle initialises
``previous_grad`` from the gradient *before* negating it, so its first step sees
``d = 2 g`` instead of 0. Here maximize is exactly "minimise ``-f``" (``d = 0`` on step
1), which equals the oracle run on negated gradients with ``maximize=False``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .pieces import lerp



class AdanScalars(NamedTuple):
    one_minus_beta1: float
    lerp1_back: float           # 1 - (1 - beta1) in math precision (torch's lerp, weight >= 0.5)
    beta2: float
    one_minus_beta2: float
    lerp2_back: float           # 1 - (1 - beta2) in math precision
    beta3: float
    one_minus_beta3: float
    bias_correction3_sqrt: float  # sqrt(1 - beta3^t)
    eps: float
    neg_step_size: float        # -lr / (1 - beta1^t)
    neg_diff_step_size: float   # -lr * beta2 / (1 - beta2^t)
    decay_factor: float         # 1 - lr * weight_decay (weight_decouple)
    prox_divisor: float         # 1 + lr * weight_decay (proximal)
    first: bool                 # step 1: no previous gradient yet
    decoupled: bool
    proximal: bool
    maximize: bool
    lerp1_from_end: bool        # torch's lerp takes its second form when the weight >= 0.5
    lerp2_from_end: bool

    # `first` flips after step 1: a run-time value, so one compiled driver serves every
    # step (kernels/specialize.py).
    RUNTIME_FLAGS = ("first",)


def adan_element(p, g, exp_avg, exp_avg_sq, exp_avg_diff, previous_grad, h):
    """One Adan update of one element.

    ``previous_grad`` is the previous gradient negated. Returns
    ``(p, exp_avg, exp_avg_sq, exp_avg_diff, previous_grad)``.
    """
    if h.maximize:
        g = -g
    neg_g = -g
    if h.first:
        previous_grad = neg_g     # the oracle's initial value: d is 0 (NaN for inf g, as there)
    d = previous_grad + g
    exp_avg = lerp(exp_avg, g, h.one_minus_beta1, h.lerp1_back, h.lerp1_from_end)
    exp_avg_diff = lerp(exp_avg_diff, d, h.one_minus_beta2, h.lerp2_back, h.lerp2_from_end)
    u = d * h.beta2 + g
    exp_avg_sq = exp_avg_sq * h.beta3 + (h.one_minus_beta3 * u) * u
    denom = math.sqrt(exp_avg_sq) / h.bias_correction3_sqrt + h.eps
    if h.decoupled:
        p = p * h.decay_factor
    # torch's addcdiv multiplies before it divides: (value * t1) / t2
    p = p + (h.neg_step_size * exp_avg) / denom
    p = p + (h.neg_diff_step_size * exp_avg_diff) / denom
    if h.proximal:
        p = p / h.prox_divisor
    return p, exp_avg, exp_avg_sq, exp_avg_diff, neg_g


def adan_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based: the step being
    taken), computed in float64 then cast with ``cast`` (``numpy.float32`` for float32
    math, ``float`` for float64).

    ``weight_decouple``: decay as ``p *= 1 - lr wd`` before the update; otherwise the
    proximal ``p /= 1 + lr wd`` after it. Neither applies when ``weight_decay == 0``.
    """
    step = int(step)
    lr = float(group["lr"])
    beta1, beta2, beta3 = (float(b) for b in group["betas"])
    weight_decay, weight_decouple = float(group["weight_decay"]), group["weight_decouple"]
    w1, w2 = cast(1.0 - beta1), cast(1.0 - beta2)
    return AdanScalars(
        one_minus_beta1=w1,
        lerp1_back=cast(cast(1.0) - w1),
        beta2=cast(beta2),
        one_minus_beta2=w2,
        lerp2_back=cast(cast(1.0) - w2),
        beta3=cast(beta3),
        one_minus_beta3=cast(1.0 - beta3),
        bias_correction3_sqrt=cast(math.sqrt(1.0 - beta3 ** step)),
        eps=cast(group["eps"]),
        neg_step_size=cast(-lr / (1.0 - beta1 ** step)),
        neg_diff_step_size=cast(-lr * beta2 / (1.0 - beta2 ** step)),
        decay_factor=cast(1.0 - lr * weight_decay),
        prox_divisor=cast(1.0 + lr * weight_decay),
        first=bool(step == 1),
        decoupled=bool(weight_decay != 0 and weight_decouple),
        proximal=bool(weight_decay != 0 and not weight_decouple),
        maximize=bool(group["maximize"]),
        lerp1_from_end=bool(float(w1) >= 0.5),
        lerp2_from_end=bool(float(w2) >= 0.5),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="Adan", functional="adan", element=adan_element, scalars=adan_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("betas", (0.98, 0.92, 0.99), _s.betas(3)), _s.eps(1e-8),
            _s.weight_decay(), _s.hyper("weight_decouple", False, _s.flag()), _s.maximize()),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True), _s.Column("exp_avg_diff"),
             _s.Column("previous_grad")),
    reference=_reference.adan, oracle="pytorch_optimizer.Adan",
    doc="""Adan: adaptive Nesterov momentum (four state columns).

    References:
      Xie et al., arXiv:2208.06677 (2022), IEEE TPAMI 2024; pytorch_optimizer.Adan.
    Names and defaults are pytorch-optimizer's: ``betas = (0.98, 0.92, 0.99)``,
    ``weight_decouple=False`` decays proximally (``p /= 1 + lr wd`` after the update),
    True as AdamW (``p *= 1 - lr wd`` before it).
    State: ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``, ``previous_grad`` (the previous
    gradient negated, as the oracle keeps it), ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, maximize=True),
        dict(betas=(0.5, 0.5, 0.9), eps=1e-6, weight_decay=0.1, weight_decouple=True),
    ), full=dict(betas=(0.5, 0.5, 0.9), eps=1e-6, weight_decay=0.1, weight_decouple=True)),
    bench=(_s.BenchRow("adan", dict(lr=1e-3)),),
)
