"""Adam and AdamW: the per-element update and its host-side scalars.

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  Equations and their order as in torch.optim.Adam / AdamW (torch 2.13, single-tensor path).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .pieces import adam_moments, lerp_fields


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
    p, g, m, v = adam_moments(p, g, m, v, h)
    if h.amsgrad:
        v_max = v_max if v_max >= v else v        # NaN in v propagates, as torch.maximum
        second = v_max
    else:
        second = v
    denom = math.sqrt(second) / h.bias_correction2_sqrt + h.eps
    p = p - h.step_size * (m / denom)
    return p, m, v, v_max


def adam_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based), computed in
    float64 then cast."""
    lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
    decoupled_weight_decay = group["decoupled_weight_decay"]
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return AdamScalars(
        step_size=cast(lr / bias_correction1),
        beta2=cast(beta2),
        **lerp_fields(beta1, cast),
        one_minus_beta2=cast(1.0 - beta2),
        bias_correction2_sqrt=cast(math.sqrt(bias_correction2)),
        eps=cast(group["eps"]),
        weight_decay=cast(weight_decay),
        decay_factor=cast(1.0 - lr * weight_decay if decoupled_weight_decay else 1.0),
        l2=bool(weight_decay != 0 and not decoupled_weight_decay),
        decoupled=bool(decoupled_weight_decay and weight_decay != 0),
        amsgrad=bool(group["amsgrad"]),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


def _check_sparse(group, where):
    _s.no_weight_decay(group, where)
    if group["amsgrad"]:
        raise ValueError(f"{where}: amsgrad is not supported with sparse gradients (SparseAdam semantics)")


def _sparse_scalars(group, step, cast):
    # SparseAdam: denom = sqrt(v) + eps and step size lr * sqrt(bc2) / bc1.
    beta1, beta2 = group["betas"]
    return adam_scalars(group, step, cast)._replace(
        step_size=cast(group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)),
        bias_correction2_sqrt=cast(1.0))


def _sparse_reference(group, step, param, index, rows, slots):
    beta1, beta2 = group["betas"]
    _reference.sparse_adam(param, index, rows, slots[0], slots[1], step=step, lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"])


SPEC = _s.Spec(
    name="Adam", functional="adam", element=adam_element, scalars=adam_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-8),
            _s.weight_decay(), _s.hyper("amsgrad", False, _s.flag()), _s.maximize(),
            _s.hyper("decoupled_weight_decay", False, _s.flag(), keyword=True)),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True),
             _s.Column("max_exp_avg_sq", when=lambda g: g["amsgrad"], unsigned=True)),
    reference=_reference.adam, oracle="torch.optim.Adam",
    # with torch.optim.SparseAdam's semantics (lazy rows)
    sparse=_s.Sparse(check=_check_sparse, scalars=_sparse_scalars, reference=_sparse_reference),
    doc="""Adam, with AMSGrad, maximize and (optionally decoupled) weight decay.

    References:
      Kingma & Ba, ICLR 2015; Reddi et al. (AMSGrad), ICLR 2018; torch.optim.Adam.
    State: ``exp_avg``, ``exp_avg_sq``, ``step``, ``max_exp_avg_sq`` (amsgrad).
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(amsgrad=True),
        dict(weight_decay=0.1, maximize=True),
        dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    ), full=dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True)),
    bench=(_s.BenchRow("adam", dict(lr=1e-3), default=True),
           _s.BenchRow("adam-amsgrad", dict(lr=1e-3, amsgrad=True))),
)

ADAMW = SPEC.derive(
    "AdamW", functional="adamw", defaults=dict(weight_decay=1e-2),
    fixed=dict(decoupled_weight_decay=True), oracle="torch.optim.AdamW",
    doc="""Adam with decoupled weight decay (torch.optim.AdamW: weight_decay defaults to 1e-2).

    References:
      Loshchilov & Hutter, ICLR 2019.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.0, amsgrad=True),
        dict(weight_decay=0.1, amsgrad=True, maximize=True),
    ), full=dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    bench=(_s.BenchRow("adamw", dict(lr=1e-3, weight_decay=1e-2), default=True),))

SPECS = (SPEC, ADAMW)
