"""RAdam: Adam with a rectified adaptive learning rate.

References:
  Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
  Equations and their order as torch.optim.RAdam (torch 2.13, single-tensor path):
  ``rho_inf = 2 / (1 - beta2) - 1``, ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``;
  when ``rho_t > 5``:
  ``p -= m / (1 - beta1^t) * lr * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r_t`` with
  ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``,
  otherwise the un-adapted ``p -= m / (1 - beta1^t) * lr``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .pieces import adam_moments, lerp_fields


# torch's rectification threshold on rho_t (the length of the approximated SMA).
RHO_THRESHOLD = 5.0


class RAdamScalars(NamedTuple):
    beta2: float
    one_minus_beta1: float
    lerp_back: float          # 1 - (1 - beta1) in storage precision (torch's lerp, weight >= 0.5)
    one_minus_beta2: float
    bias_correction1: float        # 1 - beta1^t
    bias_correction2_sqrt: float   # sqrt(1 - beta2^t)
    lr: float
    rect: float                    # r_t (1 when not rectifying)
    eps: float
    weight_decay: float
    decay_factor: float            # 1 - lr * weight_decay (decoupled), 1 otherwise
    l2: bool
    decoupled: bool
    rectify: bool                  # rho_t > 5
    lerp_from_end: bool       # torch's lerp takes its second form when the weight >= 0.5
    maximize: bool

    RUNTIME_FLAGS = ("rectify",)    # changes at step 5 or 6: see kernels/specialize.py


def radam_element(p, g, m, v, unused, h):
    """One RAdam update of one element; returns (p, exp_avg, exp_avg_sq, -)."""
    p, g, m, v = adam_moments(p, g, m, v, h)
    corrected = m / h.bias_correction1
    if h.rectify:
        adaptive = h.bias_correction2_sqrt / (math.sqrt(v) + h.eps)
        p = p - corrected * h.lr * adaptive * h.rect
    else:
        p = p - corrected * h.lr
    return p, m, v, unused


def rectification(step, beta2):
    """(rho_t > 5, r_t) for step ``step`` (float64)."""
    bias_correction2 = 1.0 - beta2 ** step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bias_correction2
    if rho_t > RHO_THRESHOLD:
        return True, math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                               / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return False, 1.0


def radam_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based), computed in
    float64 then cast."""
    lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
    decoupled_weight_decay = group["decoupled_weight_decay"]
    rectify, rect = rectification(step, beta2)
    return RAdamScalars(
        beta2=cast(beta2),
        **lerp_fields(beta1, cast),
        one_minus_beta2=cast(1.0 - beta2),
        bias_correction1=cast(1.0 - beta1 ** step),
        bias_correction2_sqrt=cast(math.sqrt(1.0 - beta2 ** step)),
        lr=cast(lr),
        rect=cast(rect),
        eps=cast(group["eps"]),
        weight_decay=cast(weight_decay),
        decay_factor=cast(1.0 - lr * weight_decay if decoupled_weight_decay else 1.0),
        l2=bool(weight_decay != 0 and not decoupled_weight_decay),
        decoupled=bool(decoupled_weight_decay and weight_decay != 0),
        rectify=bool(rectify),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="RAdam", functional="radam", element=radam_element, scalars=radam_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-8),
            _s.weight_decay(), _s.hyper("decoupled_weight_decay", False, _s.flag()),
            _s.maximize()),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True)),
    reference=_reference.radam, oracle="torch.optim.RAdam",
    doc="""RAdam: Adam with a rectified adaptive learning rate (torch's threshold rho_t > 5).

    References:
      Liu et al., ICLR 2020; torch.optim.RAdam (``decoupled_weight_decay``).
    State: ``exp_avg``, ``exp_avg_sq``, ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, maximize=True),
        dict(betas=(0.9, 0.9), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
             maximize=True),
    ), full=dict(betas=(0.9, 0.9), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
                 maximize=True)),
    bench=(_s.BenchRow("radam", dict(lr=1e-3)),),
)
