"""What the benchmark runs: the optimizer table, the parameter layouts and the sizes.

Adding an optimizer to every benchmark (``fastopt bench``, ``bench/``, ``fastopt warmup``)
is one row in :data:`OPTIMIZERS`; a row whose fastopt class does not exist (yet) is
skipped, so the table may name optimizers that are still being written.

Bytes per parameter
-------------------
The effective bandwidth of a step counts the bytes a fused step must move per parameter:
read the param, the grad and each active state slot, write the param and each slot::

    bytes_per_param = itemsize * (2 + n_slots      # reads: p, g, slots
                                  + 1 + n_slots)   # writes: p, slots

so, in float32 (float64 doubles it):

================================  =======  ============
optimizer                         slots    B/param fp32
================================  =======  ============
SGD, no momentum                  0        12
SGD momentum / Nesterov           1        20
Adagrad                           1        20
RMSprop                           1        20
RMSprop + momentum or centered    2 / 3    28 / 36
Adam, AdamW                       2        28
Adam / AdamW amsgrad              3        36
================================  =======  ============

The slot count comes from the optimizer itself (``_active_slots`` of its param group), so
it is right for any row. Optimizers whose step is more than one pass (a per-tensor norm,
then the update: LAMB, LARS) list their passes in ``passes``, each with the arrays it
reads and writes, and move the sum: LAMB 16 + 8 (read p, g, m, v; write m, v) then
12 + 4 (read p, m, v; write p) = 40 B; LARS 8 (read p, g) then 12 + 8 = 28 B. Their
roof is as many passes with the same reads and writes (:mod:`fastopt.benchmark.roof`).

Low-bit state (``state_format``, :data:`STATE_FORMATS`)
-------------------------------------------------------
A state column in ``"bfloat16"`` moves 2 B per element each way; in ``"int8"`` 1 B of
code plus, per block of 256 elements, one float32 absmax (4/256 B per element), except in
tensors under 4096 elements, which keep float32 state (fastopt/lowbit.py, as
bitsandbytes). So the bytes depend on the layout's tensor sizes
(:meth:`OptimizerCase.bytes_per_param` with ``shapes``); for Adam on one large tensor:
float32 28, bfloat16 20, int8 12 + 2 x 2 x (1 + 4/256) = 16.06 B/param. The default run
adds bfloat16 and int8 rows for :data:`LOWBIT_DEFAULT` (``fastopt bench
--state-formats`` picks others).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

FLOAT32, BF16, INT8 = "float32", "bfloat16", "int8"
STATE_FORMATS = (FLOAT32, BF16, INT8)
LOWBIT_DEFAULT = ("adam",)
"""The optimizers the default run benchmarks with bfloat16 and int8 state too. Adam only:
its two low-bit groups and bitsandbytes' row add about a sixth to the default run (AdamW's
would add as much again, for the same access pattern)."""


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of a multi-pass step over memory: the arrays it reads and writes, among
    "p", "g", "s0", "s1" (the element's state positions), and whether it is a reduction."""

    reads: str
    writes: str = ""
    reduce: bool = False

    def words(self) -> int:
        return len(self.reads.split()) + len(self.writes.split())

    def write_mask(self) -> tuple:
        """(p, s0, s1, s2) written."""
        names = self.writes.split()
        return ("p" in names, "s0" in names, "s1" in names, False)


@dataclasses.dataclass(frozen=True)
class OptimizerCase:
    """One benchmarked optimizer configuration.

    Attributes:
      name: the CLI name (``--optimizers adam,sgd-momentum``).
      fastopt: the class name in ``fastopt`` (``"Adam"``).
      kwargs: hyperparameters, for fastopt and torch alike (both use torch's names).
      torch: the class name in ``torch.optim``, or ``"package:Class"`` for a torch-based
        implementation elsewhere (``"pytorch_optimizer:Adan"``, ``"schedulefree:
        AdamWScheduleFree"``: the oracle), or None when there is none.
      torch_kwargs: torch's hyperparameters when they differ from ``kwargs``.
      default: part of the default ``fastopt bench`` run.
      passes: a multi-pass step's passes (:class:`Pass`), in order; empty for one pass.
      variants: other hyperparameter sets whose kernels ``fastopt warmup`` compiles too
        (each distinct set of active state slots is one more compiled driver).
    """

    name: str
    fastopt: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    torch: str | None = None
    torch_kwargs: dict | None = None
    default: bool = True
    passes: tuple = ()
    variants: tuple = ()

    def fastopt_class(self):
        """The fastopt class (``"Adam"``, or ``"keras.Adam"`` for fastopt.keras), or None
        when this fastopt does not have it."""
        import importlib
        module, _, name = self.fastopt.rpartition(".")
        try:
            where = importlib.import_module("fastopt" + ("." + module if module else ""))
        except ImportError:
            return None
        return getattr(where, name, None)

    @property
    def keras(self) -> bool:
        """A fastopt.keras optimizer: built on its variables after construction."""
        return self.fastopt.startswith("keras.")

    def torch_class(self):
        """The torch.optim class (or the torch-based oracle's), or None (no counterpart, or
        torch or the oracle's package not importable)."""
        if self.torch is None:
            return None
        import importlib
        module, _, name = self.torch.rpartition(":")
        try:
            where = importlib.import_module(module or "torch.optim")
        except Exception:
            return None
        return getattr(where, name, None)

    @property
    def torch_label(self) -> str:
        """What the torch row runs: "torch" (torch.optim) or the oracle's package."""
        return self.torch.rpartition(":")[0] or "torch" if self.torch else "torch"

    @property
    def torch_hyperparameters(self) -> dict:
        return dict(self.kwargs if self.torch_kwargs is None else self.torch_kwargs)

    def make(self, params, backend=None, **overrides):
        """A fastopt optimizer of this case over ``params`` (list or FlatParams)."""
        cls = self.fastopt_class()
        if cls is None:
            raise LookupError(f"fastopt has no optimizer {self.fastopt!r} (case {self.name!r})")
        if self.keras:
            opt = cls(backend=backend, **{**self.kwargs, **overrides})
            opt.build(params)
            return opt
        return cls(params, backend=backend, **{**self.kwargs, **overrides})

    def _engine(self, opt):
        """The object holding the param groups (a Keras optimizer's engine)."""
        return opt._engine if self.keras else opt

    def active_slots(self, **overrides) -> tuple:
        """The state keys the step reads and writes (three positions, None = absent)."""
        engine = self._engine(self.make([np.zeros(1, np.float32)], **overrides))
        return tuple(engine._active_slots(engine.param_groups[0]))

    def slot_mask(self) -> tuple:
        """Which of the element's three state positions are live (the driver's mask)."""
        return tuple(s is not None for s in self.active_slots())

    def passes_for(self, state_format=FLOAT32) -> tuple:
        """The passes of a multi-pass step with its state stored as ``state_format``. With
        int8 state a reduction that stores state columns (LAMB's moments) stores none,
        and the step recomputes and stores them (fastopt/_passes.py): it reads ``g`` and
        those columns too and writes them."""
        if state_format != INT8 or not self.passes:
            return self.passes
        out, moved = [], []
        for one in self.passes:
            writes = one.writes.split()
            if one.reduce:
                moved += [w for w in writes if w != "p"]
                out.append(Pass(one.reads, " ".join(w for w in writes if w == "p"), True))
                continue
            reads = one.reads.split()
            reads += [x for x in ["g", *moved] if x not in reads]
            writes += [x for x in moved if x not in writes]
            out.append(Pass(" ".join(reads), " ".join(writes)))
        return tuple(out)

    def bytes_per_param(self, dtype=np.float32, state_format=FLOAT32, shapes=None) -> float:
        """Bytes a step moves per parameter (see the module docstring): an int for
        ``state_format="float32"`` (the params' own dtype); for a low-bit format, over
        tensors of ``shapes`` (default: one tensor of a million elements)."""
        itemsize = np.dtype(dtype).itemsize
        if state_format == FLOAT32:
            if self.passes:
                return itemsize * sum(p.words() for p in self.passes)
            return itemsize * (3 + 2 * sum(self.slot_mask()))
        per_slot = state_bytes_per_element(state_format, shapes, itemsize)
        weight = {"p": itemsize, "g": itemsize}
        weight.update({f"s{k}": per_slot for k in range(len(self.slot_mask()))})
        if self.passes and state_format == INT8:
            # the int8 tensors run the int8 passes, the small ones (float32 state) the others
            sizes, block = _storages(INT8, [(1 << 20,)] if shapes is None else shapes)
            n_low = sum(n for n, storage in sizes if storage != "native")
            n_all = sum(n for n, _ in sizes)
            if not n_all:
                return 0.0
            codes = sum(n + 4 * -(-n // block) for n, storage in sizes if storage != "native")
            weight.update({f"s{k}": codes / n_low if n_low else 0.0
                           for k in range(len(self.slot_mask()))})
            low = sum(weight[a] for one in self.passes_for(INT8)
                      for a in one.reads.split() + one.writes.split())
            native = itemsize * sum(p.words() for p in self.passes)
            return float((low * n_low + native * (n_all - n_low)) / n_all)
        if self.passes:
            return float(sum(weight[a] for one in self.passes
                             for a in one.reads.split() + one.writes.split()))
        return float(3 * itemsize + 2 * per_slot * sum(self.slot_mask()))

    def state_support(self, state_format, dtype=np.float32) -> str | None:
        """None when this optimizer runs with ``state_format`` on ``dtype`` params, else
        the reason it does not (the optimizer's own message; "no state" for a stateless
        one, whose low-bit rows would repeat its float32 ones)."""
        if state_format == FLOAT32:
            return None
        if not any(self.slot_mask()):
            return "it has no state"
        try:
            self.make([np.zeros(1, dtype)], state_format=state_format)
        except (ValueError, TypeError, NotImplementedError) as exc:
            return str(exc)
        return None


def _storages(state_format: str, shapes):
    """``(elements, storage)`` of each tensor of ``shapes`` under ``state_format``
    (fastopt/lowbit.py's rule: int8 keeps tensors under 4096 elements "native"), and
    the format's block size."""
    import types

    from .. import lowbit
    fmt = lowbit.StateFormat.checked(state_format, lowbit.blockwise.BLOCK,
                                     lowbit.blockwise.MIN_SIZE)
    column = types.SimpleNamespace(unsigned=False)       # signed or not: the same bytes
    return [(math.prod(s), fmt.storage(column, math.prod(s))) for s in shapes], fmt.block_size


def lowbit_sizes(state_format: str, shapes) -> tuple[int, int]:
    """(elements whose state is stored in ``state_format``, elements that keep the params'
    dtype) of tensors of ``shapes``: int8 leaves tensors under 4096 elements in float32."""
    sizes, _ = _storages(state_format, shapes)
    native = sum(n for n, storage in sizes if storage == "native")
    return sum(n for n, _ in sizes) - native, native


def state_bytes_per_element(state_format: str, shapes=None, itemsize: int = 4) -> float:
    """Bytes of one state column per parameter over tensors of ``shapes`` (default: one
    tensor of 2^20 elements): codes and absmax, 16-bit values, or ``itemsize`` for the
    tensors that keep the params' dtype."""
    if state_format == FLOAT32:
        return float(itemsize)
    sizes, block = _storages(state_format, [(1 << 20,)] if shapes is None else shapes)
    total = 0
    for n, storage in sizes:
        if storage == "native":
            total += itemsize * n
        elif state_format == BF16:
            total += 2 * n
        else:
            total += n + 4 * (-(-n // block))
    n_all = sum(n for n, _ in sizes)
    return total / n_all if n_all else 0.0


def parse_state_formats(text) -> list[str]:
    """``"float32,int8"`` (or a list) as a checked list of :data:`STATE_FORMATS`, in the
    order given, each once."""
    names = [n.strip().lower() for n in text.split(",")] if isinstance(text, str) else list(text)
    aliases = {"fp32": FLOAT32, "bf16": BF16, "8bit": INT8, "8-bit": INT8}
    out = []
    for n in names:
        if not n:
            continue
        n = aliases.get(n, n)
        if n not in STATE_FORMATS:
            raise ValueError(f"unknown state format {n!r}; choose from {', '.join(STATE_FORMATS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"state formats must name at least one of {', '.join(STATE_FORMATS)}")
    return out


def _case(name, fastopt, kwargs=None, torch=None, **extra) -> OptimizerCase:
    return OptimizerCase(name, fastopt, dict(kwargs or {}), torch, **extra)


def _pass(text: str) -> Pass:
    """A spec's ``"reduce: p g s0 -> s0"`` as a :class:`Pass`."""
    reduce = text.startswith("reduce:")
    reads, _, writes = text.removeprefix("reduce:").partition("->")
    return Pass(reads.strip(), writes.strip(), reduce=reduce)


# Torch-based oracles timed in the torch column for optimizers torch.optim lacks.
TORCH_BASED = ("pytorch_optimizer.", "schedulefree.")


def _spec_rows(specs=None, module=""):
    """The bench rows the specs declare, in order: kernels/registry.py's by default, or
    ``specs`` whose classes live in ``fastopt.<module>`` (kernels/keras.py's: "keras.")."""
    if specs is None:
        from ..kernels.registry import SPECS as specs
    for spec in specs:
        torch = spec.oracle.removeprefix("torch.optim.") if spec.oracle.startswith("torch.optim.") else \
            ":".join(spec.oracle.rsplit(".", 1)) if spec.oracle.startswith(TORCH_BASED) else None
        for row in spec.bench:
            yield _case(row.name, module + spec.name, row.hyper, torch, default=row.default,
                        passes=tuple(map(_pass, row.passes)), variants=tuple(row.variants))


def _keras_rows():
    from ..kernels.keras import SPECS
    return _spec_rows(SPECS, "keras.")


# The table: the specs' rows, then fastopt.keras's. Hyperparameters are ordinary training
# values; flags that change which state slots exist (momentum, centered, amsgrad) get
# rows of their own because they change the bytes moved.
# The default run (``default=True``) is one row per access pattern that torch also has
# fused (12, 20 and 28 B/param) plus AdamW, the usual transformer optimizer. Measured on
# the idle 2-core machine with a cold Numba cache: 41 s for these 4, 87 s for the 13
# non-Keras rows (each optimizer adds about 6 s: compiling, torch's first step, timing);
# two to three times that while other jobs load the machine.
OPTIMIZERS: tuple[OptimizerCase, ...] = (
    *_spec_rows(),
    # fastopt.keras: Keras 3's equations and names (not in the default run).
    *_keras_rows(),
)


def available_optimizers(names=None, include_all=False) -> list[OptimizerCase]:
    """The table's rows this fastopt can run, by CLI name.

    Args:
      names: CLI names (a comma-separated string or a list); ``"all"`` means every row;
        None means the default rows.
      include_all: with ``names=None``, every available row instead of the default ones.
    Raises:
      ValueError: an unknown name, or a known one whose fastopt class does not exist.
    """
    by_name = {c.name: c for c in OPTIMIZERS}
    if isinstance(names, str):
        names = [n.strip().lower() for n in names.split(",") if n.strip()]
    if names is None or names == ["all"]:
        every = names == ["all"] or include_all
        return [c for c in OPTIMIZERS if (every or c.default) and c.fastopt_class() is not None]
    out = []
    for n in names:
        case = by_name.get(n)
        if case is None:
            raise ValueError(f"unknown optimizer {n!r}; choose from {', '.join(by_name)} or 'all'")
        if case.fastopt_class() is None:
            raise ValueError(f"optimizer {n!r} needs fastopt.{case.fastopt}, which this fastopt "
                             "does not have")
        out.append(case)
    return out


# ---------------------------------------------------------------------------- layouts
LAYOUTS = ("large", "transformer", "small")
LAYOUT_TITLES = {
    "large": "one large tensor",
    "transformer": "transformer-like",
    "small": "many small (2000 x 512)",
}
SMALL_COUNT, SMALL_SIZE = 2000, 512


def _gpt_shapes(d: int, n_layers: int, vocab: int, context: int) -> list[tuple]:
    """The parameter shapes of a GPT-2-style decoder (tied output embedding)."""
    shapes: list[tuple] = [(vocab, d), (context, d)]
    for _ in range(n_layers):
        shapes += [(d,), (d,),                  # ln_1 weight, bias
                   (d, 3 * d), (3 * d,),        # attention qkv
                   (d, d), (d,),                # attention output projection
                   (d,), (d,),                  # ln_2
                   (d, 4 * d), (4 * d,),        # mlp up
                   (4 * d, d), (d,)]            # mlp down
    shapes += [(d,), (d,)]                      # final layer norm
    return shapes


def transformer_shapes(size: int) -> list[tuple]:
    """A GPT-like mix of matrices, biases and norm weights totalling about ``size``.

    The width grows with the size (layers = width / 64, as GPT-2), blocks take at most
    60 % of the total and the token embedding fills the rest: 8M gives d=256, 4 blocks and
    an 18k vocabulary (52 tensors); 64M gives d=576, 9 blocks and a 48k vocabulary.
    """
    size = int(size)
    best = None
    for d in [*range(16, 64, 16), *range(64, 8193, 64)]:
        n_layers = max(1, d // 64)
        context = min(1024, 4 * d)
        blocks = n_layers * (12 * d * d + 13 * d) + context * d + 2 * d
        if blocks > 0.6 * size and best is not None:
            break
        best = (d, n_layers, context, blocks)
    d, n_layers, context, blocks = best
    vocab = max(1, round((size - blocks) / d))
    return _gpt_shapes(d, n_layers, vocab, context)


def layout_shapes(layout: str, size: int) -> list[tuple]:
    """Tensor shapes of ``layout``; "large" and "transformer" total about ``size``."""
    if layout == "large":
        return [(int(size),)]
    if layout == "transformer":
        return transformer_shapes(size)
    if layout == "small":
        return [(SMALL_SIZE,)] * SMALL_COUNT
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def parse_layouts(text) -> list[str]:
    names = [n.strip().lower() for n in text.split(",")] if isinstance(text, str) else list(text)
    aliases = {"one-large": "large", "many-small": "small", "gpt": "transformer"}
    out = []
    for n in names:
        n = aliases.get(n, n)
        if n == "all":
            return list(LAYOUTS)
        if n not in LAYOUTS:
            raise ValueError(f"unknown layout {n!r}; choose from {', '.join(LAYOUTS)} or 'all'")
        out.append(n)
    return out


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(text) -> int:
    """Parameter count from ``"8M"``, ``"64m"``, ``"500k"``, ``"1.5G"`` or ``"1000000"``
    (decimal units: 1M = 10^6 parameters)."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)\s*", str(text).lower())
        if m is None:
            raise ValueError(f"size must look like 8M, 500k or 1000000, got {text!r}")
        value = int(round(float(m.group(1)) * _UNITS[m.group(2)]))
    if value < 1:
        raise ValueError(f"size must be at least 1 parameter, got {text!r}")
    return value


def format_count(n: float, base: int = 1000, units=("", "k", "M", "G", "T")) -> str:
    """A count in at most three significant digits and a unit: 1_000_000 -> "1M",
    1_048_576 -> "1.05M", 999_700 -> "1M" (not "1e+03k"), 512_000 -> "512k", 999 -> "999".

    The unit is chosen after rounding, so a value just below a unit rounds up into it.
    ``base=1024`` with other ``units`` formats byte counts the same way.
    """
    n = float(n)
    if not math.isfinite(n):
        return str(n)
    sign, n = ("-" if n < 0 else ""), abs(n)
    i = 0
    while i + 1 < len(units) and float(f"{n / base ** i:.3g}") >= base:
        i += 1
    value = float(f"{n / base ** i:.3g}")
    text = f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.3g}"
    return f"{sign}{text}{units[i]}"


def case_info(case: OptimizerCase, dtype=np.float32) -> dict[str, Any]:
    """A row of ``fastopt bench --list``: name, classes, slots and bytes per parameter
    (``bytes_per_format``: per state format, on one large tensor; None where the
    optimizer does not run with that format)."""
    tcls = case.torch
    per_format = {f: (case.bytes_per_param(dtype, f) if case.state_support(f, dtype) is None
                      else None) for f in STATE_FORMATS}
    return dict(name=case.name, fastopt=case.fastopt, kwargs=case.kwargs, torch=tcls,
                slots=[s for s in case.active_slots() if s is not None],
                bytes_per_param=case.bytes_per_param(dtype), bytes_per_format=per_format,
                default=case.default)
