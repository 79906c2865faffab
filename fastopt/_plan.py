"""Which arrays a step touches: per group, a validated plan of buckets and chunk tables.

A step of a param group needs, besides the math, a check of every gradient (shape,
dtype, contiguity, no aliasing) and the tables the driver runs over. Both depend only on
*which* arrays take part, so they are kept in a :class:`_Plan` and reused while the same
arrays come back (FlatParams: always), re-targeted when only the gradient arrays are
new, and rebuilt otherwise. :class:`_Planning` is the part of
:class:`~fastopt.optimizer.Optimizer` that makes and keeps them.
"""
from __future__ import annotations

import operator

import numpy as np

from . import _backend, _validate
from .flat import arena_of, warn_if_copied

MASTER = "master_param"   # state key of the float32 master copy of a 16-bit param
KAHAN = "kahan_comp"      # state key of a pure 16-bit param's Kahan compensation (16-bit)


def _is_low_precision(p) -> bool:
    return np.dtype(p.dtype).itemsize == 2


class _Bucket:
    """Tensors of one group and dtype stepped together, with their cached chunk table.

    With ``model`` (16-bit params), ``params`` are their float32 master weights and
    ``grads`` are 16-bit: a bucket without its model would step the masters with the
    16-bit gradients read as float32 and never write the params.
    """

    __slots__ = ("indices", "params", "grads", "slots", "table", "positions", "model",
                 "formats", "scales", "block", "pure", "compensation", "_span")

    def __init__(self, indices, params, grads, slots, model=None, positions=None,
                 formats=None, scales=None, block=0):
        self.indices = np.asarray(indices, dtype=np.int64)
        self._span = None
        self.params = params
        self.grads = grads
        self.slots = slots
        self.table = None
        self.positions = positions
        self.model = model     # the 16-bit params when ``params`` are their master weights
        # Low-bit state (fastopt/lowbit.py): each column's storage format, the absmax
        # arrays of its int8 columns, their block size; None for the params' own dtype.
        self.formats = formats
        self.scales = scales
        self.block = block
        # Pure 16-bit params (no master weights): "kahan" (with their compensation
        # arrays) or "stochastic"; None otherwise.
        self.pure = None
        self.compensation = None

    def _like(self, indices, params, grads, slots, model, positions) -> "_Bucket":
        out = _Bucket(indices, params, grads, slots, model, positions, self.formats,
                      self.scales, self.block)
        out.pure, out.compensation = self.pure, self.compensation
        if indices is self.indices:
            out._span = self._span
        return out

    @property
    def span(self):
        """The indices as a slice where they are consecutive (the usual case), else the
        index array: reading and adding to a slice of the step counts is a view, several
        times cheaper than fancy indexing for a short step."""
        if self._span is None:
            ix = self.indices
            n = ix.size
            consecutive = n > 0 and int(ix[-1]) - int(ix[0]) + 1 == n and \
                (n < 3 or bool(np.all(np.diff(ix) == 1)))
            self._span = slice(int(ix[0]), int(ix[0]) + n) if consecutive else ix
        return self._span

    def subset(self, sel) -> "_Bucket":
        """The tensors at positions ``sel`` of this bucket, with everything they carry
        (master weights and their model, low-bit state's scales); its table is built on
        first use."""
        part = self._like(self.indices[sel], [self.params[j] for j in sel],
                          [self.grads[j] for j in sel],
                          tuple(None if s is None else [s[j] for j in sel] for s in self.slots),
                          None if self.model is None else [self.model[j] for j in sel],
                          None if self.positions is None else [self.positions[j] for j in sel])
        if self.scales is not None:
            part.scales = tuple(None if s is None else [s[j] for j in sel] for s in self.scales)
        if self.compensation is not None:
            part.compensation = [self.compensation[j] for j in sel]
        return part


class _Plan:
    """Everything a group's step needs that depends only on which arrays take part."""

    __slots__ = ("key", "params", "param_objs", "grads", "grad_addresses", "buckets", "replaced")

    def __init__(self, key, params, grads, grad_addresses, buckets=None, replaced=None):
        self.key = key
        self.params = params
        self.param_objs = tuple(params)     # held: the identity test below stays valid
        self.grads = grads
        self.grad_addresses = grad_addresses
        self.buckets = buckets
        self.replaced = replaced or {}      # global index -> a param that replaced another

    def same_arrays(self, key, params, grads) -> bool:
        return (self.key == key and len(self.param_objs) == len(params)
                and len(self.grads) == len(grads) and all(map(operator.is_, self.param_objs, params)))

    def same_grads(self, grads) -> bool:
        # FlatParams steps pass the plan's own list back: no per-tensor loop then.
        return grads is self.grads or all(map(operator.is_, self.grads, grads))


class _Planning:
    """The plan half of :class:`~fastopt.optimizer.Optimizer` (see the module doc)."""

    def _flat_grads(self, group):
        """The FlatParams gradient views of a group's params (when its plan is built)."""
        grads = []
        unused = None
        for k, p in enumerate(group["params"]):
            flat = arena_of(p)
            if flat is None:
                raise ValueError(f"step() got no grads, and param_groups[{self.param_groups.index(group)}]"
                                 f"['params'][{k}] is not a FlatParams view; pass grads=[...]")
            if not flat._grad_used and unused is None and flat.numel:
                unused = (k, flat)
            grads.append(flat._grads[flat.index_of(p)])
        if unused is not None:
            # Its gradients are surely the zeros it was made with: stepping them would apply
            # weight decay and momentum and count a step. Once per plan, never per step.
            k, flat = unused
            raise ValueError(
                f"step() got no grads, so it reads the gradients of {flat!r} (param_groups"
                f"[{self.param_groups.index(group)}]['params'][{k}] is one of its views), but "
                "none were ever written: its grad and grads have not been accessed since it was "
                "made, so they hold the zeros it started with. Write the gradients into "
                "flat.grads[i] (or flat.grad) before step(), or pass grads=[...]; to step with "
                "zero gradients on purpose, write them (flat.grad[...] = 0)")
        return grads

    def _group_grads(self, grads):
        """Split ``grads`` (aligned with all params, or None for FlatParams) per group."""
        if grads is None:
            out = []
            for gi, group in enumerate(self.param_groups):
                plan = self._plans[gi]
                if plan is not None and plan.key[2] and plan.params is group["params"]:
                    out.append(plan.grads)          # cached FlatParams grads
                else:
                    out.append(self._flat_grads(group))
            return out
        if _validate.is_array(grads):
            raise TypeError("grads must be a list aligned with the params, got a single array")
        grads = list(grads)
        n = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n:
            raise ValueError(f"grads has {len(grads)} entries, expected {n} (one per param; None skips one)")
        out, start = [], 0
        for group in self.param_groups:
            k = len(group["params"])
            out.append(grads[start:start + k])
            start += k
        return out

    def _plan_for(self, gi, grads, backend_name, from_flat):
        """The group's plan for these grads: cached, re-targeted, or new (validated)."""
        group = self.param_groups[gi]
        params = group["params"]
        key = (self._checked_group(gi, group), backend_name, from_flat)
        plan = self._plans[gi]
        reuse = plan is not None and plan.same_arrays(key, params, grads)
        if reuse and plan.same_grads(grads):
            return plan, "cached"
        base = sum(len(g["params"]) for g in self.param_groups[:gi])
        replaced = {} if reuse else self._check_replaced(gi, base, params)
        addresses = {}
        check = _validate.grad
        sigs = self._param_sigs
        # Refused here, before any state exists, where the backend has no master-weights
        # path (rather than run a float32 kernel on 16-bit gradients).
        for k, (p, g, pa) in enumerate(zip(params, grads, self._param_addresses[base:])):
            if g is not None:
                if _is_low_precision(p):
                    feature = _backend.MASTER_WEIGHTS if self.master_weights else \
                        _backend.PURE_KAHAN if self._pure == "kahan" else _backend.PURE_STOCHASTIC
                    _backend.require(backend_name, feature, f"params[{base + k}] is {np.dtype(p.dtype)}")
                if isinstance(p, np.ndarray) and not p.flags.writeable:
                    raise ValueError(f"params[{base + k}] is read-only; optimizer steps update params in place")
                i = base + k
                if i in replaced:
                    addresses[k] = check(g, p, i, replaced[i][1])
                else:
                    addresses[k] = check(g, p, i, pa, p_sig=sigs[i])
        self._check_grads_alias_no_param(base, grads, addresses, replaced)
        if reuse and [g is None for g in plan.grads] == [g is None for g in grads]:
            return _Plan(key, params, grads, addresses, plan.buckets), "regrad"
        return _Plan(key, params, grads, addresses, replaced=replaced), "new"

    def _check_replaced(self, gi, base, params):
        """Params swapped into ``param_groups[gi]['params']`` since the last step: check
        them like new params, and against the state their position already has."""
        if len(params) != self._group_sizes[gi]:
            raise ValueError(f"param_groups[{gi}]['params'] changed length since it was added; "
                             "use add_param_group() for new params")
        replaced = {}
        for k, p in enumerate(params):
            i = base + k
            if p is self._param_objs[i]:
                continue
            _validate.param(p, f"param_groups[{gi}]['params'][{k}]", self._low_precision_ok,
                            owner=type(self).__name__)
            for name, arr in (self._state[i] or {}).items():
                if tuple(arr.shape) != tuple(p.shape):
                    raise ValueError(f"param_groups[{gi}]['params'][{k}] was replaced by an array of "
                                     f"shape {tuple(p.shape)}, but its state {name!r} has shape "
                                     f"{tuple(arr.shape)}; build a new optimizer for new params")
            replaced[i] = (p, _validate.address(p))
            warn_if_copied([(f"param_groups[{gi}]['params'][{k}]", p)], type(self).__name__)
        return replaced

    def _check_swapped(self, plans):
        """After every group's plan: params swapped in (in any group) overlap no other
        param, and no gradient overlaps a param swapped into another group. O(n log n),
        and only in a step where some param was swapped."""
        swapped = {}
        for plan, how in plans:
            if how == "new":
                swapped.update(plan.replaced)
        if not swapped:
            return
        self._check_params_disjoint(swapped)
        base = 0
        for gi, (plan, _) in enumerate(plans):
            self._check_grads_alias_no_param(base, plan.grads, plan.grad_addresses, swapped)
            base += self._group_sizes[gi]

    def _check_params_disjoint(self, replaced):
        """No two params share memory once ``replaced`` is swapped in: two updates of one
        element would race in a parallel step."""
        starts, ends, owner = self._param_spans(replaced)
        nonempty = ends > starts
        starts, ends, owner = starts[nonempty], ends[nonempty], owner[nonempty]
        # Sorted by start: an overlap exists iff some span starts before its predecessor ends.
        bad = np.flatnonzero(starts[1:] < ends[:-1])
        if bad.size:
            a, b = sorted((int(owner[bad[0]]), int(owner[bad[0] + 1])))
            where = {i: self._locate_label(i) for i in (a, b)}
            objs = [replaced[i][0] if i in replaced else self._param_objs[i] for i in (a, b)]
            what = "the same array" if objs[0] is objs[1] else "overlapping memory"
            raise ValueError(f"{where[a]} and {where[b]} are {what} (params[{a}] and params[{b}]); "
                             "each parameter must be a distinct array, or two updates race on "
                             "the same memory")

    def _locate_label(self, i) -> str:
        """``param_groups[g]['params'][k]`` of global param index ``i``."""
        for gi, n in enumerate(self._group_sizes):
            if i < n:
                return f"param_groups[{gi}]['params'][{i}]"
            i -= n
        return f"params[{i}]"

    def _check_grads_alias_no_param(self, base, grads, addresses, replaced):
        """No gradient overlaps the memory of any param (its own is checked per grad)."""
        if not addresses:
            return
        spans = self._param_spans(replaced)
        ks = list(addresses)
        # A checked gradient has its param's shape and dtype, so its param's byte count.
        sigs = self._param_sigs
        sizes = [sigs[base + k][2] if sigs[base + k] is not None and base + k not in replaced
                 else _validate.nbytes(grads[k]) for k in ks]
        starts, ends, owner = spans
        if len(ks) <= 8:
            # a few gradients: one search each (NumPy's vector set-up costs more)
            for k, size in zip(ks, sizes):
                lo = addresses[k]
                j = int(starts.searchsorted(lo + size, side="left")) - 1
                if size and j >= 0 and int(ends[j]) > lo:
                    raise ValueError(f"grads[{base + k}] overlaps the memory of params[{int(owner[j])}]; "
                                     "a gradient must not share memory with any param")
            return
        g_lo = np.fromiter((addresses[k] for k in ks), dtype=np.int64, count=len(ks))
        g_hi = g_lo + np.asarray(sizes, dtype=np.int64)
        j = np.searchsorted(starts, g_hi, side="left") - 1     # last param starting below g_hi
        hit = (j >= 0) & (ends[np.maximum(j, 0)] > g_lo) & (g_hi > g_lo)
        if hit.any():
            k = ks[int(np.flatnonzero(hit)[0])]
            other = int(owner[j[np.flatnonzero(hit)[0]]])
            raise ValueError(f"grads[{base + k}] overlaps the memory of params[{other}]; "
                             "a gradient must not share memory with any param")

    def _param_spans(self, replaced):
        """(starts, ends, param index) of every param's bytes, sorted by start. Cached while
        the params are those added (the optimizer drops the cache when they change)."""
        if not replaced and self._spans is not None:
            return self._spans
        objs = [replaced[i][0] if i in replaced else p for i, p in enumerate(self._param_objs)]
        lo = np.array([replaced[i][1] if i in replaced else a
                       for i, a in enumerate(self._param_addresses)], dtype=np.int64)
        hi = lo + np.array([_validate.nbytes(p) for p in objs], dtype=np.int64)
        order = np.argsort(lo, kind="stable")
        spans = lo[order], hi[order], order
        if not replaced:
            self._spans = spans
        return spans

    def _build_buckets(self, gi, plan):
        group = self.param_groups[gi]
        base = sum(len(g["params"]) for g in self.param_groups[:gi])
        slot_names = plan.key[0]
        by_kind: dict = {}
        for k, (p, g) in enumerate(zip(plan.params, plan.grads)):
            if g is not None:
                storages = tuple(None if n is None else self._storage(n, p) for n in slot_names)
                by_kind.setdefault((np.dtype(p.dtype), storages), []).append(k)
        buckets = []
        for (_, storages), ks in by_kind.items():
            idx = [base + k for k in ks]
            for i, k in zip(idx, ks):
                self._ensure_state(i, plan.params[k], group, slot_names)
            slots = tuple(None if name is None else [self._state[i][name] for i in idx]
                          for name in slot_names)
            params = [plan.params[k] for k in ks]
            model = None
            if _is_low_precision(params[0]) and self.master_weights:
                model, params = params, [self._state[i][MASTER] for i in idx]
            bucket = _Bucket(idx, params, [plan.grads[k] for k in ks], slots, model=model,
                             positions=ks)
            if _is_low_precision(params[0]) and not self.master_weights:
                bucket.pure = self._pure
                if self._pure == "kahan":
                    bucket.compensation = [self._state[i][KAHAN] for i in idx]
            if not self.state_format.is_default:
                bucket.formats = tuple(s or "native" for s in storages)
                bucket.scales = tuple(None if name is None or name + "_absmax" not in self._state[idx[0]]
                                      else [self._state[i][name + "_absmax"] for i in idx]
                                      for name in slot_names)
                bucket.block = self.state_format.block_size
            buckets.append(bucket)
        plan.buckets = buckets

    def _regrad_buckets(self, gi, plan):
        """Same params and state, new gradient arrays: re-target the cached tables."""
        buckets = []
        for old in plan.buckets:
            ks = old.positions
            bucket = old._like(old.indices, old.params, [plan.grads[k] for k in ks], old.slots,
                               old.model, ks)
            if old.table is not None and hasattr(old.table, "with_grads"):
                bucket.table = old.table.with_grads(bucket.grads, [plan.grad_addresses[k] for k in ks])
            buckets.append(bucket)
        plan.buckets = buckets
