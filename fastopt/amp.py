"""Dynamic loss scaling for mixed-precision training, with torch.amp.GradScaler's semantics.

The loss is multiplied by a scale before the backward pass so small float16 gradients do
not flush to zero; the optimizer step multiplies the gradients by ``1 / scale`` inside its
kernel (``opt.step(grads, grad_scale=1/scale)``) and skips the whole step when any
gradient is NaN or infinite. After each iteration :meth:`GradScaler.update` halves the
scale when a step was skipped and doubles it after ``growth_interval`` clean steps in a row.

References:
  torch.amp.GradScaler (torch 2.13): defaults, the update rule of
  ``torch._amp_update_scale_`` (the scale is a float32 value; growth that would overflow
  float32 is not applied), and the state-dict keys.
  Micikevicius et al., "Mixed Precision Training", ICLR 2018 (dynamic loss scaling).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _validate
from .flat import arena_of

# Per-optimizer stages within one iteration, as torch's OptState.
_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


class GradScaler:
    """Dynamic loss scale (torch.amp.GradScaler's defaults and update rule).

    Typical loop::

        scaler = fo.GradScaler()
        loss = scaler.scale(loss)          # before the backward pass
        ...                                 # compute grads of the scaled loss
        scaler.step(opt, grads)            # unscale inside the step; skip on inf/NaN
        scaler.update()                    # adjust the scale

    Args:
      init_scale: the initial scale (stored as a float32 value, as torch's scale tensor).
      growth_factor: multiplies the scale after ``growth_interval`` clean steps (> 1).
      backoff_factor: multiplies the scale after a skipped step (in (0, 1)).
      growth_interval: consecutive clean steps before the scale grows (>= 1).
      enabled: False makes every method a pass-through (``step`` just steps).
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        self._enabled = _validate.flag("enabled", enabled, "GradScaler")
        self._scale = np.float32(_positive("init_scale", init_scale))
        self._growth_factor = _factor("growth_factor", growth_factor, grow=True)
        self._backoff_factor = _factor("backoff_factor", backoff_factor, grow=False)
        self._growth_interval = _interval(growth_interval)
        self._growth_tracker = 0
        self._stages: dict = {}            # id(optimizer) -> stage
        self._found_inf: dict = {}         # id(optimizer) -> bool, this iteration

    # -- scaling the loss ----------------------------------------------------------------
    def scale(self, outputs):
        """``outputs * scale``: a number, an array, a tensor, or a list/tuple of them."""
        if not self._enabled:
            return outputs
        s = float(self._scale)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, (np.ndarray, np.floating)):
            # Multiply in at least float32 (torch's opmath), keep the loss's dtype.
            return (outputs * np.float32(s)).astype(outputs.dtype, copy=False)
        return outputs * s

    # -- the optimizer step ----------------------------------------------------------------
    def inv_scale(self) -> float:
        """``1 / scale`` as torch computes it (in float64, rounded to float32)."""
        return float(np.float32(1.0 / float(self._scale)))

    def unscale_(self, optimizer, grads=None) -> bool:
        """Multiply the gradients by ``1 / scale`` in place and record whether any is
        non-finite; for when something must see unscaled gradients before the step
        (clipping with :func:`fastopt.clip_grad_norm`, logging). Returns True when all
        gradients are finite. :meth:`step` then steps without unscaling again.

        The fused path (:meth:`step` without this call) is faster: no extra passes.

        Args:
          optimizer: the optimizer the gradients belong to.
          grads: the gradients (as given to ``optimizer.step``); None for FlatParams grads.
        """
        if not self._enabled:
            return True
        key = id(optimizer)
        stage = self._stages.get(key, _READY)
        if stage == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer "
                               "since the last update().")
        if stage == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        from . import clip
        what, backend = "GradScaler.unscale_", getattr(optimizer, "backend", None)
        prep = clip._prepare(_grads_of(optimizer) if grads is None else grads, what, writeable=True)
        found_inf = not clip._all_finite(prep, backend, what)
        clip._scale(prep, self.inv_scale(), backend, what)
        self._found_inf[key] = found_inf
        self._stages[key] = _UNSCALED
        return not found_inf

    def step(self, optimizer, grads=None, **kwargs) -> bool:
        """Step ``optimizer`` on the unscaled gradients, or skip it if any is non-finite.

        Calls ``optimizer.step(grads, grad_scale=1/scale, **kwargs)``: the unscaling and
        the inf/NaN check are fused into the step, which returns False when it skipped.
        After :meth:`unscale_` it calls ``optimizer.step(grads, **kwargs)`` (or nothing,
        when unscale_ found a non-finite gradient).

        Returns:
          True when the step was applied, False when it was skipped.
        """
        if not self._enabled:
            return optimizer.step(grads, **kwargs)
        if "grad_scale" in kwargs:
            raise TypeError("GradScaler.step() sets grad_scale itself; do not pass it")
        key = id(optimizer)
        stage = self._stages.get(key, _READY)
        if stage == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if stage == _UNSCALED:
            applied = False if self._found_inf[key] else optimizer.step(grads, **kwargs) is not False
        else:
            applied = optimizer.step(grads, grad_scale=self.inv_scale(), **kwargs) is not False
            self._found_inf[key] = not applied
        self._stages[key] = _STEPPED
        return applied

    # -- the scale update ------------------------------------------------------------------
    def update(self, new_scale=None, *, found_inf=None) -> None:
        """Adjust the scale at the end of an iteration (torch's rule).

        If any optimizer stepped through this scaler skipped (non-finite gradients) the
        scale is multiplied by ``backoff_factor`` and the growth tracker resets; otherwise
        the tracker counts the clean step and, on reaching ``growth_interval``, the scale
        is multiplied by ``growth_factor`` (unless that overflows float32) and the tracker
        resets.

        Args:
          new_scale: set the scale to this value instead (torch's manual override).
          found_inf: use this verdict instead of the one recorded by :meth:`step`, e.g.
            after combining the verdicts of several data-parallel workers.
        """
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = np.float32(_positive("new_scale", _as_float(new_scale)))
        else:
            if found_inf is None:
                if not self._found_inf:
                    raise RuntimeError("No inf checks were recorded prior to update(): call "
                                       "step() (or pass found_inf=) first.")
                found_inf = any(self._found_inf.values())
            self._update_scale(bool(found_inf))
        self._stages.clear()
        self._found_inf.clear()

    def _update_scale(self, found_inf: bool) -> None:
        # torch._amp_update_scale_: scale is float32, the factors are doubles.
        if found_inf:
            self._scale = np.float32(float(self._scale) * self._backoff_factor)
            self._growth_tracker = 0
            return
        successful = self._growth_tracker + 1
        if successful == self._growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(float(self._scale) * self._growth_factor)
            if np.isfinite(grown):             # never grow past float32's range
                self._scale = grown
            self._growth_tracker = 0
        else:
            self._growth_tracker = successful

    # -- accessors ---------------------------------------------------------------------------
    def get_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return float(self._scale) if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor) -> None:
        self._growth_factor = _factor("growth_factor", new_factor, grow=True)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor) -> None:
        self._backoff_factor = _factor("backoff_factor", new_factor, grow=False)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval) -> None:
        self._growth_interval = _interval(new_interval)

    def is_enabled(self) -> bool:
        return self._enabled

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's keys: scale, growth_factor, backoff_factor, growth_interval,
        _growth_tracker ({} when disabled, as torch)."""
        if not self._enabled:
            return {}
        return {"scale": float(self._scale), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from fastopt or torch; checked first, all or nothing."""
        if not self._enabled:
            return
        if not isinstance(state_dict, dict):
            raise TypeError(f"GradScaler.load_state_dict expects a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"GradScaler state dict lacks {missing}")
        scale = np.float32(_positive("scale", _as_float(state_dict["scale"])))
        growth = _factor("growth_factor", _as_float(state_dict["growth_factor"]), grow=True)
        backoff = _factor("backoff_factor", _as_float(state_dict["backoff_factor"]), grow=False)
        interval = _interval(_as_int("growth_interval", state_dict["growth_interval"]))
        tracker = _as_int("_growth_tracker", state_dict["_growth_tracker"])
        if tracker < 0:
            raise ValueError(f"GradScaler: _growth_tracker must be >= 0, got {tracker}")
        self._scale, self._growth_factor, self._backoff_factor = scale, growth, backoff
        self._growth_interval, self._growth_tracker = interval, tracker

    def __repr__(self):
        return (f"GradScaler(scale={self.get_scale()}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, growth_interval={self._growth_interval}, "
                f"enabled={self._enabled})")


# -- helpers ------------------------------------------------------------------------------------
def _as_float(value) -> float:
    """A Python float from a number, a 0-d/1-element array or tensor."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if hasattr(value, "item"):
        return float(value.item())
    raise TypeError(f"expected a real number, got {type(value).__name__} {value!r}")


def _as_int(name, value) -> int:
    if hasattr(value, "item") and not isinstance(value, numbers.Integral):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"GradScaler: {name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _positive(name, value) -> float:
    v = _validate.number(name, value, low=0.0, low_open=True, where="GradScaler")
    if not math.isfinite(float(np.float32(v))):
        raise ValueError(f"GradScaler: {name} overflows float32, got {v}")
    return v


def _factor(name, value, grow: bool) -> float:
    if grow:
        v = _validate.number(name, value, where="GradScaler")
        if v <= 1.0:
            raise ValueError(f"GradScaler: {name} must be > 1.0, got {v}")
    else:
        v = _validate.number(name, value, low=0.0, high=1.0, low_open=True, high_open=True,
                             where="GradScaler")
    return v


def _interval(value) -> int:
    v = _as_int("growth_interval", value)
    if v < 1:
        raise ValueError(f"GradScaler: growth_interval must be >= 1, got {v}")
    return v


def _grads_of(optimizer) -> list:
    """The FlatParams gradient views of every param of ``optimizer``."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            flat = arena_of(p)
            if flat is None:
                raise ValueError(f"GradScaler.unscale_: param_groups[{gi}]['params'][{k}] is not a "
                                 "FlatParams view; pass grads=[...]")
            out.append(flat.grads[flat.index_of(p)])
    return out
