"""Muon, and Muon with an auxiliary AdamW for the params that are not hidden matrices.

:class:`Muon` has torch.optim.Muon's signature, defaults, param groups and state
(``momentum_buffer``; no ``step``), and its state dicts load both ways. A step of a group
is three pieces (kernels/muon.py):

1. one fused momentum pass over all the group's matrices of a dtype (the driver's
   reduction with writes: the buffer, the direction ``u`` into a per-shape stack, and
   ``||u||^2`` per matrix);
2. Newton-Schulz over each stack of same-shape matrices: batched ``matmul`` of the array
   module (NumPy's BLAS on the host, CuPy's cuBLAS on a GPU), in the param's dtype;
3. one fused pass ``p = p (1 - lr wd) - lr O``.

The stacks (two ``(k, m, n)`` arrays and two ``(k, s, s)`` ones per shape) and the
drivers' tables are made on the first step of a set of arrays and reused.

:class:`MuonWithAuxAdam` is KellerJordan/Muon's pairing in one optimizer: param groups
flagged ``use_muon=True`` (2-D hidden weights: torch.optim.Muon's hyperparameters) or
``use_muon=False`` (everything else: torch.optim.AdamW's), each with its own values, and one
state dict (``momentum_buffer`` for Muon params; ``exp_avg``, ``exp_avg_sq``, ``step`` for
AdamW params, as the two torch optimizers keep them).
"""
from __future__ import annotations

import time

import numpy as np

from . import _backend
from .kernels import muon as _k
from .kernels import per_tensor
from .kernels import reference_muon
from .optimizer import Optimizer, _step_seed
from .spec import optimizer_class

_NOT_SUPPORTED = {
    "master_weights": "16-bit params with master weights",
    "stochastic_rounding": "stochastic rounding of 16-bit params",
    "kahan_sum": "16-bit params with Kahan compensation",
}


def _refuse_options(name, options):
    for option, what in _NOT_SUPPORTED.items():
        if options.get(option):
            raise NotImplementedError(f"{name} does not support {option}=True ({what}) yet: "
                                      "its Newton-Schulz step runs in float32 or float64")
    fmt = options.get("state_format", "float32")
    if fmt != "float32":
        raise NotImplementedError(f"{name} does not support state_format={fmt!r} yet; "
                                  "use 'float32' (the params' dtype)")


def _check_matrices(params, where, owner):
    for k, p in enumerate(params):
        if len(p.shape) != 2:
            raise ValueError(f"{where}['params'][{k}] has shape {tuple(p.shape)}: {owner} only "
                             "supports 2-D parameters (matrices), as torch.optim.Muon; optimize "
                             "biases, norms and other non-2-D params with AdamW (fastopt."
                             "MuonWithAuxAdam runs both in one optimizer)")


class _Workspace:
    """One bucket's Muon workspace: the per-shape stacks and the drivers' tables over them.

    Matrices are ordered stack by stack (empty ones left out): row ``r`` of the momentum
    table is matrix ``order[r]`` of the bucket, so its per-row sums split per stack.
    Kept in the bucket's ``table`` slot; :meth:`with_grads` follows new gradient arrays
    as the drivers' tables do.
    """

    def __init__(self, backend, params, grads, buffers, xp):
        by_shape: dict = {}
        for j, p in enumerate(params):
            if p.size:
                by_shape.setdefault(tuple(p.shape), []).append(j)
        dtype = np.dtype(params[0].dtype)
        self.on_device = xp is not np      # (not the module itself: the workspace pickles)
        self.stacks = [_k.Stack(len(js), shape, dtype, xp) for shape, js in by_shape.items()]
        self.counts = [len(js) for js in by_shape.values()]
        self.order = [j for js in by_shape.values() for j in js]
        self.params = [params[j] for j in self.order]
        directions = [s.x[k] for s in self.stacks for k in range(s.x.shape[0])]
        self.momentum = None if not self.order else per_tensor.table(
            directions, [grads[j] for j in self.order], ([buffers[j] for j in self.order],), backend)
        self.updates: dict = {}          # ns_steps % 2 -> the update pass's table

    def with_grads(self, grads, grad_addresses=None) -> "_Workspace":
        new = object.__new__(_Workspace)
        new.__dict__.update(self.__dict__)
        if self.momentum is not None:
            addresses = None if grad_addresses is None else [grad_addresses[j] for j in self.order]
            new.momentum = self.momentum.with_grads([grads[j] for j in self.order], addresses)
        return new

    def update_table(self, ns_steps, backend):
        parity = ns_steps % 2
        table = self.updates.get(parity)
        if table is None:
            results = [s.result(ns_steps)[k] for s in self.stacks for k in range(s.x.shape[0])]
            table = self.updates[parity] = backend.table(self.params, results, ())
        return table

    @property
    def xp(self):
        if not self.on_device:
            return np
        import cupy
        return cupy

    def sync(self):
        if self.on_device:
            self.xp.cuda.get_current_stream().synchronize()


class _MuonEngine(Optimizer):
    """The Muon step over :class:`~fastopt.optimizer.Optimizer`'s groups, plans and state.

    ``phase_times``: None, or a dict that each step adds its seconds to, per phase
    ("momentum", "newton_schulz", "update"; on a GPU each phase is synchronised first):
    for benchmarks.
    """

    def __init__(self, params, defaults, backend=None, **options):
        _refuse_options(type(self).__name__, options)
        self.phase_times = None
        super().__init__(params, defaults, backend, **options)

    def _is_muon_group(self, group) -> bool:
        return True

    def add_param_group(self, group: dict) -> None:
        """Add a group (torch semantics); every param of a Muon group must be 2-D."""
        if isinstance(group, dict) and "params" in group and self._is_muon_group(group):
            ps = group["params"]
            ps = [ps] if hasattr(ps, "shape") else list(getattr(ps, "params", ps))
            group = {**group, "params": ps}
            _check_matrices(ps, f"param_groups[{len(self.param_groups)}]", type(self).__name__)
        super().add_param_group(group)

    def _plan_for(self, gi, grads, backend_name, from_flat):
        plan, how = super()._plan_for(gi, grads, backend_name, from_flat)
        if how == "new" and self._is_muon_group(self.param_groups[gi]):
            # (a param swapped into the group since the last step: still nothing changed)
            _check_matrices(plan.params, f"param_groups[{gi}]", type(self).__name__)
        return plan, how

    def _run_group(self, group, plan, backend_name, scale=1.0):
        if not self._is_muon_group(group):
            super()._run_group(group, plan, backend_name, scale)
            return
        for bucket in plan.buckets:
            if backend_name == "numpy":
                reference_muon.muon(bucket.params, bucket.grads, bucket.slots[0], grad_scale=scale,
                                    **{k: v for k, v in group.items()
                                       if k in _MUON_HYPERS})
            else:
                self._muon_bucket(group, bucket, _backend.get(backend_name), scale)
            self._steps[bucket.indices] += 1

    def _muon_bucket(self, group, bucket, backend, scale):
        ws = bucket.table
        if ws is None:
            xp = np if isinstance(bucket.params[0], np.ndarray) else backend.xp
            ws = bucket.table = _Workspace(backend, bucket.params, bucket.grads, bucket.slots[0], xp)
        if ws.momentum is None:
            return
        times = self.phase_times
        t0 = time.perf_counter() if times is not None else 0.0
        dtype = np.dtype(bucket.params[0].dtype)
        cast = dtype.type
        sums = per_tensor.row_sums(_k.muon_momentum, ws.momentum,
                                   _k.muon_scalars(group, 0, cast, scale), backend, (True, True))
        if times is not None:
            ws.sync()
            t1 = time.perf_counter()
            times["momentum"] = times.get("momentum", 0.0) + t1 - t0
        with np.errstate(divide="ignore"):
            # torch divides by max(||u||, eps): with eps 0 a zero matrix gives NaN there too
            inv = 1.0 / np.maximum(np.sqrt(sums[:, 0]), float(group["eps"]))
        inv = inv.astype(dtype)
        ns_steps = group["ns_steps"]
        start = 0
        for stack, k in zip(ws.stacks, ws.counts):
            part = inv[start:start + k]
            start += k
            _k.newton_schulz(stack, part if ws.xp is np else ws.xp.asarray(part),
                             group["ns_coefficients"], ns_steps,
                             _k.lr_ratio(stack.shape, group["adjust_lr_fn"]), ws.xp)
        if times is not None:
            ws.sync()
            t2 = time.perf_counter()
            times["newton_schulz"] = times.get("newton_schulz", 0.0) + t2 - t1
        backend.run(_k.muon_update, ws.update_table(ns_steps, backend), _k.update_scalars(group, cast))
        if times is not None:
            ws.sync()
            times["update"] = times.get("update", 0.0) + time.perf_counter() - t2


_MUON_HYPERS = tuple(h.name for h in _k.SPEC.hypers)

Muon = optimizer_class(_k.SPEC, _MuonEngine, __name__)


# -- Muon for the hidden matrices, AdamW for the rest --------------------------------------------
def _adamw_spec():
    from .optimizers import CLASSES
    return CLASSES["AdamW"].spec


class MuonWithAuxAdam(_MuonEngine):
    """Muon on the param groups flagged ``use_muon=True``, AdamW on those flagged False.

    KellerJordan/Muon's ``MuonWithAuxAdam`` as one fastopt optimizer: every group says
    ``use_muon``; a Muon group takes torch.optim.Muon's hyperparameters (its params must be
    2-D), an AdamW group torch.optim.AdamW's. A hyperparameter a group leaves out takes
    torch's default (Muon: ``lr=1e-3, weight_decay=0.1, momentum=0.95, ...``; AdamW:
    ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, ...``). KellerJordan's
    defaults differ (Muon ``lr=0.02, weight_decay=0``; Adam ``lr=3e-4, betas=(0.9, 0.95),
    eps=1e-10``): give them in the groups to get his.

    The step is Muon's on each Muon group and fastopt's fused AdamW pass on each AdamW
    group; the result equals ``torch.optim.Muon`` on the Muon groups and
    ``torch.optim.AdamW`` on the others stepped side by side. One state dict: Muon params
    keep ``momentum_buffer`` (no ``step``), AdamW params ``exp_avg``, ``exp_avg_sq``
    (``max_exp_avg_sq`` with amsgrad) and ``step``; each group records ``use_muon``.

    Example::

        hidden = [w for w in weights if w.ndim == 2 and w is not embedding and w is not head]
        rest = [embedding, head, *biases]
        opt = fastopt.MuonWithAuxAdam([
            dict(params=hidden, use_muon=True, lr=0.02, weight_decay=0.01),
            dict(params=rest, use_muon=False, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01),
        ])
    """

    spec = _k.SPEC
    # No element: fastopt.torch makes a class of every exported optimizer with one, and its
    # generic TorchOptimizer has one set of hyperparameters per optimizer; torch users pair
    # fastopt.torch.Muon with fastopt.torch.AdamW, as with torch.optim.
    element = None
    slot_names = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    has_step_state = True

    def __init__(self, params, *, backend=None, **options):
        _refuse_options(type(self).__name__, options)
        self._kinds: list = []              # per group: use_muon as added
        groups = list(params) if not isinstance(params, dict) else [params]
        if not groups or not all(isinstance(g, dict) for g in groups):
            raise TypeError("MuonWithAuxAdam takes a list of param-group dicts, each with "
                            "use_muon=True (2-D hidden weights) or use_muon=False (the rest)")
        super().__init__(groups, {}, backend, **options)

    # -- the two kinds of group ------------------------------------------------------------
    @staticmethod
    def _kind_of(group, where) -> bool:
        flag = group.get("use_muon", None)
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{where} needs use_muon=True (Muon: 2-D hidden weights) or "
                             f"use_muon=False (AdamW: the rest), got {flag!r}")
        return bool(flag)

    @staticmethod
    def _spec_of(group):
        return _k.SPEC if group["use_muon"] else _adamw_spec()

    @classmethod
    def kind_defaults(cls, use_muon: bool) -> dict:
        """The hyperparameters (with their defaults) of a Muon or an AdamW group."""
        spec = _k.SPEC if use_muon else _adamw_spec()
        return {**{h.name: h.default for h in spec.hypers}, "use_muon": bool(use_muon)}

    def _is_muon_group(self, group) -> bool:
        return bool(group["use_muon"])

    def add_param_group(self, group: dict) -> None:
        """Add a Muon (``use_muon=True``) or AdamW (``use_muon=False``) group; the
        hyperparameters it leaves out take torch's defaults for its kind."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        use_muon = self._kind_of(group, f"param_groups[{len(self.param_groups)}]")
        saved = self.defaults
        self.defaults = self.kind_defaults(use_muon)
        try:
            super().add_param_group(group)
        finally:
            self.defaults = saved
        self._kinds.append(use_muon)

    @property
    def _hyper_names(self) -> tuple:
        names = self.__dict__.get("_hyper_names_")
        if names is None:
            names = self.__dict__["_hyper_names_"] = tuple(dict.fromkeys(
                [*self.kind_defaults(True), *self.kind_defaults(False)]))
        return names

    @classmethod
    def _check_group(cls, group, where) -> None:
        use_muon = cls._kind_of(group, where)
        spec = cls._spec_of(group)
        missing = [h.name for h in spec.hypers if h.name not in group]
        if missing:
            raise ValueError(f"{where} lacks {missing}: a use_muon={use_muon} group has "
                             f"{spec.name}'s hyperparameters")
        spec.check_group(group, where)
        if use_muon and "params" in group:
            _check_matrices(group["params"], where, "Muon")

    @classmethod
    def _active_slots(cls, group) -> tuple:
        return cls._spec_of(group).active_slots(group)

    @classmethod
    def _initial_value(cls, group, name) -> float:
        return cls._spec_of(group).initial_value(group, name)

    def _plan_for(self, gi, grads, backend_name, from_flat):
        if bool(self.param_groups[gi]["use_muon"]) != self._kinds[gi]:
            raise ValueError(f"param_groups[{gi}]['use_muon'] changed since the group was added "
                             f"(was {self._kinds[gi]}); its state is the other kind's: add a new "
                             "group instead")
        return super()._plan_for(gi, grads, backend_name, from_flat)

    def _run_part(self, group, bucket, step, backend_name, scale=1.0):
        # AdamW groups (Muon groups never get here): the AdamW spec's fused pass
        _backend.get(backend_name).step(_adamw_spec(), group, bucket, step, scale,
                                         seed=_step_seed(self.seed, step),
                                         stochastic=self.stochastic_rounding)

    # -- one state dict: no 'step' for Muon params ------------------------------------------
    def _muon_indices(self) -> set:
        out, start = set(), 0
        for g in self.param_groups:
            if g["use_muon"]:
                out.update(range(start, start + len(g["params"])))
            start += len(g["params"])
        return out

    def _state_of(self, i):
        d = super()._state_of(i)
        if d is not None and i in self._muon_indices():
            d.pop("step", None)
        return d

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for i in self._muon_indices():
            if i in sd["state"]:
                sd["state"][i].pop("step", None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this class's state dict, or the two torch optimizers' merged (the Muon
        groups' entries without ``step``); checked before anything changes."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (torch layout)")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, (list, tuple)) else groups
            raise ValueError(f"state_dict has {n} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        muon_ids = set()
        for gi, (saved, kind) in enumerate(zip(groups, self._kinds)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, dict):
                raise ValueError("state_dict['param_groups'] must be a list of dicts")
            if self._kind_of(saved, where) != kind:
                raise ValueError(f"{where} has use_muon={saved['use_muon']}, this optimizer's "
                                 f"group {gi} has use_muon={kind}")
            if kind:
                try:
                    muon_ids.update(saved.get("params", ()))
                except TypeError:
                    pass            # (the base load names the bad ids)
        state = dict(state_dict["state"]) if isinstance(state_dict["state"], dict) \
            else state_dict["state"]
        if isinstance(state, dict):
            for pid in muon_ids:
                st = state.get(pid)
                if isinstance(st, dict) and "step" not in st:
                    state[pid] = {**st, "step": np.float32(1)}   # Muon counts no steps
        super().load_state_dict({**state_dict, "state": state})
