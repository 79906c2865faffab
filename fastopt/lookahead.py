"""Lookahead: slow weights pulled toward any fastopt optimizer's fast weights every k steps.

References:
  Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
  NeurIPS 2019. Semantics, defaults and state-dict layout of ``pytorch_optimizer.Lookahead``
  (pytorch-optimizer 4.1.0).

``Lookahead(optimizer, k=5, alpha=0.5, pullback_momentum="none")`` wraps a fastopt
optimizer. Each :meth:`step` runs the inner step; after it, each param group's counter
counts one, and in a group that reaches ``k`` (counter back to 0), every param that had a
gradient in this step gets ``fast = slow + alpha (fast - slow)`` (torch's ``lerp(fast,
slow, 1 - alpha)``) and ``slow = fast``, as one fused pass over all of them: the generic
CPU driver's prange over a chunk table (a FlatParams arena is one run), one CUDA launch
on the "cuda" backend, vectorised NumPy on "numpy" (kernels/lookahead.py).
``pullback_momentum``: "none"; "reset" zeroes the inner ``momentum_buffer``; "pullback"
interpolates it toward a slow copy the same way. As in the oracle these act on the inner
optimizer's ``momentum_buffer`` (SGD with momentum) only; other optimizers' moments are
left alone.

Slow weights start as copies of the params at construction. A step the inner optimizer
skips (``grad_scale`` with a non-finite gradient: it returns False) counts nothing.

State dict (pytorch_optimizer's layout)::

    {"lookahead_state": {i: {"slow_params": array[, "slow_momentum": array]}},
     "base_optimizer": <the inner optimizer's state dict, each group with its "counter">}

``i`` is the param's position over all groups (torch's state ids), so ``fastopt.save``
stores it; ``state_dict(pairs=True)`` keys it ``(group, position in group)`` as
pytorch_optimizer does. :meth:`load_state_dict` takes either key (the arrays as NumPy
arrays: ``fastopt.interop.from_pytorch_optimizer`` converts a torch one), and the inner
part as the inner optimizer's ``load_state_dict`` does (torch.optim's layout). So a
pytorch_optimizer.Lookahead around ``torch.optim.X`` loads into
``fastopt.Lookahead(fastopt.X(...))`` and back, with the arrays turned into tensors (or
back) and, for torch, ``step`` as torch keeps it.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _backend, _validate
from .flat import arena_of
from .kernels import lookahead as _kernel

PULLBACK = ("none", "reset", "pullback")
MOMENTUM = "momentum_buffer"


def _check_options(k, alpha, pullback_momentum):
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"Lookahead: k must be a positive int, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"Lookahead: k must be a positive int, got {k}")
    # [0, 1), as the oracle checks it (alpha 1 would be the inner optimizer alone)
    alpha = _validate.number("alpha", alpha, low=0.0, high=1.0, high_open=True, where="Lookahead")
    if not isinstance(pullback_momentum, str) or pullback_momentum not in PULLBACK:
        raise ValueError(f"Lookahead: pullback_momentum must be one of {PULLBACK}, "
                         f"got {pullback_momentum!r}")
    return int(k), alpha, pullback_momentum


class Lookahead:
    """Lookahead around a fastopt optimizer (see the module doc).

    Args:
      optimizer: a fastopt optimizer (``fastopt.SGD(...)``, ``fastopt.AdamW(flat)``, ...).
      k: inner steps between slow-weight updates (>= 1).
      alpha: the slow weights' step toward the fast ones, in [0, 1).
      pullback_momentum: "none", "reset" or "pullback" (the inner ``momentum_buffer``).
    """

    def __init__(self, optimizer, k: int = 5, alpha: float = 0.5, pullback_momentum: str = "none"):
        from .optimizer import Optimizer
        if not isinstance(optimizer, Optimizer):
            raise TypeError("Lookahead: optimizer must be a fastopt optimizer (fastopt.SGD(...), "
                            f"...), got {type(optimizer).__name__}")
        self.k, self.alpha, self.pullback_momentum = _check_options(k, alpha, pullback_momentum)
        if optimizer.master_weights or optimizer._pure is not None:
            raise NotImplementedError("Lookahead does not wrap optimizers of 16-bit params yet "
                                      "(master_weights, kahan_sum, stochastic_rounding)")
        if self.pullback_momentum == "pullback" and not optimizer.state_format.is_default:
            raise NotImplementedError("Lookahead(pullback_momentum='pullback') interpolates the "
                                      "inner momentum_buffer, which needs float32 state, not "
                                      f"state_format={optimizer.state_format.name!r}")
        self.optimizer = optimizer
        self._counters = [0] * len(optimizer.param_groups)
        params = self._params()
        self._slow = self._copies(params, copy=True)
        self._slow_momentum = self._copies(params, copy=False) \
            if self.pullback_momentum == "pullback" else None
        self._passes: dict = {}

    # -- what it shares with the inner optimizer --------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return {"lookahead_alpha": self.alpha, "lookahead_k": self.k,
                "lookahead_pullback_momentum": self.pullback_momentum, **self.optimizer.defaults}

    @property
    def state(self) -> dict:
        """``{i: {"slow_params": view[, "slow_momentum": view]}}`` (live arrays)."""
        out = {}
        for i, slow in enumerate(self._slow):
            out[i] = {"slow_params": slow}
            if self._slow_momentum is not None:
                out[i]["slow_momentum"] = self._slow_momentum[i]
        return out

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @staticmethod
    def _copies(params, copy):
        """Per param, a copy (or zeros) of it; the views of a FlatParams arena share one
        buffer with its layout, so that the slow pass streams it as one run."""
        out, buffers = [None] * len(params), {}
        for i, p in enumerate(params):
            flat = arena_of(p)
            if flat is not None:
                views = buffers.get(id(flat))
                if views is None:
                    buf = flat.new_buffer(0.0)
                    if copy:
                        buf[...] = flat.data
                    views = buffers[id(flat)] = (flat, flat.views_of(buf))
                out[i] = views[1][flat.index_of(p)]
            else:
                if isinstance(p, np.ndarray):
                    xp = np
                else:
                    import cupy as xp
                out[i] = xp.array(p, copy=True) if copy else xp.zeros_like(p)
        return out

    # -- the step ------------------------------------------------------------------------------
    def step(self, grads=None, **options) -> bool:
        """The inner step (``grads`` and options as its ``step``), then the slow-weight
        update of the groups whose counter reaches k. Returns what the inner step returns."""
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n != len(self._slow):
            raise ValueError("Lookahead: the inner optimizer's params changed (add_param_group "
                             "on the inner optimizer); use Lookahead.add_param_group")
        applied = self.optimizer.step(grads, **options)
        if not applied:
            return applied
        if grads is None or _validate.is_array(grads):
            stepped = range(n)
        else:   # read only when a slow update is due
            stepped = (i for i, g in enumerate(grads) if g is not None)
        self.after_step(stepped)
        return applied

    def after_step(self, stepped) -> None:
        """Count one applied inner step and run the slow update of the groups it completes,
        over the params ``stepped`` (their positions over all groups: those that had a
        gradient). :meth:`step` calls it; a wrapper that runs the inner step itself (a
        torch-side Lookahead over fastopt.torch's optimizer) calls it after that step."""
        due, start = [], 0
        for gi, group in enumerate(self.optimizer.param_groups):
            n = len(group["params"])
            self._counters[gi] += 1
            if self._counters[gi] >= self.k:
                self._counters[gi] = 0
                due.append(range(start, start + n))
            start += n
        if not due:
            return
        if isinstance(stepped, range) and stepped == range(start) and sum(map(len, due)) == start:
            chosen = stepped                      # every param, in order: the common case
        else:
            wanted = set().union(*due)
            chosen = tuple(i for i in stepped if i in wanted)
        if chosen:
            self._update(self._params(), chosen)

    def _momenta(self, chosen):
        """The inner momentum_buffer of each chosen param (None where it keeps none)."""
        if self.pullback_momentum == "none" or MOMENTUM not in self.optimizer.slot_names:
            return None
        out = []
        for i in chosen:
            st = self.optimizer._state[i]
            out.append(None if not st else st.get(MOMENTUM))
        return out if any(m is not None for m in out) else None

    def _update(self, params, chosen) -> None:
        """The slow update of params ``chosen`` (a range or a tuple of positions)."""
        backend_name = _backend.resolve(self.optimizer.backend, params[0])
        if isinstance(chosen, range) and len(chosen) == len(params):
            sel, slows = params, self._slow
        else:
            sel, slows = [params[i] for i in chosen], [self._slow[i] for i in chosen]
        momenta = self._momenta(chosen)
        slow_m = None if momenta is None or self._slow_momentum is None else \
            [self._slow_momentum[i] for i in chosen]
        if backend_name == "numpy":
            _kernel.lookahead_numpy(sel, slows, momenta, slow_m, self.alpha, self.pullback_momentum)
            return
        driver = _backend.get(backend_name)
        key = (backend_name, chosen)
        plan = self._passes.get(key)
        if plan is None or not plan.holds(sel, momenta):
            if plan is None and len(self._passes) >= 64:
                self._passes.clear()
            plan = self._passes[key] = _SlowPass(driver, sel, slows, momenta, slow_m)
        for dtype, has_m, table in plan.runs:
            scalars = _kernel.lookahead_scalars(self.alpha, self.pullback_momentum if has_m else "none",
                                                dtype.type)
            driver.run(_kernel.lookahead_element, table, scalars, 1.0)

    # -- param groups ----------------------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        """Add a group to the inner optimizer, with slow copies of its params."""
        before = len(self._params())
        self.optimizer.add_param_group(group)
        new = self._params()[before:]
        self._slow += self._copies(new, copy=True)
        if self._slow_momentum is not None:
            self._slow_momentum += self._copies(new, copy=False)
        self._counters.append(0)

    # -- evaluating with the slow weights ----------------------------------------------------------
    def backup_and_load_cache(self) -> None:
        """Keep the fast weights aside and put the slow weights into the params (for
        evaluation); :meth:`clear_and_load_backup` puts the fast weights back."""
        params = self._params()
        self._backup = [p.copy() for p in params]
        for p, slow in zip(params, self._slow):
            p[...] = slow

    def clear_and_load_backup(self) -> None:
        backup = getattr(self, "_backup", None)
        if backup is None:
            raise RuntimeError("Lookahead: clear_and_load_backup without backup_and_load_cache")
        for p, b in zip(self._params(), backup):
            p[...] = b
        del self._backup

    # -- state dicts ------------------------------------------------------------------------------
    def state_dict(self, pairs: bool = False) -> dict:
        """pytorch_optimizer's layout (module doc); ``pairs``: keys ``(group, index)``."""
        inner = self.optimizer.state_dict()
        for g, counter in zip(inner["param_groups"], self._counters):
            g["counter"] = counter
        keys = [(gi, k) for gi, g in enumerate(self.optimizer.param_groups)
                for k in range(len(g["params"]))]

        def host(a):
            return np.array(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a)

        look = {}
        for i, slow in enumerate(self._slow):
            st = {"slow_params": host(slow)}
            if self._slow_momentum is not None:
                st["slow_momentum"] = host(self._slow_momentum[i])
            look[keys[i] if pairs else i] = st
        return {"lookahead_state": look, "base_optimizer": inner}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict`'s layout (or pytorch_optimizer's, arrays as NumPy);
        everything is checked before anything changes."""
        if not isinstance(state_dict, dict) or "lookahead_state" not in state_dict \
                or "base_optimizer" not in state_dict:
            raise ValueError("Lookahead.load_state_dict: expected a dict with 'lookahead_state' "
                             "and 'base_optimizer' (pytorch_optimizer's Lookahead layout)")
        saved, base = state_dict["lookahead_state"], state_dict["base_optimizer"]
        params = self._params()
        pairs = {(gi, k): start + k for gi, start, n in self._group_spans() for k in range(n)}
        slow, slow_m = [None] * len(params), [None] * len(params)
        if not isinstance(saved, dict):
            raise ValueError("Lookahead.load_state_dict: 'lookahead_state' must be a dict")
        for key, st in saved.items():
            where = f"state_dict['lookahead_state'][{key!r}]"
            if isinstance(key, (tuple, list)) and len(key) == 2:
                i = pairs.get(tuple(int(x) for x in key))
            elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
                i = int(key) if 0 <= int(key) < len(params) else None
            else:
                i = None
            if i is None:
                raise ValueError(f"{where}: the key names no param of this Lookahead")
            if slow[i] is not None:
                raise ValueError(f"{where}: param {i} appears twice")
            if not isinstance(st, dict) or "slow_params" not in st:
                raise ValueError(f"{where} lacks 'slow_params'")
            slow[i] = self._checked_array(st["slow_params"], params[i], where + "['slow_params']")
            if self._slow_momentum is not None:
                if "slow_momentum" not in st:
                    raise ValueError(f"{where} lacks 'slow_momentum' (pullback_momentum='pullback')")
                slow_m[i] = self._checked_array(st["slow_momentum"], params[i],
                                                where + "['slow_momentum']")
        missing = [i for i, s in enumerate(slow) if s is None]
        if missing:
            raise ValueError(f"Lookahead.load_state_dict: no slow weights for params {missing}: "
                             "the state does not match the current parameters")
        if not isinstance(base, dict) or not isinstance(base.get("param_groups"), (list, tuple)) \
                or len(base["param_groups"]) != len(self._counters):
            raise ValueError("Lookahead.load_state_dict: 'base_optimizer' must be the inner "
                             f"optimizer's state dict with {len(self._counters)} param group(s)")
        counters, groups = [], []
        for gi, g in enumerate(base["param_groups"]):
            g = dict(g)
            c = g.pop("counter", 0)
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c):
                raise ValueError(f"state_dict['base_optimizer']['param_groups'][{gi}]['counter'] "
                                 f"must be a non-negative int, got {c!r}")
            counters.append(int(c))
            groups.append(g)
        self.optimizer.load_state_dict({**base, "param_groups": groups})   # checks, then loads
        for i in range(len(params)):
            self._slow[i][...] = slow[i]
            if self._slow_momentum is not None:
                self._slow_momentum[i][...] = slow_m[i]
        self._counters = counters
        self._passes.clear()

    def _group_spans(self):
        start = 0
        for gi, g in enumerate(self.optimizer.param_groups):
            yield gi, start, len(g["params"])
            start += len(g["params"])

    def _checked_array(self, value, p, where):
        a = np.asarray(value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray)
                       else value)
        if a.shape != tuple(p.shape):
            raise ValueError(f"{where} has shape {a.shape}, expected {tuple(p.shape)} like the param")
        if a.dtype.kind != "f":
            raise TypeError(f"{where} has dtype {a.dtype}, expected a floating dtype")
        if isinstance(p, np.ndarray):
            return a.astype(p.dtype, copy=False)
        import cupy
        return cupy.asarray(a, dtype=p.dtype)

    def __repr__(self):
        return (f"Lookahead({self.optimizer!r}, k={self.k}, alpha={self.alpha}, "
                f"pullback_momentum={self.pullback_momentum!r})")


class _SlowPass:
    """The slow update of one choice of params, kept for the next slow steps while the
    same arrays take part: the arrays it was built over (held, so that an identity test
    stays valid) and, per (dtype, has a momentum buffer), the driver's chunk table.

    Whatever replaces a param or a momentum buffer makes a new pass: params rebound in
    ``param_groups``, the inner ``load_state_dict`` (new state arrays), buffers that
    appear after the first inner step, another inner optimizer. The slow weights and
    slow momenta need no test: they are the Lookahead's own arrays, one per position,
    never replaced (add_param_group appends, load_state_dict copies into them)."""

    __slots__ = ("params", "momenta", "runs")

    def __init__(self, driver, params, slows, momenta, slow_m):
        self.params = tuple(params)
        self.momenta = None if momenta is None else tuple(momenta)
        members: dict = {}
        for k, p in enumerate(params):
            if p.size:
                # params with and without a momentum buffer run as separate tables
                has_m = momenta is not None and momenta[k] is not None
                members.setdefault((np.dtype(p.dtype), has_m), []).append(k)
        self.runs = []
        for (dtype, has_m), ks in members.items():
            ps = [params[k] for k in ks]
            slots = ([slows[k] for k in ks], [momenta[k] for k in ks] if has_m else None,
                     [slow_m[k] for k in ks] if has_m and slow_m is not None else None)
            self.runs.append((dtype, has_m, driver.table(ps, ps, slots)))

    def holds(self, params, momenta) -> bool:
        """Whether ``params`` and ``momenta`` (None: no buffers) are the very arrays this
        pass was built over."""
        if (momenta is None) != (self.momenta is None):
            return False
        return _same(self.params, params) and (momenta is None or _same(self.momenta, momenta))


def _same(mine, now) -> bool:
    return len(mine) == len(now) and all(map(operator.is_, mine, now))
