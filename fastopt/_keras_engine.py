"""The fused engine behind fastopt.keras: one Keras optimizer's step over its variables.

``_Engine`` is :class:`fastopt.Optimizer` with a Keras spec attached (kernels/keras.py;
:func:`engine_class`) and Keras's hooks: one global iteration count, the learning rate
(and Nadam's ``u_product``) resolved per call by the owner, clipping before the update
(``clipnorm`` as the spec's per-tensor pass, ``global_clipnorm`` with Keras's
coefficient); ``_GradientAccumulators`` holds Keras's gradient accumulators and adds a
call's gradients in one fused pass per dtype.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from . import _backend
from . import _validate as v
from .kernels import keras as _k
from .optimizer import Optimizer
from .sparse import SparseGrad, check as _check_sparse_grad
from .spec import optimizer_class


class _Engine(Optimizer):
    """The fused step of one Keras optimizer over its variables.

    One param group, or two when some variables are excluded from weight decay (the
    second has ``weight_decay=None``). Keras's semantics differ from torch's in ways the
    base class leaves to hooks: one global iteration count for every variable, values
    the owner resolves per call (``step_values``: the learning rate, host state), gradient
    clipping before the update, and Keras's global-norm coefficient over every group
    (``global_clipnorm`` is held as the base class's ``max_grad_norm`` so that its
    reduction pass runs before the step).
    """

    def __init__(self, params, defaults, backend, **options):
        self.step_values = {}       # this call's learning_rate (and host state): the owner sets them
        self.grad_factor = 1.0      # 1 / loss_scale_factor or 1 / accumulation steps (the owner)
        super().__init__(params, defaults, backend, max_grad_norm=defaults["global_clipnorm"] or None,
                         **options)

    def _host_grow(self, n):
        """Keras keeps host state (Nadam's ``u_product``) once per optimizer: the owner."""

    def _at_iteration(self, group, where):
        return {**group, **self.step_values}

    def _run_group(self, group, plan, backend_name, scale=1.0):
        # Keras: one iteration count for every variable (bias corrections, Nadam's schedule).
        for bucket in plan.buckets:
            self._run_bucket(group, bucket, self.iterations + 1, backend_name, scale * self.grad_factor)
            self._steps[bucket.indices] += 1

    def _run_part(self, group, bucket, step, backend_name, scale=1.0):
        spec = _k.CLIPPED[self.spec.name] if group["clipnorm"] else self.spec
        _backend.get(backend_name).step(spec, group, bucket, step, scale)

    def _grad_multiplier(self, plans, sparse, backend_name, grad_scale):
        """With ``global_clipnorm``: Keras's coefficient (not torch's) for the 2-norm of
        every gradient of every group as the step sees them (times ``grad_scale`` and
        ``grad_factor``), from one reduction pass; None skips the step (``grad_scale``
        given and a non-finite gradient, as the base class)."""
        if self.max_grad_norm is None:
            return super()._grad_multiplier(plans, sparse, backend_name, grad_scale)
        from . import clip as norms
        grads = [g for plan, _ in plans for g in plan.grads if g is not None]
        grads += [sg.rows for _, _, sg in sparse.values()]
        norm = norms._total_norm(self._norm_prepared(grads), 2.0, backend_name, "step")
        if grad_scale is not None and not math.isfinite(norm):
            return None
        scale = 1.0 if grad_scale is None else grad_scale
        self.last_grad_norm = norm * scale * self.grad_factor
        return scale * _k.global_clip_factor(self.last_grad_norm, self.max_grad_norm)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.max_grad_norm = self.param_groups[0]["global_clipnorm"] or None

    def _run_sparse(self, i, group, param, sg, backend_name, scale=1.0):
        scale *= self.grad_factor
        if group["clipnorm"]:
            # The rows are coalesced: their norm is the scattered gradient's.
            norm = math.sqrt(float(np.sum(np.square(sg.rows, dtype=np.float64)))) * scale
            scale *= float(group["clipnorm"] / np.maximum(norm, group["clipnorm"]))
        super()._run_sparse(i, group, param, sg, backend_name, scale)


_ENGINES: dict = {}


def engine_class(spec) -> type:
    """The engine of a Keras spec: :class:`_Engine` with the spec attached."""
    cls = _ENGINES.get(spec.name)
    if cls is None:
        cls = _ENGINES[spec.name] = optimizer_class(spec, _Engine, __name__)
    return cls


class _GradientAccumulators:
    """Keras's gradient accumulators: one zero array per variable, views of one buffer per
    dtype (a FlatParams: of one buffer) so that zeroing them is one fill each; a call adds
    its gradients with one fused pass per dtype (the accumulators in the driver's params
    column, the gradients in its grads column)."""

    def __init__(self, variables, flat, backend):
        self.variables = variables
        self.backend = backend
        if flat is not None:
            self.buffers = [flat.new_buffer(0.0)]
            self.arrays = flat.views_of(self.buffers[0])
        else:
            self.buffers, self.arrays = _zero_views(variables)
        self._tables: dict = {}

    def add(self, grads, factor) -> None:
        """``acc += g * factor`` for every gradient given (checked first, then added)."""
        dense, sparse = {}, []
        for i, (g, w) in enumerate(zip(grads, self.variables)):
            if isinstance(g, SparseGrad):
                sparse.append((i, _check_sparse_grad(g, w, i)))
            elif g is not None:
                dense.setdefault(np.dtype(w.dtype), []).append((i, v.grad(g, w, i)))
        name = _backend.resolve(self.backend, self.variables[0])
        for dtype, entries in dense.items():
            idx = tuple(i for i, _ in entries)
            accs, gs = [self.arrays[i] for i in idx], [grads[i] for i in idx]
            if name == "numpy":
                for a, g in zip(accs, gs):
                    a += g * dtype.type(factor)
                continue
            be = _backend.get(name)
            cached = self._tables.get((name, idx))
            if cached is None:
                table = be.table(accs, gs, (None, None, None))
            elif all(map(operator.is_, cached[0], gs)):
                table = cached[1]
            else:
                table = cached[1].with_grads(gs, [address for _, address in entries])
            self._tables[(name, idx)] = (gs, table)
            be.run(_k.accumulate_element, table, _k.AccumulateScalars(dtype.type(0)), factor)
        for i, sg in sparse:
            acc = self.arrays[i]
            acc[sg.indices] += sg.rows * acc.dtype.type(factor)

    def zero(self) -> None:
        for b in self.buffers:
            b.fill(0)


def _zero_views(variables):
    """Zero buffers, one per (array module, dtype), and a view of one per variable."""
    sizes: dict = {}
    for w in variables:
        key = (isinstance(w, np.ndarray), np.dtype(w.dtype))
        sizes[key] = sizes.get(key, 0) + int(w.size)
    buffers = {}
    for (host, dtype), n in sizes.items():
        xp = np if host else _cupy()
        buffers[host, dtype] = xp.zeros(n, dtype=dtype)
    used = dict.fromkeys(buffers, 0)
    views = []
    for w in variables:
        key = (isinstance(w, np.ndarray), np.dtype(w.dtype))
        start = used[key]
        used[key] = start + int(w.size)
        views.append(buffers[key][start:start + int(w.size)].reshape(w.shape))
    return list(buffers.values()), views


def _cupy():
    import cupy
    return cupy
