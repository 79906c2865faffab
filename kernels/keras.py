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

Each element has its spec (fastopt/spec.py) at the end of this file: Keras's
hyperparameter names and defaults (then the base options ``weight_decay``, ``clipnorm``,
``clipvalue``, ``global_clipnorm``), its state variables under Keras's names, its scalars
(of the param group, with this call's ``learning_rate``), its reference in
kernels/reference.py, Nadam's ``u_product`` as host state, and its bench row;
fastopt.keras makes its classes from :data:`SPECS`. ``clipnorm`` is the per-tensor pass
:data:`CLIPNORM` (the specs with it: :data:`CLIPPED`).

Beside the optimizers: :func:`accumulate_element`, the pass of
``gradient_accumulation_steps`` (``acc += g / loss_scale_factor``), and
:func:`global_clip_factor`, Keras's ``clip_by_global_norm`` coefficient (host math).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

import numpy as np

from .. import _validate as v
from .pieces import keras_prologue

# The fields every Keras scalars tuple ends with: the learning rate and the prologue's
# (kernels/pieces.py: keras_prologue), filled by _common below; ``grad_scale`` is set by
# the clipnorm pass (kernels/per_tensor.py).
COMMON_FIELDS = (("lr", float), ("clip_lo", float), ("clip_hi", float), ("weight_decay", float),
                 ("clip", bool), ("decay", bool), ("grad_scale", float))


def keras_scalars(cls):
    """A NamedTuple of ``cls``'s annotated fields followed by :data:`COMMON_FIELDS`."""
    return NamedTuple(cls.__name__, [*cls.__annotations__.items(), *COMMON_FIELDS])


@keras_scalars
class KerasSGDScalars:
    momentum: float
    has_momentum: bool
    nesterov: bool


def keras_sgd_element(p, g, v, unused1, unused2, h):
    """Keras SGD; returns (w, momentum, -, -)."""
    p, g = keras_prologue(p, g, h)
    if h.has_momentum:
        v = v * h.momentum - g * h.lr
        if h.nesterov:
            p = p + (v * h.momentum - g * h.lr)
        else:
            p = p + v
    else:
        p = p - g * h.lr
    return p, v, unused1, unused2


@keras_scalars
class KerasRMSpropScalars:
    rho: float
    one_minus_rho: float
    momentum: float
    eps: float
    has_momentum: bool
    centered: bool


def keras_rmsprop_element(p, g, velocity, mom, avg, h):
    """Keras RMSprop; returns (w, velocity, momentum, average_gradient)."""
    p, g = keras_prologue(p, g, h)
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


@keras_scalars
class KerasAdagradScalars:
    eps: float


def keras_adagrad_element(p, g, acc, unused1, unused2, h):
    """Keras Adagrad; returns (w, accumulator, -, -)."""
    p, g = keras_prologue(p, g, h)
    acc = acc + g * g
    p = p - (h.lr * g) / math.sqrt(acc + h.eps)
    return p, acc, unused1, unused2


@keras_scalars
class KerasAdamScalars:
    alpha: float               # lr sqrt(1 - b2^t) / (1 - b1^t)
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    amsgrad: bool


def keras_adam_element(p, g, m, v, v_hat, h):
    """Keras Adam and AdamW; returns (w, momentum, velocity, velocity_hat)."""
    p, g = keras_prologue(p, g, h)
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


@keras_scalars
class KerasAdamaxScalars:
    beta2: float
    one_minus_beta1: float
    bias_correction1: float    # 1 - b1^t
    eps: float


def keras_adamax_element(p, g, m, u, unused, h):
    """Keras Adamax; returns (w, momentum, norm, -)."""
    p, g = keras_prologue(p, g, h)
    m = m + (g - m) * h.one_minus_beta1
    u = h.beta2 * u
    a = abs(g)
    if a > u or a != a:
        u = a
    p = p - (h.lr * m) / (h.bias_correction1 * (u + h.eps))
    return p, m, u, unused


@keras_scalars
class KerasNadamScalars:
    one_minus_beta1: float
    one_minus_beta2: float
    u_next: float              # u_{t+1}
    one_minus_u: float         # 1 - u_t
    one_minus_product: float   # 1 - prod_{s<=t} u_s
    one_minus_product_next: float  # 1 - prod_{s<=t} u_s * u_{t+1}
    bias_correction2: float    # 1 - b2^t
    eps: float


def keras_nadam_element(p, g, m, v, unused, h):
    """Keras Nadam; returns (w, momentum, velocity, -)."""
    p, g = keras_prologue(p, g, h)
    m = m + (g - m) * h.one_minus_beta1
    v = v + (g * g - v) * h.one_minus_beta2
    m_hat = (h.u_next * m) / h.one_minus_product_next + (h.one_minus_u * g) / h.one_minus_product
    v_hat = v / h.bias_correction2
    p = p - (m_hat * h.lr) / (math.sqrt(v_hat) + h.eps)
    return p, m, v, unused


@keras_scalars
class KerasAdadeltaScalars:
    rho: float
    one_minus_rho: float
    eps: float


def keras_adadelta_element(p, g, acc_grad, acc_delta, unused, h):
    """Keras Adadelta; returns (w, accumulated_grad, accumulated_delta_var, -)."""
    p, g = keras_prologue(p, g, h)
    acc_grad = h.rho * acc_grad + h.one_minus_rho * (g * g)
    delta = -((math.sqrt(acc_delta + h.eps) * g) / math.sqrt(acc_grad + h.eps))
    acc_delta = h.rho * acc_delta + h.one_minus_rho * (delta * delta)
    p = p + h.lr * delta
    return p, acc_grad, acc_delta, unused


def nadam_u(step, beta1):
    """Keras Nadam's momentum schedule ``u_t = b1 (1 - 0.5 * 0.96^t)``."""
    return beta1 * (1.0 - 0.5 * 0.96 ** step)


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
    grad_scale: float


def grad_square(p, g, s0, s1, s2, h):
    """clipnorm's reducer: ((g grad_scale)^2, 0), the gradient as the step sees it."""
    g = g * h.grad_scale
    return g * g, h.grad_scale - h.grad_scale


# -- the declarations (fastopt/spec.py): Keras's names, defaults and state variables ---------------
from .. import spec as _s  # noqa: E402
from . import reference as _reference  # noqa: E402


def _optional(name):
    """None or 0 (off, as Keras treats them) or a finite number >= 0."""
    def check(value, where):
        return None if value is None else v.number(name, value, low=0.0, where=where)
    return check


def _learning_rate(value, where):
    """A number >= 0, or a schedule / callable the owner resolves at each call."""
    return value if callable(value) else v.number("learning_rate", value, low=0.0, where=where)


_CLIPS = ("clipnorm", "clipvalue", "global_clipnorm")


def _one_clip(group, where):
    if sum(group[name] is not None for name in _CLIPS) > 1:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}only one of clipnorm, clipvalue and global_clipnorm can be set, got "
                         + ", ".join(f"{n}={group[n]}" for n in _CLIPS))


# The base optimizer's options, after each optimizer's own hyperparameters (Keras's order).
_WEIGHT_DECAY = _s.Hyper("weight_decay", None, _optional("weight_decay"))
_OPTIONS = (_WEIGHT_DECAY, *(_s.Hyper(n, None, _optional(n)) for n in _CLIPS))
_EPSILON = _s.hyper("epsilon", 1e-7, _s.real(low=0.0))


def _unit(name, default):
    return _s.hyper(name, default, _s.real(low=0.0, high=1.0))


def _beta(name, default):
    return _s.hyper(name, default, _s.real(low=0.0, high=1.0, high_open=True))


def _common(group, cast) -> dict:
    """The fields every Keras scalars tuple shares, to splat into it: ``lr`` and the
    prologue's (clipvalue's bounds, decoupled weight decay, the driver's ``grad_scale``),
    computed once here for every optimizer's scalars function below."""
    clipvalue, wd = group["clipvalue"], group["weight_decay"]
    return dict(lr=cast(group["learning_rate"]), clip_lo=cast(-(clipvalue or 0.0)),
                clip_hi=cast(clipvalue or 0.0), weight_decay=cast(wd or 0.0),
                clip=bool(clipvalue), decay=bool(wd), grad_scale=cast(1.0))


def _clipped_reference(fn):
    """``reference_call`` of a Keras reference: clipnorm and clipvalue (Keras's order: on
    the gradients as the step sees them), then ``fn`` over the columns it takes."""
    names = inspect.signature(fn).parameters
    n_columns = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in names.values()) - 2

    def call(group, step, params, grads, slots):
        grads = _reference.keras_clip(grads, clipnorm=group["clipnorm"], clipvalue=group["clipvalue"])
        given = {**group, "lr": group["learning_rate"], "step": step}
        fn(params, grads, *slots[:n_columns], **{k: given[k] for k in names if k in given
                                                   and k not in ("params", "grads")})
    return call


def _spec(name, element, scalars, hypers, columns, reference, *, learning_rate=0.001, **fields):
    """A Keras optimizer: ``learning_rate``, its own hyperparameters, then the options."""
    own = {h.name for h in hypers}
    return _s.Spec(
        name=name, element=element, scalars=scalars, columns=columns, step_state=False,
        hypers=(_s.Hyper("learning_rate", learning_rate, _learning_rate), *hypers,
                *(h for h in _OPTIONS if h.name not in own)),
        reference=reference, reference_call=_clipped_reference(reference), check=_one_clip,
        oracle=f"keras.optimizers.{name}", **fields)


def _no_decay(group, where):
    if group["weight_decay"]:
        raise ValueError(f"{where}: sparse row updates cannot apply weight_decay (Keras decays "
                         "the whole variable); pass the dense gradient")


def _rows(reference, all_seen=None):
    """Sparse rows that step in place (SGD, Adagrad); the reference steps the gradient
    scattered into zeros (clipnorm is already in the rows' scale)."""
    call = _clipped_reference(reference)

    def rows_reference(group, step, param, index, rows, slots):
        dense = np.zeros_like(param)
        dense[index] = rows
        call({**group, "clipnorm": None}, step, [param], [dense],
             tuple(None if s is None else [s] for s in slots))
    return _s.Sparse(check=_no_decay, all_seen=all_seen, reference=rows_reference)


def sgd_scalars(group, step, cast):
    return KerasSGDScalars(momentum=cast(group["momentum"]), has_momentum=bool(group["momentum"] != 0),
                           nesterov=bool(group["nesterov"]), **_common(group, cast))


def rmsprop_scalars(group, step, cast):
    rho = group["rho"]
    return KerasRMSpropScalars(rho=cast(rho), one_minus_rho=cast(1.0 - rho),
                               momentum=cast(group["momentum"]), eps=cast(group["epsilon"]),
                               has_momentum=bool(group["momentum"] > 0),
                               centered=bool(group["centered"]), **_common(group, cast))


def adagrad_scalars(group, step, cast):
    return KerasAdagradScalars(eps=cast(group["epsilon"]), **_common(group, cast))


def adam_scalars(group, step, cast):
    b1, b2 = group["beta_1"], group["beta_2"]
    alpha = group["learning_rate"] * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
    return KerasAdamScalars(alpha=cast(alpha), one_minus_beta1=cast(1.0 - b1),
                            one_minus_beta2=cast(1.0 - b2), eps=cast(group["epsilon"]),
                            amsgrad=bool(group["amsgrad"]), **_common(group, cast))


def adamax_scalars(group, step, cast):
    b1, b2 = group["beta_1"], group["beta_2"]
    return KerasAdamaxScalars(beta2=cast(b2), one_minus_beta1=cast(1.0 - b1),
                              bias_correction1=cast(1.0 - b1 ** step), eps=cast(group["epsilon"]),
                              **_common(group, cast))


def nadam_scalars(group, step, cast):
    """``group["u_product"]`` is ``u_1 ... u_t``, this step's included."""
    b1, b2, u_product = group["beta_1"], group["beta_2"], group["u_product"]
    u_next = nadam_u(step + 1, b1)
    return KerasNadamScalars(one_minus_beta1=cast(1.0 - b1), one_minus_beta2=cast(1.0 - b2),
                             u_next=cast(u_next), one_minus_u=cast(1.0 - nadam_u(step, b1)),
                             one_minus_product=cast(1.0 - u_product),
                             one_minus_product_next=cast(1.0 - u_product * u_next),
                             bias_correction2=cast(1.0 - b2 ** step), eps=cast(group["epsilon"]),
                             **_common(group, cast))


def adadelta_scalars(group, step, cast):
    rho = group["rho"]
    return KerasAdadeltaScalars(rho=cast(rho), one_minus_rho=cast(1.0 - rho),
                                eps=cast(group["epsilon"]), **_common(group, cast))


def _advance_u(u_product, step, group):
    """Keras's ``_u_product *= u_t`` (float64; one value for the whole optimizer)."""
    return u_product * nadam_u(step, group["beta_1"])


def _bench(name, **hyper):
    return (_s.BenchRow(f"keras-{name}", hyper),)


SGD = _spec(
    "SGD", keras_sgd_element, sgd_scalars,
    (_unit("momentum", 0.0), _s.hyper("nesterov", False, _s.flag())),
    (_s.Column("momentum", when=lambda g: g["momentum"] != 0),), _reference.keras_sgd,
    learning_rate=0.01, sparse=_rows(_reference.keras_sgd, all_seen=lambda g: g["momentum"] != 0),
    bench=_bench("sgd", learning_rate=1e-2, momentum=0.9),
    doc="""keras.optimizers.SGD: ``v = momentum v - lr g``, ``w += v`` (Nesterov:
    ``w += momentum v - lr g``). State: ``momentum`` (when momentum != 0).""")

RMSPROP = _spec(
    "RMSprop", keras_rmsprop_element, rmsprop_scalars,
    (_unit("rho", 0.9), _unit("momentum", 0.0), _EPSILON, _s.hyper("centered", False, _s.flag())),
    (_s.Column("velocity", unsigned=True), _s.Column("momentum", when=lambda g: g["momentum"] > 0),
     _s.Column("average_gradient", when=lambda g: g["centered"])), _reference.keras_rmsprop,
    bench=_bench("rmsprop", learning_rate=1e-3),
    doc="""keras.optimizers.RMSprop: eps inside the square root, lr inside the momentum.
    State: ``velocity``, ``momentum`` (momentum > 0), ``average_gradient`` (centered).""")

ADAGRAD = _spec(
    "Adagrad", keras_adagrad_element, adagrad_scalars,
    (_s.hyper("initial_accumulator_value", 0.1, _s.real(low=0.0)), _EPSILON),
    (_s.Column("accumulator", initial="initial_accumulator_value", unsigned=True),), _reference.keras_adagrad,
    sparse=_rows(_reference.keras_adagrad), bench=_bench("adagrad", learning_rate=1e-2),
    doc="""keras.optimizers.Adagrad: accumulators start at 0.1, eps inside the square root.
    State: ``accumulator``.""")

_ADAM_HYPERS = (_beta("beta_1", 0.9), _beta("beta_2", 0.999), _EPSILON,
                _s.hyper("amsgrad", False, _s.flag()))
_ADAM_COLUMNS = (_s.Column("momentum"), _s.Column("velocity", unsigned=True),
                 _s.Column("velocity_hat", when=lambda g: g["amsgrad"], unsigned=True))

ADAM = _spec(
    "Adam", keras_adam_element, adam_scalars, _ADAM_HYPERS, _ADAM_COLUMNS, _reference.keras_adam,
    bench=_bench("adam", learning_rate=1e-3),
    doc="""keras.optimizers.Adam: ``w -= m lr sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)``.
    State: ``momentum``, ``velocity``, ``velocity_hat`` (amsgrad).""")

# AdamW: Adam with weight_decay second in the signature and 0.004 (None only for the
# variables excluded from it: fastopt.keras refuses it as an argument).
ADAMW = dataclasses.replace(
    _spec("AdamW", keras_adam_element, adam_scalars,
          (_s.Hyper("weight_decay", 0.004, _optional("weight_decay")), *_ADAM_HYPERS), _ADAM_COLUMNS,
          _reference.keras_adam, bench=_bench("adamw", learning_rate=1e-3),
          doc="""keras.optimizers.AdamW: Adam with ``w -= w * weight_decay * lr`` first (0.004)."""),
    parent="Adam")

ADAMAX = _spec(
    "Adamax", keras_adamax_element, adamax_scalars,
    (_beta("beta_1", 0.9), _beta("beta_2", 0.999), _EPSILON),
    (_s.Column("momentum"), _s.Column("norm", unsigned=True)), _reference.keras_adamax,
    bench=_bench("adamax", learning_rate=1e-3),
    doc="""keras.optimizers.Adamax: ``w -= lr m / ((1 - b1^t)(u + eps))``, ``u = max(b2 u, |g|)``.
    State: ``momentum``, ``norm``.""")

NADAM = _spec(
    "Nadam", keras_nadam_element, nadam_scalars,
    (_beta("beta_1", 0.9), _beta("beta_2", 0.999), _EPSILON),
    (_s.Column("momentum"), _s.Column("velocity", unsigned=True)), _reference.keras_nadam,
    host=_s.HostState("u_product", _advance_u), bench=_bench("nadam", learning_rate=1e-3),
    doc="""keras.optimizers.Nadam: the schedule ``u_t = b1 (1 - 0.5 * 0.96^t)`` and its product.
    State: ``momentum``, ``velocity`` (and ``u_product`` in the state dict).""")

ADADELTA = _spec(
    "Adadelta", keras_adadelta_element, adadelta_scalars,
    (_unit("rho", 0.95), _EPSILON),
    (_s.Column("accumulated_grad", unsigned=True),
     _s.Column("accumulated_delta_var", unsigned=True)), _reference.keras_adadelta,
    bench=_bench("adadelta", learning_rate=1.0),
    doc="""keras.optimizers.Adadelta: ``delta = -sqrt(a + eps) g / sqrt(s + eps)``, ``w += lr delta``.
    State: ``accumulated_grad``, ``accumulated_delta_var``.""")

SPECS = (SGD, RMSPROP, ADAGRAD, ADAM, ADAMW, ADAMAX, NADAM, ADADELTA)
"""fastopt.keras's optimizers, in its order (the classes and bench rows are made from them)."""

CLIPNORM = _s.PerTensor(
    reducer=grad_square, mode="grad",
    values=lambda group, sums: _clip_factors(group["clipnorm"], np.sqrt(sums[:, 0])))
"""``clipnorm``: each tensor's gradient times ``clip / max(norm, clip)`` (one reduction)."""


def _clip_factors(clip, norms):
    with np.errstate(invalid="ignore"):
        return clip / np.maximum(norms, clip)


CLIPPED = {s.name: dataclasses.replace(s, per_tensor=CLIPNORM) for s in SPECS}
"""Each spec with ``clipnorm``'s pass: the engine steps a group with clipnorm set with it."""

# By name, for the tests that compile every element (tests/test_family_cudasim.py).
ELEMENTS = {s.name: s.element for s in SPECS if not s.parent}
SLOTS = {s.name: s.column_names for s in SPECS}
