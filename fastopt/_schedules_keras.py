"""Keras-style learning-rate decays: plain callables ``lr = schedule(step)``.

Each follows ``keras.optimizers.schedules`` (Keras 3) in float64 Python arithmetic, and
round-trips through ``get_config()`` / ``from_config()`` with Keras's config keys.
"""
from __future__ import annotations

import math

from ._schedules_torch import _int_arg, _real_arg

__all__ = ["LearningRateSchedule", "InverseTimeDecay", "ExponentialDecay",
           "PiecewiseConstantDecay", "PolynomialDecay", "CosineDecay", "CosineDecayRestarts"]


class LearningRateSchedule:
    """Base class: ``__call__(step) -> float`` plus a Keras-compatible config."""

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        """Build the schedule from the output of ``get_config()``."""
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _step(owner, step):
    """The step as a float; a schedule is a function of a non-negative step count."""
    return _real_arg(owner, "step", step, 0) * 1.0


class InverseTimeDecay(LearningRateSchedule):
    """lr = initial_learning_rate / (1 + decay_rate * p), p = step / decay_steps.

    Args:
      initial_learning_rate: lr at step 0.
      decay_steps: positive number of steps per unit of p.
      decay_rate: decay rate (>= 0).
      staircase: if True, p = floor(step / decay_steps).
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="InverseTimeDecay"):
        owner = "InverseTimeDecay"
        self.initial_learning_rate = _real_arg(owner, "initial_learning_rate",
                                               initial_learning_rate, 0)
        self.decay_steps = _real_arg(owner, "decay_steps", decay_steps, 0, low_open=True)
        self.decay_rate = _real_arg(owner, "decay_rate", decay_rate, 0)
        self.staircase = bool(staircase)
        self.name = name

    def __call__(self, step):
        p = _step("InverseTimeDecay", step) / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate / (1.0 + self.decay_rate * p)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase, "name": self.name}


class ExponentialDecay(LearningRateSchedule):
    """lr = initial_learning_rate * decay_rate ** p, p = step / decay_steps.

    Args:
      initial_learning_rate: lr at step 0.
      decay_steps: positive number of steps per factor of decay_rate.
      decay_rate: positive decay rate.
      staircase: if True, p = floor(step / decay_steps).
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="ExponentialDecay"):
        owner = "ExponentialDecay"
        self.initial_learning_rate = _real_arg(owner, "initial_learning_rate",
                                               initial_learning_rate, 0)
        self.decay_steps = _real_arg(owner, "decay_steps", decay_steps, 0, low_open=True)
        self.decay_rate = _real_arg(owner, "decay_rate", decay_rate, 0, low_open=True)
        self.staircase = bool(staircase)
        self.name = name

    def __call__(self, step):
        p = _step("ExponentialDecay", step) / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase, "name": self.name}


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] for step <= boundaries[0], values[i] for boundaries[i-1] < step <= boundaries[i],
    values[-1] for step > boundaries[-1]. Any finite step is taken (a negative one gives
    values[0] when it is at most boundaries[0], as in Keras).

    Args:
      boundaries: strictly increasing step counts.
      values: ``len(boundaries) + 1`` learning rates.
    """

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        owner = "PiecewiseConstantDecay"
        boundaries, values = list(boundaries), list(values)
        if len(boundaries) != len(values) - 1:
            raise ValueError(f"{owner}: values must have len(boundaries) + 1 = "
                             f"{len(boundaries) + 1} entries, got {len(values)}")
        for b in boundaries:
            _real_arg(owner, "boundaries", b)
        if any(a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"{owner}: boundaries must be strictly increasing, got {boundaries}")
        for v in values:
            _real_arg(owner, "values", v, 0)
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def __call__(self, step):
        t = _real_arg("PiecewiseConstantDecay", "step", step) * 1.0
        for boundary, value in zip(self.boundaries, self.values):
            if t <= boundary:
                return float(value)
        return float(self.values[-1])

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values),
                "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """lr = (initial_learning_rate - end_learning_rate) * (1 - p) ** power + end_learning_rate.

    Without ``cycle``: p = min(step, decay_steps) / decay_steps, so the lr stays at
    ``end_learning_rate`` after ``decay_steps``. With ``cycle``: p = step / (decay_steps *
    ceil(step / decay_steps)) (the multiplier is 1 at step 0): the decay restarts from
    ``initial_learning_rate`` over each longer multiple of ``decay_steps``.

    Args:
      initial_learning_rate: lr at step 0.
      decay_steps: positive number of steps to decay over.
      end_learning_rate: the lr reached at ``decay_steps`` (default 0.0001, Keras's).
      power: the polynomial's power (>= 0; 1 is linear).
      cycle: restart the decay beyond ``decay_steps`` (see above).
    """

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001, power=1.0,
                 cycle=False, name="PolynomialDecay"):
        owner = "PolynomialDecay"
        self.initial_learning_rate = _real_arg(owner, "initial_learning_rate",
                                               initial_learning_rate, 0)
        self.decay_steps = _real_arg(owner, "decay_steps", decay_steps, 0, low_open=True)
        self.end_learning_rate = _real_arg(owner, "end_learning_rate", end_learning_rate, 0)
        self.power = _real_arg(owner, "power", power, 0)
        self.cycle = bool(cycle)
        self.name = name

    def __call__(self, step):
        t = _step("PolynomialDecay", step)
        if self.cycle:
            decay_steps = self.decay_steps * (1.0 if t == 0 else math.ceil(t / self.decay_steps))
        else:
            decay_steps = self.decay_steps
            t = min(t, decay_steps)
        p = t / decay_steps
        return ((self.initial_learning_rate - self.end_learning_rate) * (1.0 - p) ** self.power
                + self.end_learning_rate)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "end_learning_rate": self.end_learning_rate,
                "power": self.power, "cycle": self.cycle, "name": self.name}


class CosineDecay(LearningRateSchedule):
    """Optional linear warmup, then cosine decay (Keras 3).

    Without ``warmup_target``: lr = initial_learning_rate * ((1 - alpha) * c + alpha),
    c = (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2. With it: lr rises
    linearly from ``initial_learning_rate`` to ``warmup_target`` over ``warmup_steps``,
    then decays the same way from ``warmup_target``.

    References: Loshchilov & Hutter, SGDR (2017), https://arxiv.org/abs/1608.03983;
      Goyal et al., Accurate, Large Minibatch SGD (2017), https://arxiv.org/abs/1706.02677

    Args:
      initial_learning_rate: lr at step 0.
      decay_steps: positive number of steps to decay over.
      alpha: final lr as a fraction of the decay's starting lr.
      warmup_target: lr reached at the end of the warmup; None for no warmup.
      warmup_steps: number of warmup steps (>= 0).
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0, name="CosineDecay"):
        owner = "CosineDecay"
        self.initial_learning_rate = _real_arg(owner, "initial_learning_rate",
                                               initial_learning_rate, 0)
        self.decay_steps = _real_arg(owner, "decay_steps", decay_steps, 0, low_open=True)
        self.alpha = _real_arg(owner, "alpha", alpha, 0, 1)
        if warmup_target is not None:
            _real_arg(owner, "warmup_target", warmup_target, 0)
        self.warmup_target = warmup_target
        self.warmup_steps = _real_arg(owner, "warmup_steps", warmup_steps, 0)
        self.name = name

    def _decay(self, t, start_lr):
        cosine = 0.5 * (1.0 + math.cos(math.pi * (t / self.decay_steps)))
        return start_lr * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step):
        t = _step("CosineDecay", step)
        if self.warmup_target is None:
            return self._decay(min(t, self.decay_steps), self.initial_learning_rate)
        t = min(t, self.decay_steps + self.warmup_steps)
        if t < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (t / self.warmup_steps) + self.initial_learning_rate
        return self._decay(t - self.warmup_steps, self.warmup_target)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "alpha": self.alpha, "name": self.name,
                "warmup_target": self.warmup_target, "warmup_steps": self.warmup_steps}


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR), as Keras 3 computes it.

    With f = step / first_decay_steps, restart i and the fraction c of its period are
    i = floor(f), c = f - i when t_mul == 1, else
    i = floor(log(1 - f (1 - t_mul)) / log(t_mul)),
    c = (f - (1 - t_mul^i) / (1 - t_mul)) / t_mul^i; then
    lr = initial_learning_rate * ((1 - alpha) * 0.5 * m_mul^i * (1 + cos(pi c)) + alpha).
    Period i lasts first_decay_steps * t_mul^i steps and starts from m_mul^i times the lr.
    With t_mul < 1 the periods add up to first_decay_steps / (1 - t_mul) steps; past that
    the logarithm is undefined and the lr is NaN, as in Keras.

    References: Loshchilov & Hutter, SGDR (2017), https://arxiv.org/abs/1608.03983

    Args:
      initial_learning_rate: lr at step 0.
      first_decay_steps: positive length of the first period.
      t_mul: factor on each period's length (> 0).
      m_mul: factor on each period's starting lr (>= 0).
      alpha: the lr's floor as a fraction of initial_learning_rate, in [0, 1].
    """

    def __init__(self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0,
                 name="SGDRDecay"):
        owner = "CosineDecayRestarts"
        self.initial_learning_rate = _real_arg(owner, "initial_learning_rate",
                                               initial_learning_rate, 0)
        self.first_decay_steps = _real_arg(owner, "first_decay_steps", first_decay_steps, 0,
                                           low_open=True)
        self.t_mul = _real_arg(owner, "t_mul", t_mul, 0, low_open=True)
        self.m_mul = _real_arg(owner, "m_mul", m_mul, 0)
        self.alpha = _real_arg(owner, "alpha", alpha, 0, 1)
        self.name = name

    def __call__(self, step):
        f = _step("CosineDecayRestarts", step) / self.first_decay_steps
        if self.t_mul == 1.0:
            i = math.floor(f)
            c = f - i
        else:
            arg = 1.0 - f * (1.0 - self.t_mul)
            if arg <= 0.0:                  # past the last period of a shrinking schedule
                return math.nan
            i = math.floor(math.log(arg) / math.log(self.t_mul))
            c = (f - (1.0 - self.t_mul ** i) / (1.0 - self.t_mul)) / self.t_mul ** i
        cosine = 0.5 * self.m_mul ** i * (1.0 + math.cos(math.pi * c))
        return self.initial_learning_rate * ((1.0 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "first_decay_steps": self.first_decay_steps, "t_mul": self.t_mul,
                "m_mul": self.m_mul, "alpha": self.alpha, "name": self.name}
