"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

References:
  Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
  Equations as optax.lion (``chain(scale_by_lion(b1, b2), add_decayed_weights(wd),
  scale(-lr))``): ``c = (1 - b1) g + b1 m``, ``p -= lr (sign(c) + wd p)``,
  ``m = (1 - b2) g + b2 m``. fastopt's names: ``lr`` = optax's ``learning_rate``,
  ``betas = (b1, b2)``; the state ``exp_avg`` is optax's ``mu``.
"""
from __future__ import annotations

from typing import NamedTuple

SLOTS = ("exp_avg", None, None)


class LionScalars(NamedTuple):
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    one: float
    zero: float
    decay: bool
    maximize: bool


def lion_element(p, g, m, unused1, unused2, h):
    """One Lion update of one element; returns (p, exp_avg, -, -)."""
    if h.maximize:
        g = -g
    c = h.one_minus_beta1 * g + h.beta1 * m
    # sign(c), with sign(0) = 0 and sign(NaN) = NaN as jnp.sign
    s = h.one if c > h.zero else (-h.one if c < h.zero else c)
    if h.decay:
        s = s + h.weight_decay * p
    p = p - h.lr * s
    m = h.one_minus_beta2 * g + h.beta2 * m
    return p, m, unused1, unused2


def lion_scalars(lr, beta1, beta2, weight_decay, maximize, cast):
    return LionScalars(
        lr=cast(lr),
        beta1=cast(beta1),
        one_minus_beta1=cast(1.0 - beta1),
        beta2=cast(beta2),
        one_minus_beta2=cast(1.0 - beta2),
        weight_decay=cast(weight_decay),
        one=cast(1.0),
        zero=cast(0.0),
        decay=bool(weight_decay != 0),
        maximize=bool(maximize),
    )
