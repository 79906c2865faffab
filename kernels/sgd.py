"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize.

References:
  Sutskever et al., "On the importance of initialization and momentum in deep
  learning", ICML 2013. Equations as torch.optim.SGD (torch 2.13): the momentum buffer
  is the gradient itself on its first step, then ``mu * b + (1 - dampening) * g``.
"""
from __future__ import annotations

from typing import NamedTuple



class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    one_minus_dampening: float
    weight_decay: float
    l2: bool
    has_momentum: bool
    first: bool       # the momentum buffer does not exist yet: it becomes the gradient
    nesterov: bool
    maximize: bool

    # Flags that change between steps stay run-time values (kernels/specialize.py),
    # so one compiled driver serves every step.
    RUNTIME_FLAGS = ("first",)


def sgd_element(p, g, buf, unused1, unused2, h):
    """One SGD update of one element; returns (p, momentum_buffer, -, -)."""
    if h.maximize:
        g = -g
    if h.l2:
        g = g + h.weight_decay * p
    if h.has_momentum:
        if h.first:
            buf = g
        else:
            buf = h.momentum * buf + h.one_minus_dampening * g
        if h.nesterov:
            g = g + h.momentum * buf
        else:
            g = buf
    p = p - h.lr * g
    return p, buf, unused1, unused2


def sgd_scalars(group, step, cast):
    """Host scalars of param group ``group``; ``first`` on a param's first step (``step``
    counts its steps, 1-based): its momentum buffer becomes the gradient."""
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    return SGDScalars(
        lr=cast(group["lr"]),
        momentum=cast(momentum),
        one_minus_dampening=cast(1.0 - group["dampening"]),
        weight_decay=cast(weight_decay),
        l2=bool(weight_decay != 0),
        has_momentum=bool(momentum != 0),
        first=bool(step == 1),
        nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


def _check(group, where):
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0, "
                         f"got momentum={group['momentum']}, dampening={group['dampening']}")


def _reference_call(group, step, params, grads, slots):
    _reference.sgd(params, grads, slots[0], first_step=[step == 1] * len(params), lr=group["lr"],
                   momentum=group["momentum"], dampening=group["dampening"],
                   weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                   maximize=group["maximize"])


def _rows_seen(group):
    return group["momentum"] != 0


SPEC = _s.Spec(
    name="SGD", functional="sgd", element=sgd_element, scalars=sgd_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("momentum", 0.0, _s.real(low=0.0)),
            _s.hyper("dampening", 0.0, _s.real()), _s.weight_decay(),
            _s.hyper("nesterov", False, _s.flag()), _s.maximize()),
    columns=(_s.Column("momentum_buffer", when=lambda g: g["momentum"] != 0),),
    check=_check, step_state=False, reference=_reference.sgd, reference_call=_reference_call,
    sparse=_s.Sparse(check=_s.no_weight_decay, all_seen=_rows_seen),
    oracle="torch.optim.SGD",
    doc="""Stochastic gradient descent with momentum, dampening and Nesterov momentum.

    References:
      Sutskever et al., ICML 2013; torch.optim.SGD.
    State: ``momentum_buffer`` (when momentum != 0).
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.01, maximize=True),
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
        dict(momentum=0.9, nesterov=True, maximize=True),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    ), full=dict(momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)),
    bench=(_s.BenchRow("sgd", dict(lr=1e-2), default=True),
           _s.BenchRow("sgd-momentum", dict(lr=1e-2, momentum=0.9), default=True),
           _s.BenchRow("sgd-nesterov", dict(lr=1e-2, momentum=0.9, nesterov=True))),
)
