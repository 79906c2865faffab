"""AdEMAMix: Adam with a mixture of a fast and a slow momentum, per element and its host scalars.

References:
  Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
  arXiv:2409.03137 (2024), Algorithm 1 and its alpha / beta3 schedulers.
  Names, defaults and order of operations as ``pytorch_optimizer.AdEMAMix``
  (pytorch-optimizer 4.1.0, per-param path); bitsandbytes 0.50's ``AdEMAMix`` computes
  the same update (see "bitsandbytes" below).

With ``g`` the (maximize-negated) gradient, step ``t`` and, with ``T = t_alpha_beta3``,
``alpha_t = min(t alpha / T, alpha)`` and
``beta3_t = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)``
(``alpha_t = alpha``, ``beta3_t = b3`` when ``T`` is None)::

    p             = p * (1 - lr wd)       (weight_decouple; 1 - wd with fixed_decay)
    g             = g + wd p              (otherwise, L2)
    exp_avg       = lerp(exp_avg, g, 1 - b1)
    exp_avg_sq    = b2 exp_avg_sq + (1 - b2) g^2
    exp_avg_slow  = lerp(exp_avg_slow, g, 1 - beta3_t)
    denom         = sqrt(exp_avg_sq) / sqrt(1 - b2^t) + eps
    p            -= lr (exp_avg / (1 - b1^t) + alpha_t exp_avg_slow) / denom

Hyperparameters (pytorch-optimizer's names and defaults): ``lr=1e-3``,
``betas=(0.9, 0.999, 0.9999)`` (fast, second moment, slow), ``weight_decay=0.0``,
``weight_decouple=False``, ``fixed_decay=False``, ``alpha=5.0``, ``t_alpha_beta3=None``
(a positive int: one warm-up length for both schedulers), ``eps=1e-8``,
``maximize=False``. State columns, in the oracle's order: ``exp_avg``, ``exp_avg_sq``,
``exp_avg_slow``, zeros initially.

bitsandbytes: ``bnb.optim.AdEMAMix(lr, betas, alpha, t_alpha, t_beta3, eps,
weight_decay=1e-2)`` is this update with ``weight_decouple=True`` (its decay is
``p *= 1 - lr wd`` before the step) and ``t_alpha == t_beta3 == t_alpha_beta3``; it
keeps ``exp_avg`` and ``exp_avg_slow`` stacked in one ``state1`` of shape
``(2, *p.shape)`` and ``exp_avg_sq`` as ``state2``. Its moments are ``b m + (1 - b) g``
rather than torch's ``lerp``: its two coefficients, each rounded to float32, do not sum
to 1 (b = 0.999: 1 + 1.3e-8), so its moments drift from these relatively by up to
``|F32(b) + F32(1 - b) - 1| / (1 - b)`` (derived: 1.3e-5 at b3 = 0.999, 1.7e-4 at the
default 0.9999; tests/test_lowbit_bnb.py measures and allows it). Its separate
``t_alpha`` and ``t_beta3`` (and ``t == 0`` meaning "off") have no equivalent here.

The beta3 scheduler takes logarithms of b1 and b3; at b1 == 0 or b3 == 0 (where the
oracle raises a math domain error) this takes the formula's limits: ``b3^(T/t)`` for
b1 == 0, and 0 for b3 == 0.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from .pieces import adam_moments, lerp, lerp_fields


class AdEMAMixScalars(NamedTuple):
    one_minus_beta1: float
    lerp_back: float            # 1 - (1 - beta1) in math precision (torch's lerp, weight >= 0.5)
    beta2: float
    one_minus_beta2: float
    one_minus_beta3: float      # 1 - beta3_t (the scheduled slow decay)
    lerp3_back: float           # 1 - (1 - beta3_t) in math precision
    bias_correction1: float     # 1 - beta1^t
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t)
    alpha: float                # alpha_t (the scheduled slow weight)
    eps: float
    neg_lr: float
    weight_decay: float         # L2 coefficient added to the gradient
    decay_factor: float         # 1 - lr wd (or 1 - wd with fixed_decay): decoupled decay
    l2: bool
    decoupled: bool
    maximize: bool
    lerp_from_end: bool         # torch's lerp takes its second form when the weight >= 0.5
    lerp3_from_end: bool

    # beta3_t moves with the scheduler: which form of lerp the slow moment takes may flip
    # during the warm-up, so it is a run-time value (kernels/specialize.py).
    RUNTIME_FLAGS = ("lerp3_from_end",)


def ademamix_element(p, g, exp_avg, exp_avg_sq, exp_avg_slow, h):
    """One AdEMAMix update of one element; returns ``(p, exp_avg, exp_avg_sq, exp_avg_slow)``."""
    p, g, exp_avg, exp_avg_sq = adam_moments(p, g, exp_avg, exp_avg_sq, h)
    exp_avg_slow = lerp(exp_avg_slow, g, h.one_minus_beta3, h.lerp3_back, h.lerp3_from_end)
    denom = math.sqrt(exp_avg_sq) / h.bias_correction2_sqrt + h.eps
    update = exp_avg / h.bias_correction1 + h.alpha * exp_avg_slow
    # torch's addcdiv multiplies before it divides: (value * t1) / t2
    p = p + (h.neg_lr * update) / denom
    return p, exp_avg, exp_avg_sq, exp_avg_slow


def schedule_alpha(alpha, step, t_alpha_beta3) -> float:
    """The slow momentum's weight at ``step``: a linear warm-up over ``t_alpha_beta3`` steps."""
    if t_alpha_beta3 is None:
        return float(alpha)
    return min(step * alpha / t_alpha_beta3, alpha)


def schedule_beta3(beta1, beta3, step, t_alpha_beta3) -> float:
    """The slow momentum's decay at ``step``: from beta1 to beta3 over ``t_alpha_beta3``
    steps, linear in the EMA's half-life (the paper's scheduler, the oracle's formula)."""
    if t_alpha_beta3 is None:
        return float(beta3)
    if beta3 == 0.0:
        return 0.0
    s = step / t_alpha_beta3
    ln3 = math.log(beta3)
    if beta1 == 0.0:                     # the limit ln b1 -> -inf: b3^(1/s)
        return min(math.exp(ln3 / s), beta3)
    ln1 = math.log(beta1)
    return min(math.exp(ln1 * ln3 / ((1.0 - s) * ln3 + s * ln1)), beta3)


def ademamix_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based), float64 math then
    ``cast``."""
    step = int(step)
    lr = float(group["lr"])
    beta1, beta2, beta3 = (float(b) for b in group["betas"])
    t = group["t_alpha_beta3"]
    weight_decay = float(group["weight_decay"])
    decouple = bool(group["weight_decouple"])
    beta3_t = schedule_beta3(beta1, beta3, step, t)
    w3 = cast(1.0 - beta3_t)
    return AdEMAMixScalars(
        **lerp_fields(beta1, cast),
        beta2=cast(beta2),
        one_minus_beta2=cast(1.0 - beta2),
        one_minus_beta3=w3,
        lerp3_back=cast(cast(1.0) - w3),
        bias_correction1=cast(1.0 - beta1 ** step),
        bias_correction2_sqrt=cast(math.sqrt(1.0 - beta2 ** step)),
        alpha=cast(schedule_alpha(float(group["alpha"]), step, t)),
        eps=cast(group["eps"]),
        neg_lr=cast(-lr),
        weight_decay=cast(weight_decay),
        decay_factor=cast(1.0 - weight_decay * (1.0 if group["fixed_decay"] else lr)),
        l2=bool(weight_decay != 0 and not decouple),
        decoupled=bool(weight_decay != 0 and decouple),
        maximize=bool(group["maximize"]),
        lerp3_from_end=bool(1.0 - beta3_t >= 0.5),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from .. import _validate as _v  # noqa: E402
from .reference_ademamix import ademamix as _reference  # noqa: E402


def _warmup_steps(name):
    """None (no warm-up) or a positive whole number of steps."""
    def check(value, where):
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            prefix = f"{where}: " if where else ""
            raise TypeError(f"{prefix}{name} must be None or a positive int (steps of warm-up), "
                            f"got {type(value).__name__} {value!r}")
        _v.number(name, int(value), low=1, where=where)
        return int(value)
    return check


SPEC = _s.Spec(
    name="AdEMAMix", functional="ademamix", element=ademamix_element, scalars=ademamix_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("betas", (0.9, 0.999, 0.9999), _s.betas(3)),
            _s.weight_decay(), _s.hyper("weight_decouple", False, _s.flag()),
            _s.hyper("fixed_decay", False, _s.flag()),
            _s.hyper("alpha", 5.0, _s.real(low=0.0)),
            _s.hyper("t_alpha_beta3", None, _warmup_steps, bad=(0, -10, 2.5, "100", True)),
            _s.eps(1e-8), _s.maximize()),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True), _s.Column("exp_avg_slow")),
    reference=_reference, oracle="pytorch_optimizer.AdEMAMix",
    doc="""AdEMAMix: Adam with a mixture of a fast and a slow EMA of the gradient.

    References:
      Pagliardini, Ablin & Grangier, arXiv:2409.03137 (2024); pytorch_optimizer.AdEMAMix.
    Names and defaults are pytorch-optimizer's: ``betas = (beta1, beta2, beta3)`` (fast
    momentum, second moment, slow momentum), ``alpha`` the slow momentum's weight,
    ``t_alpha_beta3`` (None or a positive int) the warm-up of alpha and beta3;
    ``weight_decouple`` decays as AdamW (``fixed_decay``: without the lr factor).
    bitsandbytes' AdEMAMix is ``weight_decouple=True, weight_decay=1e-2`` here.
    State: ``exp_avg``, ``exp_avg_sq``, ``exp_avg_slow``, ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, maximize=True, t_alpha_beta3=10),
        dict(betas=(0.5, 0.9, 0.99), alpha=2.0, eps=1e-6, weight_decay=0.1, weight_decouple=True,
             t_alpha_beta3=5),
        dict(weight_decay=0.5, weight_decouple=True, fixed_decay=True, alpha=0.0),
    ), full=dict(betas=(0.5, 0.9, 0.99), alpha=2.0, eps=1e-6, weight_decay=0.1, weight_decouple=True,
                 t_alpha_beta3=5)),
    bench=(_s.BenchRow("ademamix", dict(lr=1e-3)),),
)
