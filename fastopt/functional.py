"""The functional API: one fused step over caller-owned params, grads and state, in place.

Mirrors ``torch.optim``'s functional forms. The caller keeps the state arrays and the
step count; every call validates all arrays and hyperparameters before touching any.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _validate
from .optim import SGD, Adagrad, Adam, RMSprop

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax", "nadam", "radam", "adadelta", "lion"]


def _step(cls, name, group, step, params, grads, slots, backend):
    """Validate, then run ``cls``'s element over the arrays, one pass per dtype."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"{name}: step must be an integer >= 1 (the count including this step), got {step!r}")
    cls._check_group(group, name)
    params, grads = list(params), list(grads)
    if not params:
        raise ValueError(f"{name}: params is empty")
    if len(grads) != len(params):
        raise ValueError(f"{name}: grads has {len(grads)} entries, expected {len(params)}")
    active = cls._active_slots(group)
    slot_lists = []
    for slot, arrays in zip(active, slots):
        if slot is None:
            slot_lists.append(None)
            continue
        if arrays is None:
            raise ValueError(f"{name}: {slot} arrays are required for these hyperparameters")
        arrays = list(arrays)
        if len(arrays) != len(params):
            raise ValueError(f"{name}: {slot} has {len(arrays)} entries, expected {len(params)}")
        slot_lists.append(arrays)
    everything = list(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        _validate.param(p, f"{name}: params[{i}]")
        _validate.grad(g, p, i, where=f"{name}: ")
    for slot, arrays in zip(active, slot_lists):
        if arrays is None:
            continue
        for i, (s, p) in enumerate(zip(arrays, params)):
            _validate.param(s, f"{name}: {slot}[{i}]")
            if tuple(s.shape) != tuple(p.shape) or s.dtype != p.dtype:
                raise ValueError(f"{name}: {slot}[{i}] must match params[{i}] in shape {tuple(p.shape)} "
                                 f"and dtype {p.dtype}, got {tuple(s.shape)} {s.dtype}")
        everything.extend(arrays)
    _validate.no_overlap(everything, f"{name} params and state")
    backend_name = _backend.resolve(backend, params[0])
    by_dtype: dict = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(np.dtype(p.dtype), []).append(i)
    full = tuple(slot_lists) + (None,) * (3 - len(slot_lists))
    for idx in by_dtype.values():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ss = tuple(None if s is None else [s[i] for i in idx] for s in full)
        if backend_name == "numpy":
            cls._reference(group, step, ps, gs, ss)
        else:
            be = _backend.get(backend_name)
            be.run(cls.element, be.table(ps, gs, ss), cls._scalars(group, step, np.dtype(ps[0].dtype).type))


def sgd(params, grads, momentum_buffers=None, *, step=1, lr=1e-3, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, backend=None):
    """SGD step in place. ``step`` == 1 initialises the momentum buffers to the gradient."""
    group = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize)
    _step(SGD, "sgd", group, step, params, grads, (momentum_buffers,), backend)


def adagrad(params, grads, state_sums, *, step=1, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, backend=None):
    """Adagrad step in place."""
    group = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
                 initial_accumulator_value=0.0)
    _step(Adagrad, "adagrad", group, step, params, grads, (state_sums,), backend)


def rmsprop(params, grads, square_avgs, momentum_buffers=None, grad_avgs=None, *, step=1, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
            backend=None):
    """RMSprop step in place."""
    group = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                 centered=centered, maximize=maximize)
    _step(RMSprop, "rmsprop", group, step, params, grads, (square_avgs, momentum_buffers, grad_avgs),
          backend)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step=1, lr=1e-3, beta1=0.9,
         beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False, backend=None):
    """Adam step in place (``step`` counts this step, so bias corrections use it)."""
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    _step(Adam, "adam", group, step, params, grads, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs), backend)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step=1, lr=1e-3, beta1=0.9,
          beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False, backend=None):
    """AdamW step in place."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr, beta1=beta1,
         beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=True, backend=backend)


# -- the rest of the family (fastopt.family) ----------------------------------------------
def adamax(params, grads, exp_avgs, exp_infs, *, step=1, lr=2e-3, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=0.0, maximize=False, backend=None):
    """Adamax step in place."""
    from .family import Adamax
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize)
    _step(Adamax, "adamax", group, step, params, grads, (exp_avgs, exp_infs), backend)


def nadam(params, grads, exp_avgs, exp_avg_sqs, *, step=1, lr=2e-3, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False,
          maximize=False, mu_product=None, backend=None):
    """NAdam step in place. ``mu_product`` is the product of the momentum schedule up to and
    including this step (torch's state); by default it is computed for a constant beta1."""
    from .family import _MU_PRODUCT, NAdam
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                 momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                 maximize=maximize)
    if mu_product is not None:
        group[_MU_PRODUCT] = _validate.number("mu_product", mu_product, where="nadam")
    _step(NAdam, "nadam", group, step, params, grads, (exp_avgs, exp_avg_sqs), backend)


def radam(params, grads, exp_avgs, exp_avg_sqs, *, step=1, lr=1e-3, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False, backend=None):
    """RAdam step in place (rectified when torch's rho_t > 5)."""
    from .family import RAdam
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    _step(RAdam, "radam", group, step, params, grads, (exp_avgs, exp_avg_sqs), backend)


def adadelta(params, grads, square_avgs, acc_deltas, *, step=1, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False, backend=None):
    """Adadelta step in place."""
    from .family import Adadelta
    group = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    _step(Adadelta, "adadelta", group, step, params, grads, (square_avgs, acc_deltas), backend)


def lion(params, grads, exp_avgs, *, step=1, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=1e-3,
         maximize=False, backend=None):
    """Lion step in place (optax's equations)."""
    from .family import Lion
    group = dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, maximize=maximize)
    _step(Lion, "lion", group, step, params, grads, (exp_avgs,), backend)
