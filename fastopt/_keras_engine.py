"""The fused engine behind fastopt.keras: one Keras optimizer's step over its variables.

``_Engine`` is the base :class:`fastopt.Optimizer` with Keras's hooks (one global
iteration count, the learning rate resolved per step, clipping before the update, sparse
rows for SGD and Adagrad); ``_GradientAccumulators`` holds Keras's gradient accumulators
and adds a call's gradients in one fused pass per dtype.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from . import _backend
from . import _validate as v
from .kernels import keras as _k
from .kernels import reference
from .optimizer import Optimizer
from .sparse import SparseGrad, check as _check_sparse_grad, rows_seen_so_far

_CLIPS = ("clipnorm", "clipvalue", "global_clipnorm")
_ROW_SPARSE = ("SGD", "Adagrad")    # sparse rows update in place; the others are densified


def _optional_positive(name, value, where):
    """None or 0 (off, as Keras treats them) or a positive finite number."""
    if value is None:
        return
    v.number(name, value, low=0.0, where=where)


def _check_keras(kind, hp, where=""):
    """Validate Keras hyperparameters, naming the bad one."""
    lr = hp["learning_rate"]
    if not callable(lr):
        v.number("learning_rate", lr, low=0.0, where=where)
    wd = hp["weight_decay"]
    if wd is not None:
        v.number("weight_decay", wd, low=0.0, where=where)
    for name in _CLIPS:
        _optional_positive(name, hp[name], where)
    if sum(hp[name] is not None for name in _CLIPS) > 1:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}only one of clipnorm, clipvalue and global_clipnorm can be set, got "
                         + ", ".join(f"{n}={hp[n]}" for n in _CLIPS))
    if "epsilon" in hp:
        v.number("epsilon", hp["epsilon"], low=0.0, where=where)
    if kind == "SGD":
        v.number("momentum", hp["momentum"], low=0.0, high=1.0, where=where)
        v.flag("nesterov", hp["nesterov"], where=where)
    elif kind == "RMSprop":
        v.number("rho", hp["rho"], low=0.0, high=1.0, where=where)
        v.number("momentum", hp["momentum"], low=0.0, high=1.0, where=where)
        v.flag("centered", hp["centered"], where=where)
    elif kind == "Adagrad":
        v.number("initial_accumulator_value", hp["initial_accumulator_value"], low=0.0, where=where)
    elif kind == "Adadelta":
        v.number("rho", hp["rho"], low=0.0, high=1.0, where=where)
    else:
        v.number("beta_1", hp["beta_1"], low=0.0, high=1.0, high_open=True, where=where)
        v.number("beta_2", hp["beta_2"], low=0.0, high=1.0, high_open=True, where=where)
        if kind == "Adam":
            v.flag("amsgrad", hp["amsgrad"], where=where)

class _Engine(Optimizer):
    """The fused step of one Keras optimizer over its variables.

    One param group, or two when some variables are excluded from weight decay (the
    second has ``weight_decay=None``). Keras's semantics differ from torch's in ways the
    base class leaves to hooks: one global iteration count for every variable, a
    learning rate resolved per step, gradient clipping before the update, and Keras's
    global-norm coefficient over every group (``global_clipnorm`` is held as the base
    class's ``max_grad_norm`` so that its reduction pass runs before the step).
    """

    has_step_state = False

    def __init__(self, params, kind, hp, backend):
        self.kind = kind
        self.element = _k.ELEMENTS[kind]
        self.slot_names = tuple(s for s in _k.SLOTS[kind] if s is not None)
        self.supports_sparse = kind in _ROW_SPARSE
        self.lr_now = 0.0           # this step's learning rate (the owner sets it)
        self.u_product = 1.0        # Nadam: u_1 ... u_t for this step (the owner sets it)
        self.grad_factor = 1.0      # 1 / loss_scale_factor or 1 / accumulation steps (the owner)
        super().__init__(params, hp, backend, max_grad_norm=hp["global_clipnorm"] or None)

    # -- hooks (instance methods: they depend on the optimizer kind and the step) -------
    def _check_group(self, group, where):
        _check_keras(self.kind, group, where)

    def _active_slots(self, group):
        names = _k.SLOTS[self.kind]
        if self.kind == "SGD":
            return (names[0] if group["momentum"] != 0 else None, None, None)
        if self.kind == "RMSprop":
            return (names[0], names[1] if group["momentum"] > 0 else None,
                    names[2] if group["centered"] else None)
        if self.kind == "Adam":
            return (names[0], names[1], names[2] if group["amsgrad"] else None)
        return names

    def _initial_value(self, group, name):
        return float(group["initial_accumulator_value"]) if name == "accumulator" else 0.0

    def _scalars(self, group, step, cast):
        return _k.keras_scalars(self.kind, group, self.iterations + 1, self.lr_now, cast,
                                self.u_product)

    def _reference(self, group, step, params, grads, slots):
        """The NumPy reference of the update (gradients already clipped)."""
        step = self.iterations + 1
        lr, wd = self.lr_now, group["weight_decay"]
        kind = self.kind
        if kind == "SGD":
            reference.keras_sgd(params, grads, slots[0], lr=lr, momentum=group["momentum"],
                                nesterov=group["nesterov"], weight_decay=wd)
        elif kind == "RMSprop":
            reference.keras_rmsprop(params, grads, *slots, lr=lr, rho=group["rho"],
                                    momentum=group["momentum"], epsilon=group["epsilon"],
                                    centered=group["centered"], weight_decay=wd)
        elif kind == "Adagrad":
            reference.keras_adagrad(params, grads, slots[0], lr=lr, epsilon=group["epsilon"],
                                    weight_decay=wd)
        elif kind == "Adam":
            reference.keras_adam(params, grads, *slots, step=step, lr=lr, beta_1=group["beta_1"],
                                 beta_2=group["beta_2"], epsilon=group["epsilon"],
                                 amsgrad=group["amsgrad"], weight_decay=wd)
        elif kind == "Adamax":
            reference.keras_adamax(params, grads, slots[0], slots[1], step=step, lr=lr,
                                   beta_1=group["beta_1"], beta_2=group["beta_2"],
                                   epsilon=group["epsilon"], weight_decay=wd)
        elif kind == "Nadam":
            reference.keras_nadam(params, grads, slots[0], slots[1], step=step,
                                  u_product=self.u_product, lr=lr, beta_1=group["beta_1"],
                                  beta_2=group["beta_2"], epsilon=group["epsilon"], weight_decay=wd)
        else:
            reference.keras_adadelta(params, grads, slots[0], slots[1], lr=lr, rho=group["rho"],
                                     epsilon=group["epsilon"], weight_decay=wd)

    def _at_iteration(self, group, where):
        # Keras's learning_rate (number, schedule or callable) is resolved by the owner
        # into lr_now before each step; the base class's "lr" schedules do not apply.
        return group

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

    # -- sparse rows (SGD, Adagrad) ---------------------------------------------------------
    def _check_sparse_group(self, group, where):
        if group["weight_decay"]:
            raise ValueError(f"{where}: sparse row updates cannot apply weight_decay (Keras decays "
                             "the whole variable); pass the dense gradient")

    def _sparse_scalars(self, group, step, cast):
        return self._scalars(group, step, cast)

    def _sparse_rows(self, i, param, sg):
        if self.kind != "SGD" or self.param_groups[0]["momentum"] == 0:
            return sg.indices, sg.rows
        return rows_seen_so_far(self.__dict__.setdefault("_sparse_seen", {}), i, param, sg)

    def _run_sparse(self, i, group, param, sg, backend_name, scale=1.0):
        scale *= self.grad_factor
        if group["clipnorm"]:
            # The rows are coalesced: their norm is the scattered gradient's.
            norm = math.sqrt(float(np.sum(np.square(sg.rows, dtype=np.float64)))) * scale
            scale *= float(group["clipnorm"] / np.maximum(norm, group["clipnorm"]))
        super()._run_sparse(i, group, param, sg, backend_name, scale)

    def _sparse_reference(self, group, step, param, index, rows, slots):
        dense = np.zeros_like(param)
        dense[index] = rows
        dense = reference.keras_clip([dense], clipvalue=group["clipvalue"])[0]
        self._reference(group, step, [param], [dense], tuple(None if s is None else [s] for s in slots))

    # -- the step ---------------------------------------------------------------------------
    def _run_group(self, group, plan, backend_name, scale=1.0):
        scale *= self.grad_factor
        buckets = [b for b in plan.buckets if len(b.indices)]
        if backend_name == "numpy":
            self._run_reference(group, buckets, scale)
        else:
            self._run_kernels(group, buckets, backend_name, scale)
        for b in buckets:
            self._steps[b.indices] += 1

    def _run_reference(self, group, buckets, scale):
        grads = [g * g.dtype.type(scale) if scale != 1.0 else g for b in buckets for g in b.grads]
        # global_clipnorm is already in ``scale`` (_grad_multiplier: it spans every group).
        clipped = reference.keras_clip(grads, clipnorm=group["clipnorm"], clipvalue=group["clipvalue"])
        k = 0
        for b in buckets:
            n = len(b.grads)
            self._reference(group, self.iterations + 1, b.params, clipped[k:k + n], b.slots)
            k += n

    def _run_kernels(self, group, buckets, backend_name, scale):
        from .kernels import per_tensor
        be = _backend.get(backend_name)
        per_tensor_clip = bool(group["clipnorm"])
        for b in buckets:
            if b.table is None:
                b.table = (per_tensor.table(b.params, b.grads, b.slots, be) if per_tensor_clip
                           else be.table(b.params, b.grads, b.slots))
        for b in buckets:
            scalars = self._scalars(group, None, np.dtype(b.params[0].dtype).type)
            if per_tensor_clip:
                sums = per_tensor.row_sums(_k.grad_square, b.table, _k.SquareScalars(scalars.lr * 0), be)
                norms = np.sqrt(sums[:, 0]) * scale
                clip = float(group["clipnorm"])
                with np.errstate(invalid="ignore"):
                    factors = clip / np.maximum(norms, clip)
                per_tensor.run(self.element, b.table, scalars, factors, mode="grad", grad_scale=scale,
                               backend=be)
            else:
                be.run(self.element, b.table, scalars, scale)


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
