"""EMA: a fused, in-place exponential moving average of model weights.

``update()`` is one pass over the weights and their averages (one ``prange`` on the CPU,
one launch on the GPU, whatever the number of tensors); ``swap()`` exchanges the
averages and the weights in place in one pass, for evaluating with the averaged model.

References:
  torch.optim.swa_utils.get_ema_multi_avg_fn (torch 2.13): ``shadow = lerp(shadow, param,
  1 - decay)``, the shadow starting as a copy of the weights.
  The warmup ``decay_t = min(decay, (1 + t) / (10 + t))`` (``use_num_updates=True``) is
  tf.train.ExponentialMovingAverage's ``num_updates`` rule (TensorFlow 1.x documentation),
  with ``t`` the number of updates made before this one.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

from . import _backend, _validate
from ._state import _host
from .flat import FlatParams
from .kernels import ema as kema


class EMA:
    """Exponential moving average of ``params``, kept in separate "shadow" arrays.

    Args:
      params: a FlatParams (the averages are then one buffer, updated in one run) or a
        list of arrays (float32/float64, C-contiguous, writeable for :meth:`swap`).
      decay: the averaging factor in [0, 1]: ``shadow = decay * shadow + (1 - decay) * param``.
      use_num_updates: warm up with ``min(decay, (1 + t) / (10 + t))`` at update ``t``
        (0-based), so early averages are not dominated by the initial weights.
      backend: ``"cpu"``, ``"numpy"``, ``"cuda"`` or None (context, env var, then auto).

    Attributes:
      shadow: the averaged arrays, aligned with ``params``.
      num_updates: updates made so far.
    """

    def __init__(self, params, decay=0.999, *, use_num_updates=False, backend=None):
        if backend is not None:
            _backend._check_name(backend, "backend")
        self.decay = _validate.number("decay", decay, low=0.0, high=1.0, where="EMA")
        self.use_num_updates = _validate.flag("use_num_updates", use_num_updates, "EMA")
        self.backend = backend
        if isinstance(params, FlatParams):
            self.params = list(params.params)
            self.shadow = params.views_of(params.data.copy())
        else:
            if _validate.is_array(params):
                raise TypeError("EMA: params must be a list of arrays or a FlatParams, got a "
                                "single array; wrap it in a list")
            self.params = list(params)
            if not self.params:
                raise ValueError("EMA: params is empty")
            for i, p in enumerate(self.params):
                _validate.param(p, f"EMA: params[{i}]")
            _validate.no_overlap(self.params, "EMA: params")
            self.shadow = [p.copy() for p in self.params]
        self.num_updates = 0
        self.swapped = False
        self._tables: dict = {}

    # -- the passes --------------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.use_num_updates:
            t = self.num_updates
            return min(self.decay, (1.0 + t) / (10.0 + t))
        return self.decay

    def update(self) -> None:
        """``shadow = lerp(shadow, param, 1 - decay)`` for every tensor, in one pass."""
        if self.swapped:
            raise RuntimeError("EMA.update() while swapped: the model holds the averages; "
                               "call swap() again first")
        decay = self.current_decay()
        self._each_dtype("update", lambda cast: kema.ema_scalars(decay, cast))
        self.num_updates += 1

    def swap(self) -> None:
        """Exchange the averages and the model's weights in place (one pass); twice restores."""
        self._each_dtype("swap", lambda cast: kema.ema_scalars(self.decay, cast))
        self.swapped = not self.swapped

    @contextlib.contextmanager
    def averaged(self):
        """``with ema.averaged(): evaluate(model)``: the model holds the averages inside."""
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    def copy_to(self, arrays=None) -> None:
        """Write the averages into ``arrays`` (default: the model's weights), e.g. at the end."""
        if self.swapped:
            raise RuntimeError("EMA.copy_to() while swapped; call swap() again first")
        targets = self.params if arrays is None else list(arrays)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA.copy_to: got {len(targets)} arrays, expected {len(self.shadow)}")
        for i, (t, s) in enumerate(zip(targets, self.shadow)):
            if tuple(t.shape) != tuple(s.shape):
                raise ValueError(f"EMA.copy_to: arrays[{i}] has shape {tuple(t.shape)}, "
                                 f"expected {tuple(s.shape)}")
        for t, s in zip(targets, self.shadow):
            t[...] = s

    def _each_dtype(self, kind, scalars_for) -> None:
        name = _backend.resolve(self.backend, self.params[0])
        for dtype, idx in self._groups():
            cast = dtype.type
            shadows = [self.shadow[i] for i in idx]
            params = [self.params[i] for i in idx]
            h = scalars_for(cast)
            if name == "numpy":
                if kind == "update":
                    kema.ema_reference(shadows, params, h)
                else:
                    for s, p in zip(shadows, params):
                        tmp = s.copy()
                        s[...] = p
                        p[...] = tmp
                continue
            be = _backend.get(name)
            key = (kind, name, dtype)
            table = self._tables.get(key)
            if table is None:
                slots = (None, None, None) if kind == "update" else (params, None, None)
                table = self._tables[key] = be.table(shadows, params, slots)
            be.run(kema.ema_element if kind == "update" else kema.swap_element, table, h)

    def _groups(self):
        groups: dict = {}
        for i, p in enumerate(self.params):
            if p.size:
                groups.setdefault(np.dtype(p.dtype), []).append(i)
        return list(groups.items())

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"decay", "use_num_updates", "num_updates", "shadow": [arrays]}`` (host copies)."""
        if self.swapped:
            raise RuntimeError("EMA.state_dict() while swapped; call swap() again first")
        return {"decay": self.decay, "use_num_updates": self.use_num_updates,
                "num_updates": self.num_updates, "shadow": [_host(s) for s in self.shadow]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict`; checked first, all or nothing."""
        if self.swapped:
            raise RuntimeError("EMA.load_state_dict() while swapped; call swap() again first")
        if not isinstance(state_dict, dict):
            raise TypeError(f"EMA.load_state_dict expects a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("decay", "use_num_updates", "num_updates", "shadow") if k not in state_dict]
        if missing:
            raise ValueError(f"EMA state dict lacks {missing}")
        decay = _validate.number("decay", state_dict["decay"], low=0.0, high=1.0, where="EMA state dict")
        use = _validate.flag("use_num_updates", state_dict["use_num_updates"], "EMA state dict")
        n = state_dict["num_updates"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"EMA state dict: num_updates must be an int >= 0, got {n!r}")
        shadow = list(state_dict["shadow"])
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state dict has {len(shadow)} shadow arrays, expected {len(self.shadow)}")
        for i, (src, dst) in enumerate(zip(shadow, self.shadow)):
            if tuple(np.shape(src)) != tuple(dst.shape):
                raise ValueError(f"EMA state dict: shadow[{i}] has shape {tuple(np.shape(src))}, "
                                 f"expected {tuple(dst.shape)}")
            if np.dtype(getattr(src, "dtype", np.float64)).kind != "f":
                raise TypeError(f"EMA state dict: shadow[{i}] must be floating point")
        self.decay, self.use_num_updates, self.num_updates = decay, use, int(n)
        for src, dst in zip(shadow, self.shadow):
            if isinstance(dst, np.ndarray):
                dst[...] = np.asarray(src, dtype=dst.dtype)
            else:
                dst[...] = _device_like(dst, src)

    def __repr__(self):
        return (f"EMA({len(self.shadow)} tensors, decay={self.decay}, "
                f"use_num_updates={self.use_num_updates}, num_updates={self.num_updates})")


def _device_like(dst, src):
    import cupy
    return cupy.asarray(np.asarray(src), dtype=dst.dtype)
