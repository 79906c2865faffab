"""Schedule-free AdamW and SGD: the per-element updates, their host scalars, the weight swap.

References:
  Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, "The Road Less Scheduled",
  NeurIPS 2024 (arXiv:2405.15682). Equations, defaults, group keys, state names and
  their order of operations as the ``schedulefree`` package's ``AdamWScheduleFree``
  and ``SGDScheduleFree`` (schedulefree 1.4, the classes users import).

The params hold ``y`` while training (``x``, the average that is evaluated, after
``eval()``); ``z`` is the base iterate, a state column. With ``beta`` AdamW's beta1 or
SGD's momentum, one step at the group's count ``k`` (steps taken before it)::

    lr_t      = lr * min(1, (k + 1) / warmup_steps)          (no warm-up at 0 steps)
    lr_max    = max(lr_max, lr_t)
    weight    = (k + 1)^r * lr_max^weight_lr_power
    weight_sum += weight;  c = weight / weight_sum            (0 when the sum is 0)
    AdamW:  v = beta2 v + (1 - beta2) g^2;  g = g / (sqrt(v / (1 - beta2^(k+1))) + eps)
    g      += weight_decay * y                                (decay at y)
    y       = lerp(y, z, c) + lr_t (beta (1 - c) - 1) g
    z       = z - lr_t g

``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr`` (``lr_t``, for logging) and
``train_mode`` are the group's host state, kept in ``param_groups`` as the package keeps
them (fastopt/schedulefree.py advances them once per applied step). ``z`` starts as a
copy of the param at its first step (the element's ``first``).

The swap (``train()``/``eval()``) is one more elementwise pass per bucket:
``x = lerp(y, z, 1 - 1/beta)`` and back ``y = lerp(x, z, 1 - beta)``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from .pieces import lerp


# -- the host schedule (float64, from the group's values before the step) -----------------
def step_schedule(group):
    """``(k, scheduled_lr, lr_max, weight_sum, c)`` of the step about to be taken with
    ``group`` (its ``k``, ``weight_sum`` and ``lr_max`` are the values before the step);
    the values the group holds after it are ``k + 1`` and the others as returned."""
    k = int(group["k"])
    warmup = int(group["warmup_steps"])
    scheduled = float(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
    lr_max = max(scheduled, float(group["lr_max"]))
    try:
        weight = float(k + 1) ** float(group["r"]) * lr_max ** float(group["weight_lr_power"])
    except OverflowError:
        weight = math.inf
    weight_sum = float(group["weight_sum"]) + weight
    c = weight / weight_sum if weight_sum != 0 else 0.0
    return k, scheduled, lr_max, weight_sum, c


def _lerp_of(weight, cast) -> dict:
    """torch.lerp's scalars for ``weight``: its forms switch at ``|weight| = 0.5``."""
    w = cast(weight)
    return dict(weight=w, back=cast(cast(1.0) - w), from_end=bool(abs(float(w)) >= 0.5))


# -- schedule-free AdamW ------------------------------------------------------------------
class AdamWScheduleFreeScalars(NamedTuple):
    beta2: float
    one_minus_beta2: float
    bias_correction2: float     # 1 - beta2^(k+1)
    eps: float
    weight_decay: float
    ckp1: float                 # c, the weight of y's pull towards z
    lerp_back: float            # 1 - c in math precision (torch's lerp, |c| >= 0.5)
    y_coef: float               # lr_t (beta1 (1 - c) - 1)
    lr: float                   # lr_t
    lerp_from_end: float        # 1 where torch's lerp takes its second form (|c| >= 0.5), else 0
    first: bool                 # the param's first step: z starts as a copy of y
    decay: bool

    # step-dependent: a run-time value (kernels/specialize.py). Which form of lerp the
    # step takes is a number, not a flag, for the same reason and because it depends on
    # lr (c is 0 at lr 0): it is no term that a hyperparameter switches off.
    RUNTIME_FLAGS = ("first",)


def adamw_schedulefree_element(y, g, z, v, unused, h):
    """One schedule-free AdamW update of one element; returns ``(y, z, exp_avg_sq, -)``.
    (Elements have three state positions at least, as the drivers' roof elements: the
    ones past the columns are absent, neither read nor written.)"""
    if h.first:
        z = y
    v = v * h.beta2 + (h.one_minus_beta2 * g) * g
    d = g / (math.sqrt(v / h.bias_correction2) + h.eps)
    if h.decay:
        d = d + h.weight_decay * y
    y = lerp(y, z, h.ckp1, h.lerp_back, h.lerp_from_end != 0)
    y = y + h.y_coef * d
    z = z - h.lr * d
    return y, z, v, unused


def adamw_schedulefree_scalars(group, step, cast):
    """Host scalars of ``group`` (its host state before this step); ``step`` counts the
    param's own steps (1 on its first: ``z`` is initialised)."""
    k, lr, _, _, c = step_schedule(group)
    beta1, beta2 = (float(b) for b in group["betas"])
    decay = float(group["weight_decay"])
    lerp_c = _lerp_of(c, cast)
    return AdamWScheduleFreeScalars(
        beta2=cast(beta2),
        one_minus_beta2=cast(1.0 - beta2),
        bias_correction2=cast(1.0 - beta2 ** (k + 1)),
        eps=cast(group["eps"]),
        weight_decay=cast(decay),
        ckp1=lerp_c["weight"],
        lerp_back=lerp_c["back"],
        y_coef=cast(lr * (beta1 * (1.0 - c) - 1.0)),
        lr=cast(lr),
        first=bool(step == 1),
        lerp_from_end=cast(1.0 if lerp_c["from_end"] else 0.0),
        decay=bool(decay != 0),
    )


# -- schedule-free SGD ----------------------------------------------------------------------
class SGDScheduleFreeScalars(NamedTuple):
    weight_decay: float
    ckp1: float
    lerp_back: float
    y_coef: float               # lr_t (momentum (1 - c) - 1)
    lr: float
    lerp_from_end: float
    first: bool
    decay: bool

    RUNTIME_FLAGS = ("first",)


def sgd_schedulefree_element(y, g, z, unused1, unused2, h):
    """One schedule-free SGD update of one element; returns ``(y, z, -, -)``."""
    if h.first:
        z = y
    if h.decay:
        g = g + h.weight_decay * y
    y = lerp(y, z, h.ckp1, h.lerp_back, h.lerp_from_end != 0)
    y = y + h.y_coef * g
    z = z - h.lr * g
    return y, z, unused1, unused2


def sgd_schedulefree_scalars(group, step, cast):
    """Host scalars of ``group`` (see :func:`adamw_schedulefree_scalars`)."""
    _, lr, _, _, c = step_schedule(group)
    momentum = float(group["momentum"])
    decay = float(group["weight_decay"])
    lerp_c = _lerp_of(c, cast)
    return SGDScheduleFreeScalars(
        weight_decay=cast(decay),
        ckp1=lerp_c["weight"],
        lerp_back=lerp_c["back"],
        y_coef=cast(lr * (momentum * (1.0 - c) - 1.0)),
        lr=cast(lr),
        first=bool(step == 1),
        lerp_from_end=cast(1.0 if lerp_c["from_end"] else 0.0),
        decay=bool(decay != 0),
    )


# -- the train/eval swap ---------------------------------------------------------------------
class SwapScalars(NamedTuple):
    weight: float
    back: float
    from_end: bool

    RUNTIME_FLAGS = ("from_end",)


def swap_element(p, g, z, h):
    """``p = lerp(p, z, weight)``; ``g`` is unused (the driver's gradient position holds
    the params themselves) and ``z`` is read only. Returns ``(p, z)``."""
    return lerp(p, z, h.weight, h.back, h.from_end), z


def swap_weight(beta, to_eval: bool) -> float:
    """The lerp weight of the swap: ``1 - 1/beta`` from y to x, ``1 - beta`` back."""
    return 1.0 - 1.0 / beta if to_eval else 1.0 - beta


def swap_scalars(beta, to_eval, cast) -> SwapScalars:
    return SwapScalars(**_lerp_of(swap_weight(beta, to_eval), cast))


# -- the declarations --------------------------------------------------------------------------
from .. import spec as _s  # noqa: E402
from . import reference_schedulefree as _reference  # noqa: E402


def count():
    """An integer >= 0 (a number of steps), not a bool."""
    def make(name):
        def check(value, where):
            prefix = f"{where}: " if where else ""
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{prefix}{name} must be an integer, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(f"{prefix}{name} must be >= 0, got {value}")
            return int(value)
        return check
    return make


_BAD_COUNTS = (-1, 2.5, "3", None, True)
HOST_KEYS = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")
"""The group keys that are host state (advanced by each step, switched by train()/eval());
in the groups and the state dict as the package keeps them, in no constructor."""


def _host_hypers():
    # fixed: in every group, checked there, in no signature (fastopt/spec.py Hyper)
    return (_s.hyper("k", 0, count(), fixed=True, bad=_BAD_COUNTS),
            _s.hyper("train_mode", True, _s.flag(), fixed=True),
            _s.hyper("weight_sum", 0.0, _s.real(low=0.0), fixed=True),
            _s.hyper("lr_max", -1.0, _s.real(), fixed=True),
            _s.hyper("scheduled_lr", 0.0, _s.real(low=0.0), fixed=True))


def _schedule_hypers(weight_lr_power):
    return (_s.hyper("warmup_steps", 0, count(), bad=_BAD_COUNTS),
            _s.hyper("r", 0.0, _s.real()),
            _s.hyper("weight_lr_power", weight_lr_power, _s.real(low=0.0)))


def _host(group, step):
    return dict(first=bool(step == 1), k=int(group["k"]), lr=float(group["lr"]),
                warmup_steps=int(group["warmup_steps"]), r=float(group["r"]),
                weight_lr_power=float(group["weight_lr_power"]),
                weight_sum=float(group["weight_sum"]), lr_max=float(group["lr_max"]),
                weight_decay=float(group["weight_decay"]))


def _adamw_reference_call(group, step, params, grads, slots):
    beta1, beta2 = group["betas"]
    _reference.adamw_schedulefree(params, grads, slots[0], slots[1], beta1=beta1, beta2=beta2,
                                  eps=group["eps"], **_host(group, step))


def _sgd_reference_call(group, step, params, grads, slots):
    _reference.sgd_schedulefree(params, grads, slots[0], momentum=group["momentum"],
                                **_host(group, step))


_STATE_DOC = """
    The params hold ``y`` in train mode and ``x`` (the average to evaluate and save)
    after ``eval()``; ``train()`` switches back; a step in eval mode is an error. Both
    switches are one fused pass over the params and ``z``. Unlike the package, a new
    optimizer starts in train mode (calling ``train()`` first, as the package requires,
    changes nothing). The group keys ``k``, ``train_mode``, ``weight_sum``, ``lr_max``
    and ``scheduled_lr`` are the package's host state, in ``param_groups`` and the state
    dict; the package's state dicts (tensors as NumPy arrays) load, and fastopt's load
    into the package.
"""

ADAMW = _s.Spec(
    name="AdamWScheduleFree", element=adamw_schedulefree_element,
    scalars=adamw_schedulefree_scalars,
    hypers=(_s.lr(0.0025), _s.hyper("betas", (0.9, 0.999), _s.betas()), _s.eps(1e-8),
            _s.weight_decay(0.0), *_schedule_hypers(2.0), *_host_hypers()),
    columns=(_s.Column("z"), _s.Column("exp_avg_sq", unsigned=True)), step_state=False,
    reference=_reference.adamw_schedulefree, reference_call=_adamw_reference_call,
    oracle="schedulefree.AdamWScheduleFree", engine="fastopt.schedulefree.ScheduleFree",
    doc="""Schedule-free AdamW: no learning-rate schedule, an average of the iterates.

    References:
      Defazio et al., "The Road Less Scheduled", NeurIPS 2024;
      schedulefree.AdamWScheduleFree (its equations, defaults and names).
    ``warmup_steps``: linear warm-up of the lr; ``r``: polynomial weighting of the
    average; ``weight_lr_power``: the average's weights are ``lr_max`` to this power.
    Weight decay is taken at ``y``; the second moment is bias-corrected.
    State: ``z``, ``exp_avg_sq``.
    """ + _STATE_DOC,
    examples=_s.Examples(base=dict(lr=0.01), grid=(
        {},
        dict(weight_decay=0.1, warmup_steps=3),
        dict(betas=(0.5, 0.99), eps=1e-6, weight_decay=0.01, warmup_steps=2, r=0.5,
             weight_lr_power=0.0),
    ), full=dict(betas=(0.5, 0.99), eps=1e-6, weight_decay=0.01, warmup_steps=2, r=0.5,
                 weight_lr_power=0.0)),
    bench=(_s.BenchRow("adamw-schedulefree", dict(lr=2.5e-3)),),
)


SGD = _s.Spec(
    name="SGDScheduleFree", element=sgd_schedulefree_element, scalars=sgd_schedulefree_scalars,
    hypers=(_s.lr(1.0),
            # in (0, 1), both ends open (the package's range): listed, as no kind's table has it
            _s.hyper("momentum", 0.9, _s.real(low=0.0, high=1.0, low_open=True, high_open=True),
                     bad=(0.0, 1.0, -0.1, 1.5, math.nan, math.inf, "0.9", None)),
            _s.weight_decay(0.0), *_schedule_hypers(2.0), *_host_hypers()),
    columns=(_s.Column("z"),), step_state=False,
    reference=_reference.sgd_schedulefree, reference_call=_sgd_reference_call,
    oracle="schedulefree.SGDScheduleFree", engine="fastopt.schedulefree.ScheduleFree",
    doc="""Schedule-free SGD: no learning-rate schedule, an average of the iterates.

    References:
      Defazio et al., "The Road Less Scheduled", NeurIPS 2024;
      schedulefree.SGDScheduleFree (its equations, defaults and names).
    ``momentum`` in (0, 1) is the interpolation ``y = (1 - momentum) z + momentum x``;
    ``warmup_steps``, ``r``, ``weight_lr_power`` as AdamWScheduleFree. Weight decay is
    taken at ``y``.
    State: ``z``.
    """ + _STATE_DOC,
    examples=_s.Examples(base=dict(lr=0.05), grid=(
        {},
        dict(weight_decay=0.1, warmup_steps=3),
        dict(momentum=0.5, weight_decay=0.01, warmup_steps=2, r=1.0, weight_lr_power=1.0),
    ), full=dict(momentum=0.5, weight_decay=0.01, warmup_steps=2, r=1.0, weight_lr_power=1.0)),
    bench=(_s.BenchRow("sgd-schedulefree", dict(lr=1.0)),),
)

SPECS = (ADAMW, SGD)
