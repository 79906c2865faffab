"""The engine of the schedule-free optimizers: train()/eval() and the group host state.

``fastopt.AdamWScheduleFree`` and ``fastopt.SGDScheduleFree`` are made from their specs
(``kernels/schedulefree.py``) on :class:`ScheduleFree` (``Spec.engine``), which adds to
:class:`~fastopt.optimizer.Optimizer` what the ``schedulefree`` package keeps beside
the per-param state:

- **Group host state.** ``k`` (steps taken), ``weight_sum``, ``lr_max``,
  ``scheduled_lr`` and ``train_mode`` live in each param group, as in the package (so
  its state dicts and fastopt's are interchangeable; they are the spec's fixed
  hyperparameters, checked like the others). The element's scalars read the values
  before the step (``kernels.schedulefree.step_schedule``); a step that is applied
  writes the new values into every group afterwards, one that raises or is skipped
  (``grad_scale`` with a non-finite gradient) leaves them as they were. A group's ``k``
  advances at every applied step, whether or not its params had gradients (as the
  package's).
- **The weights' two points.** Params hold ``y`` in train mode, ``x`` in eval mode.
  :meth:`ScheduleFree.eval` and :meth:`ScheduleFree.train` switch the groups not yet in
  that mode with one fused elementwise pass per bucket (``kernels.schedulefree.
  swap_element``: reads the param and ``z``, writes the param; 16-bit params with
  master weights switch their masters and get them rounded; low-bit ``z`` is decoded,
  not rewritten). Params without state (never stepped) are left alone, as in the package.
- **Steps only in train mode.** ``step()`` in eval mode raises (before anything
  changes), naming the group.

Where fastopt differs from the package: a new optimizer starts in train mode (the
package starts in eval mode and refuses to step before ``train()``; calling ``train()``
first changes nothing here); ``step()`` refuses when *any* group is in eval mode (the
package looks at the first group only and would step the others' ``x`` as ``y``);
``eval()`` with ``beta1`` (``momentum``) 0 raises a ValueError before changing anything
(the package divides by zero mid-way).
"""
from __future__ import annotations

import math

import numpy as np

from . import _backend
from ._plan import KAHAN, MASTER, _is_low_precision
from .kernels import schedulefree as _sf
from .kernels.layout import BFLOAT16, BLOCKWISE, NATIVE
from .optimizer import Optimizer

_Z = "z"


def _beta(group) -> float:
    """The interpolation coefficient: AdamW's ``beta1``, SGD's ``momentum``."""
    return float(group["betas"][0]) if "betas" in group else float(group["momentum"])


def _beta_name(group) -> str:
    return "betas[0]" if "betas" in group else "momentum"


class _Swap:
    """The tensors of one group switched together: same dtype, same storage of ``z``."""

    __slots__ = ("params", "grads", "zs", "model", "pure", "compensation", "format", "scales",
                 "block", "table", "key")

    def __init__(self):
        self.model = self.pure = self.compensation = self.scales = self.table = None
        self.format, self.block = NATIVE, 0


class ScheduleFree(Optimizer):
    """Base class of the schedule-free optimizers (see the module doc)."""

    # -- the step: train mode only; the group host state advances when it is applied ---------
    def _step_unlocked(self, grads, grad_scale):
        pending = self.__dict__["_sf_pending"] = []
        try:
            applied = super()._step_unlocked(grads, grad_scale)
        finally:
            self.__dict__.pop("_sf_pending", None)
        if applied:
            for group, values in pending:
                group.update(values)
        return applied

    def _at_iteration(self, group, where):
        """Called for each group after its check, before anything changes: refuse eval
        mode, compute the host state the step leaves (kept until the step is applied)."""
        if group["train_mode"] is not True:
            raise RuntimeError(f"{where} is in eval mode (train_mode=False): the params hold the "
                               f"averaged weights x; call optimizer.train() before step() (and "
                               f"optimizer.eval() before evaluating or saving)")
        run = super()._at_iteration(group, where)
        k, lr, lr_max, weight_sum, c = _sf.step_schedule(run)
        if not (math.isfinite(weight_sum) and math.isfinite(c)):
            raise ValueError(f"{where}: the average's weight overflows at step {k + 1} "
                             f"(r={run['r']}, weight_lr_power={run['weight_lr_power']}, "
                             f"lr_max={lr_max}): use a smaller r or weight_lr_power")
        pending = self.__dict__.get("_sf_pending")
        if pending is not None:
            pending.append((group, {"k": k + 1, "scheduled_lr": lr, "lr_max": lr_max,
                                    "weight_sum": weight_sum}))
        return run

    def state_dict(self) -> dict:
        """The state dict (fastopt/_state.py), each group also carrying the package's
        ``foreach`` switch (False): the package's step reads it and its
        ``load_state_dict`` keeps only the saved group's keys. fastopt drops it on load,
        as it does torch's implementation switches."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.setdefault("foreach", False)
        return sd

    # -- train() / eval() -----------------------------------------------------------------
    def train(self) -> None:
        """Switch every group in eval mode to train mode: the params get ``y`` back
        (``y = lerp(x, z, 1 - beta)``). Groups already in train mode are left alone."""
        self._switch(to_eval=False)

    def eval(self) -> None:
        """Switch every group in train mode to eval mode: the params get the averaged
        weights ``x = lerp(y, z, 1 - 1/beta)``, the ones to evaluate and save. Groups
        already in eval mode are left alone."""
        self._switch(to_eval=True)

    def _switch(self, to_eval: bool) -> None:
        with self._step_lock:
            todo = []
            for gi, group in enumerate(self.param_groups):
                where = f"param_groups[{gi}]"
                self._checked_group(gi, group)
                if group["train_mode"] is not to_eval:     # already in that mode
                    continue
                if to_eval and _beta(group) == 0:
                    raise ValueError(f"{where}: eval() needs {_beta_name(group)} > 0 (x = (y - "
                                     f"(1 - beta) z) / beta), got 0; the params are unchanged")
                todo.append(gi)
            if not todo:
                return
            backend_name = _backend.resolve(self.backend, self.param_groups[0]["params"][0])
            be = _backend.get(backend_name)
            for gi in todo:
                group = self.param_groups[gi]
                for swap in self._swaps(gi):
                    self._run_swap(be, swap, _beta(group), to_eval)
                group["train_mode"] = not to_eval

    def _swaps(self, gi) -> list:
        """The group's params that have ``z``, in buckets (cached while the arrays are
        the same ones)."""
        group = self.param_groups[gi]
        base = sum(len(g["params"]) for g in self.param_groups[:gi])
        kinds: dict = {}
        for k, p in enumerate(group["params"]):
            st = self._state[base + k]
            if st and _Z in st:
                kinds.setdefault((np.dtype(p.dtype), self._storage(_Z, p)), []).append(base + k)
        cache = self.__dict__.setdefault("_sf_swaps", {})
        key = tuple((i, id(self._state[i][_Z]), id(self.param_groups[gi]["params"][i - base]))
                    for idx in kinds.values() for i in idx)
        hit = cache.get(gi)
        if hit is not None and hit[0] == key:
            return hit[1]
        swaps = []
        for (_, storage), idx in kinds.items():
            s = _Swap()
            shown = [group["params"][i - base] for i in idx]
            states = [self._state[i] for i in idx]
            s.zs = [st[_Z] for st in states]
            s.params, s.grads = shown, shown           # the element ignores the gradient
            if _is_low_precision(shown[0]):
                if self.master_weights:
                    s.model, s.params = shown, [st[MASTER] for st in states]
                else:
                    s.pure = self._pure
                    if self._pure == "kahan":
                        s.compensation = [st[KAHAN] for st in states]
            if storage != NATIVE or not self.state_format.is_default:
                s.format = storage
                if storage in BLOCKWISE:
                    s.scales = [st[_Z + "_absmax"] for st in states]
                s.block = self.state_format.block_size
            swaps.append(s)
        cache[gi] = (key, swaps)
        return swaps

    def _run_swap(self, be, s: _Swap, beta: float, to_eval: bool) -> None:
        if be.name == "numpy":
            _numpy_swap(s, beta, to_eval)
            return
        if s.table is None:
            options = {}
            if s.format != NATIVE or not self.state_format.is_default:
                options = dict(formats=(s.format,), scales=(s.scales,), block=s.block)
            if s.pure is not None:
                options.update(pure=s.pure, model=s.compensation)
            else:
                options["model"] = s.model
            s.table = be.table(s.params, s.grads, (s.zs,), **options)
        cast = np.float32 if s.pure is not None else np.dtype(s.params[0].dtype).type
        scalars = _sf.swap_scalars(beta, to_eval, cast)
        options = {"seed": 0} if s.model is None else {"seed": 0, "stochastic": self.stochastic_rounding}
        # z is read only; a blockwise (int8) column cannot be read without being
        # re-encoded by the driver, which gives its codes and absmax back unchanged
        # (each block's largest value is its absmax exactly; tested)
        be.run(_sf.swap_element, s.table, scalars, 1.0, writes=(s.format in BLOCKWISE,), **options)


def _decoded(s: _Swap) -> list:
    """``z`` as float32 or the params' dtype (low-bit columns decoded)."""
    if s.format == NATIVE or s.format not in (BFLOAT16,) + BLOCKWISE:
        return s.zs
    if s.format == BFLOAT16:
        return [z.astype(np.float32) for z in s.zs]
    from .kernels import blockwise, reference_lowbit
    kind = blockwise.SIGNED if s.format == BLOCKWISE[0] else blockwise.UNSIGNED
    qmap = blockwise.dynamic_map(kind)
    return [reference_lowbit.dequantize(z, a, qmap, s.block) for z, a in zip(s.zs, s.scales)]


def _numpy_swap(s: _Swap, beta: float, to_eval: bool) -> None:
    """The ``"numpy"`` backend's swap: the reference's lerp over whole tensors."""
    from .kernels import reference_schedulefree as ref
    move = ref.to_eval if to_eval else ref.to_train
    zs = _decoded(s)
    if s.pure is not None:
        # pure 16-bit params (Kahan): the float32 swap on widened copies, the change
        # carried as an update is (see fastopt/_backend.py _Reference._pure_step)
        wide = [p.astype(np.float32) for p in s.params]
        before = [w.copy() for w in wide]
        move(wide, zs, beta)
        for p, c, p0, new in zip(s.params, s.compensation, before, wide):
            comp = c.astype(np.float32) + (new - p0)
            p[...] = (p0 + comp).astype(p.dtype)
            c[...] = (comp - (p.astype(np.float32) - p0)).astype(c.dtype)
        return
    move(s.params, zs, beta)
    if s.model is not None:
        for w, master in zip(s.model, s.params):
            w[...] = master.astype(w.dtype)
