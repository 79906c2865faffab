"""LAMB: Adam's direction scaled per tensor by the trust ratio ||p|| / ||update||.

References:
  You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes", ICLR 2020.
  Equations as optax.lamb (``chain(scale_by_adam(b1, b2, eps, eps_root),
  add_decayed_weights(wd), scale_by_trust_ratio(), scale(-lr))``):
  ``m = (1 - b1) g + b1 m``, ``v = (1 - b2) g^2 + b2 v``,
  ``u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps) + wd p``,
  ``ratio = ||p|| / ||u||`` per tensor (1 where either norm is 0, as optax),
  ``p -= lr * ratio * u``. fastopt's names: ``lr`` = optax's ``learning_rate``,
  ``betas = (b1, b2)``; states ``exp_avg``, ``exp_avg_sq`` are optax's ``mu``, ``nu``.

Two passes (:mod:`fastopt.kernels.per_tensor`), 40 bytes per float32 parameter:

1. :func:`lamb_moments` (a reduction that writes): reads p, g, m, v; writes the new
   moments; sums ``||p||^2`` and ``||u||^2`` per tensor.
2. :func:`lamb_element`: reads p and the new moments, recomputes ``u`` from them (the
   same operations on the same values: the same bits as in pass 1) and writes
   ``p - lr * ratio * u``; the per-tensor driver passes the ratio in the third state
   position. The gradient is not read again and the moments are not written again.

Recomputing the moments in pass 2 instead (pass 1 then writes nothing) moves 44 bytes.
That is the form of int8 (blockwise) state (fastopt/_passes.py, ``recompute``): pass 1
reads p, g and the decoded moments and stores nothing; pass 2 recomputes the moments,
applies the update with them and stores them quantized. The sums and the update thus see
the same float32 moments, and each moment is quantized once per step, after the update
used it, as in every other int8 optimizer (and bitsandbytes' 32-bit LAMB, which takes
the update norm from the unquantized new moments and recomputes them in its update
kernel; its 8-bit blockwise LAMB has no trust ratio at all). Storing quantized moments
in pass 1 instead would have the update, and its norm, read moments carrying this step's
quantization error. Bytes per parameter: 10 + 16 = 26 (1-byte codes, absmax aside).

The bias corrections multiply by host reciprocals where optax divides: each pass then
has one division and one square root per element instead of three and one, which on
a 2-core machine is the difference between a compute-bound step and one at the memory
roof; the results differ from optax's order by about one ulp of ``u``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np



class LambScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    inv_bias_correction1: float    # 1 / (1 - b1^t)
    inv_bias_correction2: float    # 1 / (1 - b2^t)
    eps: float
    eps_root: float
    weight_decay: float
    grad_scale: float          # the step's gradient multiplier (pass 1 only)
    decay: bool
    recompute: bool = False    # pass 2 gets the old moments and updates them (int8 state)


# Pass 1 writes the moments, pass 2 the param (the drivers' write masks).
MOMENTS_WRITES = (False, True, True, False)     # (p, s0, s1, s2)
STEP_WRITES = (False, False, False)             # state slots written by lamb_element


def lamb_moments(p, g, m, v, unused, h):
    """Pass 1 for one element: (p^2, u^2, p, new m, new v, -); the driver stores m and v."""
    g = g * h.grad_scale
    m = h.one_minus_beta1 * g + h.beta1 * m
    v = (h.one_minus_beta2 * g) * g + h.beta2 * v
    u = (m * h.inv_bias_correction1) / (math.sqrt(v * h.inv_bias_correction2 + h.eps_root) + h.eps)
    if h.decay:
        u = u + h.weight_decay * p
    return p * p, u * u, p, m, v, unused


def lamb_element(p, g, m, v, ratio, h):
    """Pass 2 for one element: the moments are pass 1's (read-only) and ``ratio`` is the
    tensor's trust ratio (read-only); ``g`` is not used. With ``h.recompute`` (int8 state)
    the moments are the old ones and ``g`` the scaled gradient: they are updated as pass 1
    updated them (the same bits) and returned to be stored. Returns (p, m, v, ratio)."""
    if h.recompute:
        m = h.one_minus_beta1 * g + h.beta1 * m
        v = (h.one_minus_beta2 * g) * g + h.beta2 * v
    u = (m * h.inv_bias_correction1) / (math.sqrt(v * h.inv_bias_correction2 + h.eps_root) + h.eps)
    if h.decay:
        u = u + h.weight_decay * p
    p = p - h.lr * (u * ratio)
    return p, m, v, ratio


def lamb_scalars(group, step, cast):
    """Host scalars of ``group`` for step ``step`` (1-based), computed in float64 then cast."""
    lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
    return LambScalars(
        lr=cast(lr),
        beta1=cast(beta1),
        beta2=cast(beta2),
        one_minus_beta1=cast(1.0 - beta1),
        one_minus_beta2=cast(1.0 - beta2),
        inv_bias_correction1=cast(1.0 / (1.0 - beta1 ** step)),
        inv_bias_correction2=cast(1.0 / (1.0 - beta2 ** step)),
        eps=cast(group["eps"]),
        eps_root=cast(group["eps_root"]),
        weight_decay=cast(weight_decay),
        grad_scale=cast(1.0),
        decay=bool(weight_decay != 0),
    )


def trust_ratios(param_sq, update_sq, trust_coefficient=1.0, eps=0.0):
    """optax's scale_by_trust_ratio per tensor, from the squared norms (float64).

    ``trust_coefficient * ||p|| / (||u|| + eps)``, and 1 where ``||p||`` or ``||u||`` is 0.
    """
    param_norm = np.sqrt(np.asarray(param_sq, dtype=np.float64))
    update_norm = np.sqrt(np.asarray(update_sq, dtype=np.float64))
    ratio = np.ones_like(param_norm)
    # Divides only where both norms are non-zero (no warnings to silence; NaN and inf
    # norms still divide, as optax's).
    np.divide(trust_coefficient * param_norm, update_norm + eps, out=ratio,
              where=(param_norm != 0) & (update_norm != 0))
    return ratio


# -- the declaration -------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


SPEC = _s.Spec(
    name="LAMB", functional="lamb", element=lamb_element, scalars=lamb_scalars,
    hypers=(_s.lr(1e-3), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-6),
            _s.weight_decay(), _s.hyper("eps_root", 0.0, _s.real(low=0.0), keyword=True)),
    columns=(_s.Column("exp_avg"), _s.Column("exp_avg_sq", unsigned=True)),
    per_tensor=_s.PerTensor(reducer=lamb_moments, writes=MOMENTS_WRITES, step_writes=STEP_WRITES,
                            values=lambda group, sums: trust_ratios(sums[:, 0], sums[:, 1])),
    reference=_reference.lamb, oracle="optax.lamb",
    doc="""LAMB: Adam's direction (plus decoupled weight decay) times ||p|| / ||update||.

    References:
      You et al., ICLR 2020; optax.lamb.
    Names: ``lr`` is optax's ``learning_rate`` (no default in optax; 1e-3 here),
    ``betas = (b1, b2)``; ``eps = 1e-6``, ``eps_root = 0``, ``weight_decay = 0`` as optax.
    The trust ratio is 1 for a tensor whose param or update norm is 0 (optax).
    State: ``exp_avg``, ``exp_avg_sq`` (optax's ``mu``, ``nu``), ``step``.
    """,
    examples=_s.Examples(base=dict(lr=1e-2), grid=(
        {}, dict(betas=(0.8, 0.99), eps=1e-4, eps_root=1e-8, weight_decay=0.1),
    ), full=dict(betas=(0.8, 0.99), eps=1e-4, eps_root=1e-8, weight_decay=0.1)),
    bench=(_s.BenchRow("lamb", dict(lr=1e-3), passes=("reduce: p g s0 s1 -> s0 s1", "p s0 s1 -> p")),),
)
