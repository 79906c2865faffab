"""torch.optim.lr_scheduler's schedulers (torch 2.13 semantics) over duck-typed optimizers.

An optimizer here is anything with ``param_groups``: a list of plain dicts, each with a
numeric ``"lr"`` (and ``"momentum"`` or ``"betas"`` where momentum is cycled). Each
scheduler follows the same recursive ("chainable") or closed form that torch's
``get_lr()`` uses, so the float sequences equal torch's; attribute names, and hence
``state_dict()`` keys, are torch's, so a torch scheduler's state dict loads.

This module has the base class and the closed-form / recursive decays; the cyclic,
warm-restart, composite and plateau schedulers are in :mod:`fastopt._schedules_cyclic`.
"""
from __future__ import annotations

import copy
import math
import numbers
import types
import warnings
from bisect import bisect_right
from collections import Counter

__all__ = [
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
    "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
]

_EPOCH_DEPRECATED = ("passing epoch to step() is deprecated (as in torch): the closed form "
                     "is used where one exists; call step() without arguments instead")


# ---------------------------------------------------------------- argument checks

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int_arg(owner, name, value, minimum):
    """Return ``value`` if it is an integer >= ``minimum``, else raise ValueError naming it."""
    if not _is_int(value) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return value


def _real_arg(owner, name, value, low=None, high=None, low_open=False, high_open=False):
    """Return ``value`` if it is a finite real number in the interval, else raise ValueError."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        if low == 0 and high is None:
            what = "a positive finite number" if low_open else "a non-negative finite number"
        elif low is None and high is None:
            what = "a finite real number"
        else:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            what = (f"a finite number in {'(' if low_open else '['}{lo}, "
                    f"{hi}{')' if high_open else ']'}")
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return value


def _int_list(owner, name, values):
    """A list of non-negative integers, else ValueError naming ``name``."""
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be a list of non-negative integers, "
                         f"got {values!r}") from None
    for v in values:
        _int_arg(owner, name, v, 0)
    return values


def _choice_arg(owner, name, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {sorted(choices)}, got {value!r}")
    return value


def _check_optimizer(owner, optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if (not isinstance(groups, (list, tuple)) or not groups
            or not all(isinstance(g, dict) and "lr" in g for g in groups)):
        raise TypeError(f"{owner}: optimizer must have param_groups, a non-empty list of "
                        f"dicts with an 'lr' key; got {type(optimizer).__name__}")
    for i, g in enumerate(groups):
        if not isinstance(g["lr"], numbers.Real) or isinstance(g["lr"], bool):
            raise ValueError(f"{owner}: optimizer.param_groups[{i}]['lr'] must be a number for "
                             f"a scheduler to drive it, got {g['lr']!r}")


def _per_group(owner, name, optimizer, value, **bounds):
    """One value per param group: a list/tuple of matching length, or a scalar broadcast."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{owner}: {name} has {len(value)} values but the optimizer "
                             f"has {n} param_groups")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        _real_arg(owner, name, v, **bounds)
    return values


def _uses_beta1(owner, optimizer) -> bool:
    """True to cycle ``betas[0]``, False to cycle ``momentum`` (torch looks at ``defaults``)."""
    defaults = getattr(optimizer, "defaults", None)
    keys = defaults if isinstance(defaults, dict) else optimizer.param_groups[0]
    key = "betas" if "betas" in keys else "momentum" if "momentum" in keys else None
    if key is None or not all(key in g for g in optimizer.param_groups):
        raise ValueError(f"{owner}: cycle_momentum=True needs 'momentum' or 'betas' in every "
                         "param group of the optimizer; pass cycle_momentum=False otherwise")
    return key == "betas"


def _set_momentum(group, use_beta1, value):
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _callable_states(fns):
    """torch's rule: save a callable's ``__dict__`` unless it is a plain function or lambda."""
    return [None if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
            else copy.deepcopy(dict(fn.__dict__)) for fn in fns]


# ---------------------------------------------------------------- base class

class LRScheduler:
    """Base class: owns ``last_epoch``, ``base_lrs`` and the lr written into the groups.

    Subclasses implement ``get_lr()`` (called with ``last_epoch`` already advanced) and,
    where torch has one, ``_get_closed_form_lr()`` (used by ``step(epoch)``).

    Args:
      optimizer: object with ``param_groups`` (list of dicts with ``"lr"``).
      last_epoch: index of the last step; -1 starts a schedule (and records
        ``initial_lr`` in each group), other values resume one from ``initial_lr``.
    """

    _get_lr_called_within_step = False
    _is_initial = False
    _not_state = ("optimizer",)

    def __init__(self, optimizer, last_epoch=-1):
        owner = type(self).__name__
        _check_optimizer(owner, optimizer)
        _int_arg(owner, "last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            missing = [i for i, g in enumerate(groups) if "initial_lr" not in g]
            if missing:
                raise ValueError(
                    f"{owner}: last_epoch={last_epoch} resumes a schedule, but "
                    f"optimizer.param_groups{missing} have no 'initial_lr' (load the "
                    "optimizer state first, or use last_epoch=-1 for a fresh run)")
        self.base_lrs = [g["initial_lr"] for g in groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def _current_lrs(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def _warn_outside_step(self):
        if not self._get_lr_called_within_step:
            warnings.warn("To get the last learning rate computed by the scheduler, "
                          "please use `get_last_lr()`.", UserWarning, stacklevel=3)

    def _write_lrs(self, values):
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = self._current_lrs()

    def get_lr(self):
        """Return the lr of each group at ``last_epoch`` (call ``get_last_lr()`` to read it)."""
        raise NotImplementedError

    def get_last_lr(self):
        """Return the lrs the last step wrote into the optimizer's groups (a copy)."""
        return list(self._last_lr)

    def step(self, epoch=None):
        """Advance one step and write the new lrs into the optimizer's groups."""
        self._step_count += 1
        if epoch is not None:
            warnings.warn(_EPOCH_DEPRECATED, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _update_lr(self, epoch=None):
        self._get_lr_called_within_step = True
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        self._write_lrs(values)

    def state_dict(self):
        """Return the scheduler's state: a plain dict (no optimizer, no callables)."""
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in self._not_state}

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()`` (also one saved by the same torch scheduler)."""
        self.__dict__.update({k: copy.deepcopy(v) for k, v in state_dict.items()
                              if k not in self._not_state})


# ---------------------------------------------------------------- lambda schedulers

class _LambdaScheduler(LRScheduler):
    _not_state = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        owner = type(self).__name__
        _check_optimizer(owner, optimizer)
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"{owner}: lr_lambda has {len(lr_lambda)} functions but the "
                                 f"optimizer has {n} param_groups")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"{owner}: lr_lambda must be callable, got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch)

    def state_dict(self):
        state = super().state_dict()
        state["lr_lambdas"] = _callable_states(self.lr_lambdas)
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for fn, saved in zip(self.lr_lambdas, state_dict.get("lr_lambdas", ())):
            if saved is not None:
                fn.__dict__.update(copy.deepcopy(saved))


class LambdaLR(_LambdaScheduler):
    """lr = initial_lr * lr_lambda(epoch); ``lr_lambda`` is one callable or one per group."""

    def get_lr(self):
        self._warn_outside_step()
        return [base_lr * fn(self.last_epoch)
                for fn, base_lr in zip(self.lr_lambdas, self.base_lrs, strict=True)]


class MultiplicativeLR(_LambdaScheduler):
    """lr <- lr * lr_lambda(epoch) at every step after the first."""

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return [g["lr"] * fn(self.last_epoch)
                for fn, g in zip(self.lr_lambdas, self.optimizer.param_groups, strict=True)]


# ---------------------------------------------------------------- step decays

class StepLR(LRScheduler):
    """lr <- lr * gamma every ``step_size`` epochs: initial_lr * gamma^(epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = _int_arg("StepLR", "step_size", step_size, 1)
        self.gamma = _real_arg("StepLR", "gamma", gamma, 0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [g["lr"] * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class MultiStepLR(LRScheduler):
    """lr <- lr * gamma^k at an epoch listed k times in ``milestones``."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        milestones = _int_list("MultiStepLR", "milestones", milestones)
        self.milestones = Counter(milestones)
        self.gamma = _real_arg("MultiStepLR", "gamma", gamma, 0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        factor = self.gamma ** self.milestones[self.last_epoch]
        return [g["lr"] * factor for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [b * self.gamma ** passed for b in self.base_lrs]


class ConstantLR(LRScheduler):
    """lr = initial_lr * factor for the first ``total_iters`` epochs, then initial_lr."""

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1):
        self.factor = _real_arg("ConstantLR", "factor", factor, 0, 1, low_open=True)
        self.total_iters = _int_arg("ConstantLR", "total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0:
            return [g["lr"] * self.factor for g in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return self._current_lrs()
        return [g["lr"] * (1.0 / self.factor) for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        done = self.last_epoch >= self.total_iters
        return [b * (self.factor + done * (1 - self.factor)) for b in self.base_lrs]


class LinearLR(LRScheduler):
    """lr factor goes linearly from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        self.start_factor = _real_arg("LinearLR", "start_factor", start_factor, 0, 1,
                                      low_open=True)
        self.end_factor = _real_arg("LinearLR", "end_factor", end_factor, 0, 1)
        self.total_iters = _int_arg("LinearLR", "total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0:
            return [g["lr"] * self.start_factor for g in self.optimizer.param_groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        span = self.end_factor - self.start_factor
        ratio = 1.0 + span / (self.total_iters * self.start_factor + (self.last_epoch - 1) * span)
        return [g["lr"] * ratio for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        span = self.end_factor - self.start_factor
        frac = min(self.total_iters, self.last_epoch) / self.total_iters
        return [b * (self.start_factor + span * frac) for b in self.base_lrs]


class ExponentialLR(LRScheduler):
    """lr <- lr * gamma every epoch."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = _real_arg("ExponentialLR", "gamma", gamma, 0, low_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return [g["lr"] * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [b * self.gamma ** self.last_epoch for b in self.base_lrs]


class PolynomialLR(LRScheduler):
    """lr = initial_lr * (1 - min(e, total_iters) / total_iters)^power, applied recursively."""

    def __init__(self, optimizer, total_iters=5, power=1.0, last_epoch=-1):
        self.total_iters = _int_arg("PolynomialLR", "total_iters", total_iters, 1)
        self.power = _real_arg("PolynomialLR", "power", power, 0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        e, n = self.last_epoch, self.total_iters
        decay = ((1.0 - e / n) / (1.0 - (e - 1) / n)) ** self.power
        return [g["lr"] * decay for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        frac = min(self.total_iters, self.last_epoch) / self.total_iters
        return [b * (1.0 - frac) ** self.power for b in self.base_lrs]


# ---------------------------------------------------------------- cosine schedules

class CosineAnnealingLR(LRScheduler):
    """SGDR cosine annealing without restarts, in torch's recursive form.

    References: Loshchilov & Hutter, SGDR (2017), https://arxiv.org/abs/1608.03983
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = _real_arg("CosineAnnealingLR", "T_max", T_max, 0, low_open=True)
        self.eta_min = _real_arg("CosineAnnealingLR", "eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        e, t, lo = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_lrs()
        if self._step_count == 1 and e > 0:  # as torch; reached only from a _step_count=0 state
            return [lo + (b - lo) * (1 + math.cos(e * math.pi / t)) / 2 for b in self.base_lrs]
        if (e - 1 - t) % (2 * t) == 0:  # leaving the trough: the ratio form would divide by 0
            return [g["lr"] + (b - lo) * (1 - math.cos(math.pi / t)) / 2
                    for b, g in zip(self.base_lrs, self.optimizer.param_groups, strict=True)]
        ratio = (1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t))
        return [ratio * (g["lr"] - lo) + lo for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        lo = self.eta_min
        return [lo + (b - lo) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for b in self.base_lrs]
