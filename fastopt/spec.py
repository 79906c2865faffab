"""One declaration per optimizer, and everything made from it.

A :class:`Spec` sits beside its optimizer's element function (``kernels/<name>.py``) and
says everything else about the optimizer once: its hyperparameters (name, default,
check), its state columns (the name torch or optax gives them, when each one is active,
its initial value), its per-param host state (NAdam's ``mu_product``), its host-scalar
function (taking the param group), its passes (a per-tensor reduction and host
arithmetic before the step: LAMB's and LARS's trust ratios), its sparse-gradient rule,
its independent NumPy reference, its external oracle, and the rows it is tested and
benchmarked with. From it are generated:

- the optimizer class (:func:`optimizer_class`; ``fastopt.Adam``),
- the functional form (:func:`functional_form`; ``fastopt.functional.adam``),
- the ``fastopt.torch`` class (from the optimizer class's signature),
- the test database row (``tests/cases.py``) and the bench row
  (``fastopt/benchmark/cases.py``).

``kernels/registry.py`` lists the specs; adding an optimizer is its kernel file (element,
scalars, spec), its reference, and one line there.
"""
from __future__ import annotations

import dataclasses
import inspect
import keyword
from typing import Any, Callable

import numpy as np

from . import _validate as v

REQUIRED = inspect.Parameter.empty
_POSITIONS: dict = {}      # element -> its number of state arguments


# -- the parts of a spec --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hyper:
    """A hyperparameter: its name, default and check.

    check: ``check(value, where) -> value`` (normalised, e.g. betas to a tuple of floats);
      it raises naming the hyperparameter. See the helpers below (:func:`real`, ...).
    keyword: keyword-only in the constructor (torch's ``*, maximize=False``).
    functional: a keyword of the functional form (False for values the caller owns there,
      as Adagrad's ``initial_accumulator_value``: the caller initialises the state).
    fixed: its default is fixed by the optimizer (AdamW's ``decoupled_weight_decay``): in
      the groups and checked there, in no signature.
    bad: values its check must refuse, for a hyperparameter that is not a flag, a betas
      tuple or a real number (Rprop's ``etas`` pair, an integer count, an optional value):
      the tests' bad values for it. Empty for those three kinds, whose bad values the
      tests know.
    """

    name: str
    default: Any
    check: Callable = None
    keyword: bool = False
    functional: bool = True
    fixed: bool = False
    bad: tuple = ()


@dataclasses.dataclass(frozen=True)
class Column:
    """A state column: an array per param, aligned with it element for element.

    when: ``when(group) -> bool``, whether the column exists for these hyperparameters
      (``None``: always). An inactive column is neither allocated, read nor written.
    initial: its initial value: a number, or the name of the hyperparameter holding it.
    argument: its argument name in the functional form (default: the name plus "s").
    unsigned: never negative (a second moment, an accumulator of squares): stored in
      8 bits, it takes the unsigned dynamic map, twice as fine as the signed one.
    """

    name: str
    when: Callable = None
    initial: Any = 0.0
    argument: str = ""
    unsigned: bool = False

    def active(self, group) -> bool:
        return self.when is None or bool(self.when(group))

    def initial_value(self, group) -> float:
        return float(group[self.initial] if isinstance(self.initial, str) else self.initial)

    @property
    def functional_name(self) -> str:
        return self.argument or self.name + "s"


@dataclasses.dataclass(frozen=True)
class HostState:
    """A float32 scalar per param kept on the host and saved in the state dict.

    A spec's ``host`` is one HostState or a tuple of them (ASGD's ``eta`` and ``mu``);
    :attr:`Spec.hosts` is always the tuple.

    advance: ``advance(values, step, group) -> values``: the values after step ``step``
      (1-based) at ``group``'s hyperparameters, for a float32 array of several params'
      values (same shape out).
    initial: a fresh param's value: a number, or the name of the hyperparameter holding
      it, read at the param's first step (ASGD's ``eta`` starts at that step's lr).
    before: the element's scalars see, as ``group[name]``, the value the previous step left
      (ASGD's ``eta`` and ``mu``: torch uses them, then computes the next ones); False:
      this step's advanced value (NAdam's ``mu_product`` includes this step's ``mu_t``).
      Params whose values differ run as separate passes.
    low, high, low_open: the range a loaded value must lie in (``(low, high]`` when
      ``low_open``).
    required: a loaded param state must carry the value (ASGD's ``eta`` depends on the lr
      of every past step and cannot be recomputed); False: a state without it gets the
      value after its steps at the loaded hyperparameters (NAdam's ``mu_product``).
    """

    name: str
    advance: Callable
    initial: Any = 1.0
    low: float = 0.0
    high: float = 1.0
    before: bool = False
    low_open: bool = False
    required: bool = False

    def initial_value(self, group) -> np.float32:
        return np.float32(group[self.initial] if isinstance(self.initial, str) else self.initial)

    def after(self, steps: int, group) -> np.float32:
        """The value of a fresh param after ``steps`` steps at ``group``'s hyperparameters."""
        value = np.float32(self.initial_value(group))
        for s in range(1, steps + 1):
            value = self.advance(value, s, group)
        return np.float32(value)

    def seen_at(self, step: int, group) -> np.float32:
        """The value the element's scalars see at step ``step`` of a fresh param."""
        return self.after(step - 1 if self.before else step, group)

    def accepts(self, value: float) -> bool:
        """Whether a loaded value lies in the declared range."""
        low_ok = value > self.low if self.low_open else value >= self.low
        return low_ok and value <= self.high

    @property
    def range_text(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """A pass before the step: one reduction per tensor, host arithmetic, then the step
    with one value per tensor (kernels/per_tensor.py).

    reducer: ``(p, g, s..., h) -> (a, b)``, or ``(a, b, p, s...)`` with ``writes``.
    writes: what the reducer also stores, ``(p, s0, s1, ...)``; None for nothing.
    values: ``values(group, sums) -> array``, one per tensor from the ``(n, 2)`` sums.
    mode: "slot" (the value is the element's state argument ``row_slot``, read-only) or
      "grad" (it multiplies the tensor's gradients).
    step_writes: the state columns the step stores (None: every active one).
    The element's scalars must have a ``grad_scale`` field: the reducer reads raw
    gradients and applies the step's gradient scale itself. With int8 state a reducer
    with ``writes`` stores nothing: the step recomputes and stores those columns, told
    by its scalars' ``recompute`` flag (fastopt/_passes.py).
    """

    reducer: Callable
    values: Callable
    writes: tuple = None
    step_writes: tuple = None
    mode: str = "slot"
    row_slot: int = 2


@dataclasses.dataclass(frozen=True)
class Sparse:
    """Sparse-gradient rows (:class:`fastopt.SparseGrad`) for this optimizer.

    check: ``check(group, where)`` refuses hyperparameters sparse steps lack.
    scalars: the scalars of a sparse step (None: the dense ones).
    all_seen: update every row seen so far, not only this step's (SGD's momentum).
    reference: ``(group, step, param, index, rows, slots)``; None runs the dense reference
      with a gradient that is zero outside the rows.
    dense: dense gradients are taken too; False for a sparse-only optimizer (SparseAdam),
      whose step refuses them before anything changes.
    """

    check: Callable = None
    scalars: Callable = None
    all_seen: Callable = None
    reference: Callable = None
    dense: bool = True


@dataclasses.dataclass(frozen=True)
class Examples:
    """The hyperparameter rows the tests run (every flag on in some row, off in another)
    and the row with the most terms active."""

    base: dict
    grid: tuple
    full: dict


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """A row of ``fastopt bench`` (fastopt/benchmark/cases.py).

    passes: a multi-pass step's passes over memory, in order, as ``"reads -> writes"``
      over "p", "g", "s0", "s1", ... with a leading "reduce: " for a reduction (their
      bytes and roof); empty for a one-pass step.
    variants: other hyperparameter sets whose drivers ``fastopt warmup`` compiles too.
    """

    name: str
    hyper: dict
    default: bool = False
    passes: tuple = ()
    variants: tuple = ()


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimizer (see the module doc).

    name: the class name (``"Adam"``); functional: the functional form's name, or "".
    element: ``(p, g, s0, ..., h) -> (p, s0, ...)``; its state positions follow the
      columns, and positions past them are unused (or a per-tensor value's slot).
    scalars: ``scalars(group, step, cast)``: the element's host scalars, float64 math then
      ``cast``; ``step`` counts this step.
    reference: the NumPy reference, called as ``reference(params, grads, *columns,
      step=..., <hyperparameters>)`` with ``betas`` split into ``beta1, beta2, ...`` and
      only the keywords its signature names (or ``reference_call`` to call it otherwise).
    check: cross-hyperparameter checks ``check(group, where)``, after each one's own.
    oracle: the external implementation tests compare with ("torch.optim.Adam", ...).
    parent: the name of the spec whose class this one's subclasses (AdamW: Adam).
    host: its per-param host state: a :class:`HostState`, or a tuple of them (ASGD's
      ``eta`` and ``mu``); :attr:`hosts` is always the tuple.
    engine: the class the optimizer class subclasses, as ``"module.Class"`` (a subclass
      of fastopt.optimizer.Optimizer with methods beyond the step: schedule-free's
      ``train()``/``eval()`` and group host state); "" for Optimizer itself.
    """

    name: str
    element: Callable
    scalars: Callable
    hypers: tuple
    columns: tuple
    reference: Callable
    functional: str = ""
    doc: str = ""
    step_state: bool = True
    host: Any = None               # a HostState, or a tuple of them
    per_tensor: PerTensor = None
    sparse: Sparse = None
    check: Callable = None
    reference_call: Callable = None
    oracle: str = ""
    parent: str = ""
    engine: str = ""
    examples: Examples = None
    bench: tuple = ()

    @property
    def positions(self) -> int:
        """The element's number of state arguments (asked at every step: cached)."""
        n = _POSITIONS.get(self.element)
        if n is None:
            n = _POSITIONS[self.element] = len(inspect.signature(self.element).parameters) - 3
        return n

    @property
    def hosts(self) -> tuple:
        """The host states (:class:`HostState`), in order; empty without any."""
        host = self.host
        return () if host is None else (host,) if isinstance(host, HostState) else tuple(host)

    def fill_host_values(self, group: dict, step: int) -> dict:
        """Put into ``group`` each host state it lacks, at the value a fresh param's
        element sees at step ``step`` (the functional form's default); returns it."""
        for h in self.hosts:
            if h.name not in group:
                group[h.name] = float(h.seen_at(step, group))
        return group

    @property
    def column_names(self) -> tuple:
        return tuple(c.name for c in self.columns)

    @property
    def settable(self) -> tuple:
        """The hyperparameters a caller sets (the signatures'): all but the fixed ones."""
        return tuple(h for h in self.hypers if not h.fixed)

    def derive(self, name, *, defaults=None, fixed=None, **changes) -> "Spec":
        """A variant (AdamW from Adam): other defaults, some hyperparameters fixed."""
        defaults, fixed = defaults or {}, fixed or {}
        hypers = tuple(dataclasses.replace(h, default=fixed[h.name], fixed=True) if h.name in fixed
                       else dataclasses.replace(h, default=defaults.get(h.name, h.default))
                       for h in self.hypers)
        return dataclasses.replace(self, name=name, hypers=hypers, parent=self.name, **changes)

    # -- what the engine asks of it ---------------------------------------------------------
    def check_group(self, group, where) -> None:
        for h in self.hypers:
            if h.check is not None:
                group[h.name] = h.check(group[h.name], where)
        if self.check is not None:
            self.check(group, where)

    def active_slots(self, group) -> tuple:
        names = tuple(c.name if c.active(group) else None for c in self.columns)
        return names + (None,) * (self.positions - len(names))

    def column(self, name) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no state column {name!r}")

    def initial_value(self, group, name) -> float:
        for c in self.columns:
            if c.name == name:
                return c.initial_value(group)
        return 0.0

    def run_reference(self, group, step, params, grads, slots) -> None:
        if self.reference_call is not None:
            self.reference_call(group, step, params, grads, slots)
            return
        accepted = _keywords_of(self.reference)
        given = {"step": step, **flat_hypers(group)}
        self.reference(params, grads, *slots[:len(self.columns)],
                       **{k: val for k, val in given.items() if k in accepted})


_KEYWORDS: dict = {}


def _keywords_of(fn) -> frozenset:
    names = _KEYWORDS.get(fn)
    if names is None:
        names = _KEYWORDS[fn] = frozenset(inspect.signature(fn).parameters)
    return names


def flat_hypers(group) -> dict:
    """The group's hyperparameters with ``betas`` split into ``beta1, beta2, ...`` (the
    references' and functional forms' names)."""
    out = {k: val for k, val in group.items() if k != "params"}
    betas = out.pop("betas", None)
    if betas is not None:
        for k, b in enumerate(betas, 1):
            out[f"beta{k}"] = b
    return out


# -- checks a Hyper can name --------------------------------------------------------------------
def real(low=None, high=None, low_open=False, high_open=False):
    """A finite real number in the given range."""
    def make(name):
        return lambda value, where: v.number(name, value, low=low, high=high, low_open=low_open,
                                            high_open=high_open, where=where)
    return make


def hyper(name, default, check=None, **options) -> Hyper:
    """A Hyper whose check is a factory of the name (:func:`real`, :func:`flag`, ...)."""
    return Hyper(name, default, None if check is None else check(name), **options)


def flag():
    return lambda name: (lambda value, where: v.flag(name, value, where=where))


def learning_rate():
    return lambda name: (lambda value, where: v.learning_rate(value, where=where))


def betas(n=2):
    """A tuple of ``n`` coefficients in [0, 1)."""
    def make(name):
        def check(value, where):
            if n == 2:
                return v.betas(value, where)
            prefix = f"{where}: " if where else ""
            try:
                values = tuple(value)
            except TypeError:
                values = ()
            if len(values) != n:
                names = ", ".join(f"beta{k}" for k in range(1, n + 1))
                raise TypeError(f"{prefix}{name} must be a tuple ({names}), got {value!r}")
            for k, b in enumerate(values):
                v.number(f"{name}[{k}]", b, low=0.0, high=1.0, high_open=True, where=where)
            return tuple(float(b) for b in values)
        return check
    return make


# The hyperparameters most optimizers share, spelled once.
def lr(default):
    return hyper("lr", default, learning_rate())


def weight_decay(default=0.0, **options):
    return hyper("weight_decay", default, real(low=0.0), **options)


def eps(default):
    return hyper("eps", default, real(low=0.0))


def maximize():
    return hyper("maximize", False, flag(), keyword=True)


def no_weight_decay(group, where):
    """Sparse steps take no weight decay (as torch)."""
    if group["weight_decay"] != 0:
        raise ValueError(f"{where}: weight_decay must be 0 with sparse gradients (as in torch), "
                         f"got {group['weight_decay']}")


# -- the classes ---------------------------------------------------------------------------------
def constructor_signature(spec: Spec) -> inspect.Signature:
    """``(params, <hyperparameters in order>, *, <keyword ones>, backend=None, **options)``."""
    P = inspect.Parameter
    params = [P("params", P.POSITIONAL_OR_KEYWORD)]
    params += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default) for h in spec.settable
               if not h.keyword]
    params += [P(h.name, P.KEYWORD_ONLY, default=h.default) for h in spec.settable if h.keyword]
    params += [P("backend", P.KEYWORD_ONLY, default=None), P("options", P.VAR_KEYWORD)]
    return inspect.Signature(params)


def optimizer_class(spec: Spec, base: type, module: str) -> type:
    """The optimizer class of ``spec``: ``base`` (a spec-driven Optimizer class) with the
    spec attached and a constructor with the spec's signature."""
    sig = constructor_signature(spec)
    # The engine's constructor: the first class above that is not made from a spec.
    engine_init = next(c.__init__ for c in base.__mro__
                       if "__init__" in c.__dict__ and c.__dict__.get("spec") is None)
    positional = [h.name for h in spec.settable if not h.keyword]
    hyper_names = {h.name for h in spec.settable}
    fixed = {h.name: h.default for h in spec.hypers if h.fixed}

    def __init__(self, params, *args, backend=None, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{spec.name}() takes at most {len(positional)} positional "
                            f"hyperparameters ({', '.join(positional)}), got {len(args)}")
        values = {h.name: h.default for h in spec.hypers}
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{spec.name}() got multiple values for argument {name!r}")
            values[name] = value
        options = {}
        for k, value in kwargs.items():
            if k in hyper_names:
                values[k] = value
            elif k in fixed:
                raise TypeError(f"{spec.name}() got an unexpected keyword argument {k!r}: "
                                f"{spec.name} fixes {k}={fixed[k]!r} ({spec.parent} takes it)")
            else:
                options[k] = value
        engine_init(self, params, values, backend, **options)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    __init__.__qualname__ = f"{spec.name}.__init__"
    return type(spec.name, (base,), {
        "spec": spec, "element": staticmethod(spec.element), "slot_names": spec.column_names,
        "has_step_state": spec.step_state, "supports_sparse": spec.sparse is not None,
        "__init__": __init__, "__doc__": spec.doc, "__module__": module, "__qualname__": spec.name})


# -- the functional form -----------------------------------------------------------------------
def functional_signature(spec: Spec) -> inspect.Signature:
    """``(params, grads, <columns>, *, step=1, <hyperparameters>, [host state], [absmax=None,
    block_size=256], backend=None)``: columns always active are required, the others
    default to None; ``betas`` are split; ``absmax`` and ``block_size`` (int8 state) where
    the spec has columns."""
    P = inspect.Parameter
    params = [P("params", P.POSITIONAL_OR_KEYWORD), P("grads", P.POSITIONAL_OR_KEYWORD)]
    for c in spec.columns:
        params.append(P(c.functional_name, P.POSITIONAL_OR_KEYWORD,
                        default=REQUIRED if c.when is None else None))
    params.append(P("step", P.KEYWORD_ONLY, default=1))
    for h in spec.settable:
        if not h.functional:
            continue
        if h.name == "betas":
            params += [P(f"beta{k}", P.KEYWORD_ONLY, default=b) for k, b in enumerate(h.default, 1)]
        else:
            params.append(P(h.name, P.KEYWORD_ONLY, default=h.default))
    for h in spec.hosts:
        params.append(P(h.name, P.KEYWORD_ONLY, default=None))
    if spec.columns:            # int8 state's absmax arrays and their block (fastopt.functional)
        params += [P("absmax", P.KEYWORD_ONLY, default=None),
                   P("block_size", P.KEYWORD_ONLY, default=256)]
    params.append(P("backend", P.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


def function_of(sig: inspect.Signature, name: str, body: Callable, module: str) -> Callable:
    """A Python function ``name`` with signature ``sig`` that calls ``body`` with the dict
    of its arguments (defaults applied). Written as source and compiled, as dataclasses
    writes ``__init__``: the interpreter binds the arguments and raises its own
    TypeErrors, in about a microsecond (``inspect.Signature.bind`` took some 50 us)."""
    P = inspect.Parameter
    parts, namespace, star = [], {"_body": body}, False
    for i, (arg, p) in enumerate(sig.parameters.items()):
        if not arg.isidentifier() or keyword.iskeyword(arg) or p.kind not in (
                P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY):  # pragma: no cover - specs' names
            raise ValueError(f"cannot write a function with parameter {arg!r} ({p.kind})")
        if p.kind is P.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.default is P.empty:
            parts.append(arg)
        else:
            namespace[f"_default{i}"] = p.default
            parts.append(f"{arg}=_default{i}")
    names = ", ".join(f"{arg!r}: {arg}" for arg in sig.parameters)
    exec(f"def {name}({', '.join(parts)}):\n    return _body({{{names}}})\n", namespace)
    fn = namespace[name]
    fn.__signature__, fn.__module__ = sig, module
    return fn


def functional_form(spec: Spec, cls: type, run: Callable) -> Callable:
    """``fastopt.functional.<name>``: binds its arguments, rebuilds the param group, then
    ``run(cls, name, group, step, params, grads, column arrays, backend)``.

    The arguments are the spec's columns only. A per-tensor pass's value (LAMB's and
    LARS's trust ratio, :class:`PerTensor`) is no column: the element reads it in a state
    position past the columns, which the driver fills with the tensor's value computed in
    this call (``fastopt/_passes.py``), so the functional form allocates nothing for it
    and the caller never passes or keeps it."""
    sig = functional_signature(spec)
    n_betas = next((len(h.default) for h in spec.hypers if h.name == "betas"), 0)

    def bound(a):
        group = {h.name: h.default for h in spec.hypers}
        for k in list(group):
            if k == "betas":
                group[k] = tuple(a.pop(f"beta{i}") for i in range(1, n_betas + 1))
            elif k in a:
                group[k] = a.pop(k)
        for h in spec.hosts:
            value = a.pop(h.name)
            if value is not None:
                group[h.name] = v.number(h.name, value, where=spec.functional)
        columns = tuple(a[c.functional_name] for c in spec.columns)
        low_bit = {"absmax": a["absmax"], "block_size": a["block_size"]} if spec.columns else {}
        run(cls, spec.functional, group, a["step"], a["params"], a["grads"], columns, a["backend"],
            **low_bit)

    step_fn = function_of(sig, spec.functional, bound, "fastopt.functional")
    step_fn.__doc__ = (f"{spec.name} step in place over caller-owned state (see fastopt.{spec.name}). "
                       "``step`` counts this step (1 on the first).")
    if spec.columns:
        step_fn.__doc__ += (" Low-bit state: bfloat16 state arrays beside float32 params, or "
                            "uint8 int8 codes with their float32 absmax arrays in absmax={<argument>: "
                            "[array or None per param]} (blocks of block_size elements); see "
                            "fastopt.functional.")
    if spec.per_tensor is not None:
        step_fn.__doc__ += (" Each call runs the per-tensor pass first (a reduction per tensor, "
                            "then one value per tensor, e.g. its trust ratio): that value is "
                            "computed afresh in every call, as the class does each step, and is "
                            "neither state nor an argument.")
    return step_fn
