"""The optimizers of torch.optim's standard set, with torch 2.13's names and defaults.

Each class maps a param group to its element function's state slots and host scalars,
and to its NumPy reference; the base class does the rest.
"""
from __future__ import annotations

import math

from . import _validate as v
from .kernels import adagrad as _adagrad
from .kernels import adam as _adam
from .kernels import reference
from .kernels import rmsprop as _rmsprop
from .kernels import sgd as _sgd
from .optimizer import Optimizer
from .sparse import rows_seen_so_far


def _no_weight_decay(group, where):
    if group["weight_decay"] != 0:
        raise ValueError(f"{where}: weight_decay must be 0 with sparse gradients (as in torch), "
                         f"got {group['weight_decay']}")


def _lr_wd_eps(group, where, eps=True, maximize=True):
    """The hyperparameters most optimizers share: lr (or a schedule), weight_decay, and
    where the optimizer has them, eps and maximize."""
    v.learning_rate(group["lr"], where=where)
    v.number("weight_decay", group["weight_decay"], low=0.0, where=where)
    if eps:
        v.number("eps", group["eps"], low=0.0, where=where)
    if maximize:
        v.flag("maximize", group["maximize"], where=where)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening and Nesterov momentum.

    References:
      Sutskever et al., ICML 2013; torch.optim.SGD.
    State: ``momentum_buffer`` (when momentum != 0).
    """

    element = staticmethod(_sgd.sgd_element)
    slot_names = ("momentum_buffer",)
    has_step_state = False
    supports_sparse = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, backend=None,
                 **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize),
                         backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where, eps=False)
        momentum = v.number("momentum", group["momentum"], low=0.0, where=where)
        dampening = v.number("dampening", group["dampening"], where=where)
        if v.flag("nesterov", group["nesterov"], where=where) and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and dampening = 0, "
                             f"got momentum={momentum}, dampening={dampening}")

    @classmethod
    def _active_slots(cls, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    _check_sparse_group = classmethod(lambda cls, group, where: _no_weight_decay(group, where))

    def _sparse_rows(self, i, param, sg):
        if self._locate_group(i)["momentum"] == 0:
            return sg.indices, sg.rows
        return rows_seen_so_far(self.__dict__.setdefault("_sparse_seen", {}), i, param, sg)

    @classmethod
    def _scalars(cls, group, step, cast):
        return _sgd.sgd_scalars(step == 1, group["lr"], group["momentum"], group["dampening"],
                                group["weight_decay"], group["nesterov"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        reference.sgd(params, grads, slots[0], first_step=[step == 1] * len(params), lr=group["lr"],
                      momentum=group["momentum"], dampening=group["dampening"],
                      weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                      maximize=group["maximize"])


class Adagrad(Optimizer):
    """Adagrad with learning-rate decay.

    References:
      Duchi et al., JMLR 2011; torch.optim.Adagrad.
    State: ``sum``, ``step``.
    """

    element = staticmethod(_adagrad.adagrad_element)
    slot_names = ("sum",)
    supports_sparse = True
    _check_sparse_group = classmethod(lambda cls, group, where: _no_weight_decay(group, where))

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, backend=None,
                 **options):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize),
                         backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        v.number("lr_decay", group["lr_decay"], low=0.0, where=where)
        v.number("initial_accumulator_value", group["initial_accumulator_value"], low=0.0, where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("sum", None, None)

    @classmethod
    def _initial_value(cls, group, name):
        return float(group["initial_accumulator_value"])

    @classmethod
    def _scalars(cls, group, step, cast):
        return _adagrad.adagrad_scalars(step, group["lr"], group["lr_decay"], group["eps"],
                                        group["weight_decay"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        reference.adagrad(params, grads, slots[0], step=step, lr=group["lr"],
                          lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                          eps=group["eps"], maximize=group["maximize"])


class RMSprop(Optimizer):
    """RMSprop, optionally centered, with momentum.

    References:
      Hinton, Coursera lecture 6.5 (2012); Graves, arXiv:1308.0850; torch.optim.RMSprop.
    State: ``square_avg``, ``step``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    element = staticmethod(_rmsprop.rmsprop_element)
    slot_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, backend=None,
                 **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        v.number("alpha", group["alpha"], low=0.0, high=1.0, where=where)
        v.number("momentum", group["momentum"], low=0.0, where=where)
        v.flag("centered", group["centered"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    @classmethod
    def _scalars(cls, group, step, cast):
        return _rmsprop.rmsprop_scalars(group["lr"], group["alpha"], group["eps"],
                                        group["weight_decay"], group["momentum"],
                                        group["centered"], group["maximize"], cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        reference.rmsprop(params, grads, *slots, lr=group["lr"], alpha=group["alpha"],
                          eps=group["eps"], weight_decay=group["weight_decay"],
                          momentum=group["momentum"], centered=group["centered"],
                          maximize=group["maximize"])


class Adam(Optimizer):
    """Adam, with AMSGrad, maximize and (optionally decoupled) weight decay.

    References:
      Kingma & Ba, ICLR 2015; Reddi et al. (AMSGrad), ICLR 2018; torch.optim.Adam.
    State: ``exp_avg``, ``exp_avg_sq``, ``step``, ``max_exp_avg_sq`` (amsgrad).
    """

    element = staticmethod(_adam.adam_element)
    slot_names = _adam.SLOTS
    supports_sparse = True   # with torch.optim.SparseAdam's semantics (lazy rows)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, backend=None,
                 **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         backend, **options)

    @classmethod
    def _check_group(cls, group, where):
        _lr_wd_eps(group, where)
        group["betas"] = v.betas(group["betas"], where)
        v.flag("amsgrad", group["amsgrad"], where=where)
        v.flag("decoupled_weight_decay", group["decoupled_weight_decay"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    @classmethod
    def _scalars(cls, group, step, cast):
        beta1, beta2 = group["betas"]
        return _adam.adam_scalars(step, group["lr"], beta1, beta2, group["eps"],
                                  group["weight_decay"], group["amsgrad"], group["maximize"],
                                  group["decoupled_weight_decay"], cast)

    @classmethod
    def _check_sparse_group(cls, group, where):
        _no_weight_decay(group, where)
        if group["amsgrad"]:
            raise ValueError(f"{where}: amsgrad is not supported with sparse gradients (SparseAdam semantics)")

    @classmethod
    def _sparse_scalars(cls, group, step, cast):
        # SparseAdam: denom = sqrt(v) + eps and step size lr * sqrt(bc2) / bc1.
        beta1, beta2 = group["betas"]
        dense = cls._scalars(group, step, cast)
        return dense._replace(
            step_size=cast(group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)),
            bias_correction2_sqrt=cast(1.0))

    @classmethod
    def _sparse_reference(cls, group, step, param, index, rows, slots):
        beta1, beta2 = group["betas"]
        reference.sparse_adam(param, index, rows, slots[0], slots[1], step=step, lr=group["lr"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], maximize=group["maximize"])

    @classmethod
    def _reference(cls, group, step, params, grads, slots):
        beta1, beta2 = group["betas"]
        reference.adam(params, grads, *slots, step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"],
                       amsgrad=group["amsgrad"], maximize=group["maximize"],
                       decoupled_weight_decay=group["decoupled_weight_decay"])


class AdamW(Adam):
    """Adam with decoupled weight decay (torch.optim.AdamW: weight_decay defaults to 1e-2).

    References:
      Loshchilov & Hutter, ICLR 2019.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, backend=None,
                 **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         backend=backend, **options)
