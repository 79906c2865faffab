"""Adamax: Adam with the infinity norm in place of the second moment.

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1.
  Equations and their order as torch.optim.Adamax (torch 2.13, single-tensor path):
  ``m = lerp(m, g, 1 - beta1)``, ``u = max(beta2 * u, |g| + eps)``,
  ``p -= lr / (1 - beta1^t) * m / u``.
"""
from __future__ import annotations

from typing import NamedTuple

from .pieces import lerp, lerp_fields


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
    m = lerp(m, g, h.one_minus_beta1, h.lerp_back, h.lerp_from_end)
    u = u * h.beta2
    a = abs(g) + h.eps
    if a > u or a != a:      # torch.maximum: a NaN on either side propagates
        u = a
    p = p - h.clr * (m / u)
    return p, m, u, unused


def adamax_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based), computed in
    float64 then cast."""
    (beta1, beta2), weight_decay = group["betas"], group["weight_decay"]
    return AdamaxScalars(
        clr=cast(group["lr"] / (1.0 - beta1 ** step)),
        **lerp_fields(beta1, cast),
        beta2=cast(beta2),
        eps=cast(group["eps"]),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="Adamax", functional="adamax", element=adamax_element, scalars=adamax_scalars,
    hypers=(_s.lr(2e-3), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-8),
            _s.weight_decay(), _s.maximize()),
    columns=(_s.Column("exp_avg"), _s.Column("exp_inf", unsigned=True)),
    reference=_reference.adamax, oracle="torch.optim.Adamax",
    doc="""Adamax: Adam with the infinity norm.

    References:
      Kingma & Ba, ICLR 2015 (section 7.1); torch.optim.Adamax.
    State: ``exp_avg``, ``exp_inf``, ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, maximize=True),
        dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1, maximize=True),
    ), full=dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1, maximize=True)),
    bench=(_s.BenchRow("adamax", dict(lr=2e-3)),),
)
