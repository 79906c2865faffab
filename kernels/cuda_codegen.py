"""The CUDA driver's kernels, written as source from a description of their columns.

One generator serves every kernel of ``kernels/cuda.py``: the step, the reduction and
the sparse-row update, for any number K of state columns, any storage format per
column, master weights, per-row values and compile-time flags. A kernel is two pieces:

- a *walk*, which says which elements a block visits and where each column's element
  lies: chunks of a chunk table (the step and the reduction), or rows of a param named
  by an index array (sparse rows);
- a *body*, the same for every walk: load the columns present (16-bit ones widened to
  float32, kernels/cuda_formats.py), call the element (inlined device function), store
  the columns written (rounded to their format) and, with master weights, the model
  copy. The reduction's body adds its two outputs to per-thread sums instead.

The source goes to a file named by a hash of its text, written only when absent, and is
imported from there (``kernels.codegen.load``, as the CPU driver's), so numba's on-disk
cache (``FASTOPT_CUDA_CACHE=1``) can find the kernel again in a fresh process. Its
globals (the element as a device function, the scalars' class, the format conversions)
are set in the module before its body runs. The simulator imports the very same files.

Kernel arguments, for a table of K state columns (absent columns get the gradient's
span and offsets, never read): ``p, g, s0 .. s{K-1}, w`` spans (``w``: the model copy,
or the gradient's span again), then for the chunk walks the device chunk table with
columns ``(count, position, row, p, g, s0 .. s{K-1}[, w])`` of element offsets, and for
the row walk the index array and the row width.

Blockwise 8-bit columns (a layout with ``block``) have their own step walk and body
(:func:`_blockwise_step_source`; a reduction only decodes them, read-only, in the common
walk: :func:`_reduce_source`): a thread block of the step owns whole quantization blocks.
Per iteration it takes ``max(block, threads)`` elements of its chunk, each thread
``max(1, block // threads)`` of them (one with the default 256 and 256): it decodes the
codes with their block's old absmax (``qmap[code] * old``, the map in shared memory),
runs the element, keeps each blockwise column's new value in registers, and takes the
largest magnitude bits (int32) of the block: warp shuffles (``warp_xor``), then, where a
block spans several warps, their maxima through shared memory and one
``syncthreads`` (double-buffered by iteration). The block's first thread stores the new
absmax, and every thread encodes its values with the CPU's tables (kernels/
cuda_formats.encode, lut and mid in shared memory). Extra arguments after the spans: the
absmax span of each blockwise column (``a<k>``), then the ``qmap``, ``mid`` and ``lut``
device arrays of each map kind used (:func:`map_kinds`); the chunk table gains each
absmax column's block offset, after the others.
"""
from __future__ import annotations

import types as pytypes

import numpy as np

from . import cuda_formats
from .layout import (BFLOAT16, BLOCKWISE, FLOAT16, INT8_SIGNED, INT8_UNSIGNED, NATIVE,
                     PURE_STOCHASTIC, ROW_GRAD, ROW_SLOT)
from .codegen import driver_name
from .specialize import source_tag

STEP, REDUCE, ROWS = "step", "reduce", "rows"
# Chunk table columns before the per-column offsets.
COUNT, POSITION, ROW, FIRST_OFFSET = 0, 1, 2, 3

_WIDEN = {FLOAT16: "half_to_float", BFLOAT16: "bfloat16_to_float"}
# the 16-bit format of a model column's gradients and copy (or of pure 16-bit params)
_MODEL_FORMAT = {"float16": FLOAT16, "bfloat16": BFLOAT16, "bfloat16-stochastic": BFLOAT16,
                 PURE_STOCHASTIC: BFLOAT16, "pure-bfloat16-kahan": BFLOAT16,
                 "pure-float16-kahan": FLOAT16}
_STOCHASTIC = ("bfloat16-stochastic", PURE_STOCHASTIC)
_MAP_KINDS = {INT8_SIGNED: "signed", INT8_UNSIGNED: "unsigned"}
_LUT_WORDS, _MAP_SIZE = 2048, 256       # lut: 8192 codes, 4 to a uint32 word; qmap and mid


def columns(n_slots: int) -> list[str]:
    """The span names, in kernel argument order."""
    return ["p", "g"] + [f"s{k}" for k in range(n_slots)] + ["w"]


def map_kinds(formats, reads) -> list[str]:
    """The dynamic maps ("signed", "unsigned") of the blockwise columns read, each once
    and in that order: the order of their tables among the kernel arguments."""
    used = {_MAP_KINDS[f] for f, r in zip(formats, reads) if r and f in BLOCKWISE}
    return [kind for kind in ("signed", "unsigned") if kind in used]


# -- the body -------------------------------------------------------------------------------------
def _load(col, fmt, index):
    load = f"{col}_span[{index}]"
    return load if fmt == NATIVE else f"{_WIDEN[fmt]}({load})"


def _narrow(fmt, value):
    """``value`` rounded to nearest even in storage format ``fmt``."""
    if fmt == FLOAT16:
        return f"float_to_half({value})"
    if fmt == BFLOAT16:
        return f"float_to_bfloat16({value}, -1)"
    return value


def _store(col, fmt, index, value):
    return f"{col}_span[{index}] = {_narrow(fmt, value)}"


def _param_store(layout, sfx, value, lane):
    """Store the updated param ``value``: as it is, and with master weights its rounded
    model copy; pure 16-bit params rounded stochastically, or to nearest with the
    rounding error carried in the Kahan column ``w`` (as kernels/codegen.py's
    ``_param_store``, operation for operation: the drivers agree bit for bit)."""
    fmt = _MODEL_FORMAT.get(layout.model)
    k_p, k_w = f"k_p{sfx}", f"k_w{sfx}"
    if layout.model in _STOCHASTIC:
        rounded = f"float_to_bfloat16({value}, stochastic_noise(seed, at + {lane}))"
        if layout.pure:
            return [f"p_span[{k_p}] = {rounded}"]
        return [f"p_span[{k_p}] = {value}", f"w_span[{k_w}] = {rounded}"]
    if not layout.pure:
        lines = [f"p_span[{k_p}] = {value}"]
        return lines + ([_store("w", fmt, k_w, value)] if layout.model else [])
    # Kahan: the exact update plus the error carried so far is added to the param (p{sfx},
    # its old value widened); what rounding left out is carried on.
    widen = _WIDEN[fmt]
    return [f"comp{sfx} = {widen}(w_span[{k_w}]) + ({value} - p{sfx})",
            f"q{sfx} = {_narrow(fmt, f'p{sfx} + comp{sfx}')}", f"p_span[{k_p}] = q{sfx}",
            _store("w", fmt, k_w, f"comp{sfx} - ({widen}(q{sfx}) - p{sfx})")]


def _lane_loads(layout, lane, sfx, scaled):
    """Index and value of every column read, for the element at offset ``lane``."""
    g_fmt = _MODEL_FORMAT[layout.model] if layout.model else NATIVE
    p_fmt = g_fmt if layout.pure else NATIVE
    lines = [f"k_p{sfx} = np.uint64(o_p + {lane})", f"k_g{sfx} = np.uint64(o_g + {lane})",
             f"p{sfx} = {_load('p', p_fmt, f'k_p{sfx}')}",
             f"g{sfx} = {_load('g', g_fmt, f'k_g{sfx}')}" + (" * scale" if scaled else "")]
    for k in range(layout.n_slots):
        if layout.row_mode == ROW_SLOT and k == layout.row_slot:
            lines.append(f"s{k}{sfx} = value")
        elif layout.reads[k]:
            lines.append(f"k_s{k}{sfx} = np.uint64(o_s{k} + {lane})")
            if layout.formats[k] in BLOCKWISE:      # the code's value times the block's old absmax
                kind = _MAP_KINDS[layout.formats[k]]
                lines.append(f"s{k}{sfx} = q_{kind}[s{k}_span[k_s{k}{sfx}]] * old{k}")
            else:
                lines.append(f"s{k}{sfx} = {_load(f's{k}', layout.formats[k], f'k_s{k}{sfx}')}")
        else:
            lines.append(f"s{k}{sfx} = g{sfx}")      # absent: the element ignores it
    if layout.extra_columns:
        lines.append(f"k_w{sfx} = np.uint64(o_w + {lane})")
    return lines


def _lane_stores(layout, result, first, write_p, lane, sfx, keep=None):
    """Stores of ``result[first]`` (the param) and ``result[first + 1 + k]`` (state k);
    a blockwise state's value goes to ``keep(k, value)``'s lines instead."""
    lines = []
    if write_p:
        lines += _param_store(layout, sfx, f"{result}{sfx}[{first}]", lane)
    for k in range(layout.n_slots):
        if layout.writes[k] and layout.formats[k] in BLOCKWISE:
            lines += keep(k, f"{result}{sfx}[{first + 1 + k}]")
        elif layout.writes[k]:
            lines.append(_store(f"s{k}", layout.formats[k], f"k_s{k}{sfx}",
                                f"{result}{sfx}[{first + 1 + k}]"))
    return lines


def _call(fn, sfx, n_slots):
    args = ", ".join([f"p{sfx}", f"g{sfx}"] + [f"s{k}{sfx}" for k in range(n_slots)] + ["hc"])
    return f"{fn}({args})"


def _update_body(layout, lanes):
    """The step's body for one or two lanes (``PAIR``): all loads, then the math, then
    the stores; the second lane stores only when it is inside the chunk."""
    lines = []
    for lane, sfx in lanes:
        lines += _lane_loads(layout, lane, sfx, scaled=True)
    for lane, sfx in lanes:
        lines.append(f"out{sfx} = {_call('element', sfx, layout.n_slots)}")
    for n, (lane, sfx) in enumerate(lanes):
        stores = _lane_stores(layout, "out", 0, True, lane, sfx)
        lines += stores if n == 0 else ["if second:"] + _indent(stores, 1)
    return lines


def _reduce_body(layout, write_p, maximum):
    lines = _lane_loads(layout, "i", "", scaled=False)
    lines.append(f"res = {_call('element', '', layout.n_slots)}")
    lines += _lane_stores(layout, "res", 2, write_p, "i", "")
    if maximum:
        lines += ["acc_a = max(acc_a, res[0])", "acc_b = max(acc_b, res[1])"]
    else:
        lines += ["acc_a += res[0]", "acc_b += res[1]"]
    return lines


def _indent(lines, depth):
    return ["    " * depth + line for line in lines]


# -- the walks ------------------------------------------------------------------------------------
def _chunk_offsets(layout):
    """Per chunk: the element offset of each column read or written."""
    lines = [f"n = chunks[c, {COUNT}]", f"o_p = chunks[c, {FIRST_OFFSET}]",
             f"o_g = chunks[c, {FIRST_OFFSET + 1}]"]
    if layout.model in _STOCHASTIC:
        lines.append(f"at = chunks[c, {POSITION}]")     # stochastic rounding's counter
    for k in range(layout.n_slots):
        if layout.reads[k]:
            lines.append(f"o_s{k} = chunks[c, {FIRST_OFFSET + 2 + k}]")
    if layout.extra_columns:
        lines.append(f"o_w = chunks[c, {FIRST_OFFSET + 2 + layout.n_slots}]")
    return lines


def _row_values(layout):
    if layout.row_mode == ROW_GRAD:
        return [f"scale = grad_scale * row_values[chunks[c, {ROW}]]"]
    lines = ["scale = grad_scale"]
    if layout.row_mode == ROW_SLOT:
        lines.append(f"value = row_values[chunks[c, {ROW}]]")
    return lines


def _freeze(flags, n_fields, named):
    """The scalars with their bool ``flags`` as constants: LLVM folds their branches."""
    if not flags:
        return "hc = h"
    fixed = dict(flags)
    fields = [repr(fixed[i]) if i in fixed else f"h[{i}]" for i in range(n_fields)]
    return f"hc = Scalars({', '.join(fields)})" if named else f"hc = ({', '.join(fields)},)"


def _kernel_source(name, layout, arguments, head, over, body, more=()):
    """``def name(spans..., more..., arguments)``: ``head``, then blocks striding over the
    entries of array ``over`` (chunks, or index rows), ``c`` the entry, running ``body``."""
    spans = ", ".join([f"{c}_span" for c in columns(layout.n_slots)] + list(more))
    return "\n".join([f"def {name}({spans}, {arguments}):"]
                     + _indent(head + ["c = cuda.blockIdx.x", f"while c < {over}.shape[0]:"], 1)
                     + _indent(body + ["c += cuda.gridDim.x"], 2)) + "\n"


def _step_source(name, layout, freeze, pair):
    lanes = [("i", ""), ("j", "_2")] if pair else [("i", "")]
    inner = []
    if pair:
        # The second lane is element i + blockDim; past the chunk's end it repeats the
        # first (its loads merge, its math is dead code, its stores are skipped).
        inner += ["j = i + nt", "second = j < n", "if not second:", "    j = i"]
    inner += _update_body(layout, lanes) + [f"i += {'nt * 2' if pair else 'nt'}"]
    body = (_chunk_offsets(layout) + _row_values(layout)
            + ["i = cuda.threadIdx.x", "while i < n:"] + _indent(inner, 1))
    return _kernel_source(name, layout, "chunks, h, grad_scale, row_values, seed",
                          [freeze, "nt = cuda.blockDim.x"], "chunks", body)


def _blockwise_step_source(name, layout, freeze, threads, warp):
    """The step over a layout with blockwise columns (see the module docstring); launched
    with ``threads`` threads per block, ``warp`` lanes per warp (both powers of two)."""
    size = layout.block
    if any(x <= 0 or x & (x - 1) for x in (size, threads, warp)) or warp > threads:
        raise ValueError(f"block ({size}), threads ({threads}) and warp ({warp}) must be powers "
                         "of two, the warp no wider than the threads")
    reps = max(1, size // threads)          # elements per thread of one quantization block
    seg = min(size, threads)                # threads per quantization block
    width = min(seg, warp)                  # lanes of a block within one warp
    warps = seg // width                    # warps per quantization block
    blocked = layout.blockwise
    kinds = map_kinds(layout.formats, layout.reads)
    kind_of = {k: _MAP_KINDS[layout.formats[k]] for k in blocked}
    more = [f"a{k}_span" for k in blocked] + [f"{table}_{kind}" for kind in kinds
                                              for table in ("qmap", "mid", "lut")]
    # The maps and encoder tables in shared memory, filled once per thread block.
    head = [freeze, "nt = cuda.blockDim.x", "t = cuda.threadIdx.x"]
    for kind in kinds:
        head += [f"q_{kind} = cuda.shared.array({_MAP_SIZE}, np.float32)",
                 f"m_{kind} = cuda.shared.array({_MAP_SIZE}, np.float32)",
                 f"l_{kind} = cuda.shared.array({_LUT_WORDS}, np.uint32)"]
    fill = [f"l_{kind}[i] = lut_{kind}[i]" for kind in kinds] + [f"if i < {_MAP_SIZE}:"]
    fill += [line for kind in kinds for line in (f"    q_{kind}[i] = qmap_{kind}[i]",
                                                 f"    m_{kind}[i] = mid_{kind}[i]")]
    head += ["i = t", f"while i < {_LUT_WORDS}:"] + _indent(fill + ["i += nt"], 1)
    for k in blocked:
        if warps > 1:       # each warp's maximum, by iteration parity
            head.append(f"red{k} = cuda.shared.array((2, {threads // warp}), np.int32)")
        if reps > 1:        # the thread's new values of the quantization block
            head.append(f"v{k} = cuda.local.array({reps}, np.float32)")
    head += ["cuda.syncthreads()", "it = 0"]

    def value(k):
        return f"v{k}[r]" if reps > 1 else f"v{k}"

    def keep(k, result):
        return [f"{value(k)} = {result}",
                f"top{k} = larger(top{k}, magnitude_bits({value(k)}))"]

    lane = (_lane_loads(layout, "e", "", scaled=True)
            + [f"out = {_call('element', '', layout.n_slots)}"]
            + _lane_stores(layout, "out", 0, True, "e", "", keep))
    encode = [f"s{k}_span[np.uint64(o_s{k} + e)] = encode({value(k)} * inv{k}, l_{kind_of[k]}, "
              f"m_{kind_of[k]})" for k in blocked]

    def over_lanes(lines):
        if reps == 1:
            return ["if e < n:"] + _indent(lines, 1)
        return [f"for r in range({reps}):", f"    e = base + r * {threads} + t",
                "    if e < n:"] + _indent(lines, 2)

    first = FIRST_OFFSET + 2 + layout.n_slots + layout.extra_columns
    offsets = [f"o_a{k} = chunks[c, {first + j}]" for j, k in enumerate(blocked)]
    inner = [f"qb = (base + t) // {size}", f"live = qb * {size} < n"]
    inner += [f"old{k} = a{k}_span[np.uint64(o_a{k} + qb)] if live else np.float32(0.0)"
              for k in blocked]
    inner += [f"top{k} = np.int32(0)" for k in blocked]
    if reps == 1:
        inner += [f"v{k} = np.float32(0.0)" for k in blocked] + ["e = base + t"]
    inner += over_lanes(lane)
    shift = width // 2
    while shift:
        inner += [f"top{k} = larger(top{k}, warp_xor(top{k}, {shift}))" for k in blocked]
        shift //= 2
    if warps > 1:
        inner += [f"if t % {warp} == 0:"] + [f"    red{k}[it & 1, t // {warp}] = top{k}"
                                              for k in blocked]
        inner += ["cuda.syncthreads()", f"w0 = (t - t % {seg}) // {warp}"]
        for k in blocked:
            inner.append(f"top{k} = red{k}[it & 1, w0]")
            inner += [f"top{k} = larger(top{k}, red{k}[it & 1, w0 + {j}])" for j in range(1, warps)]
        inner.append("it += 1")
    inner += [f"new{k} = bits_float(np.int64(top{k}))" for k in blocked]
    inner += [f"if live and t % {seg} == 0:"] + [f"    a{k}_span[np.uint64(o_a{k} + qb)] = new{k}"
                                                for k in blocked]
    inner += [f"inv{k} = inverse(new{k})" for k in blocked]
    inner += over_lanes(encode) + [f"base += {reps * threads}"]
    body = (_chunk_offsets(layout) + offsets + _row_values(layout)
            + ["base = 0", "while base < n:"] + _indent(inner, 1))
    return _kernel_source(name, layout, "chunks, h, grad_scale, row_values, seed", head,
                          "chunks", body, more)


def _reduce_source(name, layout, freeze, write_p, maximum, rblock):
    """Per-chunk partials of a reducer. Blockwise columns are read-only here (a step
    re-encodes them): each element's code is decoded with its quantization block's
    absmax, ``qmap[code] * a<k>[o_a<k> + i // block]`` (chunks hold whole blocks), the
    map read from the table's ``qmap`` argument; the kernel takes the step's arguments
    (absmax spans and map tables after the spans) and leaves the encoder tables alone."""
    combine = (["sa[t] = max(sa[t], sa[t + s])", "sb[t] = max(sb[t], sb[t + s])"] if maximum
               else ["sa[t] += sa[t + s]", "sb[t] += sb[t + s]"])
    blocked = layout.blockwise
    if any(layout.writes[k] for k in blocked):
        raise ValueError("a reduction stores no blockwise column (the step re-encodes it)")
    more, offsets, decode = [], [], []
    if blocked:
        more = [f"a{k}_span" for k in blocked] + [
            f"{table}_{kind}" for kind in map_kinds(layout.formats, layout.reads)
            for table in ("qmap", "mid", "lut")]
        first = FIRST_OFFSET + 2 + layout.n_slots + layout.extra_columns
        offsets = [f"o_a{k} = chunks[c, {first + j}]" for j, k in enumerate(blocked)]
        decode = [f"old{k} = a{k}_span[np.uint64(o_a{k} + i // {layout.block})]" for k in blocked]
    # float64 partial sums, deliberately: a chunk's sum may have millions of terms. One
    # partial per chunk from a fixed-shape tree: the result is deterministic.
    body = (_chunk_offsets(layout) + offsets
            + ["acc_a = 0.0", "acc_b = 0.0", "i = t", "while i < n:"]
            + _indent(decode + _reduce_body(layout, write_p, maximum) + [f"i += {rblock}"], 1)
            + ["sa[t] = acc_a", "sb[t] = acc_b", "cuda.syncthreads()", f"s = {rblock // 2}",
               "while s > 0:", "    if t < s:"] + _indent(combine, 2)
            + ["    cuda.syncthreads()", "    s //= 2",
               "if t == 0:", "    out[c, 0] = sa[0]", "    out[c, 1] = sb[0]",
               "cuda.syncthreads()"])
    head = [freeze, f"sa = cuda.shared.array({rblock}, np.float64)",
            f"sb = cuda.shared.array({rblock}, np.float64)", "t = cuda.threadIdx.x"]
    head += [f"q_{kind} = qmap_{kind}" for kind in map_kinds(layout.formats, layout.reads)]
    return _kernel_source(name, layout, "chunks, h, out", head, "chunks", body, more)


def _rows_source(name, layout, freeze):
    if layout.model or layout.row_mode:
        raise ValueError("sparse rows take neither a model column nor per-row values")
    # Block c updates param row index[c] from gradient row c; every other column is
    # indexed by the param row.
    offsets = ["n = width", "r = np.int64(index[c])", "o_p = r * width", "o_g = c * width",
               "scale = grad_scale"]
    offsets += [f"o_s{k} = o_p" for k in range(layout.n_slots) if layout.reads[k]]
    body = (offsets + ["i = cuda.threadIdx.x", "while i < n:"]
            + _indent(_update_body(layout, [("i", "")]) + ["i += nt"], 1))
    return _kernel_source(name, layout, "index, width, h, grad_scale",
                          [freeze, "nt = cuda.blockDim.x"], "index", body)


# -- kernels ---------------------------------------------------------------------------------------
class Generated:
    """A kernel's source text and the names its globals must hold."""

    def __init__(self, name, text, scalars_class):
        self.name, self.text, self.scalars_class = name, text, scalars_class


def generate(kind, fn, layout, flags=(), scalars=None, pair=False, maximum=False,
             write_p=False, rblock=256, threads=256, warp=32) -> Generated:
    """The source of the ``kind`` kernel (STEP, REDUCE or ROWS) for element (or reducer)
    ``fn`` over ``layout``, with the bool fields ``flags`` of ``scalars`` frozen.
    ``threads`` and ``warp``: the launch's threads per block and lanes per warp, which a
    blockwise step is written for."""
    named = scalars is not None and hasattr(scalars, "_fields")
    freeze = _freeze(flags, len(scalars) if scalars is not None else 0, named)
    extra = ""
    if layout.block and kind == ROWS:
        raise ValueError("blockwise columns have a step and a reduction kernel, not a rows kernel")
    if kind == STEP and layout.block:
        extra = f"_t{threads}w{warp}"
    elif kind == STEP:
        extra = "_pair" if pair else ""
    elif kind == REDUCE:
        extra = f"_{'max' if maximum else 'sum'}{rblock}" + ("_p" if write_p else "")
    name = driver_name(f"cuda_{kind}", fn, layout, flags, extra)
    if kind == STEP and layout.block:
        text = _blockwise_step_source(name, layout, freeze, threads, warp)
    elif kind == STEP:
        text = _step_source(name, layout, freeze, pair)
    elif kind == REDUCE:
        text = _reduce_source(name, layout, freeze, write_p, maximum, rblock)
    else:
        text = _rows_source(name, layout, freeze)
    origin = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn.__name__)}"
    # The conversions' source tag too: numba's disk cache knows only this file, so any
    # change to what the kernel calls must change its text.
    header = (f'"""Generated by fastopt.kernels.cuda_codegen: do not edit.\n\n'
              f"{kind} kernel of {origin} (source tag {source_tag(fn)}, format conversions "
              f"{source_tag(cuda_formats)}) over\n{layout!r}\n"
              f'{"frozen flags " + repr(flags) if flags else "no frozen flags"}.\n"""\n\n\n')
    return Generated(name, header + text, type(scalars) if named else None)


def format_functions(jit) -> dict:
    """kernels/cuda_formats.py's functions compiled by ``jit`` (``cuda.jit(device=True)``),
    each calling the others' device versions."""
    built = {"np": np}
    for name, fn in cuda_formats.FUNCTIONS.items():
        built[name] = jit(pytypes.FunctionType(fn.__code__, built, name))
    return {name: built[name] for name in cuda_formats.FUNCTIONS}
