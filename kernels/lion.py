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


def lion_scalars(group, step, cast):
    """Host scalars of param group ``group`` (the same at every step)."""
    (beta1, beta2), weight_decay = group["betas"], group["weight_decay"]
    return LionScalars(
        lr=cast(group["lr"]),
        beta1=cast(beta1),
        one_minus_beta1=cast(1.0 - beta1),
        beta2=cast(beta2),
        one_minus_beta2=cast(1.0 - beta2),
        weight_decay=cast(weight_decay),
        one=cast(1.0),
        zero=cast(0.0),
        decay=bool(weight_decay != 0),
        maximize=bool(group["maximize"]),
    )


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="Lion", functional="lion", element=lion_element, scalars=lion_scalars,
    hypers=(_s.lr(1e-4), _s.hyper("betas", (0.9, 0.99), _s.betas()), _s.weight_decay(1e-3),
            _s.maximize()),
    columns=(_s.Column("exp_avg"),), step_state=False,
    reference=_reference.lion, oracle="optax.lion",
    doc="""Lion (EvoLved Sign Momentum), with optax's equations and defaults.

    References:
      Chen et al., NeurIPS 2023; optax.lion.
    Names: ``lr`` is optax's ``learning_rate`` (optax has no default; 1e-4 here, 3-10x
    below a typical AdamW lr as the paper advises), ``betas = (b1, b2) = (0.9, 0.99)``,
    ``weight_decay = 1e-3`` as optax (decoupled: ``p -= lr (sign(c) + wd p)``).
    State: ``exp_avg`` (optax's ``mu``).
    """,
    examples=_s.Examples(base=dict(lr=1e-3), grid=(
        {}, dict(betas=(0.8, 0.95), weight_decay=0.1, maximize=True),
        dict(weight_decay=0.0, maximize=True),
    ), full=dict(betas=(0.8, 0.95), weight_decay=0.1, maximize=True)),
    bench=(_s.BenchRow("lion", dict(lr=1e-4)),),
)
