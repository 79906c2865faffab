"""torch.optim.lr_scheduler's cyclic, warm-restart, composite and plateau schedulers.

``CosineAnnealingWarmRestarts``, ``CyclicLR``, ``OneCycleLR``, ``SequentialLR``,
``ChainedScheduler`` and ``ReduceLROnPlateau`` with torch 2.13's semantics, on the base
class and argument checks of :mod:`fastopt._schedules_torch`.
"""
from __future__ import annotations

import copy
import math
import warnings
from bisect import bisect_right

from ._schedules_torch import (_EPOCH_DEPRECATED, LRScheduler, _callable_states, _check_optimizer,
                               _choice_arg, _int_arg, _int_list, _per_group, _real_arg,
                               _set_momentum, _uses_beta1)

__all__ = ["CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "SequentialLR",
           "ChainedScheduler", "ReduceLROnPlateau"]


class CosineAnnealingWarmRestarts(LRScheduler):
    """SGDR: cosine from initial_lr to eta_min over T_i epochs, then restart with T_i *= T_mult.

    References: Loshchilov & Hutter, SGDR (2017), https://arxiv.org/abs/1608.03983
    """

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        owner = "CosineAnnealingWarmRestarts"
        self.T_0 = _int_arg(owner, "T_0", T_0, 1)
        self.T_i = T_0
        self.T_mult = _int_arg(owner, "T_mult", T_mult, 1)
        self.eta_min = _real_arg(owner, "eta_min", eta_min)
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        lo = self.eta_min
        return [lo + (b - lo) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for b in self.base_lrs]

    def step(self, epoch=None):
        """Advance one step, or jump to ``epoch`` (may be fractional, as in torch)."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            _real_arg("CosineAnnealingWarmRestarts", "epoch", epoch, 0)
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** n
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        self._get_lr_called_within_step = True
        try:
            values = self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        self._write_lrs(values)


# ---------------------------------------------------------------- cyclical schedules

class CyclicLR(LRScheduler):
    """Cyclical learning rate (triangular, triangular2, exp_range or a custom ``scale_fn``).

    With ``cycle_momentum`` the momentum (or ``betas[0]``) cycles inversely between
    ``base_momentum`` and ``max_momentum``. The lr is set to ``base_lr`` at construction.

    References: Smith, Cyclical Learning Rates for Training Neural Networks (2017),
      https://arxiv.org/abs/1506.01186
    """

    _not_state = ("optimizer", "_scale_fn_custom")

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0, scale_fn=None, scale_mode="cycle",
                 cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, last_epoch=-1):
        owner = "CyclicLR"
        _check_optimizer(owner, optimizer)
        _int_arg(owner, "last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        base_lrs = _per_group(owner, "base_lr", optimizer, base_lr, low=0)
        self.max_lrs = _per_group(owner, "max_lr", optimizer, max_lr, low=0)
        up = float(_real_arg(owner, "step_size_up", step_size_up, 0, low_open=True))
        down = up if step_size_down is None else float(
            _real_arg(owner, "step_size_down", step_size_down, 0, low_open=True))
        if scale_fn is None:
            _choice_arg(owner, "mode", mode, {"triangular", "triangular2", "exp_range"})
        elif not callable(scale_fn):
            raise TypeError(f"{owner}: scale_fn must be callable, got {type(scale_fn).__name__}")
        _choice_arg(owner, "scale_mode", scale_mode, {"cycle", "iterations"})
        self.gamma = _real_arg(owner, "gamma", gamma, 0, low_open=True)
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.mode = mode
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1 = _uses_beta1(owner, optimizer)
            self.base_momentums = _per_group(owner, "base_momentum", optimizer, base_momentum)
            self.max_momentums = _per_group(owner, "max_momentum", optimizer, max_momentum)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups, strict=True):
                group["lr"] = lr
            if self.cycle_momentum:
                for hi, lo, group in zip(self.max_momentums, self.base_momentums,
                                         optimizer.param_groups, strict=True):
                    _set_momentum(group, self.use_beta1, hi)
                    group["max_momentum"] = hi
                    group["base_momentum"] = lo
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self):
        if self._scale_fn_custom is None:  # the built-in modes fix their scale_mode
            self.scale_mode = "iterations" if self.mode == "exp_range" else "cycle"

    def scale_fn(self, x):
        """Amplitude scale at cycle (or iteration) ``x``."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma ** x

    def get_lr(self):
        self._warn_outside_step()
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else self.last_epoch)
        lrs = [lo + (hi - lo) * scale_factor * scale
               for lo, hi in zip(self.base_lrs, self.max_lrs, strict=True)]
        if self.cycle_momentum:
            for lo, hi, group in zip(self.base_momentums, self.max_momentums,
                                     self.optimizer.param_groups, strict=True):
                _set_momentum(group, self.use_beta1, hi - (hi - lo) * scale_factor * scale)
        return lrs

    def state_dict(self):
        state = super().state_dict()
        state["_scale_fn_custom"] = (None if self._scale_fn_custom is None
                                     else _callable_states([self._scale_fn_custom])[0])
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict.get("_scale_fn_custom")
        if saved is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(copy.deepcopy(saved))
        self._init_scale_fn()


def _anneal(kind, start, end, pct):
    if kind == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


class OneCycleLR(LRScheduler):
    """1cycle policy: warm up to ``max_lr``, anneal to ``initial_lr / final_div_factor``.

    ``initial_lr = max_lr / div_factor``. With ``three_phase`` the lr comes back down to
    ``initial_lr`` symmetrically before the final anneal. With ``cycle_momentum`` the
    momentum (or ``betas[0]``) moves inversely between ``max_momentum`` and ``base_momentum``.

    References: Smith & Topin, Super-Convergence (2018), https://arxiv.org/abs/1708.07120
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False, last_epoch=-1):
        owner = "OneCycleLR"
        _check_optimizer(owner, optimizer)
        _int_arg(owner, "last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        if total_steps is not None:
            self.total_steps = _int_arg(owner, "total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (_int_arg(owner, "epochs", epochs, 1)
                                * _int_arg(owner, "steps_per_epoch", steps_per_epoch, 1))
        else:
            raise ValueError(f"{owner}: give total_steps, or both epochs and steps_per_epoch")
        _real_arg(owner, "pct_start", pct_start, 0, 1)
        up_end = float(pct_start * self.total_steps) - 1
        ends = [up_end, self.total_steps - 1]
        if three_phase:
            ends.insert(1, float(2 * pct_start * self.total_steps) - 2)
        if not all(a < b for a, b in zip([0.0] + ends, ends)):
            raise ValueError(f"{owner}: pct_start={pct_start} with total_steps={self.total_steps} "
                             "leaves a phase with no steps (need 1 < pct_start * total_steps"
                             f"{' < (total_steps + 1) / 2' if three_phase else ' < total_steps'})")
        names = ([("initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  ("max_lr", "initial_lr", "base_momentum", "max_momentum"),
                  ("initial_lr", "min_lr", "max_momentum", "max_momentum")] if three_phase else
                 [("initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  ("max_lr", "min_lr", "base_momentum", "max_momentum")])
        keys = ("start_lr", "end_lr", "start_momentum", "end_momentum")
        self._schedule_phases = [{"end_step": end, **dict(zip(keys, row))}
                                 for end, row in zip(ends, names)]
        self._anneal_func_type = _choice_arg(owner, "anneal_strategy", anneal_strategy,
                                             {"cos", "linear"})
        max_lrs = _per_group(owner, "max_lr", optimizer, max_lr, low=0)
        _real_arg(owner, "div_factor", div_factor, 0, low_open=True)
        _real_arg(owner, "final_div_factor", final_div_factor, 0, low_open=True)
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1 = _uses_beta1(owner, optimizer)
            max_moms = _per_group(owner, "max_momentum", optimizer, max_momentum)
            base_moms = _per_group(owner, "base_momentum", optimizer, base_momentum)
        if last_epoch == -1:
            for i, group in enumerate(optimizer.param_groups):
                group["initial_lr"] = max_lrs[i] / div_factor
                group["max_lr"] = max_lrs[i]
                group["min_lr"] = group["initial_lr"] / final_div_factor
                if self.cycle_momentum:
                    _set_momentum(group, self.use_beta1, max_moms[i])
                    group["max_momentum"] = max_moms[i]
                    group["base_momentum"] = base_moms[i]
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"OneCycleLR: tried to step {step_num} times, but total_steps "
                             f"is {self.total_steps}")
        lrs = []
        last = len(self._schedule_phases) - 1
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step_num <= end_step or i == last:
                    pct = (step_num - start_step) / (end_step - start_step)
                    break
                start_step = end_step
            kind = self._anneal_func_type
            lrs.append(_anneal(kind, group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                momentum = _anneal(kind, group[phase["start_momentum"]],
                                   group[phase["end_momentum"]], pct)
                _set_momentum(group, self.use_beta1, momentum)
        return lrs


# ---------------------------------------------------------------- composition

def _check_members(owner, optimizer, schedulers):
    for i, s in enumerate(schedulers):
        if not hasattr(s, "optimizer"):
            raise TypeError(f"{owner}: schedulers[{i}] has no `optimizer` attribute")
        if isinstance(s, ReduceLROnPlateau):
            raise ValueError(f"{owner}: schedulers[{i}] is a ReduceLROnPlateau, which needs a "
                             "metric at each step and cannot be composed")
        if s.optimizer is not optimizer:
            raise ValueError(f"{owner}: schedulers[{i}] ({type(s).__name__}) drives a different "
                             "optimizer; all schedulers must share one")


class _Composite(LRScheduler):
    _not_state = ("optimizer", "_schedulers")

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for s, saved in zip(self._schedulers, state_dict["_schedulers"], strict=True):
            s.load_state_dict(saved)


class SequentialLR(_Composite):
    """Run ``schedulers[i]`` between ``milestones[i-1]`` and ``milestones[i]``.

    At each milestone the next scheduler restarts from its epoch 0 (closed form if it has
    one). Build the member schedulers on the same optimizer before this one.
    """

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        owner = "SequentialLR"
        _check_optimizer(owner, optimizer)
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError(f"{owner}: schedulers must hold at least one scheduler")
        _check_members(owner, optimizer, schedulers)
        milestones = _int_list(owner, "milestones", milestones)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"{owner}: milestones must have len(schedulers) - 1 = "
                             f"{len(schedulers) - 1} entries, got {len(milestones)}")
        if milestones != sorted(milestones):
            raise ValueError(f"{owner}: milestones must be non-decreasing, got {milestones}")
        _int_arg(owner, "last_epoch", last_epoch, -1)
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:  # undo what the members' constructors did
            group["lr"] = group["initial_lr"]
        self.recursive_undo()
        first = schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def recursive_undo(self, sched=None):
        """Step back the ``last_epoch`` of every (nested) member scheduler by one."""
        sched = self if sched is None else sched
        if hasattr(sched, "_schedulers"):
            for s in sched._schedulers:
                self.recursive_undo(s)
        elif hasattr(sched, "last_epoch"):
            sched.last_epoch -= 1

    def step(self):
        """Advance one step, switching scheduler at a milestone."""
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


class ChainedScheduler(_Composite):
    """Step every scheduler in ``schedulers`` at each step; their effects compose."""

    def __init__(self, schedulers, optimizer=None):
        owner = "ChainedScheduler"
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError(f"{owner}: schedulers must hold at least one scheduler")
        optimizer = optimizer if optimizer is not None else getattr(
            schedulers[0], "optimizer", None)
        _check_members(owner, optimizer, schedulers)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = self._current_lrs()

    def step(self):
        """Step each member scheduler in order."""
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = self._current_lrs()


# ---------------------------------------------------------------- metric-driven

class ReduceLROnPlateau(LRScheduler):
    """Multiply the lr by ``factor`` once a metric stops improving for ``patience`` epochs.

    Args:
      mode: "min" (lower is better) or "max".
      factor: lr <- max(lr * factor, min_lr), applied only if it changes lr by more than eps.
      patience: bad epochs tolerated before a reduction.
      threshold, threshold_mode: improvement needed: "rel" best*(1 -/+ threshold), "abs"
        best -/+ threshold.
      cooldown: epochs after a reduction during which bad epochs are not counted.
      min_lr: lower bound, a scalar or one per param group.
      eps: smallest lr change that is applied.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        owner = "ReduceLROnPlateau"
        _check_optimizer(owner, optimizer)
        self.factor = _real_arg(owner, "factor", factor, 0, 1, high_open=True)
        self.optimizer = optimizer
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = _per_group(owner, "min_lr", optimizer, min_lr, low=0)
        else:
            self.default_min_lr = _real_arg(owner, "min_lr", min_lr, 0)
            self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.patience = _int_arg(owner, "patience", patience, 0)
        self.cooldown = _int_arg(owner, "cooldown", cooldown, 0)
        self.eps = _real_arg(owner, "eps", eps, 0)
        self.last_epoch = 0
        self._last_lr = self._current_lrs()
        _real_arg(owner, "threshold", threshold, 0)
        self._init_is_better(mode, threshold, threshold_mode)
        self._reset()

    def _init_is_better(self, mode, threshold, threshold_mode):
        _choice_arg("ReduceLROnPlateau", "mode", mode, {"min", "max"})
        _choice_arg("ReduceLROnPlateau", "threshold_mode", threshold_mode, {"rel", "abs"})
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def _reset(self):
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self):
        return self.cooldown_counter > 0

    def _is_better(self, a, best):
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return a < best * (1.0 - self.threshold)
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metrics, epoch=None):
        """Record one epoch's metric and reduce the lr if it has plateaued."""
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(_EPOCH_DEPRECATED, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._current_lrs()

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(f"ReduceLROnPlateau: the optimizer now has {len(groups)} "
                                   f"param_groups but min_lr has {len(self.min_lrs)} entries; "
                                   "update `min_lrs` to match")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._init_is_better(self.mode, self.threshold, self.threshold_mode)
