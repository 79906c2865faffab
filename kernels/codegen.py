"""The CPU driver's loops, generated from a :class:`~.layout.Layout` and compiled.

One generator writes the three loops of ``kernels/cpu.py`` from the description of the
columns: a step over a chunk table (:func:`step_source`), a blocked reduction over it
(:func:`reduce_source`) and a sparse update of rows (:func:`rows_source`). They share
their pieces: which columns are bound, how each one is loaded into the math type and
stored back in its format, and how the element is called (:func:`_element_lines`).

Generated functions see these globals, set before their module runs: ``np``, ``prange``,
``view`` (an address as an array), ``lowp`` (16-bit loads and stores), ``accumulate``,
``ELEMENT`` (the element function, inlined) and ``FREEZE`` (its scalars with their bool
flags made constants).

Numba caches a function on disk only when its source file exists and its modification
time does not change, so :func:`load` writes each generated module to a file named by a
hash of its text, only when absent, and imports it from there.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile

import numba
import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from . import blockwise, lowp
from .layout import BFLOAT16, BLOCKWISE, FLOAT16, INT8_SIGNED, NATIVE, ROW_GRAD, ROW_SLOT, Layout
from .pieces import bind
from .specialize import accumulate, flag_tag, freezer, source_tag

# 16-bit storage formats and model columns as lowp kinds (compile-time constants).
_KIND = {FLOAT16: lowp.FLOAT16, BFLOAT16: lowp.BFLOAT16}
_MODEL_KIND = {"float16": lowp.FLOAT16, "bfloat16": lowp.BFLOAT16,
               "bfloat16-stochastic": lowp.BFLOAT16_STOCHASTIC,
               "pure-bfloat16-stochastic": lowp.BFLOAT16_STOCHASTIC,
               "pure-bfloat16-kahan": lowp.BFLOAT16, "pure-float16-kahan": lowp.FLOAT16}
# the 16-bit format a model's gradients (and pure params) are loaded from
_LOAD_KIND = {m: lowp.BFLOAT16 if k == lowp.BFLOAT16_STOCHASTIC else k for m, k in _MODEL_KIND.items()}
MODELS = ("",) + tuple(_MODEL_KIND)


@intrinsic
def _address_to_pointer(typingctx, address, like):
    """Reinterpret an integer address as a pointer to elements of ``like``'s type."""
    pointer_type = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, like), codegen


@numba.njit(inline="always", cache=True)
def view(address, n, like):
    """The ``n`` elements of ``like``'s type at ``address``, as a 1-D array."""
    return carray(_address_to_pointer(address, like), n)


# Elements per buffered block of a step with 16-bit state columns (_buffered_step_source).
BUFFER16 = 256


# -- the pieces ------------------------------------------------------------------------
def _buffered(layout: Layout) -> tuple:
    """The state positions whose values the element loop finds in a float32 block buffer
    ``buf{k}``: blockwise columns (decoded there), and 16-bit ones in a step's driver
    (widened there: :func:`_buffered_step_source`)."""
    return tuple(k for k in range(layout.n_slots) if layout.reads[k]
                 and (layout.formats[k] in BLOCKWISE or layout.formats[k] in _KIND))


def _load(fmt: str, expr: str, k: int = 0, buffered: bool = False) -> str:
    if buffered or fmt in BLOCKWISE:     # decoded or widened into the block's buffer beforehand
        return f"buf{k}[i]"
    return expr if fmt == NATIVE else f"lowp.load({expr}, {_KIND[fmt]}, like)"


def _store(fmt: str, expr: str) -> str:
    return expr if fmt == NATIVE else f"lowp.store({expr}, {_KIND[fmt]})"


def _element_type(fmt: str) -> str:
    return "like" if fmt == NATIVE else "CODE" if fmt in BLOCKWISE else "bits"


def _columns(layout: Layout) -> list:
    """``(name, table column, element type)`` of every column the loop indexes."""
    k_slots = layout.n_slots
    low = "bits" if layout.model else "like"
    cols = [("p", 1, "bits" if layout.pure else "like"), ("g", 2, low)]
    cols += [(f"s{k}", 3 + k, _element_type(layout.formats[k]))
             for k in range(k_slots) if layout.reads[k]]
    if layout.extra_columns:       # the model copy, or the Kahan compensation
        cols.append(("k" if layout.pure else "w", 3 + k_slots, "bits"))
    return cols


def _chunk_views(layout: Layout, lo: str, hi: str) -> list:
    # Slice first, then loop from 0: LLVM vectorises this form (a loop over
    # range(lo, hi) of the whole row's view did not).
    return [f"{name} = view(table[r, {col}], n, {like})[{lo}:{hi}]"
            for name, col, like in _columns(layout)]


def _element_lines(layout: Layout, out: str, first: int, scaled: bool, write_p: bool,
                   rounding: str = "", buffered: tuple = ()) -> list:
    """The body of the element loop over ``i``: load, call ``ELEMENT``, store.

    ``out[first]`` is the new param and ``out[first + 1 + k]`` the new state ``k``.
    The gradient is multiplied by ``scale`` when ``scaled``; an absent column gets the
    gradient in its place (no load, as the CUDA driver); the per-row slot gets ``rv``.
    ``rounding``: the seed and position arguments of the model column's rounding.
    State columns in ``buffered`` (and blockwise ones) are read from and written to
    their block buffer ``buf{k}``.
    """
    gi = (f"lowp.load(g[i], {_LOAD_KIND[layout.model]}, like)" if layout.model else "g[i]")
    if scaled:
        gi += " * scale"
    args = ["p0" if layout.pure else "p[i]", "gi"]
    for k in range(layout.n_slots):
        if layout.row_mode == ROW_SLOT and k == layout.row_slot:
            args.append("rv")
        elif layout.reads[k]:
            args.append(_load(layout.formats[k], f"s{k}[i]", k, k in buffered))
        else:
            args.append("gi")
    lines = [f"gi = {gi}"]
    if layout.pure:
        lines.append(f"p0 = lowp.load(p[i], {_LOAD_KIND[layout.model]}, like)")
    lines.append(f"{out} = ELEMENT({', '.join(args)}, hc)")
    if write_p:
        lines += _param_store(layout, f"{out}[{first}]", rounding)
    for k in range(layout.n_slots):
        if not layout.writes[k]:
            continue
        value = f"{out}[{first + 1 + k}]"
        if k in buffered or layout.formats[k] in BLOCKWISE:    # kept for the block's store pass
            lines.append(f"buf{k}[i] = {value}")
        else:
            lines.append(f"s{k}[i] = {_store(layout.formats[k], value)}")
    return lines


def _param_store(layout: Layout, value: str, rounding: str) -> list:
    """Store the updated param ``value``: as it is; with master weights also its rounded
    model copy; pure 16-bit params rounded stochastically, or to nearest with the
    rounding error carried in the Kahan column ``k`` (the exact update plus the error
    carried so far is added to the param, and what rounding left out is carried on)."""
    kind = _MODEL_KIND.get(layout.model, 0)
    if not layout.model:
        return [f"p[i] = {value}"]
    if not layout.pure:
        return [f"p[i] = {value}", f"w[i] = lowp.round_to_bits({value}, {kind}, {rounding})"]
    if layout.model == "pure-bfloat16-stochastic":
        return [f"p[i] = lowp.round_to_bits({value}, {kind}, {rounding})"]
    return [f"comp = lowp.load(k[i], {kind}, like) + ({value} - p0)",
            f"q = lowp.round_to_bits(p0 + comp, {kind}, 0, 0)",
            "p[i] = q",
            f"k[i] = lowp.store(comp - (lowp.load(q, {kind}, like) - p0), {kind})"]


def _row_values(layout: Layout) -> list:
    if layout.row_mode == ROW_GRAD:
        return ["scale = grad_scale * row_values[r]"]
    lines = ["scale = grad_scale"]
    if layout.row_mode == ROW_SLOT:
        lines.append("rv = row_values[r]")
    return lines


def _chunk_head() -> list:
    return ["hc = FREEZE(h)  # inside the loop: parfor bodies are outlined",
            "r = chunks[c, 0]", "lo = chunks[c, 1]", "hi = chunks[c, 2]", "n = table[r, 0]"]


def _block(indent: int, lines) -> list:
    return ["    " * indent + line for line in lines]


# -- the three loops -------------------------------------------------------------------
def step_source(name: str, layout: Layout, chunk: int) -> str:
    """One step of the element over every chunk ``(r, lo, hi)`` of a chunk table."""
    if layout.block:
        return _blockwise_step_source(name, layout, chunk)
    if _buffered(layout):
        return _buffered_step_source(name, layout, chunk)
    lines = [f"def {name}(table, chunks, like, bits, h, grad_scale, row_values, seed):",
             "    for c in prange(chunks.shape[0]):"]
    lines += _block(2, _chunk_head() + _row_values(layout) + _chunk_views(layout, "lo", "hi"))
    lines += _block(2, ["for i in range(hi - lo):"])
    lines += _block(3, _element_lines(layout, "out", 0, True, True, f"seed, c * {chunk} + i"))
    return "\n".join(lines) + "\n"


def _buffered_step_source(name: str, layout: Layout, chunk: int) -> str:
    """The step over a layout with 16-bit state columns: each chunk goes by blocks of
    :data:`BUFFER16` elements, and per block each 16-bit column is widened into a float32
    buffer, the element runs over the params, gradients and buffers, and each written
    column is rounded back from its buffer, each in a loop of its own. One loop that
    read and wrote every column at once streamed slowly: Adam with bfloat16 state at 64M
    params took 1.3-1.6x as long (2-core AMD EPYC), and so did a loop with its access
    pattern and trivial math (kernels/roof.py), while split loops moving the same bytes
    took 0.6x as long."""
    size = BUFFER16
    buffered = _buffered(layout)
    lines = [f"def {name}(table, chunks, like, bits, h, grad_scale, row_values, seed):",
             "    for c in prange(chunks.shape[0]):"]
    head = _chunk_head() + _row_values(layout)
    head += [f"buf{k} = np.full({size}, like)  # the math type" for k in buffered]
    lines += _block(2, head + [f"for start in range(lo, hi, {size}):"])
    body = [f"stop = min(start + {size}, hi)", "m = stop - start"]
    body += _chunk_views(layout, "start", "stop")
    for k in buffered:
        body += ["for i in range(m):",
                 f"    buf{k}[i] = lowp.load(s{k}[i], {_KIND[layout.formats[k]]}, like)"]
    lines += _block(3, body + ["for i in range(m):"])
    lines += _block(4, _element_lines(layout, "out", 0, True, True,
                                      f"seed, c * {chunk} + start - lo + i", buffered))
    for k in buffered:
        if layout.writes[k]:
            lines += _block(3, ["for i in range(m):",
                                f"    s{k}[i] = lowp.store(buf{k}[i], {_KIND[layout.formats[k]]})"])
    return "\n".join(lines) + "\n"


def _blockwise_step_source(name: str, layout: Layout, chunk: int) -> str:
    """The step over a layout with blockwise columns: each chunk (whole blocks) goes block
    by block, in short loops over a block that stays in L1, each simple enough for LLVM
    to vectorise: decode each blockwise column into a float32 block buffer (its old
    absmax times the map's value), run the element over the params, gradients and
    buffers, then per written column find the new values' largest magnitude (an integer
    max on their bits) and encode them with the new absmax (a read-only column is only
    decoded). Memory is read and written once.

    Codes come in through a block-sized byte buffer ``cb``: LLVM cannot tell that a
    column's codes (an address from the table) do not overlap the float buffer, and a
    loop that loads one and stores the other was left scalar (the int8 step ran 2.2x
    slower); copying is a vectorised byte loop. They go out through
    :func:`~.blockwise.encode_block`, which writes them eight at a time (an explicit
    vector loop, no aliasing question) and leaves the block's last ``m % 8`` (or, without
    AVX2, all of them) to :func:`~.blockwise.encode`."""
    size = layout.block
    if chunk % size:
        raise ValueError(f"the chunk ({chunk} elements) must hold whole blocks of {size}")
    blocked = layout.blockwise
    first = 3 + layout.n_slots + layout.extra_columns     # the absmax columns follow
    lines = [f"def {name}(table, chunks, like, bits, h, grad_scale, row_values, seed):",
             "    for c in prange(chunks.shape[0]):"]
    head = _chunk_head() + _row_values(layout) + [f"n_blocks = (n + {size - 1}) // {size}",
                                                  f"cb = np.empty({size}, np.uint8)"]
    for k in blocked:
        head += [f"absmax{k} = view(table[r, {first + blocked.index(k)}], n_blocks, ABSMAX)",
                 f"buf{k} = np.empty({size}, np.float32)"]
    lines += _block(2, head + [f"for start in range(lo, hi, {size}):"])
    body = [f"stop = min(start + {size}, hi)", f"b = start // {size}", "m = stop - start"]
    body += _chunk_views(layout, "start", "stop")
    for k in blocked:
        body += [f"old{k} = absmax{k}[b]", "for i in range(m):", f"    cb[i] = s{k}[i]",
                 "for i in range(m):", f"    buf{k}[i] = QMAP{k}[cb[i]] * old{k}"]
    lines += _block(3, body + ["for i in range(m):"])
    lines += _block(4, _element_lines(layout, "out", 0, True, True,
                                      f"seed, c * {chunk} + start - lo + i", blocked))
    for k in (k for k in blocked if layout.writes[k]):      # read-only ones: decoded only
        lines += _block(3, [f"top{k} = numba.uint32(0)", "for i in range(m):",
                            f"    top{k} = max(top{k}, blockwise.magnitude_bits(buf{k}[i]))",
                            f"new{k} = blockwise.absmax_of(top{k})", f"absmax{k}[b] = new{k}",
                            f"inv{k} = blockwise.inverse(new{k})",
                            f"done = blockwise.encode_block(buf{k}, inv{k}, CODES{k}, s{k}, m)",
                            "for i in range(done, m):",
                            f"    s{k}[i] = blockwise.encode(buf{k}[i] * inv{k}, CODES{k})"])
    return "\n".join(lines) + "\n"


def reduce_source(name: str, layout: Layout, block: int, maximum: bool, write_p: bool) -> str:
    """Per-chunk partials ``out[c] = (a, b)`` of an element returning ``(a, b)``, or
    ``(a, b, p, s0, ...)`` when it also stores the columns ``write_p`` and
    ``layout.writes``. Blocks of ``block`` elements are combined in the element's own
    precision, then into ``out``'s: one chunk is one thread's, in a fixed order."""
    combine = ("{0} = max({0}, {1})" if maximum else "{0} = accumulate({0}, {1})")
    total = ("{0} = max({0}, {1})" if maximum else "{0} += {1}")
    lines = [f"def {name}(table, chunks, like, bits, h, out):",
             "    for c in prange(chunks.shape[0]):"]
    lines += _block(2, _chunk_head() + ["acc_a = out[c, 0] * 0", "acc_b = out[c, 1] * 0",
                                        f"for start in range(lo, hi, {block}):"])
    lines += _block(3, [f"stop = min(start + {block}, hi)"] + _chunk_views(layout, "start", "stop")
                    + ["block_a = like - like  # unifies with the element's output type",
                       "block_b = like - like", "for i in range(stop - start):"])
    lines += _block(4, _element_lines(layout, "res", 2, False, write_p, "0, start + i")
                    + [combine.format("block_a", "res[0]"), combine.format("block_b", "res[1]")])
    lines += _block(3, [total.format("acc_a", "block_a"), total.format("acc_b", "block_b")])
    lines += _block(2, ["out[c, 0] = acc_a", "out[c, 1] = acc_b"])
    return "\n".join(lines) + "\n"


def _blockwise_reduce_source(name: str, layout: Layout, chunk: int, maximum: bool,
                             write_p: bool) -> str:
    """:func:`reduce_source` over a layout with blockwise columns, read-only: each chunk
    (whole blocks) goes block by block; the element gets each blockwise value decoded
    where it reads it, ``QMAP[code] * absmax`` with the block's absmax, and its two
    outputs are combined over the block in the element's precision, then into the
    chunk's partial, in a fixed order: one chunk is one thread's, so the partials do not
    depend on the thread count. The sums' blocks are the quantization blocks (not
    ``REDUCE_BLOCK``).

    Decoded in the element's loop, not into a block buffer as the step does: with nothing
    stored there is no aliasing to keep LLVM from vectorising, and a column the element
    ignores is not decoded at all (LARS's trace: its int8 reduction at 4M params took
    3.9 ms with a buffer, 2.1 ms so; LAMB's 5.6 and 5.3; same partials, 2-core AMD EPYC).

    A reduction stores no blockwise column: re-encoding belongs to the step, which
    quantizes each column once per step (fastopt/_passes.py: LAMB's int8 moments are
    recomputed and stored by its step, from the values its sums were taken over)."""
    size = layout.block
    if chunk % size:
        raise ValueError(f"the chunk ({chunk} elements) must hold whole blocks of {size}")
    blocked = layout.blockwise
    if any(layout.writes[k] for k in blocked):
        raise ValueError("a reduction stores no blockwise column (the step re-encodes it)")
    combine = ("{0} = max({0}, {1})" if maximum else "{0} = accumulate({0}, {1})")
    total = ("{0} = max({0}, {1})" if maximum else "{0} += {1}")
    first = 3 + layout.n_slots + layout.extra_columns     # the absmax columns follow
    lines = [f"def {name}(table, chunks, like, bits, h, out):",
             "    for c in prange(chunks.shape[0]):"]
    head = _chunk_head() + [f"n_blocks = (n + {size - 1}) // {size}"]
    head += [f"absmax{k} = view(table[r, {first + blocked.index(k)}], n_blocks, ABSMAX)"
             for k in blocked]
    head += ["acc_a = out[c, 0] * 0", "acc_b = out[c, 1] * 0"]
    lines += _block(2, head + [f"for start in range(lo, hi, {size}):"])
    body = [f"stop = min(start + {size}, hi)", f"b = start // {size}"]
    body += _chunk_views(layout, "start", "stop") + [f"old{k} = absmax{k}[b]" for k in blocked]
    body += ["block_a = like - like  # unifies with the element's output type",
             "block_b = like - like", "for i in range(stop - start):"]
    lines += _block(3, body)
    element = _element_lines(layout, "res", 2, False, write_p, "0, start + i")
    for k in blocked:       # the element lines read blockwise values from buf{k}: decode there
        element = [line.replace(f"buf{k}[i]", f"QMAP{k}[s{k}[i]] * old{k}") for line in element]
    lines += _block(4, element + [combine.format("block_a", "res[0]"),
                                  combine.format("block_b", "res[1]")])
    lines += _block(3, [total.format("acc_a", "block_a"), total.format("acc_b", "block_b")])
    lines += _block(2, ["out[c, 0] = acc_a", "out[c, 1] = acc_b"])
    return "\n".join(lines) + "\n"


def rows_source(name: str, layout: Layout) -> str:
    """A step of rows ``index`` (unique) of ``(rows, width)`` arrays ``P`` and ``S*``;
    ``G`` holds the gradient rows ``(len(index), width)``."""
    if layout.model or layout.row_mode:
        raise ValueError("sparse rows take neither a model column nor per-row values")
    present = [k for k in range(layout.n_slots) if layout.reads[k]]
    args = ["P", "G"] + [f"S{k}" for k in present] + ["index", "like", "h", "grad_scale"]
    lines = [f"def {name}({', '.join(args)}):", "    for k in prange(index.size):"]
    lines += _block(2, ["hc = FREEZE(h)", "r = index[k]", "p = P[r]", "g = G[k]", "scale = grad_scale"]
                    + [f"s{k} = S{k}[r]" for k in present] + ["for i in range(p.size):"])
    lines += _block(3, _element_lines(layout, "out", 0, True, True))
    return "\n".join(lines) + "\n"


# -- compiling -------------------------------------------------------------------------
_HEADER = ('"""Generated by fastopt.kernels.codegen; named by a hash of this text, never '
           'edited.\n\nGlobals (prange, view, lowp, accumulate, ELEMENT, FREEZE) are set '
           'before it runs.\n"""\n\n\n')


def _helpers_tag() -> str:
    """A hash of the modules whose functions every driver inlines (16-bit and blockwise
    loads and stores, views, accumulation): Numba's disk cache knows a driver by its own
    file, not by the functions it inlines, so an edit there must rename the drivers."""
    import inspect
    from . import specialize
    text = "".join(inspect.getsource(m) for m in (lowp, blockwise, specialize))
    return hashlib.sha1(text.encode()).hexdigest()[:6]


HELPERS_TAG = _helpers_tag()


def driver_name(kind: str, element, layout: Layout, flags: tuple, extra: str = "") -> str:
    """The function's name, which is also its on-disk cache entry's: the element's name
    and source hash, the layout, the flags and the inlined helpers' hash."""
    prefix = "master" if kind == "step" and layout.model else kind
    name = getattr(element, "__name__", "element")
    return re.sub(r"\W", "_", f"{prefix}_{name}_{layout.tag()}_{flag_tag(flags)}{extra}_"
                               f"{source_tag(element)}{HELPERS_TAG}")


def build(kind: str, element, layout: Layout, flags: tuple, chunk: int, block: int,
          maximum: bool = False, write_p: bool = False):
    """The compiled driver ``kind`` ("step", "reduce" or "rows") for ``element`` over
    ``layout``, specialised on the scalars' ``flags``."""
    if layout.block and kind not in ("step", "reduce"):
        raise ValueError(f"blockwise columns have a step and a reduction driver, not {kind!r}")
    # blockwise drivers hold the maps as constants: their hash is part of the name
    maps = f"_q{blockwise.TAG}" if layout.block else ""
    if kind == "step":
        name = driver_name(kind, element, layout, flags, maps)
        text = step_source(name, layout, chunk)
    elif kind == "reduce":
        name = driver_name(kind, element, layout, flags, f"_{'max' if maximum else 'sum'}"
                           f"{'_p' if write_p else ''}{maps}")
        text = (_blockwise_reduce_source(name, layout, chunk, maximum, write_p) if layout.block
                else reduce_source(name, layout, block, maximum, write_p))
    elif kind == "rows":
        name = driver_name(kind, element, layout, flags)
        text = rows_source(name, layout)
    else:
        raise ValueError(f"unknown driver kind {kind!r}")
    namespace = dict(np=np, prange=prange, view=view, lowp=lowp, accumulate=accumulate,
                     ELEMENT=cpu_function(element, inline="always", cache=True),
                     FREEZE=freezer(flags), **_blockwise_globals(layout))
    module = load(_HEADER + text, namespace)
    return numba.njit(parallel=True, cache=True, nogil=True)(getattr(module, name))


def _blockwise_globals(layout: Layout) -> dict:
    """The maps and encoder tables of a layout's blockwise columns (constants of the
    compiled driver), named by state position."""
    if not layout.block:
        return {}
    names = dict(numba=numba, blockwise=blockwise, CODE=np.uint8(0),
                 ABSMAX=np.float32(0))
    for k in layout.blockwise:
        kind = blockwise.SIGNED if layout.formats[k] == INT8_SIGNED else blockwise.UNSIGNED
        names[f"QMAP{k}"] = blockwise.dynamic_map(kind)
        names[f"CODES{k}"] = blockwise.encoder(kind)
    return names


_CPU_PIECES: dict = {}


def cpu_function(element, **options):
    """``element`` compiled by ``numba.njit(**options)``, calling the CPU form of every
    element piece it names (kernels/pieces.py)."""
    return numba.njit(**options)(bind(element, _cpu_piece))


def _cpu_piece(fn):
    """The CPU form of an element piece (kernels/pieces.py), inlined into its caller."""
    if fn not in _CPU_PIECES:
        _CPU_PIECES[fn] = cpu_function(fn, inline="always")
    return _CPU_PIECES[fn]


def source_dir() -> str:
    """Where generated modules are written: beside Numba's cache when NUMBA_CACHE_DIR is
    set, else in this package's __pycache__, else in the user's cache directory."""
    candidates = []
    if numba.config.CACHE_DIR:
        candidates.append(os.path.join(numba.config.CACHE_DIR, "fastopt_drivers"))
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__",
                                   "fastopt_drivers"))
    from numba.misc.appdirs import AppDirs
    candidates.append(os.path.join(AppDirs(appname="fastopt").user_cache_dir, "drivers"))
    for directory in candidates:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise OSError(f"fastopt: no writable directory for generated drivers among {candidates}")


def write_source(text: str, directory: str | None = None) -> str:
    """The path of a file holding ``text``, named by its hash; written only when absent
    (or different), so that its modification time, part of Numba's cache key, stays."""
    directory = directory or source_dir()
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = os.path.join(directory, f"fastopt_driver_{digest}.py")
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
        exists = True
    except FileNotFoundError:
        exists = False
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastopt_driver_", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if exists:
            os.replace(tmp, path)
            return path
        try:
            # A link never replaces a file another process wrote meanwhile (same text).
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:
            os.replace(tmp, path)
            return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(text: str, namespace: dict):
    """A fresh module run from the file of ``text``, with ``namespace`` as its first
    globals (each call its own module: two drivers may share a text, not an element)."""
    path = write_source(text)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(namespace)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
