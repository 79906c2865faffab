"""NAdam: Adam with Nesterov momentum and a momentum schedule.

References:
  Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop.
  Equations and their order as torch.optim.NAdam (torch 2.13, single-tensor path):
  ``mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))``, ``mu_product *= mu_t``,
  ``denom = sqrt(v / (1 - beta2^t)) + eps``,
  ``p += -lr (1 - mu_t) / (1 - mu_product) * g / denom``,
  ``p += -lr mu_{t+1} / (1 - mu_product mu_{t+1}) * m / denom``.

``mu_product`` is one number per parameter tensor (the product of ``mu_s`` over its
steps); it lives on the host, rounded to float32 after every multiplication exactly as
torch's float32 ``mu_product`` tensor is (:func:`next_mu_product`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .pieces import adam_moments, lerp_fields

import numpy as np



class NAdamScalars(NamedTuple):
    beta2: float
    one_minus_beta1: float
    lerp_back: float          # 1 - (1 - beta1) in storage precision (torch's lerp, weight >= 0.5)
    one_minus_beta2: float
    bias_correction2: float   # 1 - beta2^t
    eps: float
    grad_coef: float          # -lr (1 - mu_t) / (1 - mu_product_t)
    avg_coef: float           # -lr mu_{t+1} / (1 - mu_product_t mu_{t+1})
    weight_decay: float
    decay_factor: float       # 1 - lr * weight_decay (decoupled), 1 otherwise
    l2: bool
    decoupled: bool
    lerp_from_end: bool       # torch's lerp takes its second form when the weight >= 0.5
    maximize: bool


def nadam_element(p, g, m, v, unused, h):
    """One NAdam update of one element; returns (p, exp_avg, exp_avg_sq, -)."""
    p, g, m, v = adam_moments(p, g, m, v, h)
    denom = math.sqrt(v / h.bias_correction2) + h.eps
    p = p + h.grad_coef * (g / denom)
    p = p + h.avg_coef * (m / denom)
    return p, m, v, unused


def momentum_cache(step, beta1, momentum_decay):
    """``mu_t`` of the momentum schedule (float64)."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def next_mu_product(mu_product, step, beta1, momentum_decay):
    """``mu_product * mu_t`` rounded as torch's float32 tensor does (``mu_t`` cast first)."""
    return np.float32(np.float32(mu_product) * np.float32(momentum_cache(step, beta1, momentum_decay)))


def nadam_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based); the host state
    ``group["mu_product"]`` already includes ``mu_t``."""
    lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
    momentum_decay, decoupled_weight_decay = group["momentum_decay"], group["decoupled_weight_decay"]
    mu = momentum_cache(step, beta1, momentum_decay)
    mu_next = momentum_cache(step + 1, beta1, momentum_decay)
    mu_product = float(group["mu_product"])
    return NAdamScalars(
        beta2=cast(beta2),
        **lerp_fields(beta1, cast),
        one_minus_beta2=cast(1.0 - beta2),
        bias_correction2=cast(1.0 - beta2 ** step),
        eps=cast(group["eps"]),
        grad_coef=cast(-lr * (1.0 - mu) / (1.0 - mu_product)),
        avg_coef=cast(-lr * mu_next / (1.0 - mu_product * mu_next)),
        weight_decay=cast(weight_decay),
        decay_factor=cast(1.0 - lr * weight_decay if decoupled_weight_decay else 1.0),
        l2=bool(weight_decay != 0 and not decoupled_weight_decay),
        decoupled=bool(decoupled_weight_decay and weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


def _advance(mu_product, step, group):
    return next_mu_product(mu_product, step, group["betas"][0], group["momentum_decay"])


SPEC = _s.Spec(
    name="NAdam", functional="nadam", element=nadam_element, scalars=nadam_scalars,
    hypers=(_s.lr(2e-3), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-8),
            _s.weight_decay(), _s.hyper("momentum_decay", 4e-3, _s.real(low=0.0)),
            _s.hyper("decoupled_weight_decay", False, _s.flag()), _s.maximize()),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True)),
    host=_s.HostState("mu_product", _advance),
    reference=_reference.nadam, oracle="torch.optim.NAdam",
    doc="""NAdam: Adam with Nesterov momentum and torch's momentum schedule.

    References:
      Dozat, ICLR 2016 workshop; torch.optim.NAdam (``momentum_decay``,
      ``decoupled_weight_decay``).
    State: ``exp_avg``, ``exp_avg_sq``, ``step``, ``mu_product`` (a float32 scalar per
    parameter, the running product of the momentum schedule, as torch keeps it).
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, momentum_decay=0.1),
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
             maximize=True),
    ), full=dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
                 maximize=True)),
    bench=(_s.BenchRow("nadam", dict(lr=2e-3)),),
)
