"""Keras 3's optimizers over fastopt's fused kernels: ``fastopt.keras.Adam(learning_rate=...)``.

Keras's names, defaults and equations (``keras.optimizers``, Keras 3): ``learning_rate``
(a number, a ``fastopt.schedules`` Keras-style decay called with the iteration count, or
a callable of no arguments), ``beta_1``/``beta_2``, ``epsilon`` ("epsilon hat"), SGD's
velocity with the learning rate inside, RMSprop's eps inside the square root and lr
inside its momentum, Adagrad's initial accumulator 0.1, and the base optimizer's
options:

- ``weight_decay``: ``w -= w * weight_decay * lr`` before the update (AdamW: 0.004).
- ``clipnorm`` (each gradient to at most this 2-norm), ``clipvalue`` (each element to
  [-clipvalue, clipvalue]) or ``global_clipnorm`` (all gradients together); only one.
  ``clipvalue`` runs inside the element; ``global_clipnorm`` is one reduction pass and a
  gradient scale; ``clipnorm`` is one per-tensor reduction pass and a per-tensor
  gradient scale.
- one global ``iterations`` count (bias corrections use it for every variable, as Keras).

An optimizer is created without variables and built on its first ``apply`` (or by
``build``); ``apply(grads, variables)``, ``apply_gradients(zip(grads, variables))`` and
the plain ``step(grads)`` (``step()`` for a FlatParams) all run one fused step.
SGD also takes sparse row gradients (``fastopt.sparse.SparseGrad``, or any object with
``indices`` and ``values`` like ``tf.IndexedSlices``): duplicate rows are summed, which
is Keras's scatter-add without momentum and its deduplication with momentum.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend
from . import _validate as v
from .flat import FlatParams
from .kernels import keras as _k
from .kernels import reference
from .optimizer import Optimizer
from .sparse import rows_seen_so_far
from .schedules import LearningRateSchedule
from .sparse import SparseGrad

__all__ = ["SGD", "RMSprop", "Adagrad", "Adam", "AdamW", "Adamax", "Nadam", "Adadelta"]

_CLIPS = ("clipnorm", "clipvalue", "global_clipnorm")


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
    """The fused step of one Keras optimizer over its variables (one param group).

    Keras's semantics differ from torch's in ways the base class leaves to hooks: one
    global iteration count for every variable, a learning rate resolved per step, and
    gradient clipping before the update.
    """

    has_step_state = False

    def __init__(self, params, kind, hp, backend):
        self.kind = kind
        self.element = _k.ELEMENTS[kind]
        self.slot_names = tuple(s for s in _k.SLOTS[kind] if s is not None)
        self.supports_sparse = kind == "SGD"
        self.iterations = 0         # completed steps (the owner advances it)
        self.lr_now = 0.0           # this step's learning rate (the owner sets it)
        self.u_product = 1.0        # Nadam: u_1 ... u_t for this step (the owner sets it)
        super().__init__(params, hp, backend)

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

    # -- sparse rows (SGD) ----------------------------------------------------------------
    def _check_sparse_group(self, group, where):
        for name in ("weight_decay",) + _CLIPS:
            if group[name]:
                raise ValueError(f"{where}: {name} is not supported with sparse gradients "
                                 f"(Keras applies it to the whole variable), got {group[name]}")

    def _sparse_scalars(self, group, step, cast):
        return self._scalars(group, step, cast)

    def _sparse_rows(self, i, param, sg):
        if self.param_groups[0]["momentum"] == 0:
            return sg.indices, sg.rows
        return rows_seen_so_far(self.__dict__.setdefault("_sparse_seen", {}), i, param, sg)

    def _sparse_reference(self, group, step, param, index, rows, slots):
        dense = np.zeros_like(param)
        dense[index] = rows
        self._reference(group, step, [param], [dense], tuple(None if s is None else [s] for s in slots))

    # -- the step ---------------------------------------------------------------------------
    def _run_group(self, group, plan, backend_name, scale=1.0):
        buckets = [b for b in plan.buckets if len(b.indices)]
        if backend_name == "numpy":
            self._run_reference(group, buckets, scale)
        else:
            self._run_kernels(group, buckets, backend_name, scale)
        for b in buckets:
            self._steps[b.indices] += 1

    def _run_reference(self, group, buckets, scale):
        grads = [g * g.dtype.type(scale) if scale != 1.0 else g for b in buckets for g in b.grads]
        clipped = reference.keras_clip(grads, clipnorm=group["clipnorm"], clipvalue=group["clipvalue"],
                                       global_clipnorm=group["global_clipnorm"])
        k = 0
        for b in buckets:
            n = len(b.grads)
            self._reference(group, self.iterations + 1, b.params, clipped[k:k + n], b.slots)
            k += n

    def _run_kernels(self, group, buckets, backend_name, scale):
        from .kernels import cpu, per_tensor
        be = _backend.get(backend_name)
        per_tensor_clip = bool(group["clipnorm"])
        for b in buckets:
            if b.table is None:
                b.table = (per_tensor.table(b.params, b.grads, b.slots, be) if per_tensor_clip
                           else be.table(b.params, b.grads, b.slots))
        squares = _k.SquareScalars
        if group["global_clipnorm"]:
            reduce = cpu.reduce_chunks if backend_name == "cpu" else be.reduce_chunks
            total = 0.0
            for b in buckets:
                cast = np.dtype(b.params[0].dtype).type
                total += float(reduce(_k.grad_square, b.table, squares(cast(0)))[:, 0].sum())
            norm = math.sqrt(total) * scale
            clip = float(group["global_clipnorm"])
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = clip * min(np.float64(1.0) / norm, 1.0 / clip) + (norm - norm)
            scale = scale * float(factor)
        for b in buckets:
            scalars = self._scalars(group, None, np.dtype(b.params[0].dtype).type)
            if per_tensor_clip:
                sums = per_tensor.row_sums(_k.grad_square, b.table, squares(scalars.lr * 0), be)
                norms = np.sqrt(sums[:, 0]) * scale
                clip = float(group["clipnorm"])
                with np.errstate(invalid="ignore"):
                    factors = clip / np.maximum(norms, clip)
                per_tensor.run(self.element, b.table, scalars, factors, mode="grad", grad_scale=scale,
                               backend=be)
            else:
                be.run(self.element, b.table, scalars, scale)


def _is_sparse(g) -> bool:
    return isinstance(g, SparseGrad) or (hasattr(g, "indices") and hasattr(g, "values")
                                         and not isinstance(g, np.ndarray))


def _as_sparse(g):
    if isinstance(g, SparseGrad):
        return g
    return SparseGrad(np.asarray(g.indices).reshape(-1), np.asarray(g.values))


class _KerasOptimizer:
    """Base of the Keras-style optimizers: config, lazy build, Keras's apply methods."""

    _kind = ""

    def __init__(self, learning_rate, *, weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, name=None, backend=None, **hyperparameters):
        if backend is not None:
            _backend._check_name(backend, "backend")
        self.name = name or type(self).__name__.lower()
        self.backend = backend
        self._hp = dict(learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm,
                        clipvalue=clipvalue, global_clipnorm=global_clipnorm, **hyperparameters)
        _check_keras(self._kind, self._hp)
        self._engine: _Engine | None = None
        self._iterations = 0
        self._u_product = 1.0

    # -- Keras's interface ------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self._engine is not None

    def build(self, variables) -> None:
        """Create the optimizer over ``variables`` (a list of arrays or a FlatParams)."""
        if self._engine is not None:
            return
        if not isinstance(variables, FlatParams):
            variables = list(variables)
        self._engine = _Engine(variables, self._kind, dict(self._hp), self.backend)

    @property
    def iterations(self) -> int:
        """Steps applied so far (Keras's ``optimizer.iterations``)."""
        return self._iterations

    @property
    def learning_rate(self) -> float:
        """This iteration's learning rate (a schedule evaluated at ``iterations``)."""
        return self._current_lr()

    @learning_rate.setter
    def learning_rate(self, value):
        if isinstance(self._hp["learning_rate"], LearningRateSchedule):
            raise TypeError("this optimizer was created with a LearningRateSchedule as its "
                            "learning_rate, so its learning rate is not settable")
        hp = dict(self._hp, learning_rate=value)
        _check_keras(self._kind, hp)
        self._hp = hp
        if self._engine is not None:
            self._engine.param_groups[0]["learning_rate"] = value

    @property
    def variables(self) -> list:
        """The state arrays created so far, variable by variable (live arrays)."""
        if self._engine is None:
            return []
        st = self._engine.state
        return [st[i][n] for i in sorted(st) for n in self._engine.slot_names if n in st[i]]

    def get_config(self) -> dict:
        return dict(self._hp, name=self.name)

    def apply_gradients(self, grads_and_vars) -> int:
        """Apply ``zip(grads, variables)``; returns ``iterations`` (as tf.keras)."""
        pairs = list(grads_and_vars)
        self.apply([g for g, _ in pairs], [w for _, w in pairs])
        return self._iterations

    def apply(self, grads, trainable_variables=None) -> None:
        """One step: ``grads`` aligned with ``trainable_variables`` (the variables the
        optimizer was built with, or any subset of them), or with all of them when
        ``trainable_variables`` is None. None gradients skip their variable."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if self._engine is None:
                raise ValueError("when passing grads without variables, the optimizer must already "
                                 "be built on a list of variables; call build(variables) first")
            aligned = grads
        else:
            if isinstance(trainable_variables, FlatParams):
                self.build(trainable_variables)          # no-op once built
                trainable_variables = trainable_variables.params
            variables = list(trainable_variables)
            if len(variables) != len(grads):
                raise ValueError(f"got {len(grads)} gradients for {len(variables)} variables")
            if self._engine is None:
                self.build(variables)
            aligned = self._align(grads, variables)
        if all(g is None for g in aligned):
            raise ValueError("No gradients provided for any variable.")
        self.step(aligned)

    def step(self, grads=None, *, grad_scale=None) -> bool:
        """One fused step; ``grads`` aligned with the built variables (None for a
        FlatParams: its ``grads`` are read). Returns True when applied."""
        eng = self._engine
        if eng is None:
            raise ValueError(f"{type(self).__name__} is not built: call build(variables) or "
                             "apply(grads, variables) first")
        if grads is not None:
            grads = [_as_sparse(g) if g is not None and _is_sparse(g) else g for g in grads]
        lr = self._current_lr()
        eng.iterations = self._iterations
        eng.lr_now = lr
        u_product = self._u_product
        if self._kind == "Nadam":
            u_product = self._u_product * _k.nadam_u(self._iterations + 1, self._hp["beta_1"])
        eng.u_product = u_product
        applied = eng.step(grads, grad_scale=grad_scale) if grad_scale is not None else eng.step(grads)
        if applied:
            self._iterations += 1
            self._u_product = u_product
        return applied

    def state_dict(self) -> dict:
        """The engine's state dict (torch layout, Keras's state names) with
        ``iterations`` (and Nadam's ``u_product``)."""
        if self._engine is None:
            raise ValueError(f"{type(self).__name__} is not built: it has no state yet")
        sd = self._engine.state_dict()
        sd["iterations"] = self._iterations
        if self._kind == "Nadam":
            sd["u_product"] = self._u_product
        return sd

    def load_state_dict(self, state_dict) -> None:
        if self._engine is None:
            raise ValueError(f"{type(self).__name__} is not built: call build(variables) first")
        iterations = state_dict.get("iterations") if isinstance(state_dict, dict) else None
        if isinstance(iterations, bool) or not isinstance(iterations, (numbers.Integral, np.integer)) \
                or iterations < 0:
            raise ValueError(f"state_dict['iterations'] must be a non-negative integer, got {iterations!r}")
        u_product = 1.0
        if self._kind == "Nadam":
            u_product = v.number("state_dict['u_product']", state_dict.get("u_product"), low=0.0, high=1.0)
        self._engine.load_state_dict(state_dict)
        self._hp = {k: self._engine.param_groups[0][k] for k in self._hp}
        self._iterations = int(iterations)
        self._u_product = u_product

    # -- helpers ----------------------------------------------------------------------------
    def _align(self, grads, variables):
        params = [p for g in self._engine.param_groups for p in g["params"]]
        position = {id(p): k for k, p in enumerate(params)}
        aligned = [None] * len(params)
        for g, w in zip(grads, variables):
            k = position.get(id(w))
            if k is None:
                raise ValueError("unknown variable: this optimizer can only be called for the "
                                 "variables it was built with")
            aligned[k] = g
        return aligned

    def _current_lr(self) -> float:
        lr = self._hp["learning_rate"]
        if isinstance(lr, LearningRateSchedule):
            lr = lr(self._iterations)
        elif callable(lr):
            lr = lr()
        lr = float(np.asarray(lr))
        v.number("learning_rate", lr, low=0.0)
        return lr

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


class SGD(_KerasOptimizer):
    """keras.optimizers.SGD: ``v = momentum v - lr g``, ``w += v`` (Nesterov:
    ``w += momentum v - lr g``). State: ``momentum`` (when momentum != 0)."""

    _kind = "SGD"

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None, *, name="SGD", backend=None):
        super().__init__(learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                         name=name, backend=backend)


class RMSprop(_KerasOptimizer):
    """keras.optimizers.RMSprop: eps inside the square root, lr inside the momentum.
    State: ``velocity``, ``momentum`` (momentum > 0), ``average_gradient`` (centered)."""

    _kind = "RMSprop"

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, *,
                 name="rmsprop", backend=None):
        super().__init__(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon, centered=centered,
                         weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, backend=backend)


class Adagrad(_KerasOptimizer):
    """keras.optimizers.Adagrad: accumulators start at 0.1, eps inside the square root.
    State: ``accumulator``."""

    _kind = "Adagrad"

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, *,
                 name="adagrad", backend=None):
        super().__init__(learning_rate, initial_accumulator_value=initial_accumulator_value,
                         epsilon=epsilon, weight_decay=weight_decay, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm, name=name,
                         backend=backend)


class Adam(_KerasOptimizer):
    """keras.optimizers.Adam: ``w -= m lr sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)``.
    State: ``momentum``, ``velocity``, ``velocity_hat`` (amsgrad)."""

    _kind = "Adam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, *,
                 name="adam", backend=None):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
                         weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, backend=backend)


class AdamW(Adam):
    """keras.optimizers.AdamW: Adam with ``w -= w * weight_decay * lr`` first (0.004)."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 *, name="adamw", backend=None):
        if weight_decay is None:
            raise ValueError("weight_decay must be a float for AdamW, got None")
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
                         weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, backend=backend)


class Adamax(_KerasOptimizer):
    """keras.optimizers.Adamax: ``w -= lr m / ((1 - b1^t)(u + eps))``, ``u = max(b2 u, |g|)``.
    State: ``momentum``, ``norm``."""

    _kind = "Adamax"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, *,
                 name="adamax", backend=None):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, backend=backend)


class Nadam(_KerasOptimizer):
    """keras.optimizers.Nadam: the schedule ``u_t = b1 (1 - 0.5 * 0.96^t)`` and its product.
    State: ``momentum``, ``velocity`` (and ``u_product`` in the state dict)."""

    _kind = "Nadam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None, *,
                 name="nadam", backend=None):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, name=name, backend=backend)


class Adadelta(_KerasOptimizer):
    """keras.optimizers.Adadelta: ``delta = -sqrt(a + eps) g / sqrt(s + eps)``, ``w += lr delta``.
    State: ``accumulated_grad``, ``accumulated_delta_var``."""

    _kind = "Adadelta"

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, weight_decay=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None, *, name="adadelta",
                 backend=None):
        super().__init__(learning_rate, rho=rho, epsilon=epsilon, weight_decay=weight_decay,
                         clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                         name=name, backend=backend)
