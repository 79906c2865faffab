"""Exponential moving average of weights: the per-element update, the swap, the NumPy reference.

The EMA pass runs through the generic step drivers with the *shadow* (averaged) arrays
in the params column, which the driver writes, and the model's weights in the grads
column, which it only reads (multiplied by a grad_scale of exactly 1).

References:
  torch.optim.swa_utils.get_ema_multi_avg_fn (torch 2.13): the shadow is updated as
  ``torch.lerp(shadow, param, 1 - decay)``; torch.lerp's formula
  (``weight < 0.5 ? start + weight * (end - start) : end - (end - start) * (1 - weight)``)
  is reproduced here, evaluated in the storage dtype without fused multiply-adds (torch's
  vectorised CPU kernel fuses them, so the two may differ in the last bit).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class EmaScalars(NamedTuple):
    weight: float             # 1 - decay, in the storage dtype
    one_minus_weight: float   # 1 - weight, computed in the storage dtype (torch's opmath)
    small: bool               # |weight| < 0.5: torch.lerp's branch

    RUNTIME_FLAGS = ("small",)    # a warm-up's decay crosses 0.5 mid-run (specialize.flags_of)


def ema_scalars(decay: float, cast) -> EmaScalars:
    weight = cast(1.0 - decay)
    return EmaScalars(weight=weight, one_minus_weight=cast(cast(1.0) - weight),
                      small=bool(abs(float(weight)) < 0.5))


def ema_element(s, p, s0, s1, s2, h):
    """shadow <- lerp(shadow, param, 1 - decay); returns (shadow, s0, s1, s2) unchanged slots."""
    d = p - s
    if h.small:
        s = s + h.weight * d
    else:
        s = p - d * h.one_minus_weight
    return s, s0, s1, s2


def swap_element(s, p, q, s1, s2, h):
    """Exchange shadow and param: run with the params in the grads column *and* in state
    slot 0 (the same address): the shadow takes ``p``, slot 0 (the param) takes ``s``."""
    return p, s, s1, s2


def ema_reference(shadows, params, h: EmaScalars) -> None:
    """The NumPy reference of :func:`ema_element` over lists of arrays, in place."""
    for s, p in zip(shadows, params):
        d = p - s
        if h.small:
            s += h.weight * d
        else:
            np.subtract(p, d * h.one_minus_weight, out=s)
