"""ASGD: averaged stochastic gradient descent, the per-element update and its host-side
scalars.

References:
  Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J.
  Control Optim. 30(4), 1992. Equations, defaults, state names and their order of
  operations as ``torch.optim.ASGD`` (torch 2.13, single-tensor path, the one torch takes
  for CPU tensors).

Per param, two host scalars the previous step left (torch keeps them as float32 0-d
tensors in the state, ``eta`` = the lr and ``mu`` = 1 at the first step); with ``g``
the (maximize-negated) gradient, per element::

    g  = g + weight_decay * p                  (weight_decay != 0)
    p  = p * (1 - lambd * eta)
    p  = p + (-eta) * g
    ax = ax + (p - ax) * mu                    (mu != 1; else ax = p)

then, on the host, with ``t`` this step and the group's values at this step::

    eta = lr / (1 + lambd * lr * t) ** alpha   (float64, stored as float32)
    mu  = 1 / max(1, t - t0)                   (float64, stored as float32)

so a changed lr takes effect on ``eta`` one step later, as in torch.

Hyperparameters (torch's defaults): ``lr=1e-2``, ``lambd=1e-4``, ``alpha=0.75``,
``t0=1e6``, ``weight_decay=0``, ``maximize=False``. State: ``ax`` (the average, zeros),
``step``, ``eta`` and ``mu`` (host state, float32 scalars per param, as torch's).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ASGDScalars(NamedTuple):
    decay: float              # 1 - lambd * eta (float64 on the host, then the math type)
    neg_eta: float            # -eta
    mu: float
    weight_decay: float
    nan: float                # NaN, a run-time value (see asgd_element)
    average: bool             # mu != 1: ax moves towards p; else ax = p
    l2: bool
    maximize: bool

    # mu leaves 1 once t > t0 + 1: a run-time value, so one compiled driver serves every
    # step (kernels/specialize.py).
    RUNTIME_FLAGS = ("average",)


def asgd_element(p, g, ax, unused1, unused2, h):
    """One ASGD update of one element; returns (p, ax, -, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    p = p * h.decay
    p = p + h.neg_eta * g
    if h.average:
        ax = ax + (p - ax) * h.mu
    else:
        # ax = p, as a select on the old ax that is always true at run time (nothing equals
        # NaN, and h.nan is not a constant, so the compiler keeps the load): a loop that
        # only stores ax ran at 0.72 of the one that loads it too (16M float32 params on
        # the 2-core Xeon: 22-24 ms against 16 ms; the bytes moved are the same).
        ax = p if ax != h.nan else ax
    return p, ax, unused1, unused2


def asgd_scalars(group, step, cast):
    """Host scalars of param group ``group`` at step ``step``: ``group["eta"]`` and
    ``group["mu"]`` are the values the previous step left (the host state)."""
    eta, mu = float(group["eta"]), float(group["mu"])
    weight_decay = float(group["weight_decay"])
    return ASGDScalars(
        decay=cast(1 - group["lambd"] * eta),
        neg_eta=cast(-eta),
        mu=cast(mu),
        weight_decay=cast(weight_decay),
        nan=cast(float("nan")),
        average=bool(mu != 1),
        l2=bool(weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


def next_eta(values, step, group):
    """``eta`` after step ``step``, for every param (torch's Python float64, then float32)."""
    lr, lambd, alpha = float(group["lr"]), float(group["lambd"]), float(group["alpha"])
    eta = lr / ((1 + lambd * lr * float(step)) ** alpha)
    return np.full(np.shape(values), eta, dtype=np.float32)


def next_mu(values, step, group):
    """``mu`` after step ``step``, for every param (torch's Python float64, then float32)."""
    mu = 1 / max(1, float(step) - float(group["t0"]))
    return np.full(np.shape(values), mu, dtype=np.float32)


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference_rprop_asgd as _reference  # noqa: E402

_nonnegative = _s.real(low=0.0)

SPEC = _s.Spec(
    name="ASGD", functional="asgd", element=asgd_element, scalars=asgd_scalars,
    hypers=(_s.lr(1e-2), _s.hyper("lambd", 1e-4, _nonnegative),
            _s.hyper("alpha", 0.75, _nonnegative), _s.hyper("t0", 1e6, _nonnegative),
            _s.weight_decay(), _s.maximize()),
    columns=(_s.Column("ax"),),
    host=(_s.HostState("eta", next_eta, initial="lr", high=float("inf"), before=True,
                       required=True),
          _s.HostState("mu", next_mu, initial=1.0, low_open=True, before=True, required=True)),
    reference=_reference.asgd, oracle="torch.optim.ASGD",
    doc="""ASGD: averaged stochastic gradient descent (Polyak-Ruppert averaging).

    References:
      Polyak & Juditsky, SIAM J. Control Optim. 1992; torch.optim.ASGD (torch 2.13).
    Each step decays ``p`` by ``1 - lambd * eta``, steps by ``-eta * g`` and moves the
    average ``ax`` towards ``p`` by ``mu``; then ``eta = lr / (1 + lambd lr t)^alpha`` and
    ``mu = 1 / max(1, t - t0)`` for the next step (averaging starts after ``t0`` steps).
    ``lambd``, ``alpha`` and ``t0`` are finite and >= 0.
    State: ``ax`` (the average), ``step``, ``eta`` and ``mu`` (float32 scalars per
    parameter, as torch keeps them; a loaded state must carry both).
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(t0=0.0, weight_decay=0.1),
        dict(lambd=0.01, alpha=0.5, t0=5.0, maximize=True),
        dict(lambd=1e-3, alpha=0.6, t0=0.0, weight_decay=0.05, maximize=True),
    ), full=dict(lambd=1e-3, alpha=0.6, t0=0.0, weight_decay=0.05, maximize=True)),
    bench=(_s.BenchRow("asgd", dict(lr=1e-2)),),
)
