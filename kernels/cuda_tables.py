"""The CUDA driver's device arrays: spans, streams, storage formats and chunk tables.

``kernels/cuda.py`` launches kernels over what this module builds: a *span* per column
(a 1-D device array over raw memory from a column's lowest address to its highest
tensor's end, owning nothing) and the device *chunk table* of a step, cached by address.
See ``kernels/cuda.py`` for the layout and ``kernels/cuda_codegen.py`` for the chunk
table's columns.

Blockwise 8-bit columns (kernels/layout.py BLOCKWISE: uint8 codes, one float32 absmax
per block of ``block`` elements) add one address column per blockwise state, the
absmax arrays', after the state columns and the model copy (as the CPU table's); their
spans hold one value per block, and chunks hold whole blocks. The maps and encoder
tables they are decoded and encoded with are device arrays made once per process
(:func:`encoder_tables`).
"""
from __future__ import annotations

import collections
import math
import os
from typing import NamedTuple

import numpy as np
from numba import config as _numba_config
from numba import cuda

from . import cuda_codegen as codegen
from .cpu import CHUNK as CPU_CHUNK
from .cpu import merge_runs
from .layout import BFLOAT16, BLOCKWISE, FLOAT16, FORMATS, NATIVE
from .lowp import bfloat16_dtype

SIMULATOR = bool(getattr(_numba_config, "ENABLE_CUDASIM", False)) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


# -- arrays, spans and streams ---------------------------------------------------------------
def describe(a):
    """(address, number of elements, dtype, kind) of a device array (or, under the
    simulator, a NumPy array standing in for one)."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None and not isinstance(a, np.ndarray):
        strides = cai.get("strides")
        dtype = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
            raise ValueError("the CUDA backend needs C-contiguous arrays, got strides "
                             f"{tuple(strides)} for shape {shape}")
        return int(cai["data"][0]), math.prod(shape), dtype, type(a).__module__.split(".")[0]
    if isinstance(a, np.ndarray):
        if not SIMULATOR:
            raise TypeError("backend 'cuda' steps device arrays (CuPy arrays, torch CUDA tensors, "
                            "anything with __cuda_array_interface__), got a NumPy array; move it "
                            "to the device or use backend='cpu'")
        if not a.flags.c_contiguous:
            raise ValueError("the CUDA backend needs C-contiguous arrays")
        return int(a.__array_interface__["data"][0]), int(a.size), a.dtype, "host"
    raise TypeError(f"backend 'cuda' steps arrays with __cuda_array_interface__, got {type(a).__name__}")


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _HostSpan:
    """A NumPy view of ``length`` elements at ``address`` (simulator only; touches nothing)."""

    def __init__(self, address, length, dtype):
        self.__array_interface__ = {"shape": (length,), "typestr": dtype.str,
                                    "data": (address, False), "version": 3}


def span(address, length, dtype):
    """A 1-D device array of ``length`` elements at ``address``, owning nothing."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.asarray(_HostSpan(address, length, dtype)))
    desc = {"shape": (length,), "strides": None, "typestr": dtype.str,
            "data": (address, False), "version": 3}
    # No 'stream' entry: nothing to synchronise on.
    return cuda.from_cuda_array_interface(desc, owner=None, sync=False)


_STREAMS: dict = {}


def current_stream(kind: str, sample=None):
    """The numba stream to launch on: the array library's current stream."""
    if SIMULATOR:
        return 0
    ptr = 0
    if kind == "cupy":
        import cupy
        ptr = cupy.cuda.get_current_stream().ptr
    elif kind == "torch":
        import torch
        ptr = torch.cuda.current_stream(sample.device).cuda_stream
    elif sample is not None:
        st = getattr(sample, "stream", 0)      # numba device arrays carry their stream
        return st if st else 0
    if not ptr:
        return 0                                # the legacy default stream
    stream = _STREAMS.get(ptr)
    if stream is None:
        stream = _STREAMS[ptr] = cuda.external_stream(ptr)
    return stream


# -- storage of the columns -----------------------------------------------------------------
_BITS = (np.dtype(np.uint16), np.dtype(np.int16))   # 16-bit patterns, format given or bfloat16
_CODES = np.dtype(np.uint8)                          # blockwise columns' codes


def format_of(dt, given, native, what) -> str:
    """The storage format of an array of dtype ``dt``: ``given``, checked, or read from
    ``dt`` (``native`` is the params' dtype, None for a model copy; float16 and ml_dtypes
    bfloat16 arrays say their format). 16-bit integer arrays hold the patterns of either
    format, so a state column of them needs its format given; a model copy of them is
    bfloat16 (CuPy has no bfloat16 dtype and torch's bfloat16 tensors no
    ``__cuda_array_interface__``: their uint16 or int16 views are what reaches here)."""
    dt = np.dtype(dt)
    bf16 = bfloat16_dtype()
    is_bf16 = bf16 is not None and dt == bf16
    if given in BLOCKWISE:
        if native != np.float32:
            raise TypeError(f"{what}: a {given!r} state column needs float32 params (or float32 "
                            f"master weights), not {native}")
        if dt != _CODES:
            raise TypeError(f"{what} is {dt}, which cannot be {given}: its codes are uint8")
        return given
    if given is None:
        if native is not None and dt == native:
            return NATIVE
        if dt == np.float16:
            return FLOAT16
        if is_bf16 or (native is None and dt in _BITS):
            return BFLOAT16
        if dt in _BITS:
            raise TypeError(f"{what} is {dt}, the bits of a 16-bit format: give its format "
                            "(formats=..., 'float16' or 'bfloat16')")
    elif given not in FORMATS:
        raise ValueError(f"{what}: unknown storage format {given!r}; expected one of {FORMATS}")
    elif {NATIVE: native is not None and dt == native, FLOAT16: dt == np.float16 or dt in _BITS,
          BFLOAT16: is_bf16 or dt in _BITS}[given]:
        return given
    raise TypeError(f"{what} is {dt}, which cannot be "
                    + (f"{given}" if given else f"a state of a {native} step (native, float16 or bfloat16)"))


class _Columns(NamedTuple):
    """How a table's columns are stored (part of its cache key)."""
    dtype: np.dtype         # the params': float32 or float64 (float32 masters with a model)
    has: tuple              # per state position: present
    formats: tuple          # per state position: its storage format
    model: str              # "" or the 16-bit format of the model copy, or of pure params
    block: int = 0          # elements per block of the blockwise columns (0: none)
    pure: str = ""          # 16-bit params without master weights: "kahan" or "stochastic"

    @property
    def extra(self) -> bool:
        """A column after the state columns: the model copy of master weights, or the
        Kahan compensation of pure 16-bit params."""
        return bool(self.model) and self.pure != "stochastic"

    @property
    def blockwise(self) -> tuple:
        """The present blockwise state positions, in order (their absmax columns')."""
        return tuple(k for k, (h, f) in enumerate(zip(self.has, self.formats))
                     if h and f in BLOCKWISE)

    def storage(self) -> list:
        """The element dtype of each address column: p, g, s0 .. s{K-1}, the model copy
        or Kahan column (:attr:`extra`), and the absmax (float32) of each blockwise column."""
        u16 = np.dtype(np.uint16)
        grad = u16 if self.model else self.dtype
        states = [(self.dtype if f == NATIVE else _CODES if f in BLOCKWISE else u16) if h else grad
                  for h, f in zip(self.has, self.formats)]
        return ([u16 if self.pure else self.dtype, grad] + states + ([u16] if self.extra else [])
                + [np.dtype(np.float32)] * len(self.blockwise))


# -- the table ------------------------------------------------------------------------------
def chunk_size(total: int, chunking, block: int = 0) -> int:
    """Elements per chunk for a step of ``total`` elements; ``chunking``: (at least, at
    most, chunks wanted per step), the driver's launch geometry; ``block`` (a power of
    two): chunks hold whole blocks of the blockwise columns."""
    least, most, wanted = chunking
    want = max(1, -(-total // wanted))
    return int(max(min(most, max(least, 1 << (want - 1).bit_length())), block))


def cpu_positions(sizes, row_of, lo, size) -> np.ndarray:
    """Each chunk's first element's position as the CPU driver counts positions for
    stochastic rounding (chunk c of its table, CPU_CHUNK elements, starts at
    c * CPU_CHUNK), so both drivers draw the same random bits for the same step."""
    if CPU_CHUNK % size:
        raise ValueError(f"CUDA chunks of {size} elements straddle the CPU's chunks of {CPU_CHUNK}")
    cpu_chunks = -(-sizes // CPU_CHUNK)
    cpu_first = np.cumsum(cpu_chunks) - cpu_chunks
    return (cpu_first[row_of] + lo // CPU_CHUNK) * CPU_CHUNK + lo % CPU_CHUNK


class _DeviceTable:
    """The device side of a table: host rows and chunks, spans, device chunk table.

    It depends only on addresses, sizes, storage and chunking, and references no array
    (the spans own nothing), so device tables are cached by address.
    """

    __slots__ = ("rows", "chunks", "starts", "args", "n_elements", "n_chunks", "partials",
                 "row_values")

    def __init__(self, rows, columns: _Columns, merge, chunking, stream=0):
        self.partials = None                 # the reduction's per-chunk output, made once
        self.row_values = None               # per-row values of per-tensor steps, made once
        storage = columns.storage()
        itemsizes = np.array([d.itemsize for d in storage], dtype=np.int64)
        n_absmax, block = len(columns.blockwise), columns.block
        # absmax columns: one float32 per block of a row (a row starts a block)
        per_element = np.array([1] * (len(storage) - n_absmax) + [block] * n_absmax, dtype=np.int64)
        rows = merge_runs(rows, itemsizes, block, n_absmax) if merge else rows
        self.rows = rows
        sizes = rows[:, 0]
        self.n_elements = int(sizes.sum())
        self.n_chunks = 0
        self.chunks = np.zeros((0, 3), dtype=np.int64)
        self.starts = np.zeros(0, dtype=np.int64)       # each row's first chunk
        self.args = None
        if rows.shape[0] == 0:
            return
        # Spans: one per column, from its lowest address to its highest tensor's end.
        base = rows[:, 1:].min(axis=0)
        end = (rows[:, 1:] + -(-sizes[:, None] // per_element) * itemsizes).max(axis=0)
        rel = rows[:, 1:] - base
        if np.any(rel % itemsizes):
            raise ValueError("CUDA step: tensor addresses are not aligned to their elements")
        offsets = rel // itemsizes
        spans, made = [], {}
        for k, dt in enumerate(storage):
            key = (int(base[k]), int(end[k]), dt.str)
            if key not in made:
                made[key] = span(key[0], (key[1] - key[0]) // dt.itemsize, dt)
            spans.append(made[key])
        if not columns.extra:
            # the kernel's model argument (before any absmax span), never touched
            spans.insert(len(storage) - n_absmax, spans[1])
        # Chunks: (row, lo, hi) on the host; (count, position, row, offsets + lo) on the device.
        size = chunk_size(self.n_elements, chunking, block)
        counts = -(-sizes // size)
        row_of = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
        self.starts = np.cumsum(counts) - counts
        first = np.repeat(self.starts, counts)
        lo = (np.arange(row_of.size, dtype=np.int64) - first) * size
        hi = np.minimum(lo + size, sizes[row_of])
        self.chunks = np.ascontiguousarray(np.stack([row_of, lo, hi], axis=1))
        device = np.empty((row_of.size, codegen.FIRST_OFFSET + len(storage)), dtype=np.int64)
        device[:, codegen.COUNT] = hi - lo
        device[:, codegen.POSITION] = cpu_positions(sizes, row_of, lo, size)
        device[:, codegen.ROW] = row_of
        device[:, codegen.FIRST_OFFSET:] = offsets[row_of] + lo[:, None] // per_element
        self.n_chunks = int(row_of.size)
        # The maps and encoder tables of the blockwise columns, by kind (kernel arguments
        # after the spans, as kernels/cuda_codegen.py names them).
        tables = []
        for kind in codegen.map_kinds(columns.formats, columns.has):
            tables += encoder_tables(kind)
        # Uploaded on the stream the step will launch on, so the launch is ordered after
        # the copy even on a non-blocking stream (the legacy default stream is not).
        self.args = tuple(spans) + tuple(tables) + (cuda.to_device(device, stream=stream),)


class CudaTable:
    """The device-side description of one step over aligned lists of device arrays.

    Attributes:
      table: host int64 rows ``(n, p, g, s0 .. s{K-1}[, w][, absmax ..])`` of addresses, as
        the CPU table.
      chunks: host int64 ``(row, lo, hi)`` per chunk, as the CPU table (combine
        reduction partials per row with ``np.add.reduceat``).
      args: the kernel's array arguments (a span per column and the device chunk table).
      has, formats, model: per state position, present and storage format; the model
        copy's format ("" without master weights).
      block, scales: the blockwise columns' block size (0 without them) and absmax arrays.
      kind: the array library ("cupy", "torch", ...), which says whose current stream to use.
      refs: the arrays, kept alive while the table lives (it holds their raw addresses).
    """

    __slots__ = ("layout", "columns", "dtype", "cast", "kind", "sample", "refs", "fixed", "merge",
                 "chunking")

    def __init__(self, layout, columns, kind, sample, refs, fixed, merge, chunking):
        self.layout, self.columns, self.chunking = layout, columns, chunking
        self.dtype, self.cast = columns.dtype, columns.dtype.type
        self.kind, self.sample, self.refs = kind, sample, refs
        self.fixed, self.merge = fixed, merge

    table = property(lambda self: self.layout.rows)
    chunks = property(lambda self: self.layout.chunks)
    starts = property(lambda self: self.layout.starts)
    args = property(lambda self: self.layout.args)
    n_elements = property(lambda self: self.layout.n_elements)
    n_chunks = property(lambda self: self.layout.n_chunks)
    has = property(lambda self: self.columns.has)
    formats = property(lambda self: self.columns.formats)
    model = property(lambda self: self.columns.model)
    n_slots = property(lambda self: len(self.columns.has))
    block = property(lambda self: self.columns.block)
    scales = property(lambda self: self.refs[4])

    def with_grads(self, grads, grad_addresses=None) -> "CudaTable":
        """The same params and state over new gradient arrays."""
        params, _, slots, model, scales = self.refs
        if grad_addresses is None:
            grad_addresses = [describe(g)[0] for g in grads]
        return TABLES(self.fixed, grad_addresses, self.columns, self.kind, self.sample,
                      self.merge, (params, grads, slots, model, scales), self.chunking)


def fixed_columns(params, slots, model, formats, scales=None, block=0, pure=None):
    """(columns n, p, s0 .. s{K-1}, w[, absmax ..] per tensor, their storage, kind), read
    and checked once. ``scales``/``block``: the blockwise columns' absmax arrays (one
    list per state position, None elsewhere) and block size, as ``cpu.ChunkTable``.
    ``pure`` ("kahan" or "stochastic"): the params are 16-bit, without master weights;
    ``model`` is then their Kahan compensation arrays (16-bit, as the params), or None."""
    n_slots = len(slots)
    fixed = np.zeros((len(params), 3 + n_slots), dtype=np.int64)
    dtype = kind = None
    for i, p in enumerate(params):
        addr, n, dt, kd = describe(p)
        if dtype is None:
            dtype, kind = dt, kd
        elif dt != dtype:
            raise TypeError(f"one CUDA step takes one dtype, got {dtype} and {dt}")
        fixed[i, :2] = n, addr
    dtype = dtype or np.dtype(np.float32)
    pure_format = ""
    if pure is not None:
        if pure not in ("kahan", "stochastic"):
            raise ValueError(f"pure must be 'kahan' or 'stochastic', got {pure!r}")
        if (pure == "kahan") != (model is not None):
            raise ValueError("pure='kahan' needs its compensation arrays (model=), pure='stochastic' none")
        if dtype in (np.float32, np.float64):
            raise TypeError(f"pure 16-bit steps take float16 or bfloat16 params, got {dtype}")
        pure_format = format_of(dtype, None, None, "the params")
        if pure == "stochastic" and pure_format != BFLOAT16:
            raise TypeError("stochastic rounding of pure 16-bit params is for bfloat16, got float16")
        dtype = np.dtype(np.float32)          # the arithmetic's (and the state's native) dtype
    elif model is not None and dtype != np.float32:
        raise TypeError(f"master weights are float32, got params of {dtype}")
    given = (None,) * n_slots if formats is None else tuple(formats)
    if len(given) != n_slots:
        raise ValueError(f"formats: one per state position ({n_slots}), got {len(given)}")
    found = []
    for k, s in enumerate(slots):
        fmt = given[k] or NATIVE
        if s is None and fmt in BLOCKWISE:
            fmt = NATIVE                # an absent column is the gradient: nothing blockwise
        for i in range(len(params) if s is not None else 0):
            addr, n, dt, _ = describe(s[i])
            fmt = format_of(dt, given[k] if i == 0 else fmt, dtype, f"state {k} of tensor {i}")
            same_size(n, fixed[i, 0], f"state {k} of tensor {i}")
            fixed[i, 2 + k] = addr
        found.append(fmt)
    model_format = pure_format
    what = "Kahan compensation" if pure else "model copy"
    for i, w in enumerate(model or ()):
        addr, n, dt, _ = describe(w)
        model_format = format_of(dt, model_format or None, None, f"{what} of tensor {i}")
        same_size(n, fixed[i, 0], f"{what} of tensor {i}")
        fixed[i, 2 + n_slots] = addr
    has = tuple(s is not None for s in slots)
    columns = _Columns(dtype, has, tuple(found), model_format, pure=pure or "")
    if columns.blockwise:
        block = _check_blockwise(params, columns.blockwise, scales, block)
        columns = columns._replace(block=block)
        absmax = np.zeros((len(params), len(columns.blockwise)), dtype=np.int64)
        for j, k in enumerate(columns.blockwise):
            for i, a in enumerate(scales[k]):
                addr, n, dt, _ = describe(a)
                want = -(-int(fixed[i, 0]) // block)
                if dt != np.float32 or n != want:
                    raise ValueError(f"the absmax of state {k} of tensor {i} must be {want} float32 "
                                     f"values (one per block of {block}), got {n} {dt}")
                absmax[i, j] = addr
        fixed = np.concatenate([fixed, absmax], axis=1)
    return fixed, columns, kind or "host"


def _check_blockwise(params, blocked, scales, block) -> int:
    """The checked block size of a table with blockwise state positions ``blocked``."""
    block = int(block)
    if block <= 0 or CPU_CHUNK % block:
        raise ValueError(f"block must be a positive divisor of {CPU_CHUNK} (a power of two), "
                         f"got {block}")
    for k in blocked:
        if scales is None or len(scales) <= k or scales[k] is None or len(scales[k]) != len(params):
            raise ValueError(f"blockwise column {k} needs scales: one absmax array per param")
    return block


def grad_addresses(grads, columns: _Columns, fixed) -> list:
    """The gradients' addresses, each checked against its param: the params' dtype, or
    16-bit as the model copy with master weights."""
    addresses = []
    for i, g in enumerate(grads):
        addr, n, dt, _ = describe(g)
        if columns.model:
            format_of(dt, columns.model, None, f"gradient {i} of a master-weight step")
        elif dt != columns.dtype:
            raise TypeError(f"gradient {i} is {dt}, expected {columns.dtype}"
                            + ("; 16-bit gradients need the table of their master weights "
                               "(model=the 16-bit params)" if dt.itemsize == 2 else ""))
        same_size(n, fixed[i, 0], f"gradient {i}")
        addresses.append(addr)
    return addresses


def same_size(n, want, what):
    if n != want:
        raise ValueError(f"{what} has {n} elements, its param {want}")


class _TableCache:
    """Builds tables over the last few layouts, keyed by address: a repeated call over the
    same arrays (the functional API, a regrad back to earlier gradients) reuses the device
    chunk table instead of allocating and uploading a new one."""

    def __init__(self, size=32):
        self.size = size
        self.layouts: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, fixed, grad_addresses, columns, kind, sample, merge, refs, chunking):
        g_addr = np.asarray(grad_addresses, dtype=np.int64).reshape(-1)
        n_slots = len(columns.has)
        n_absmax = len(columns.blockwise)
        width = 3 + n_slots + columns.extra
        full = np.empty((fixed.shape[0], width + n_absmax), dtype=np.int64)
        full[:, :2] = fixed[:, :2]
        full[:, 2] = g_addr
        for k in range(n_slots):
            full[:, 3 + k] = fixed[:, 2 + k] if columns.has[k] else g_addr
        if columns.extra:
            full[:, 3 + n_slots] = fixed[:, 2 + n_slots]
        if n_absmax:
            full[:, width:] = fixed[:, 3 + n_slots:]
        full = full[full[:, 0] > 0]
        key = (columns, merge, chunking, full.tobytes())
        layout = self.layouts.get(key)
        if layout is not None:
            self.layouts.move_to_end(key)
        else:
            stream = current_stream(kind, sample) if kind != "host" else 0
            layout = self.layouts[key] = _DeviceTable(full, columns, merge, chunking, stream)
            while len(self.layouts) > self.size:
                self.layouts.popitem(last=False)
        return CudaTable(layout, columns, kind, sample, refs, fixed, merge, chunking)


TABLES = _TableCache()


_ENCODER_TABLES: dict = {}


def encoder_host_tables(kind: str) -> tuple:
    """``(qmap, mid, lut)`` of the ``kind`` dynamic map ("signed", "unsigned") on the
    host: its 256 float32 values; ``mid[c]``, the largest float32 at which code ``c`` is
    still nearer than ``c + 1`` (255 of them, then infinity); ``lut``, the code of the
    lowest value of each of the 8192 buckets of kernels/blockwise.py, 4 to a uint32
    word (little-endian, as the device reads them). The thresholds and buckets are
    blockwise's own, so kernels/cuda_formats.encode gives the CPU encoder's codes."""
    from . import blockwise
    qmap = blockwise.dynamic_map(kind)
    mid = np.full(256, np.inf, dtype=np.float32)
    mid[:255] = blockwise.thresholds(qmap)
    lowest, _ = blockwise.bucket_bounds()
    lut = np.searchsorted(mid[:255], lowest, side="left").astype(np.uint8)
    return qmap, mid, lut.view("<u4")


def encoder_tables(kind: str) -> tuple:
    """:func:`encoder_host_tables` as device arrays, made once per process."""
    tables = _ENCODER_TABLES.get(kind)
    if tables is None:
        tables = _ENCODER_TABLES[kind] = tuple(cuda.to_device(np.ascontiguousarray(a))
                                               for a in encoder_host_tables(kind))
    return tables


def index_description(index):
    """(device address or None for a host array, length, dtype, kind) of a row index."""
    if isinstance(index, np.ndarray) or not hasattr(index, "__cuda_array_interface__"):
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise ValueError(f"index must be a 1-D integer array, got {index.dtype} of shape {index.shape}")
        return None, int(index.size), index.dtype, "host"
    addr, n, dt, kind = describe(index)
    if dt.kind not in "iu" or len(shape_of(index)) != 1:
        raise ValueError(f"index must be a 1-D integer array, got {dt}")
    return addr, n, dt, kind


def shape_of(a) -> tuple:
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None and not isinstance(a, np.ndarray):
        return tuple(cai["shape"])
    return tuple(np.shape(a))
