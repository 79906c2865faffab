"""SparseAdam: torch.optim.SparseAdam's masked Adam for sparse row gradients.

References:
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; the lazy
  (masked) variant of ``torch.optim.SparseAdam`` (torch 2.13,
  ``torch/optim/_functional.py: sparse_adam``), whose equations, order of operations,
  defaults and state keys are these.

Only the rows a gradient names change: with ``g`` a coalesced gradient row (duplicate
indices summed; negated under ``maximize``) and ``m``, ``v`` that row's moments::

    dm      = (g - m) (1 - beta1)
    dv      = (g^2 - v) (1 - beta2)
    m       = m + dm
    v       = v + dv
    p       = p - lr sqrt(1 - beta2^t) / (1 - beta1^t) * (m / (sqrt(v) + eps))

Unlike Adam, eps is added to ``sqrt(v)`` before the bias correction, which sits in the
step size; every row shares the param's step count ``t``, which counts every step the
param had a gradient, an empty one included (torch counts it and updates nothing).
Gradients must be :class:`fastopt.SparseGrad` rows; a dense gradient is refused
(torch: "SparseAdam does not support dense gradients, please consider Adam instead").

Hyperparameters (torch's names, order and defaults; ``lr`` and ``eps`` must be > 0, as
torch checks): ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``maximize=False``.
State: ``step``, ``exp_avg``, ``exp_avg_sq`` (zeros initially), as torch's. torch keeps
``step`` as a Python int, fastopt's state dict as a float32 0-d array (as the other torch
optimizers do): both load into either.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class SparseAdamScalars(NamedTuple):
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    neg_step_size: float        # -lr sqrt(1 - beta2^t) / (1 - beta1^t)
    maximize: bool


def sparse_adam_element(p, g, exp_avg, exp_avg_sq, h):
    """One SparseAdam update of one element of a row the gradient names; returns
    ``(p, exp_avg, exp_avg_sq)``."""
    if h.maximize:
        g = -g
    dm = (g - exp_avg) * h.one_minus_beta1
    dv = (g * g - exp_avg_sq) * h.one_minus_beta2
    exp_avg = exp_avg + dm
    exp_avg_sq = exp_avg_sq + dv
    p = p + h.neg_step_size * (exp_avg / (math.sqrt(exp_avg_sq) + h.eps))
    return p, exp_avg, exp_avg_sq


def sparse_adam_scalars(group, step, cast):
    """Host scalars of param group ``group`` for step ``step`` (1-based), float64 math then
    ``cast``."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr = float(group["lr"])
    return SparseAdamScalars(
        one_minus_beta1=cast(1.0 - beta1),
        one_minus_beta2=cast(1.0 - beta2),
        eps=cast(group["eps"]),
        neg_step_size=cast(-lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from .. import _validate as _v  # noqa: E402
from .reference_sparse_adam import sparse_adam as _reference_rows  # noqa: E402


def _positive_lr(name):
    """torch's check: lr > 0 (a callable schedule is evaluated at each step, as elsewhere)."""
    def check(value, where):
        if callable(value):
            return value
        return _v.number(name, value, low=0.0, low_open=True, where=where)
    return check


def _reference(group, step, param, index, rows, slots):
    beta1, beta2 = group["betas"]
    _reference_rows(param, index, rows, slots[0], slots[1], step=step, lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], maximize=group["maximize"])


def _no_dense_reference(params, grads, *slots, **hypers):  # pragma: no cover - never reached
    raise TypeError("SparseAdam does not support dense gradients (the engine refuses them first)")


SPEC = _s.Spec(
    name="SparseAdam", element=sparse_adam_element, scalars=sparse_adam_scalars,
    hypers=(_s.hyper("lr", 1e-3, _positive_lr), _s.hyper("betas", (0.9, 0.999), _s.betas()),
            _s.hyper("eps", 1e-8, _s.real(low=0.0, low_open=True)),
            _s.hyper("maximize", False, _s.flag())),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True)),
    reference=_no_dense_reference, oracle="torch.optim.SparseAdam",
    sparse=_s.Sparse(reference=_reference, dense=False),
    doc="""SparseAdam: Adam's moments and update on the rows a sparse gradient names only.

    References:
      Kingma & Ba, ICLR 2015; torch.optim.SparseAdam (torch 2.13).
    Gradients are :class:`fastopt.SparseGrad` rows (indices, rows): duplicates are summed,
    and only those rows of the param and its moments change, with torch's SparseAdam
    equations (``denom = sqrt(v) + eps``, step size ``lr sqrt(1 - beta2^t) / (1 - beta1^t)``).
    Dense gradients are refused, as torch refuses them (use Adam). ``lr`` and ``eps``
    must be > 0. State: ``exp_avg``, ``exp_avg_sq``, ``step`` (torch's keys); state dicts
    load from and into torch.optim.SparseAdam.
    """,
    # No examples: the generated tests step dense gradients, which SparseAdam refuses;
    # tests/test_sparse_adam.py tests it against torch.optim.SparseAdam instead.
)
