"""The optimizer base class: param groups, lazy state, one fused pass per step.

Subclasses name their element function and state slots and map a param group to the
element's host scalars; everything else lives here once: the step, state arenas and
state dicts, with the per-group plans of validated arrays and chunk tables in
``_plan.py`` and the sparse-row steps in ``sparse.py`` (both mixed into
:class:`Optimizer`).
"""
from __future__ import annotations

import collections.abc
import math
import operator
import threading
from typing import ClassVar

import numpy as np

from . import _backend, _validate, lowbit
from .flat import FlatParams, arena_of, warn_if_copied
from .kernels.layout import BFLOAT16, NATIVE
from ._plan import KAHAN, MASTER, _Bucket, _is_low_precision, _Plan, _Planning  # noqa: F401
from ._host_state import HostStates
from .sparse import SparseSteps, rows_seen_so_far

_NOT_HYPERPARAMETERS = ("params",)


class Optimizer(_Planning, SparseSteps, HostStates):
    """Base class of fastopt's optimizers (torch.optim's interface over NumPy/CUDA arrays).

    Args:
      params: a FlatParams, a list of arrays, or a list of param-group dicts
        (``{"params": [...], "lr": ...}``) as in torch.optim.
      defaults: hyperparameter defaults filled into each group.
      backend: ``"cpu"``, ``"numpy"``, ``"cuda"`` or None (context, env var, then auto).

    Options every optimizer takes (keyword-only):
      max_grad_norm: clip the global 2-norm of the gradients to this value, fused into
        the step (torch's ``clip_grad_norm_`` coefficient); the norm is ``last_grad_norm``.
      master_weights: accept float16/bfloat16 params: keep float32 master weights and
        state, and write each updated weight back rounded to nearest even.
      stochastic_rounding: round bfloat16 params stochastically instead (with ``seed``);
        without master weights, bfloat16 params are updated in place, each update
        rounded stochastically (no float32 copy: 2 bytes of param per parameter).
      kahan_sum: update float16/bfloat16 params in place without master weights, keeping
        each one's rounding error in a 16-bit compensation column (``kahan_comp``) that
        the next update adds back (4 bytes per parameter instead of 6 with masters).
      state_format: ``"float32"`` (the params' dtype, default), ``"bfloat16"`` or
        ``"int8"`` (blockwise 8-bit, bitsandbytes' scheme): how the state columns are
        stored; the math is float32 either way (fastopt/lowbit.py).
      block_size: elements per absmax block of int8 state (256).
      min_8bit_size: tensors with fewer elements keep float32 state under "int8" (4096).
    """

    spec: ClassVar = None               # the optimizer's declaration (fastopt/spec.py)
    element: ClassVar = None            # the element function (kernels.<name>)
    slot_names: ClassVar[tuple] = ()    # the spec's state columns
    has_step_state: ClassVar[bool] = True

    def __init__(self, params, defaults: dict, backend: str | None = None, *,
                 max_grad_norm: float | None = None, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, state_format: str = "float32",
                 block_size: int = 256, min_8bit_size: int = 4096, kahan_sum: bool = False,
                 **unexpected):
        if unexpected:
            _validate.unexpected_keywords(type(self), unexpected, defaults)
        if backend is not None:
            _backend._check_name(backend, "backend")
        if master_weights and self.spec is not None and self.spec.per_tensor is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support master_weights "
                                      "(16-bit params) yet: its per-tensor pass has no 16-bit driver")
        if master_weights and self.spec is not None and self.spec.sparse is not None \
                and not self.spec.sparse.dense:
            raise NotImplementedError(f"{type(self).__name__} does not support master_weights "
                                      "(16-bit params): it steps sparse gradient rows, which do not "
                                      "update master weights")
        if max_grad_norm is not None:
            max_grad_norm = _validate.number("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        self.state_format = lowbit.StateFormat.checked(state_format, block_size, min_8bit_size)
        self.defaults = dict(defaults)
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        # 16-bit params: float32 master weights and state; the params get the rounded copy.
        self.master_weights = _validate.flag("master_weights", master_weights)
        self.stochastic_rounding = _validate.flag("stochastic_rounding", stochastic_rounding)
        self.kahan_sum = _validate.flag("kahan_sum", kahan_sum)
        if self.kahan_sum and (self.master_weights or self.stochastic_rounding):
            raise ValueError("kahan_sum updates 16-bit params in place without master weights; "
                             "it excludes master_weights=True and stochastic_rounding=True")
        # 16-bit params without master weights: compensated, or rounded stochastically
        self._pure = None if self.master_weights else \
            "kahan" if self.kahan_sum else "stochastic" if self.stochastic_rounding else None
        if self._pure and self.spec is not None and self.spec.per_tensor is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support 16-bit params "
                                      "without master weights yet: its per-tensor pass has no "
                                      "16-bit driver")
        self.seed = int(seed)
        self.last_grad_norm: float | None = None
        self._norm_prep = None               # the pre-pass's tables over the last gradients
        self._step_lock = threading.Lock()     # serialises concurrent step() calls
        # Applied steps (Keras's optimizer.iterations): the argument of callable lrs.
        self.iterations = 0
        self.param_groups: list[dict] = []
        self._state: list[dict | None] = []
        self._param_objs: list = []          # the params as added (identity: replacements)
        self._group_sizes: list[int] = []
        self._param_addresses: list[int] = []
        self._param_sigs: list = []          # per param: _validate.signature (fast grad checks)
        self._steps = np.zeros(0, dtype=np.int64)
        self._arenas: dict = {}
        self._plans: list[_Plan | None] = []
        self._checked: dict = {}             # group index -> (values, active slots, group)
        self._spans = None                   # sorted param byte spans (see _param_spans)
        groups = self._as_groups(params)
        for group in groups:
            self.add_param_group(group)

    # -- construction -------------------------------------------------------------------
    def _as_groups(self, params):
        if isinstance(params, FlatParams):
            return [{"params": list(params.params)}]
        if _validate.is_torch_tensor(params):
            raise TypeError(f"params is a torch {type(params).__name__}; "
                            f"{_validate.torch_hint(type(self).__name__)}")
        if _validate.is_array(params):
            raise TypeError("params must be a list of arrays, a list of param-group dicts or a "
                            "FlatParams, got a single array; wrap it in a list")
        params = list(params)
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters")
        if all(isinstance(g, dict) for g in params):
            return [dict(g) for g in params]
        if any(isinstance(g, dict) for g in params):
            raise TypeError("params mixes arrays and param-group dicts")
        return [{"params": params}]

    def add_param_group(self, group: dict) -> None:
        """Add a group (torch semantics): missing hyperparameters take the defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        gi = len(self.param_groups)
        where = f"param_groups[{gi}]"
        ps = group["params"]
        ps = list(ps.params) if isinstance(ps, FlatParams) else ([ps] if _validate.is_array(ps) else list(ps))
        if not ps:
            raise ValueError(f"{where}['params'] is empty")
        owner = type(self).__name__
        for k, p in enumerate(ps):
            _validate.param(p, f"{where}['params'][{k}]", allow_low_precision=self._low_precision_ok,
                            owner=owner)
            if self._pure == "stochastic" and np.dtype(p.dtype) == np.float16:
                raise TypeError(f"{where}['params'][{k}] is float16: stochastic rounding without "
                                "master weights is for bfloat16 params; use kahan_sum=True or "
                                "master_weights=True")
            if not self.state_format.is_default and np.dtype(p.dtype) == np.float64:
                raise TypeError(f"{where}['params'][{k}] is float64: state_format="
                                f"{self.state_format.name!r} stores float32 math's state; float64 "
                                "params keep float64 state (state_format='float32')")
        unknown = set(group) - set(self.defaults) - set(_NOT_HYPERPARAMETERS)
        if unknown:
            raise TypeError(f"{where} has unknown hyperparameters {sorted(unknown)} for "
                            f"{type(self).__name__}{_validate.did_you_mean(unknown, self.defaults)}; "
                            f"expected some of {sorted(self.defaults)}")
        new = {"params": ps}
        for k, v in self.defaults.items():
            new[k] = group.get(k, v)
        self._check_group(new, where)
        all_params = [p for g in self.param_groups for p in g["params"]] + ps
        _validate.no_overlap(all_params, "params")
        warn_if_copied(((f"{where}['params'][{k}]", p) for k, p in enumerate(ps)), owner)
        self.param_groups.append(new)
        self._param_objs.extend(ps)
        self._group_sizes.append(len(ps))
        self._param_addresses.extend(_validate.address(p) for p in ps)
        self._param_sigs.extend(_validate.signature(p) for p in ps)
        self._state.extend([None] * len(ps))
        self._steps = np.concatenate([self._steps, np.zeros(len(ps), dtype=np.int64)])
        self._host_grow(len(ps))
        self._plans.append(None)
        self._spans = None

    # -- what the spec says (fastopt/spec.py) --------------------------------------------
    @classmethod
    def _check_group(cls, group: dict, where: str) -> None:
        """Validate a group's hyperparameters (raise naming the bad one)."""
        cls.spec.check_group(group, where)

    def _checked_group(self, gi: int, group: dict) -> tuple:
        """Validate ``param_groups[gi]`` (its values may have been edited since the last
        step) and return its active state columns. A step of many small tensors is
        short: checking every hyperparameter again cost it 10-30 us, so the check runs
        when a value or its type differs from those last checked (checks normalise their
        values, so equal values are valid ones; a NaN never equals itself and is checked
        again)."""
        names = self._hyper_names
        # with their types: 0 == False, and a flag set to 0 must be refused
        values = tuple([(v.__class__, v) for v in map(group.get, names)])
        checked = self.__dict__.setdefault("_checked", {})
        seen = checked.get(gi)
        if seen is not None and seen[2] is group and seen[0] == values:
            return seen[1]
        self._check_group(group, f"param_groups[{gi}]")
        slots = self._active_slots(group)
        checked[gi] = (tuple([(v.__class__, v) for v in map(group.get, names)]), slots, group)
        return slots

    @property
    def _hyper_names(self) -> tuple:
        names = self.__dict__.get("_hyper_names_")
        if names is None:
            names = self.__dict__["_hyper_names_"] = tuple(self.defaults)
        return names

    @classmethod
    def _active_slots(cls, group: dict) -> tuple:
        """The state keys the element reads and writes for this group (None = absent)."""
        return cls.spec.active_slots(group)

    @classmethod
    def _initial_value(cls, group: dict, name: str) -> float:
        return cls.spec.initial_value(group, name)

    @classmethod
    def _scalars(cls, group: dict, step: int, cast):
        """The element's host scalars for a step (``step`` counts this step, 1-based)."""
        return cls.spec.scalars(group, step, cast)

    @classmethod
    def _reference(cls, group, step, params, grads, slots) -> None:
        """The NumPy reference for one bucket (the ``"numpy"`` backend)."""
        cls.spec.run_reference(group, step, params, grads, slots)

    @classmethod
    def _check_sparse_group(cls, group, where):
        check = cls.spec.sparse.check
        if check is not None:
            check(group, where)

    def _sparse_rows(self, i, param, sg):
        rule = self.spec.sparse.all_seen
        if rule is None or not rule(self._locate_group(i)):
            return sg.indices, sg.rows
        return rows_seen_so_far(self.__dict__.setdefault("_sparse_seen", {}), i, param, sg)

    @property
    def _low_precision_ok(self) -> bool:
        """16-bit params are accepted: with master weights, or updated in place."""
        return self.master_weights or self._pure is not None

    def _storage(self, name, p) -> str:
        """The storage format of state column ``name`` of param ``p`` (kernels/layout.py)."""
        if self.state_format.is_default or name in (MASTER, KAHAN):
            return NATIVE
        return self.state_format.storage(self.spec.column(name), int(p.size))

    def _ensure_state(self, i, p, group, slot_names):
        st = self._state[i]
        if st is None:
            st = self._state[i] = {}
        low = _is_low_precision(p)
        extra = () if not low else (MASTER,) if self.master_weights else \
            (KAHAN,) if self._pure == "kahan" else ()
        names = extra + tuple(slot_names)
        for name in names:
            if name is None or name in st:
                continue
            fill = 0.0 if name == KAHAN else self._initial_value(group, name)
            storage = self._storage(name, p)
            if storage != NATIVE or (not self.state_format.is_default and name not in (MASTER, KAHAN)):
                # low-bit columns, and under a low-bit state_format the float32 columns
                # of small tensors too: compact buffers of just their members
                st.update(self._new_lowbit_column(p, name, storage, fill))
                continue
            dtype = np.dtype(p.dtype) if name == KAHAN or not low else np.dtype(np.float32)
            flat = arena_of(p)
            if flat is not None:
                key = (id(flat), name)
                arena = self._arenas.get(key)
                if arena is None:
                    arena = self._arenas[key] = (flat, flat.views_of(flat.new_buffer(fill, dtype)))
                view = arena[1][flat.index_of(p)]
                # The arena was filled for the group that created it; groups may differ.
                view[...] = p if name == MASTER else fill
                st[name] = view
            else:
                xp = np if isinstance(p, np.ndarray) else _cupy()
                st[name] = p.astype(np.float32) if name == MASTER else xp.full(p.shape, fill, dtype=dtype)

    def _new_lowbit_column(self, p, name, storage, fill) -> dict:
        """State column ``name`` of ``p`` in ``storage`` (16-bit, 8-bit, or float32 beside
        them), holding ``fill``:
        ``{name: values or codes[, name_absmax: absmax]}``. The params of one FlatParams
        share one compact buffer per column and storage (and one of absmax), in their
        order, so that a step streams them as one run."""
        fmt = self.state_format
        flat = arena_of(p)
        if flat is None:
            return {name + suffix: a for suffix, a in self._lowbit_arrays(storage, [p], fill)[0].items()}
        key = (id(flat), name, storage)
        arena = self._arenas.get(key)
        if arena is None:
            column = self.spec.column(name)
            members = [q for q in flat.params if fmt.storage(column, int(q.size)) == storage]
            arena = self._arenas[key] = (flat, {flat.index_of(q): arrays for q, arrays in
                                                zip(members, self._lowbit_arrays(storage, members, fill))})
        arrays = arena[1][flat.index_of(p)]
        # The arena was filled for the group that created it; groups may differ.
        fresh = self._lowbit_arrays(storage, [p], fill)[0]      # host or device, as p
        for key2, a in arrays.items():
            a[...] = fresh[key2]
        return {name + suffix: a for suffix, a in arrays.items()}

    def _lowbit_arrays(self, storage, params, fill, xp=None) -> list:
        """Per param, ``{"": values or codes[, "_absmax": absmax]}`` holding ``fill``, as
        views of one buffer per array kind (consecutive, in the params' order)."""
        block = self.state_format.block_size
        if xp is None:
            xp = np if not params or isinstance(params[0], np.ndarray) else _cupy()
        sizes = [int(q.size) for q in params]
        if storage == NATIVE:       # float32 state of the tensors under min_8bit_size
            kinds = {"": (sizes, np.float32, fill)}
        elif storage == BFLOAT16:
            # device arrays have no bfloat16 dtype: their columns hold the 16-bit patterns
            kinds = {"": (sizes, lowbit.bfloat16(), fill)} if xp is np else \
                {"": (sizes, np.uint16, int(np.array(fill, lowbit.bfloat16()).view(np.uint16)))}
        else:
            code, absmax = lowbit.constant(storage, fill)
            kinds = {"": (sizes, np.uint8, code),
                     lowbit.ABSMAX: ([lowbit.n_blocks(n, block) for n in sizes], np.float32, absmax)}
        out = [{} for _ in params]
        for suffix, (counts, dtype, value) in kinds.items():
            buffer = xp.full(sum(counts), value, dtype=dtype)
            start = 0
            for j, (q, n) in enumerate(zip(params, counts)):
                view = buffer[start:start + n]
                out[j][suffix] = view.reshape(q.shape) if suffix == "" else view
                start += n
        return out

    def step(self, grads=None, *, grad_scale: float | None = None) -> bool:
        """One fused optimizer step; returns True when applied, False when skipped.

        Args:
          grads: a list aligned with all params (in group order); None entries skip
            their param; a :class:`SparseGrad` updates rows of an embedding table. Omit it
            when every param is a FlatParams view: the step reads the FlatParams' grads.
          grad_scale: the factor every gradient is multiplied by inside the kernel (for
            mixed precision, ``1 / loss_scale``). When given, a first pass checks the
            gradients: if any is NaN or infinite the whole step is skipped (params,
            state and step counts unchanged) and False is returned.

        With ``max_grad_norm`` set on the optimizer, the same first pass computes the
        global 2-norm of the (unscaled) gradients and the step multiplies them by torch's
        clip coefficient ``min(1, max_norm / (norm + 1e-6))``: two passes in all.

        Thread safety: one optimizer may be stepped from several Python threads; a lock
        held for the whole call serialises the steps (each sees the state the previous
        one left), so the result is that of the same steps made one after another in
        some order. An uncontended acquire costs well under a microsecond. The lock
        does not cover ``state_dict``/``load_state_dict``/``param_groups`` edits made
        while another thread steps, and a process forked while another thread is inside
        ``step`` must not step that optimizer (its copy of the lock stays held).
        Different optimizers step concurrently without contention.
        """
        with self._step_lock:
            return self._step_unlocked(grads, grad_scale)

    def _step_unlocked(self, grads, grad_scale):
        if grad_scale is not None:
            grad_scale = _validate.number("grad_scale", grad_scale, low=0.0, low_open=True)
        from_flat = grads is None
        grads, sparse = self._split_sparse(grads)
        per_group = self._group_grads(grads)
        backend_name = _backend.resolve(self.backend, self.param_groups[0]["params"][0])
        _backend.get(backend_name)         # an unavailable backend raises before state exists
        if not self.state_format.is_default:
            _backend.require(backend_name, _backend.LOWBIT_STATE,
                             f"state_format={self.state_format.name!r}")
        plans, groups = [], []
        for gi, group in enumerate(self.param_groups):
            self._checked_group(gi, group)
            groups.append(self._at_iteration(group, f"param_groups[{gi}]"))
            plans.append(self._plan_for(gi, per_group[gi], backend_name, from_flat))
        self._check_swapped(plans)
        sparse = self._check_sparse(sparse, backend_name)
        if sparse and not self.state_format.is_default:
            i = next(iter(sparse))
            raise NotImplementedError(f"grads[{i}] is a SparseGrad: sparse gradients update "
                                      f"float32 state only, not state_format="
                                      f"{self.state_format.name!r}; pass a dense gradient")
        if self._low_precision_ok:
            for i, (_, param, _) in sparse.items():  # noqa: B007
                if _is_low_precision(param):
                    raise NotImplementedError(
                        f"grads[{i}] is a SparseGrad for a {np.dtype(param.dtype)} param: sparse "
                        "gradients do not update master weights (16-bit params); pass a dense gradient")
        scale = 1.0
        if grad_scale is not None or self.max_grad_norm is not None:
            scale = self._grad_multiplier(plans, sparse, backend_name, grad_scale)
            if scale is None:
                return False
        # Everything is validated: from here on the step mutates.
        for gi, (plan, how) in enumerate(plans):
            if how == "new":
                for i, (p, address) in plan.replaced.items():
                    self._param_objs[i], self._param_addresses[i] = p, address
                    self._param_sigs[i] = _validate.signature(p)
                    self._spans = None
                self._build_buckets(gi, plan)
            elif how == "regrad":
                self._regrad_buckets(gi, plan)
            self._plans[gi] = plan
            self._run_group(groups[gi], plan, backend_name, scale)
        for i, (group, param, sg) in sparse.items():
            gi = self._locate(i)[0]
            self._run_sparse(i, groups[gi], param, sg, backend_name, scale)
        self.iterations += 1
        return True

    def _norm_prepared(self, grads):
        """The reduction's tables over these (already validated) gradients, kept for the
        next step while they are the same arrays; only the current list is held."""
        from .clip import _Prepared
        prepared = self._norm_prep
        if prepared is None or len(prepared.seq) != len(grads) or \
                not all(map(operator.is_, prepared.seq, grads)):
            prepared = self._norm_prep = _Prepared(list(grads), [g for g in grads if g.size], False)
        return prepared

    def _at_iteration(self, group, where):
        """The group with a callable lr replaced by its value at this step."""
        lr = group["lr"]
        if not callable(lr):
            return group
        value = _validate.number("lr", lr(self.iterations), low=0.0,
                                 where=f"{where} (lr schedule at iteration {self.iterations})")
        return {**group, "lr": value}

    # -- the pass before the step: non-finite check and global norm ----------------------
    # ``local norm -> global norm`` for params sharded across processes (fastopt.torch sets
    # it for DTensors): the fused clipping's norm then covers every shard.
    _global_norm = None

    def _grad_multiplier(self, plans, sparse, backend_name, grad_scale):
        """The factor the step multiplies gradients by, or None to skip the step.

        One reduction pass over every gradient (dense and sparse), combined in a fixed
        order, so the norm has the same bits for any number of threads.
        """
        from . import clip as norms
        from .kernels import clip
        dense = [g for plan, _ in plans for g in plan.grads if g is not None]
        rows = [sg.rows for _, _, sg in sparse.values()]
        grads = dense + rows
        if self.max_grad_norm is not None:
            total = norms._total_norm(self._norm_prepared(grads), 2.0, backend_name, "step")
            if self._global_norm is not None:   # params sharded over processes (FSDP2)
                total = self._global_norm(total)
            finite = math.isfinite(total)
        else:
            total = None
            finite = norms._all_finite(self._norm_prepared(grads), backend_name, "step")
        if grad_scale is not None and not finite:
            return None
        scale = 1.0 if grad_scale is None else grad_scale
        if total is None:
            return scale
        total *= scale                       # the norm of the unscaled gradients
        self.last_grad_norm = total
        # torch computes the coefficient in the gradients' promoted dtype
        dtype = np.float64 if any(np.dtype(g.dtype) == np.float64 for g in grads) else np.float32
        return scale * float(clip.clip_coefficient(total, self.max_grad_norm, dtype))

    def _run_group(self, group, plan, backend_name, scale=1.0):
        for bucket in plan.buckets:
            span = bucket.span
            steps = self._steps[span]
            if steps.size > 1 and steps.min() != steps.max():
                # Params of one group that skipped different steps: one pass per step count,
                # each over a part of the bucket that keeps its master weights and model.
                steps = steps.copy()            # a view of the counts where span is a slice
                for s in np.unique(steps):
                    sub = bucket.subset(np.flatnonzero(steps == s))
                    self._run_bucket(group, sub, int(s) + 1, backend_name, scale)
            elif steps.size:
                self._run_bucket(group, bucket, int(steps[0]) + 1, backend_name, scale)
            self._steps[span] += 1

    def _run_bucket(self, group, bucket, step, backend_name, scale=1.0):
        if self._host_values is not None:
            passes, new = self._host_passes(group, bucket, step)
            for part_group, part in passes:
                self._run_part(part_group, part, step, backend_name, scale)
            self._host_values[bucket.indices] = new
        else:
            self._run_part(group, bucket, step, backend_name, scale)

    def _run_part(self, group, bucket, step, backend_name, scale=1.0):
        _backend.get(backend_name).step(self.spec, group, bucket, step, scale,
                                         seed=_step_seed(self.seed, step),
                                         stochastic=self.stochastic_rounding)

    def zero_grad(self, grads=None):
        """Zero FlatParams grads (or the given grads) in place."""
        seen = set()
        if grads is None:
            for group in self.param_groups:
                for p in group["params"]:
                    flat = arena_of(p)
                    if flat is not None and id(flat) not in seen:
                        seen.add(id(flat))
                        flat.zero_grad()
        else:
            for g in grads:
                if g is not None:
                    g.fill(0)

    # -- state ----------------------------------------------------------------------------
    @property
    def state(self) -> "StateView":
        """{param index: {state key: array}}: a read-only mapping over the params that
        have state (arrays are live; 'step' is a copy). Looking one param up costs the
        same for 10 params as for 10,000."""
        return StateView(self)

    def _state_of(self, i: int) -> dict | None:
        """Param ``i``'s entry of :attr:`state`, or None before its first step."""
        st = self._state[i]
        if not st:
            return None
        d = dict(st)
        if self.has_step_state:
            d["step"] = np.float32(self._steps[i])
        self._host_add_to(i, d)
        return d

    def state_dict(self) -> dict:
        """torch's layout: {'state': {i: {...}}, 'param_groups': [{..., 'params': [i, ...]}]}.

        Arrays are NumPy copies (device state is copied to the host).
        """
        from ._state import state_dict
        return state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from fastopt or from torch (tensors turned into NumPy arrays).

        Everything is checked first; on any error nothing changes.
        """
        from ._state import load_state_dict
        load_state_dict(self, state_dict)

    # Copies and pickles get a lock of their own (a lock cannot be copied or pickled).
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_step_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._step_lock = threading.Lock()
        # A deep copy or unpickle has new arrays at new addresses: cached tables and
        # checks hold the old ones (the copy would step the original's memory).
        self._param_addresses = [_validate.address(p) for p in self._param_objs]
        self._param_sigs = [_validate.signature(p) for p in self._param_objs]
        self._plans = [None] * len(self._plans)
        self._spans = None
        self._norm_prep = None

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join(lines + [")"])


def _step_seed(seed: int, step: int) -> int:
    """Random bits for stochastic rounding: a different stream every step."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77) & 0xFFFFFFFF


def _cupy():
    import cupy
    return cupy


class StateView(collections.abc.Mapping):
    """``optimizer.state``: param index -> that param's state dict, built on lookup."""

    __slots__ = ("_opt",)

    def __init__(self, opt):
        self._opt = opt

    def __getitem__(self, i):
        d = self._opt._state_of(i) if isinstance(i, (int, np.integer)) and \
            0 <= i < len(self._opt._state) else None
        if d is None:
            raise KeyError(i)
        return d

    def __contains__(self, i):
        return isinstance(i, (int, np.integer)) and 0 <= i < len(self._opt._state) \
            and bool(self._opt._state[i])

    def __iter__(self):
        return (i for i, st in enumerate(self._opt._state) if st)

    def __len__(self):
        return sum(1 for st in self._opt._state if st)

    def __repr__(self):
        return repr(dict(self))

