"""Keras 3's optimizer equations: one element per optimizer, Keras's state names.

References: keras/src/optimizers/*.py (Keras 3) and the optimizer docstrings there.
They differ from torch.optim's in placement, not in spirit:

- SGD keeps a velocity with the learning rate inside: ``v = momentum v - lr g``,
  ``w += v``; Nesterov ``w += momentum v - lr g``.
- RMSprop puts eps inside the square root and lr inside the momentum:
  ``inc = lr g / sqrt(s + eps)``, ``mom = momentum mom + inc``, ``w -= mom``.
- Adagrad starts its accumulator at 0.1 and puts eps inside the square root.
- Adam uses "epsilon hat": ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``,
  ``w -= m alpha / (sqrt(v) + eps)``.
- Adamax: ``w -= lr m / ((1 - b1^t)(u + eps))`` with ``u = max(b2 u, |g|)``.
- Nadam: the momentum schedule ``u_t = b1 (1 - 0.5 * 0.96^t)`` and its running product.
- Adadelta: ``delta = -sqrt(a + eps) g / sqrt(s + eps)``, ``w += lr delta``.

Every element starts with Keras's base-optimizer prologue: ``clipvalue`` (the gradient
clipped to [-clipvalue, clipvalue]) and decoupled weight decay ``w -= w * wd * lr``
applied before the update. ``clipnorm`` and ``global_clipnorm`` are gradient scales the
driver applies as it reads the gradient (per tensor or for the whole step), as is
``loss_scale_factor``'s ``1 / loss_scale_factor``.

Beside the optimizers: :func:`accumulate_element`, the pass of
``gradient_accumulation_steps`` (``acc += g / loss_scale_factor``), and
:func:`global_clip_factor`, Keras's ``clip_by_global_norm`` coefficient (host math).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# State names per optimizer, in the element's three state positions (Keras's variable names).
SLOTS = {
    "SGD": ("momentum", None, None),
    "RMSprop": ("velocity", "momentum", "average_gradient"),
    "Adagrad": ("accumulator", None, None),
    "Adam": ("momentum", "velocity", "velocity_hat"),
    "Adamax": ("momentum", "norm", None),
    "Nadam": ("momentum", "velocity", None),
    "Adadelta": ("accumulated_grad", "accumulated_delta_var", None),
}


class KerasSGDScalars(NamedTuple):
    lr: float
    momentum: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool
    has_momentum: bool
    nesterov: bool


def keras_sgd_element(p, g, v, unused1, unused2, h):
    """Keras SGD; returns (w, momentum, -, -)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    if h.has_momentum:
        v = v * h.momentum - g * h.lr
        if h.nesterov:
            p = p + (v * h.momentum - g * h.lr)
        else:
            p = p + v
    else:
        p = p - g * h.lr
    return p, v, unused1, unused2


class KerasRMSpropScalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    momentum: float
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool
    has_momentum: bool
    centered: bool


def keras_rmsprop_element(p, g, velocity, mom, avg, h):
    """Keras RMSprop; returns (w, velocity, momentum, average_gradient)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    velocity = h.rho * velocity + h.one_minus_rho * (g * g)
    if h.centered:
        avg = h.rho * avg + h.one_minus_rho * g
        denominator = velocity - avg * avg + h.eps
    else:
        denominator = velocity + h.eps
    increment = (h.lr * g) / math.sqrt(denominator)
    if h.has_momentum:
        mom = h.momentum * mom + increment
        p = p - mom
    else:
        p = p - increment
    return p, velocity, mom, avg


class KerasAdagradScalars(NamedTuple):
    lr: float
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool


def keras_adagrad_element(p, g, acc, unused1, unused2, h):
    """Keras Adagrad; returns (w, accumulator, -, -)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    acc = acc + g * g
    p = p - (h.lr * g) / math.sqrt(acc + h.eps)
    return p, acc, unused1, unused2


class KerasAdamScalars(NamedTuple):
    lr: float
    alpha: float               # lr sqrt(1 - b2^t) / (1 - b1^t)
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool
    amsgrad: bool


def keras_adam_element(p, g, m, v, v_hat, h):
    """Keras Adam and AdamW; returns (w, momentum, velocity, velocity_hat)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    m = m + (g - m) * h.one_minus_beta1
    v = v + (g * g - v) * h.one_minus_beta2
    if h.amsgrad:
        if v > v_hat or v != v:   # ops.maximum: NaN propagates
            v_hat = v
        second = v_hat
    else:
        second = v
    p = p - (m * h.alpha) / (math.sqrt(second) + h.eps)
    return p, m, v, v_hat


class KerasAdamaxScalars(NamedTuple):
    lr: float
    beta2: float
    one_minus_beta1: float
    bias_correction1: float    # 1 - b1^t
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool


def keras_adamax_element(p, g, m, u, unused, h):
    """Keras Adamax; returns (w, momentum, norm, -)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    m = m + (g - m) * h.one_minus_beta1
    u = h.beta2 * u
    a = abs(g)
    if a > u or a != a:
        u = a
    p = p - (h.lr * m) / (h.bias_correction1 * (u + h.eps))
    return p, m, u, unused


class KerasNadamScalars(NamedTuple):
    lr: float
    one_minus_beta1: float
    one_minus_beta2: float
    u_next: float              # u_{t+1}
    one_minus_u: float         # 1 - u_t
    one_minus_product: float   # 1 - prod_{s<=t} u_s
    one_minus_product_next: float  # 1 - prod_{s<=t} u_s * u_{t+1}
    bias_correction2: float    # 1 - b2^t
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool


def keras_nadam_element(p, g, m, v, unused, h):
    """Keras Nadam; returns (w, momentum, velocity, -)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    m = m + (g - m) * h.one_minus_beta1
    v = v + (g * g - v) * h.one_minus_beta2
    m_hat = (h.u_next * m) / h.one_minus_product_next + (h.one_minus_u * g) / h.one_minus_product
    v_hat = v / h.bias_correction2
    p = p - (m_hat * h.lr) / (math.sqrt(v_hat) + h.eps)
    return p, m, v, unused


class KerasAdadeltaScalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    eps: float
    clip_lo: float
    clip_hi: float
    weight_decay: float
    clip: bool
    decay: bool


def keras_adadelta_element(p, g, acc_grad, acc_delta, unused, h):
    """Keras Adadelta; returns (w, accumulated_grad, accumulated_delta_var, -)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    acc_grad = h.rho * acc_grad + h.one_minus_rho * (g * g)
    delta = -((math.sqrt(acc_delta + h.eps) * g) / math.sqrt(acc_grad + h.eps))
    acc_delta = h.rho * acc_delta + h.one_minus_rho * (delta * delta)
    p = p + h.lr * delta
    return p, acc_grad, acc_delta, unused


ELEMENTS = {
    "SGD": keras_sgd_element,
    "RMSprop": keras_rmsprop_element,
    "Adagrad": keras_adagrad_element,
    "Adam": keras_adam_element,
    "Adamax": keras_adamax_element,
    "Nadam": keras_nadam_element,
    "Adadelta": keras_adadelta_element,
}


def nadam_u(step, beta1):
    """Keras Nadam's momentum schedule ``u_t = b1 (1 - 0.5 * 0.96^t)``."""
    return beta1 * (1.0 - 0.5 * 0.96 ** step)


def keras_scalars(kind, hp, step, lr, cast, u_product=1.0):
    """The element scalars of optimizer ``kind`` for iteration ``step`` (1-based).

    ``hp`` holds Keras's hyperparameter names; ``lr`` is this step's learning rate;
    ``u_product`` is Nadam's running product including ``u_t``.
    """
    clipvalue = hp.get("clipvalue")
    wd = hp.get("weight_decay")
    common = dict(clip_lo=cast(-(clipvalue or 0.0)), clip_hi=cast(clipvalue or 0.0),
                  weight_decay=cast(wd or 0.0), clip=bool(clipvalue), decay=bool(wd))
    if kind == "SGD":
        return KerasSGDScalars(lr=cast(lr), momentum=cast(hp["momentum"]),
                               has_momentum=bool(hp["momentum"] != 0),
                               nesterov=bool(hp["nesterov"]), **common)
    if kind == "RMSprop":
        return KerasRMSpropScalars(lr=cast(lr), rho=cast(hp["rho"]), one_minus_rho=cast(1.0 - hp["rho"]),
                                   momentum=cast(hp["momentum"]), eps=cast(hp["epsilon"]),
                                   has_momentum=bool(hp["momentum"] > 0),
                                   centered=bool(hp["centered"]), **common)
    if kind == "Adagrad":
        return KerasAdagradScalars(lr=cast(lr), eps=cast(hp["epsilon"]), **common)
    b1 = hp.get("beta_1", 0.0)
    b2 = hp.get("beta_2", 0.0)
    if kind == "Adam":
        return KerasAdamScalars(lr=cast(lr), alpha=cast(lr * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)),
                                one_minus_beta1=cast(1.0 - b1), one_minus_beta2=cast(1.0 - b2),
                                eps=cast(hp["epsilon"]), amsgrad=bool(hp["amsgrad"]), **common)
    if kind == "Adamax":
        return KerasAdamaxScalars(lr=cast(lr), beta2=cast(b2), one_minus_beta1=cast(1.0 - b1),
                                  bias_correction1=cast(1.0 - b1 ** step), eps=cast(hp["epsilon"]),
                                  **common)
    if kind == "Nadam":
        u_t = nadam_u(step, b1)
        u_next = nadam_u(step + 1, b1)
        return KerasNadamScalars(lr=cast(lr), one_minus_beta1=cast(1.0 - b1), one_minus_beta2=cast(1.0 - b2),
                                 u_next=cast(u_next), one_minus_u=cast(1.0 - u_t),
                                 one_minus_product=cast(1.0 - u_product),
                                 one_minus_product_next=cast(1.0 - u_product * u_next),
                                 bias_correction2=cast(1.0 - b2 ** step), eps=cast(hp["epsilon"]),
                                 **common)
    if kind == "Adadelta":
        return KerasAdadeltaScalars(lr=cast(lr), rho=cast(hp["rho"]), one_minus_rho=cast(1.0 - hp["rho"]),
                                    eps=cast(hp["epsilon"]), **common)
    raise ValueError(f"unknown Keras optimizer {kind!r}")


def global_clip_factor(norm, clip):
    """Keras's ``clip_by_global_norm`` coefficient: ``clip * min(1 / norm, 1 / clip)``
    plus ``norm - norm``, so a non-finite norm gives NaN (Keras's rule; a zero norm gives 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(clip * min(np.float64(1.0) / norm, 1.0 / clip) + (norm - norm))


class AccumulateScalars(NamedTuple):
    zero: float                # unused: the driver's grad_scale carries 1 / loss_scale_factor


def accumulate_element(acc, g, s0, s1, s2, h):
    """Gradient accumulation: the accumulators run in the params column, the gradients
    (already multiplied by the driver's grad_scale) in the grads column; ``acc + g``."""
    return acc + g, s0, s1, s2


class SquareScalars(NamedTuple):
    zero: float


def grad_square(p, g, s0, s1, s2, h):
    """Reducer: (g^2, 0), for clipnorm and global_clipnorm."""
    return g * g, h.zero
