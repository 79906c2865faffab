"""Lookahead's slow-weight update: the per-element function, its host scalars and its
NumPy form.

References:
  Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
  NeurIPS 2019; the order of operations, the pullback options and the names of
  ``pytorch_optimizer.Lookahead`` (pytorch-optimizer 4.1.0).

Every k inner steps, for each param that had a gradient::

    fast          = lerp(fast, slow, 1 - alpha)     (= slow + alpha (fast - slow))
    slow          = fast
    momentum      = lerp(momentum, slow_momentum, 1 - alpha); slow_momentum = momentum
                                                              (pullback_momentum="pullback")
    momentum      = 0                                         (pullback_momentum="reset")

``momentum`` is the inner optimizer's ``momentum_buffer`` (SGD's), as the oracle has it.
The element runs through the generic drivers (kernels/cpu.py, kernels/cuda.py) over a
table whose gradient column is the params themselves: the element never reads it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .pieces import lerp


class LookaheadScalars(NamedTuple):
    weight: float               # 1 - alpha: torch's lerp(fast, slow, 1 - alpha)
    back: float                 # 1 - weight in math precision (lerp's second form)
    zero: float                 # 0 in the math type (the reset momentum)
    from_end: bool              # torch's lerp takes its second form when the weight >= 0.5
    pullback: bool              # interpolate the inner momentum toward its slow copy
    reset: bool                 # zero the inner momentum


def lookahead_element(p, g, slow, momentum, slow_momentum, h):
    """One element's slow-weight update; returns ``(p, slow, momentum, slow_momentum)``.
    ``g`` is unused (the table's gradient column is the param)."""
    p = lerp(p, slow, h.weight, h.back, h.from_end)
    slow = p
    if h.pullback:
        momentum = lerp(momentum, slow_momentum, h.weight, h.back, h.from_end)
        slow_momentum = momentum
    elif h.reset:
        momentum = h.zero
    return p, slow, momentum, slow_momentum


def lookahead_scalars(alpha, pullback_momentum, cast) -> LookaheadScalars:
    weight = cast(1.0 - float(alpha))
    return LookaheadScalars(weight=weight, back=cast(cast(1.0) - weight), zero=cast(0.0),
                            from_end=bool(1.0 - float(alpha) >= 0.5),
                            pullback=pullback_momentum == "pullback",
                            reset=pullback_momentum == "reset")


def lerp_numpy(start, end, weight):
    """torch.lerp(start, end, weight) in vectorised NumPy, both of its forms, in place."""
    w = start.dtype.type(weight)
    if weight < 0.5:
        start += w * (end - start)
    else:
        start[...] = end - (end - start) * (start.dtype.type(1) - w)


def lookahead_numpy(params, slows, momenta, slow_momenta, alpha, pullback_momentum) -> None:
    """The ``"numpy"`` backend: the same update tensor by tensor, vectorised."""
    for i, (p, slow) in enumerate(zip(params, slows)):
        lerp_numpy(p, slow, 1.0 - float(alpha))
        slow[...] = p
        m = momenta[i] if momenta is not None else None
        if m is None:
            continue
        if pullback_momentum == "pullback":
            lerp_numpy(m, slow_momenta[i], 1.0 - float(alpha))
            slow_momenta[i][...] = m
        elif pullback_momentum == "reset":
            m[...] = np.zeros((), m.dtype)
