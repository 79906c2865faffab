"""Keras's base optimizer for fastopt.keras: config, lazy build, the apply methods and
the base options (weight-decay exclusions, EMA, gradient accumulation, loss scaling, state
dicts), and :func:`keras_class`, which makes the public classes from the specs of
kernels/keras.py. The rules they follow are in :mod:`fastopt.keras`.
"""
from __future__ import annotations

import inspect
import numbers
import re

import numpy as np

from . import _backend, lowbit
from . import _validate as v
from ._keras_engine import _GradientAccumulators, engine_class
from ._state import _host, _to_like
from .ema import EMA
from .flat import FlatParams
from .schedules import LearningRateSchedule
from .sparse import SparseGrad, check as _check_sparse_grad

_TORCH_NAMES = {"Nadam": "NAdam"}   # fastopt's torch-style class of the same optimizer


def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_options(opts):
    """Validate the base options beyond the hyperparameters (Keras's rules and messages)."""
    v.flag("use_ema", opts["use_ema"])
    if opts["use_ema"]:             # Keras checks these only when EMA is on
        v.number("ema_momentum", opts["ema_momentum"], low=0.0, high=1.0)
        freq = opts["ema_overwrite_frequency"]
        if freq is not None and (not _is_int(freq) or freq < 1):
            raise ValueError(f"ema_overwrite_frequency must be an integer >= 1 or None, got {freq!r}")
    if opts["loss_scale_factor"] is not None:
        v.number("loss_scale_factor", opts["loss_scale_factor"], low=0.0, low_open=True)
    n = opts["gradient_accumulation_steps"]
    if n is not None and (not _is_int(n) or n < 2):
        raise ValueError(f"gradient_accumulation_steps must be an integer >= 2 or None, got {n!r}")


def _is_sparse(g) -> bool:
    return isinstance(g, SparseGrad) or (hasattr(g, "indices") and hasattr(g, "values")
                                         and not isinstance(g, np.ndarray))


def _as_sparse(g):
    if isinstance(g, SparseGrad):
        return g
    return SparseGrad(np.asarray(g.indices).reshape(-1), np.asarray(g.values))


def _looks_like_variables(x) -> bool:
    """What a torch-style ``Adam(params, ...)`` passes where Keras takes learning_rate."""
    return (isinstance(x, (FlatParams, list, tuple, dict)) or v.is_array(x)
            or v.is_torch_tensor(x) or hasattr(x, "__next__"))


class _KerasOptimizer:
    """Base of the Keras-style optimizers: config, lazy build, Keras's apply methods."""

    spec = None                     # the optimizer's declaration (kernels/keras.py)

    def __new__(cls, *args, **kwargs):
        # Python raises "got multiple values for argument 'learning_rate'" for the torch
        # habit Adam(params, learning_rate=...) before __init__ runs; say what to write.
        if args and _looks_like_variables(args[0]):
            name = cls.__name__
            raise TypeError(
                f"fastopt.keras.{name}() got variables where Keras takes learning_rate: Keras "
                f"optimizers are created without variables. Write opt = fastopt.keras.{name}("
                f"learning_rate=1e-3), then opt.apply(grads, variables) each step (or "
                f"opt.apply_gradients(zip(grads, variables))); fastopt.{_TORCH_NAMES.get(name, name)}"
                f"(params, lr=...) is the torch-style class that takes the params")
        return super().__new__(cls)

    def __init__(self, learning_rate, *, weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name=None, backend=None,
                 state_format="float32", block_size=256, min_8bit_size=4096, **hyperparameters):
        if backend is not None:
            _backend._check_name(backend, "backend")
        self.name = name or type(self).__name__.lower()
        self.backend = backend
        given = dict(learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm,
                     clipvalue=clipvalue, global_clipnorm=global_clipnorm, **hyperparameters)
        self._hp = {h.name: given[h.name] for h in self.spec.hypers}
        self._check(self._hp)
        self._options = dict(use_ema=use_ema, ema_momentum=ema_momentum,
                             ema_overwrite_frequency=ema_overwrite_frequency or None,
                             loss_scale_factor=loss_scale_factor,
                             gradient_accumulation_steps=gradient_accumulation_steps or None)
        _check_options(self._options)
        # fastopt's low-bit state (fastopt/lowbit.py), checked now, used by the engine
        lowbit.StateFormat.checked(state_format, block_size, min_8bit_size)
        self._state_format = dict(state_format=state_format, block_size=block_size,
                                  min_8bit_size=min_8bit_size)
        self._built = False
        self._variables: list = []
        self._flat: FlatParams | None = None
        self._engine: _Engine | None = None
        self._order: list | None = None       # engine position -> build index (None: same)
        self._ema: EMA | None = None
        self._accumulators: _GradientAccumulators | None = None
        self._dense: dict = {}                # build index -> zeros a sparse gradient scatters into
        self._exclude = ([], None)            # exclude_from_weight_decay: (variables, pattern)
        self._position: dict = {}             # id(variable) -> build index
        self._row_sparse: list = []           # per variable: sparse rows step in place
        self._iterations = 0                  # apply() calls (Keras's _iterations)
        host = self.spec.host                 # one value per optimizer, as Keras's variable
        self._host_value = None if host is None else float(host.initial)

    def _check(self, hp) -> None:
        """Validate hyperparameters (the spec's checks), naming the bad one."""
        self.spec.check_group(dict(hp), "")
        decay = next(h for h in self.spec.hypers if h.name == "weight_decay")
        if hp["weight_decay"] is None and decay.default is not None:     # AdamW
            raise ValueError(f"weight_decay must be a float for {self.spec.name}, got None")

    # -- Keras's interface ------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self._built

    def build(self, variables, names=None) -> None:
        """Create the optimizer over ``variables`` (a list of arrays, possibly empty, or a
        FlatParams). ``names`` (one string per variable) name them for
        ``exclude_from_weight_decay(var_names=...)``; by default a variable's ``name``
        attribute is used. A second call is a no-op."""
        if self._built:
            return
        flat = variables if isinstance(variables, FlatParams) else None
        if flat is None and v.is_array(variables):
            raise TypeError("build() takes a list of variables or a FlatParams, got a single array; "
                            "wrap it in a list")
        variables = list(flat.params if flat is not None else variables)
        decayed = self._decayed(variables, names)
        excluded = sorted(set(range(len(variables))) - set(decayed))
        engine = order = ema = accumulators = None
        if variables:
            groups = [{"params": [variables[b] for b in decayed]}] if decayed else []
            if excluded:
                groups.append({"params": [variables[b] for b in excluded], "weight_decay": None})
            if excluded and decayed:
                order = decayed + excluded
            engine = engine_class(self.spec)(groups, backend=self.backend, **self._hp,
                                             **self._state_format)
            if self._options["use_ema"]:
                ema = EMA(flat if flat is not None else variables,
                          decay=self._options["ema_momentum"], backend=self.backend)
            if self._options["gradient_accumulation_steps"]:
                accumulators = _GradientAccumulators(variables, flat, self.backend)
        self._variables, self._flat, self._engine, self._order = variables, flat, engine, order
        self._ema, self._accumulators = ema, accumulators
        self._position = {id(w): b for b, w in enumerate(variables)}
        # Sparse rows step in place where no weight decay applies (Keras decays whole variables).
        no_decay = set(excluded) if self._hp["weight_decay"] else set(range(len(variables)))
        self._row_sparse = [self.spec.sparse is not None and b in no_decay for b in range(len(variables))]
        self._built = True

    def exclude_from_weight_decay(self, var_list=None, var_names=None) -> None:
        """Exempt variables from weight decay (Keras's method; call it before ``build``).

        Args:
          var_list: variables to exclude (matched by identity).
          var_names: strings (regular expressions); a variable whose name contains any of
            them is excluded, e.g. ``["bias"]``. Names come from ``build(variables,
            names=...)`` or the variables' ``name`` attribute.
        """
        if self._built:
            raise ValueError("exclude_from_weight_decay() can only be configured before the "
                             "optimizer is built")
        if isinstance(var_names, str) or (var_names is not None and
                                          not all(isinstance(n, str) for n in var_names)):
            raise TypeError(f"var_names must be a list of strings, got {var_names!r}")
        pattern = re.compile("|".join(sorted(set(var_names)))) if var_names else None
        self._exclude = (list(var_list or ()), pattern)

    def _decayed(self, variables, names) -> list:
        """Build indices of the variables not excluded from weight decay (all of them
        without exclusions, or without weight decay)."""
        if names is not None:
            names = list(names)
            if len(names) != len(variables) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"names must be {len(variables)} strings, one per variable, "
                                 f"got {names!r}")
        excluded_vars, pattern = self._exclude
        if not self._hp["weight_decay"] or (not excluded_vars and pattern is None):
            return list(range(len(variables)))
        if names is None:
            names = [getattr(w, "name", None) for w in variables]
            unnamed = [b for b, n in enumerate(names) if not isinstance(n, str)]
            if pattern is not None and unnamed:
                raise ValueError(
                    f"exclude_from_weight_decay(var_names=...) matches variables by name, but "
                    f"variables {unnamed} have none (NumPy arrays have no name): pass "
                    "build(variables, names=[...]) before the first apply")
        excluded_ids = {id(w) for w in excluded_vars}
        return [b for b, w in enumerate(variables)
                if id(w) not in excluded_ids and not (pattern is not None and pattern.search(names[b]))]

    @property
    def iterations(self) -> int:
        """Steps applied so far (Keras's ``optimizer.iterations``: with
        ``gradient_accumulation_steps``, calls // steps)."""
        steps = self._options["gradient_accumulation_steps"]
        return self._iterations // steps if steps else self._iterations

    @property
    def learning_rate(self) -> float:
        """This iteration's learning rate (a schedule evaluated at the call count)."""
        return self._current_lr()

    @learning_rate.setter
    def learning_rate(self, value):
        if isinstance(self._hp["learning_rate"], LearningRateSchedule):
            raise TypeError("this optimizer was created with a LearningRateSchedule as its "
                            "learning_rate, so its learning rate is not settable")
        hp = dict(self._hp, learning_rate=value)
        self._check(hp)
        self._hp = hp
        if self._engine is not None:
            for group in self._engine.param_groups:
                group["learning_rate"] = value

    @property
    def variables(self) -> list:
        """The optimizer's arrays (live), in Keras's order: the EMA averages, the gradient
        accumulators, then each variable's state created so far, variable by variable."""
        out = list(self._ema.shadow) if self._ema is not None else []
        if self._accumulators is not None:
            out += self._accumulators.arrays
        if self._engine is not None:
            st = self._engine.state
            for i in self._engine_positions():
                if i in st:
                    out += [st[i][n] for n in self._engine.slot_names if n in st[i]]
        return out

    def get_config(self) -> dict:
        return dict(self._hp, **self._options, name=self.name)

    @classmethod
    def from_config(cls, config):
        """The optimizer ``get_config()`` describes (without state)."""
        return cls(**config)

    def scale_loss(self, loss):
        """``loss * loss_scale_factor`` (the loss unchanged without one)."""
        factor = self._options["loss_scale_factor"]
        return loss if factor is None else loss * factor

    def finalize_variable_values(self, var_list=None) -> None:
        """With ``use_ema``: write the averages into the variables (``var_list``: other
        arrays aligned with the built variables). Without EMA, nothing to do."""
        if self._ema is not None:
            self._ema.copy_to(None if var_list is None else list(var_list))

    def apply_gradients(self, grads_and_vars) -> int:
        """Apply ``zip(grads, variables)``; returns the call count (as tf.keras)."""
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
            if not self._built:
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
            if not self._built:
                self.build(variables)
            aligned = self._align(grads, variables)
        if all(g is None for g in aligned):
            raise ValueError("No gradients provided for any variable.")
        self.step(aligned)

    def step(self, grads=None, *, grad_scale=None) -> bool:
        """One call: ``grads`` aligned with the built variables (None for a FlatParams: its
        ``grads`` are read). Returns True when applied (with gradient accumulation, also
        for the calls that only accumulate); False when ``grad_scale`` found a non-finite
        gradient and skipped the step."""
        if not self._built:
            raise ValueError(f"{type(self).__name__} is not built: call build(variables) or "
                             "apply(grads, variables) first")
        n = len(self._variables)
        sparse = []                           # build indices of the sparse gradients
        if grads is None:
            if self._flat is None:
                raise ValueError("step() without grads reads a FlatParams' grads, but this optimizer "
                                 "was built on a list of variables; pass grads=[...]")
        else:
            if v.is_array(grads):
                raise TypeError("grads must be a list aligned with the variables, got a single array")
            grads = list(grads)
            sparse = [b for b, g in enumerate(grads) if g is not None and _is_sparse(g)]
            for b in sparse:
                grads[b] = _as_sparse(grads[b])
            if len(grads) != n:
                raise ValueError(f"got {len(grads)} gradients for the {n} variables this optimizer "
                                 "was built with")
        if n == 0:
            return False
        lr = self._current_lr()
        unscale = 1.0 / self._options["loss_scale_factor"] if self._options["loss_scale_factor"] else 1.0
        if self._accumulators is None:
            applied = self._update(grads, lr, grad_scale, unscale, sparse)
        else:
            if grad_scale is not None:
                raise TypeError("grad_scale (unscale and skip non-finite steps) does not combine with "
                                "gradient_accumulation_steps; use loss_scale_factor")
            applied = self._accumulate(grads, lr, unscale)
        if applied:
            self._after_call()
        return applied

    def _accumulate(self, grads, lr, unscale) -> bool:
        """Keras's gradient accumulation: add; every n-th call, step on the mean and zero."""
        steps = self._options["gradient_accumulation_steps"]
        source = list(self._flat.grads) if grads is None else grads
        self._accumulators.add(source, unscale)
        if (self._iterations + 1) % steps == 0:
            accumulated = [a if g is not None else None for a, g in zip(self._accumulators.arrays, source)]
            self._update(accumulated, lr, None, 1.0 / steps)
            self._accumulators.zero()
        return True

    def _update(self, grads, lr, grad_scale, factor, sparse=()) -> bool:
        """The fused step on ``grads`` (build order; None: the FlatParams' grads; ``sparse``:
        the indices of the SparseGrad entries), each multiplied by ``factor`` as the kernel
        reads it."""
        eng = self._engine
        eng.iterations = self.iterations
        eng.grad_factor = factor
        host = self.spec.host
        eng.step_values = {"learning_rate": lr}
        if host is not None:
            eng.step_values[host.name] = host.advance(self._host_value, self.iterations + 1, self._hp)
        scattered = []
        if grads is not None:
            if sparse:
                grads = self._densified(grads, sparse, scattered)
            if self._order is not None:
                grads = [grads[b] for b in self._order]
        try:
            applied = eng.step(grads, grad_scale=grad_scale) if grad_scale is not None else eng.step(grads)
        finally:
            for dense, index in scattered:
                dense[index] = 0
        if applied and host is not None:
            self._host_value = eng.step_values[host.name]
        return applied

    def _densified(self, grads, sparse, scattered) -> list:
        """Sparse gradients that do not step as rows, scattered into zeros (kept per
        variable and zeroed again after the step: no allocation per step)."""
        out = list(grads)
        for b in sparse:
            if not self._row_sparse[b]:
                w = self._variables[b]
                sg = _check_sparse_grad(grads[b], w, b)
                dense = self._dense.get(b)
                if dense is None:
                    dense = self._dense[b] = np.zeros_like(w)
                dense[sg.indices] = sg.rows
                scattered.append((dense, sg.indices))
                out[b] = dense
        return out

    def _after_call(self) -> None:
        """Keras's end of apply(): the EMA update (and overwrite), then count the call."""
        ema = self._ema
        if ema is not None:
            it = self.iterations
            # Keras: momentum 0 at iteration 0, so the first average is the variables.
            ema.decay = 0.0 if it == 0 else float(self._options["ema_momentum"])
            ema.update()
            freq = self._options["ema_overwrite_frequency"]
            if freq and (it + 1) % freq == 0:
                ema.copy_to()
        self._iterations += 1

    def state_dict(self) -> dict:
        """The engine's state dict (torch layout, Keras's state names, ids = positions in
        the built variables) with ``iterations`` (the call count), host state (Nadam's
        ``u_product``),
        and with the options on, ``average`` (EMA) and ``gradient_accumulator`` (lists
        aligned with the variables)."""
        if not self._built:
            raise ValueError(f"{type(self).__name__} is not built: it has no state yet")
        if self._engine is None:
            sd = {"state": {}, "param_groups": []}
        else:
            sd = self._engine.state_dict()
            if self._order is not None:
                sd["state"] = {self._order[i]: st for i, st in sd["state"].items()}
                for g in sd["param_groups"]:
                    g["params"] = [self._order[i] for i in g["params"]]
        sd["iterations"] = self._iterations
        if self.spec.host is not None:
            sd[self.spec.host.name] = self._host_value
        for key, arrays in self._extra_state().items():
            sd[key] = [_host(a) for a in arrays]
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict from :meth:`state_dict` (same options and exclusions);
        everything is checked before anything changes."""
        if not self._built:
            raise ValueError(f"{type(self).__name__} is not built: call build(variables) first")
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        iterations = state_dict.get("iterations")
        if not _is_int(iterations) or iterations < 0:
            raise ValueError(f"state_dict['iterations'] must be a non-negative integer, got {iterations!r}")
        host = self.spec.host
        if host is not None:
            host_value = v.number(f"state_dict[{host.name!r}]", state_dict.get(host.name),
                                  low=host.low, high=host.high)
        extra = self._extra_state()
        for key in ("average", "gradient_accumulator"):
            if key in state_dict and key not in extra:
                raise ValueError(f"state_dict has {key!r}, which this optimizer's options do not use")
        for key, arrays in extra.items():
            saved = state_dict.get(key)
            if not isinstance(saved, (list, tuple)) or len(saved) != len(arrays):
                raise ValueError(f"state_dict[{key!r}] must be a list of {len(arrays)} arrays, "
                                 f"got {saved!r:.80}")
            for b, (src, dst) in enumerate(zip(saved, arrays)):
                v.state_array(src, dst, f"state_dict[{key!r}][{b}]", f"variables[{b}]")
        if self._engine is None:
            if state_dict.get("state"):
                raise ValueError("state_dict has state, but this optimizer was built with no variables")
        else:
            self._engine.load_state_dict(state_dict)
            group = self._engine.param_groups[0]
            self._hp = {k: (val if k == "weight_decay" else group[k]) for k, val in self._hp.items()}
        for key, arrays in extra.items():
            for src, dst in zip(state_dict[key], arrays):
                dst[...] = _to_like(dst, np.asarray(src) if isinstance(dst, np.ndarray) else src)
        self._iterations = int(iterations)
        if host is not None:
            self._host_value = host_value

    # -- helpers ----------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = {}
        if self._ema is not None:
            extra["average"] = self._ema.shadow
        if self._accumulators is not None:
            extra["gradient_accumulator"] = self._accumulators.arrays
        return extra

    def _engine_positions(self) -> list:
        """The engine's index of each built variable, in build order."""
        n = len(self._variables)
        if self._order is None:
            return list(range(n))
        position = [0] * n
        for i, b in enumerate(self._order):
            position[b] = i
        return position

    def _align(self, grads, variables):
        aligned = [None] * len(self._variables)
        for g, w in zip(grads, variables):
            b = self._position.get(id(w))
            if b is None:
                raise ValueError("unknown variable: this optimizer can only be called for the "
                                 "variables it was built with")
            aligned[b] = g
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


# -- the public classes ------------------------------------------------------------------------
_BASE_OPTIONS = dict(use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
                     loss_scale_factor=None, gradient_accumulation_steps=None)
_NAMES = {"SGD": "SGD"}       # Keras's default ``name``: the class name lower-cased but for these


def keras_signature(spec) -> inspect.Signature:
    """Keras's signature: the spec's hyperparameters in order, the base options, then
    keyword-only ``name`` and ``backend``."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default) for h in spec.settable]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=d) for k, d in _BASE_OPTIONS.items()]
    params += [P("name", P.KEYWORD_ONLY, default=_NAMES.get(spec.name, spec.name.lower())),
               P("backend", P.KEYWORD_ONLY, default=None),
               P("state_format", P.KEYWORD_ONLY, default="float32"),
               P("block_size", P.KEYWORD_ONLY, default=256),
               P("min_8bit_size", P.KEYWORD_ONLY, default=4096)]
    return inspect.Signature(params)


def keras_class(spec, base: type, module: str) -> type:
    """The fastopt.keras class of ``spec``: ``base`` with the spec attached and Keras's
    constructor signature; every argument goes on to :class:`_KerasOptimizer`."""
    sig = keras_signature(spec)

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        _KerasOptimizer.__init__(self, **arguments)

    __init__.__signature__ = sig
    __init__.__qualname__ = f"{spec.name}.__init__"
    return type(spec.name, (base,), {"spec": spec, "__init__": __init__, "__doc__": spec.doc,
                                     "__module__": module, "__qualname__": spec.name})
