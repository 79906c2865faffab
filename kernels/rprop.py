"""Rprop: resilient backpropagation, the per-element update and its host-side scalars.

References:
  Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation Learning: The
  RPROP Algorithm", IEEE ICNN 1993. Equations, defaults, state names and their order of
  operations as ``torch.optim.Rprop`` (torch 2.13, single-tensor path, the one torch takes
  for CPU tensors).

With ``g`` the (maximize-negated) gradient, per element::

    s         = sign(g * prev)                 (NaN products count as 0, as torch's sign)
    factor    = etaplus if s > 0, etaminus if s < 0, else 1
    step_size = clamp(step_size * factor, step_size_min, step_size_max)
    g         = 0 where factor == etaminus     (the sign flipped: no move, and forget it)
    p         = p + (-sign(g)) * step_size     (torch's addcmul(sign(g), step_size, value=-1))
    prev      = g                              (the zeroed gradient)

The factors and bounds are the storage precision's (torch writes them into a tensor of the
param's dtype), and the sign is taken of the product ``g * prev``, not of each factor (a
float32 product that underflows to 0 leaves the step size as it is, as in torch).

Hyperparameters (torch's defaults): ``lr=1e-2`` (the initial step size), ``etas=(0.5,
1.2)`` (etaminus, etaplus), ``step_sizes=(1e-6, 50)`` (min, max), ``maximize=False``.
State columns: ``prev`` (zeros) and ``step_size`` (``lr`` at the first step), and ``step``.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class RpropScalars(NamedTuple):
    etaminus: float
    etaplus: float
    step_size_min: float
    step_size_max: float
    one: float                  # constants in the math type (no float64 promotion)
    zero: float
    maximize: bool


def rprop_element(p, g, prev, step_size, unused, h):
    """One Rprop update of one element; returns (p, prev, step_size, -)."""
    if h.maximize:
        g = -g
    prod = g * prev
    if prod > h.zero:
        factor = h.etaplus
    elif prod < h.zero:
        factor = h.etaminus
    else:                       # 0, or NaN (torch's sign(NaN) is 0)
        factor = h.one
    step_size = step_size * factor
    # torch's clamp(min, max): NaN stays NaN
    if step_size < h.step_size_min:
        step_size = h.step_size_min
    if step_size > h.step_size_max:
        step_size = h.step_size_max
    if factor == h.etaminus:    # the sign flipped: no move, and the gradient is forgotten
        g = h.zero
    # torch's sign(g): 0 for 0 and NaN
    sign = h.one if g > h.zero else (-h.one if g < h.zero else h.zero)
    p = p + (-sign) * step_size
    return p, g, step_size, unused


def rprop_scalars(group, step, cast):
    """Host scalars of param group ``group`` (nothing depends on the step)."""
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    return RpropScalars(
        etaminus=cast(etaminus),
        etaplus=cast(etaplus),
        step_size_min=cast(step_size_min),
        step_size_max=cast(step_size_max),
        one=cast(1.0),
        zero=cast(0.0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import _validate as _v  # noqa: E402
from .. import spec as _s  # noqa: E402
from . import reference_rprop_asgd as _reference  # noqa: E402


def _pair(name, value, where):
    prefix = f"{where}: " if where else ""
    if isinstance(value, (str, bytes)):
        values = ()
    else:
        try:
            values = tuple(value)
        except TypeError:
            values = ()
    if len(values) != 2:
        raise TypeError(f"{prefix}{name} must be a pair of numbers, got {value!r}")
    return values


def _etas(name):
    def check(value, where):
        etaminus, etaplus = _pair(name, value, where)
        etaminus = _v.number(f"{name}[0] (etaminus)", etaminus, low=0.0, high=1.0, low_open=True,
                             high_open=True, where=where)
        etaplus = _v.number(f"{name}[1] (etaplus)", etaplus, low=1.0, low_open=True, where=where)
        return (etaminus, etaplus)
    return check


def _step_sizes(name):
    def check(value, where):
        lo, hi = _pair(name, value, where)
        lo = _v.number(f"{name}[0] (the minimal step size)", lo, low=0.0, where=where)
        hi = _v.number(f"{name}[1] (the maximal step size)", hi, low=0.0, where=where)
        if lo > hi:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{name} must be (min, max) with min <= max, got {value!r}")
        return (lo, hi)
    return check


SPEC = _s.Spec(
    name="Rprop", functional="rprop", element=rprop_element, scalars=rprop_scalars,
    hypers=(_s.lr(1e-2),
            _s.hyper("etas", (0.5, 1.2), _etas,
                     bad=((0.0, 1.2), (1.0, 1.2), (0.5, 1.0), (-0.5, 1.2), (0.5, math.nan),
                          (0.5, math.inf), (0.5,), (0.5, 1.2, 2.0), 0.5, "0.5")),
            _s.hyper("step_sizes", (1e-6, 50), _step_sizes,
                     bad=((-1e-6, 50), (1e-3, 1e-6), (1e-6, math.nan), (math.nan, 50), (1e-6, math.inf),
                          (1e-6,), (1e-6, 50, 1), 50, "1e-6")),
            _s.maximize()),
    # step_size's functional argument is step_size_state: "step_sizes" names the bounds
    columns=(_s.Column("prev"),
             _s.Column("step_size", initial="lr", unsigned=True, argument="step_size_state")),
    reference=_reference.rprop, oracle="torch.optim.Rprop",
    doc="""Rprop: resilient backpropagation (a per-element step size, moved by the sign of
    the gradient).

    References:
      Riedmiller & Braun, IEEE ICNN 1993; torch.optim.Rprop (torch 2.13).
    ``etas=(etaminus, etaplus)`` with ``0 < etaminus < 1 < etaplus`` multiply an element's
    step size when its gradient's sign flips or stays; ``step_sizes=(min, max)`` bound it
    (finite, ``0 <= min <= max``). Where the sign flips the element does not move and its
    gradient is forgotten (``prev`` holds 0 there), as torch.
    State: ``prev`` (the previous gradient, zeroed where its sign flipped), ``step_size``
    (``lr`` initially), ``step``.
    """,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(maximize=True),
        dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True),
        dict(lr=0.05, etas=(0.7, 1.1), step_sizes=(0.0, 1.0)),
    ), full=dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True)),
    bench=(_s.BenchRow("rprop", dict(lr=1e-2)),),
)
