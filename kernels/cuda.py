"""The CUDA driver: one kernel launch per step over a device-side chunk table.

A step over any number of tensors of one dtype is described, as on the CPU, by rows
``(n, p_addr, g_addr, s0_addr, s1_addr, s2_addr)`` (back-to-back tensors merged, so a
FlatParams arena is one row; an absent state slot repeats the grad address). On the
device the rows become one *chunk table* and five *span arrays*:

- ``span[k]`` is a 1-D array of the storage dtype starting at the lowest address of
  column ``k`` (params, grads, s0, s1, s2) and long enough to reach its highest tensor's
  end. It is pointer arithmetic written as array indexing: the kernel only touches the
  elements of the tensors named in the table, never the memory between them.
- ``chunks[c] = (count, p, g, s0, s1, s2, row)``: chunk ``c`` is ``count`` consecutive
  elements starting at those element offsets into the spans (at most a few thousand,
  sized so a step has enough chunks to fill the device), all in row ``row``.

The kernel is a grid-stride loop over chunks (one block per chunk at a time, its threads
striding over the chunk's elements, so loads coalesce; with ``PAIR`` each thread takes
two elements per iteration, all their loads issued first), with the optimizer's element
function compiled by ``cuda.jit(device=True)`` and inlined per (element, slot mask), the
same function the CPU driver inlines. Host scalars (a NamedTuple) and ``grad_scale`` are
kernel arguments, and the launch goes to the arrays' library's current stream (CuPy's
or torch's); nothing is synchronised or allocated per step. Per-tensor steps (LAMB,
LARS, Keras clipnorm; kernels/per_tensor.py) also pass a device array of one value per
row of a ``merge=False`` table, a gradient multiplier or a read-only third state
argument as the CPU driver's ``row_values``; their norm pass copies per-chunk partials
to the host (the one synchronisation such a step needs). A table is built (and its
chunk table uploaded, synchronously) once per set of arrays; layouts are cached by
address, so recurring arrays (the functional API, gradient buffers that come back at
the same addresses) reuse the device table.

The same kernel runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), where the
spans are NumPy views of host memory, so the simulator exercises exactly the code the
GPU runs, list mode included; only span construction and stream selection differ.
"""
from __future__ import annotations

import collections
import math
import os
import types as pytypes
import warnings

import numpy as np
from numba import config as _numba_config
from numba import cuda

from .cpu import merge_runs
from .specialize import source_tag

SIMULATOR = bool(getattr(_numba_config, "ENABLE_CUDASIM", False)) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# Launch geometry. Chunks: at least CHUNK_MIN elements (a block's threads stride over
# them), at most CHUNK_MAX, sized so a step has about TARGET_CHUNKS of them. Merged rows
# split evenly; a small tensor in list mode is one chunk of its own size.
BLOCK = 256
CHUNK_MIN = 1024
CHUNK_MAX = 8192
TARGET_CHUNKS = 2048
MAX_GRID = 1 << 16          # beyond this, blocks stride over several chunks
REDUCE_BLOCK = 256          # compile-time: the reduction's shared-memory tree
# compile-time: two elements per thread per iteration. Off: on an H100 (256M fp32 Adam)
# one element per thread ran at 2797 GB/s against 2466 GB/s with pairs.
PAIR = False
# The simulator runs every CUDA thread as a Python thread: tiny blocks and chunks keep
# tests fast while still crossing chunk and block boundaries.
if SIMULATOR:
    BLOCK, CHUNK_MIN, CHUNK_MAX, TARGET_CHUNKS, REDUCE_BLOCK, MAX_GRID = 4, 8, 32, 16, 4, 3

TABLE_CACHE = 32            # tables cached by address (functional API calls)


# -- kernels -----------------------------------------------------------------------------
def _step_template(p_span, g_span, s0_span, s1_span, s2_span, chunks, h, grad_scale, row_values):
    # ELEMENT, HAS0..2 (slots read), WRITE0..2 (slots written: HAS, or fewer), PAIR and
    # ROW_MODE are compile-time constants injected by _instantiate.
    # PAIR: each thread takes elements i and i + blockDim per iteration, all ten loads
    # issued before any math (twice the bytes in flight per thread). Without PAIR the
    # second lane is the first one again: its loads merge and its math is dead code.
    # while loops, not range(): range computes a 64-bit trip count (a division).
    # ROW_MODE (as the CPU driver): 0, row_values is () and never read; 1, the chunk's
    # row's row_values entry also multiplies its gradients (a per-tensor clip factor);
    # 2, that entry is the element's third state argument, read-only (a trust ratio).
    # The row is column 6 of the chunk table, read once per chunk in modes 1 and 2 only.
    nt = cuda.blockDim.x
    stride = nt * 2 if PAIR else nt  # noqa: F821
    c = cuda.blockIdx.x
    while c < chunks.shape[0]:
        n = chunks[c, 0]
        po = chunks[c, 1]
        go = chunks[c, 2]
        ao = chunks[c, 3]
        bo = chunks[c, 4]
        co = chunks[c, 5]
        scale = grad_scale
        third = grad_scale          # ROW_MODE 2's read-only third state argument
        if ROW_MODE == 1:  # noqa: F821
            scale = grad_scale * row_values[chunks[c, 6]]
        if ROW_MODE == 2:  # noqa: F821
            third = row_values[chunks[c, 6]]
        i = cuda.threadIdx.x
        while i < n:
            j = i + nt
            second = PAIR and j < n  # noqa: F821
            if not second:
                j = i
            # Unsigned indices: no negative-index wraparound code on every access.
            ip, jp = np.uint64(po + i), np.uint64(po + j)
            ig, jg = np.uint64(go + i), np.uint64(go + j)
            ia, ja = np.uint64(ao + i), np.uint64(ao + j)
            ib, jb = np.uint64(bo + i), np.uint64(bo + j)
            ic, jc = np.uint64(co + i), np.uint64(co + j)
            p, q = p_span[ip], p_span[jp]
            g, f = g_span[ig], g_span[jg]
            # An absent slot is never loaded: the element gets g in its place (ignored).
            a0 = s0_span[ia] if HAS0 else g  # noqa: F821
            b0 = s0_span[ja] if HAS0 else f  # noqa: F821
            a1 = s1_span[ib] if HAS1 else g  # noqa: F821
            b1 = s1_span[jb] if HAS1 else f  # noqa: F821
            a2 = s2_span[ic] if HAS2 else g  # noqa: F821
            b2 = s2_span[jc] if HAS2 else f  # noqa: F821
            if ROW_MODE == 2:  # noqa: F821
                a2 = third
                b2 = third
            out = ELEMENT(p, g * scale, a0, a1, a2, h)  # noqa: F821
            other = ELEMENT(q, f * scale, b0, b1, b2, h)  # noqa: F821
            p_span[ip] = out[0]
            if WRITE0:  # noqa: F821
                s0_span[ia] = out[1]
            if WRITE1:  # noqa: F821
                s1_span[ib] = out[2]
            if WRITE2:  # noqa: F821
                s2_span[ic] = out[3]
            if second:
                p_span[jp] = other[0]
                if WRITE0:  # noqa: F821
                    s0_span[ja] = other[1]
                if WRITE1:  # noqa: F821
                    s1_span[jb] = other[2]
                if WRITE2:  # noqa: F821
                    s2_span[jc] = other[3]
            i += stride
        c += cuda.gridDim.x


def _reduce_template(p_span, g_span, s0_span, s1_span, s2_span, chunks, h, out):
    # REDUCER(p, g, s0, s1, s2, h) -> (a, b), or with writes (a, b, p, s0, s1, s2), of
    # which WRITE_P and WRITE0..2 store those (as the CPU driver's reduction); MAXIMUM
    # picks max instead of sum; RBLOCK is the block size. One partial per chunk from a
    # fixed-shape tree: deterministic.
    sa = cuda.shared.array(RBLOCK, np.float64)  # noqa: F821
    sb = cuda.shared.array(RBLOCK, np.float64)  # noqa: F821
    t = cuda.threadIdx.x
    c = cuda.blockIdx.x
    while c < chunks.shape[0]:
        n = chunks[c, 0]
        po = chunks[c, 1]
        go = chunks[c, 2]
        ao = chunks[c, 3]
        bo = chunks[c, 4]
        co = chunks[c, 5]
        acc_a = 0.0     # float64 accumulation, deliberately (sums over millions of terms)
        acc_b = 0.0
        i = t
        while i < n:
            res = REDUCER(p_span[po + i], g_span[go + i], s0_span[ao + i],  # noqa: F821
                          s1_span[bo + i], s2_span[co + i], h)
            if WRITE_P:  # noqa: F821
                p_span[po + i] = res[2]
            if WRITE0:  # noqa: F821
                s0_span[ao + i] = res[3]
            if WRITE1:  # noqa: F821
                s1_span[bo + i] = res[4]
            if WRITE2:  # noqa: F821
                s2_span[co + i] = res[5]
            if MAXIMUM:  # noqa: F821
                acc_a = max(acc_a, res[0])
                acc_b = max(acc_b, res[1])
            else:
                acc_a += res[0]
                acc_b += res[1]
            i += RBLOCK  # noqa: F821
        sa[t] = acc_a
        sb[t] = acc_b
        cuda.syncthreads()
        s = RBLOCK // 2  # noqa: F821
        while s > 0:
            if t < s:
                if MAXIMUM:  # noqa: F821
                    sa[t] = max(sa[t], sa[t + s])
                    sb[t] = max(sb[t], sb[t + s])
                else:
                    sa[t] += sa[t + s]
                    sb[t] += sb[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            out[c, 0] = sa[0]
            out[c, 1] = sb[0]
        cuda.syncthreads()
        c += cuda.gridDim.x


_KERNELS: dict = {}
_DEVICE_FUNCTIONS: dict = {}


def _device_function(fn):
    dev = _DEVICE_FUNCTIONS.get(fn)
    if dev is None:
        dev = _DEVICE_FUNCTIONS[fn] = cuda.jit(device=True)(fn)
    return dev


def _instantiate(template, name, constants):
    """Compile ``template`` as a kernel with ``constants`` injected as globals."""
    namespace = dict(globals())
    namespace.update(constants)
    fn = pytypes.FunctionType(template.__code__, namespace, template.__name__)
    fn.__qualname__ = name
    options = {}
    if not SIMULATOR and os.environ.get("FASTOPT_CUDA_CACHE") == "1":
        options["cache"] = True     # opt-in on-disk cache of compiled kernels
    return cuda.jit(**options)(fn)


ROW_MODES = {None: 0, "grad": 1, "slot2": 2}     # as kernels/cpu.py


def _bits(flags) -> str:
    return "".join("1" if x else "0" for x in flags)


def step_kernel(element, has: tuple[bool, bool, bool], row_mode: int = 0, writes=None):
    """The step kernel for ``element`` with state slots ``has`` (read; ``writes``: the
    ones written, default all of them) and per-row mode ``row_mode`` (0, 1 or 2: see
    ``_step_template``), compiled lazily per dtype."""
    writes = has if writes is None else tuple(bool(w) and x for w, x in zip(writes, has))
    key = ("step", element, has, writes, PAIR, row_mode)
    kernel = _KERNELS.get(key)
    if kernel is None:
        mask = _bits(has) + ("" if writes == has else "w" + _bits(writes)) + ("p" if PAIR else "")
        if row_mode:
            mask += f"r{row_mode}"
        kernel = _KERNELS[key] = _instantiate(
            _step_template, f"cuda_step_{element.__name__}_{mask}_{source_tag(element)}",
            dict(ELEMENT=_device_function(element), HAS0=has[0], HAS1=has[1], HAS2=has[2],
                 WRITE0=writes[0], WRITE1=writes[1], WRITE2=writes[2], PAIR=PAIR,
                 ROW_MODE=row_mode))
    return kernel


NO_WRITES = (False, False, False, False)


def reduce_kernel(fn, maximum: bool, writes=NO_WRITES):
    """The reduction kernel for ``fn``; ``writes`` = which of (p, s0, s1, s2) it stores."""
    key = ("reduce", fn, maximum, writes)
    kernel = _KERNELS.get(key)
    if kernel is None:
        tag = f"{int(maximum)}" + ("" if writes == NO_WRITES else "w" + _bits(writes))
        kernel = _KERNELS[key] = _instantiate(
            _reduce_template, f"cuda_reduce_{fn.__name__}_{tag}_{source_tag(fn)}",
            dict(REDUCER=_device_function(fn), MAXIMUM=maximum, RBLOCK=REDUCE_BLOCK,
                 WRITE_P=writes[0], WRITE0=writes[1], WRITE1=writes[2], WRITE2=writes[3]))
    return kernel


# -- arrays, spans and streams ---------------------------------------------------------------
def _describe(a):
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


def _span(address, length, dtype):
    """A 1-D device array of ``length`` elements at ``address``, owning nothing."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.asarray(_HostSpan(address, length, dtype)))
    desc = {"shape": (length,), "strides": None, "typestr": dtype.str,
            "data": (address, False), "version": 3}
    # No 'stream' entry: nothing to synchronise on.
    return cuda.from_cuda_array_interface(desc, owner=None, sync=False)


_STREAMS: dict = {}
_LAUNCHERS: dict = {}


def _launcher(kernel, grid, block, stream):
    """``kernel[grid, block, stream]``, configured once and kept (a dict hit per step)."""
    if SIMULATOR:                       # the simulator's kernels configure in place
        return kernel[grid, block, stream]
    key = (kernel, grid, block, stream)
    launch = _LAUNCHERS.get(key)
    if launch is None:
        if len(_LAUNCHERS) > 4096:          # many table sizes over time: start over
            _LAUNCHERS.clear()
        with warnings.catch_warnings():
            # A small step is a small grid by design: no low-occupancy warning for it.
            warnings.simplefilter("ignore")
            launch = _LAUNCHERS[key] = kernel[grid, block, stream]
    return launch


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


# -- the table ------------------------------------------------------------------------------
def chunk_size(total: int) -> int:
    """Elements per chunk for a step of ``total`` elements."""
    want = max(1, -(-total // TARGET_CHUNKS))
    return int(min(CHUNK_MAX, max(CHUNK_MIN, 1 << (want - 1).bit_length())))


class _Layout:
    """The device side of a table: host rows and chunks, spans, device chunk table.

    It depends only on addresses, sizes, dtype, slot mask and chunking, and references
    no array (the spans own nothing), so layouts are cached by address.
    """

    __slots__ = ("rows", "chunks", "starts", "args", "n_elements", "n_chunks", "partials",
                 "row_values")

    def __init__(self, rows, dtype, merge, stream=0):
        self.partials = None                 # the reduction's per-chunk output, made once
        self.row_values = None               # per-row values of per-tensor steps, made once
        itemsize = dtype.itemsize
        rows = merge_runs(rows, itemsize) if merge else rows
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
        end = (rows[:, 1:] + sizes[:, None] * itemsize).max(axis=0)
        rel = rows[:, 1:] - base
        if np.any(rel % itemsize):
            raise ValueError(f"CUDA step: tensor addresses are not aligned to {dtype} elements")
        offsets = rel // itemsize
        spans, made = [], {}
        for k in range(5):
            key = (int(base[k]), int(end[k]))
            if key not in made:
                made[key] = _span(key[0], (key[1] - key[0]) // itemsize, dtype)
            spans.append(made[key])
        # Chunks: (row, lo, hi) on the host; (count, offsets + lo, row) on the device.
        size = chunk_size(self.n_elements)
        counts = -(-sizes // size)
        row_of = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
        self.starts = np.cumsum(counts) - counts
        first = np.repeat(self.starts, counts)
        lo = (np.arange(row_of.size, dtype=np.int64) - first) * size
        hi = np.minimum(lo + size, sizes[row_of])
        self.chunks = np.ascontiguousarray(np.stack([row_of, lo, hi], axis=1))
        device = np.empty((row_of.size, 7), dtype=np.int64)
        device[:, 0] = hi - lo
        device[:, 1:6] = offsets[row_of] + lo[:, None]
        device[:, 6] = row_of
        self.n_chunks = int(row_of.size)
        # Uploaded on the stream the step will launch on, so the launch is ordered after
        # the copy even on a non-blocking stream (the legacy default stream is not).
        self.args = tuple(spans) + (cuda.to_device(device, stream=stream),)


class CudaTable:
    """The device-side description of one step over aligned lists of device arrays.

    Attributes:
      table: host int64 rows ``(n, p, g, s0, s1, s2)`` of addresses, as the CPU table.
      chunks: host int64 ``(row, lo, hi)`` per chunk, as the CPU table (combine
        reduction partials per row with ``np.add.reduceat``).
      args: the kernel's array arguments (five spans and the device chunk table).
      kind: the array library ("cupy", "torch", ...), which says whose current stream to use.
      refs: the arrays, kept alive while the table lives (it holds their raw addresses).
    """

    __slots__ = ("layout", "has", "dtype", "cast", "kind", "sample", "refs", "fixed", "merge")

    def __init__(self, layout, has, dtype, kind, sample, refs, fixed, merge):
        self.layout = layout
        self.has, self.dtype, self.cast = has, dtype, dtype.type
        self.kind, self.sample, self.refs = kind, sample, refs
        self.fixed, self.merge = fixed, merge

    table = property(lambda self: self.layout.rows)
    chunks = property(lambda self: self.layout.chunks)
    starts = property(lambda self: self.layout.starts)
    args = property(lambda self: self.layout.args)
    n_elements = property(lambda self: self.layout.n_elements)
    n_chunks = property(lambda self: self.layout.n_chunks)

    def with_grads(self, grads, grad_addresses=None) -> "CudaTable":
        """The same params and state over new gradient arrays."""
        params, _, slots = self.refs
        if grad_addresses is None:
            grad_addresses = [_describe(g)[0] for g in grads]
        return _BACKEND_TABLES(self.fixed, grad_addresses, self.dtype, self.has, self.kind,
                               self.sample, self.merge, (params, grads, slots))


def _fixed_columns(params, slots):
    """(columns n, p, s0, s1, s2 per tensor, dtype, kind) read from the arrays once."""
    fixed = np.zeros((len(params), 5), dtype=np.int64)
    dtype = kind = None
    for i, p in enumerate(params):
        addr, n, dt, kd = _describe(p)
        if dtype is None:
            dtype, kind = dt, kd
        elif dt != dtype:
            raise TypeError(f"one CUDA step takes one dtype, got {dtype} and {dt}")
        fixed[i, 0] = n
        fixed[i, 1] = addr
        for k, s in enumerate(slots):
            if s is not None:
                fixed[i, 2 + k] = _describe(s[i])[0]
    return fixed, dtype or np.dtype(np.float32), kind or "host"


class _TableCache:
    """Builds tables over the last few layouts, keyed by address: a repeated call over the
    same arrays (the functional API, a regrad back to earlier gradients) reuses the device
    chunk table instead of allocating and uploading a new one."""

    def __init__(self, size):
        self.size = size
        self.layouts: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, fixed, grad_addresses, dtype, has, kind, sample, merge, refs):
        g_addr = np.asarray(grad_addresses, dtype=np.int64).reshape(-1)
        full = np.empty((fixed.shape[0], 6), dtype=np.int64)
        full[:, :2] = fixed[:, :2]
        full[:, 2] = g_addr
        for k in range(3):
            full[:, 3 + k] = fixed[:, 2 + k] if has[k] else g_addr
        full = full[full[:, 0] > 0]
        key = (dtype.str, has, merge, CHUNK_MIN, CHUNK_MAX, TARGET_CHUNKS, full.tobytes())
        layout = self.layouts.get(key)
        if layout is not None:
            self.layouts.move_to_end(key)
        else:
            stream = current_stream(kind, sample) if kind != "host" else 0
            layout = self.layouts[key] = _Layout(full, dtype, merge, stream)
            while len(self.layouts) > self.size:
                self.layouts.popitem(last=False)
        return CudaTable(layout, has, dtype, kind, sample, refs, fixed, merge)


_BACKEND_TABLES = _TableCache(TABLE_CACHE)


class CudaBackend:
    """The ``"cuda"`` backend: ``table()`` once per set of arrays, ``run()`` once per step.

    ``launches`` counts kernel launches (tests check one per step per dtype group).
    """

    name = "cuda"

    def __init__(self):
        if not SIMULATOR and not cuda.is_available():
            raise RuntimeError("numba.cuda found no usable CUDA device/driver")
        self.launches = 0
        self.simulator = SIMULATOR

    @property
    def xp(self):
        import cupy
        return cupy

    def table(self, params, grads, slots, merge=True, model=None) -> CudaTable:
        """The table for ``params``/``grads``/``slots`` (C-contiguous, one dtype, equal sizes)."""
        if model is not None:
            raise NotImplementedError("master weights for 16-bit params run on the 'cpu' and "
                                      "'numpy' backends, not 'cuda'")
        slots = tuple(slots) + (None,) * (3 - len(slots))
        fixed, dtype, kind = _fixed_columns(params, slots)
        g_addr = [_describe(g)[0] for g in grads]
        has = tuple(s is not None for s in slots)
        sample = params[0] if params else None
        return _BACKEND_TABLES(fixed, g_addr, dtype, has, kind, sample, merge, (params, grads, slots))

    def run(self, element, table: CudaTable, scalars, grad_scale=1.0, row_values=None,
            row_mode=None, writes=None, **options) -> None:
        """One fused step of ``element`` over ``table``: one launch, asynchronous.

        ``row_values`` (a device array of the table's dtype, one value per row of a
        ``merge=False`` table, e.g. from :meth:`row_array`) with ``row_mode`` "grad"
        scales each row's gradients; with "slot2" it is the element's third state
        argument (read-only; that slot must be absent), as ``kernels.cpu.run``;
        ``writes`` narrows the state slots stored, as there too.
        """
        if options:
            raise NotImplementedError(f"the 'cuda' backend takes no options {sorted(options)}")
        mode = ROW_MODES[row_mode]
        if not table.n_chunks:
            return
        has = table.has
        if mode:
            self._check_row_values(table, row_values)
            if mode == 2:
                has = (has[0], has[1], False)
        else:
            row_values = ()                  # no kernel argument, nothing loaded
        kernel = step_kernel(element, has, mode, writes)
        stream = current_stream(table.kind, table.sample)
        launch = _launcher(kernel, min(table.n_chunks, MAX_GRID), BLOCK, stream)
        launch(*table.args, scalars, table.cast(grad_scale), row_values)
        self.launches += 1

    @staticmethod
    def _check_row_values(table, row_values):
        if table.merge:
            raise ValueError("per-tensor values need a table built with merge=False")
        n_rows = table.table.shape[0]
        shape = getattr(row_values, "shape", None)
        if shape != (n_rows,) or np.dtype(getattr(row_values, "dtype", None)) != table.dtype:
            raise ValueError(f"row_values must be a device array of {n_rows} {table.dtype} values "
                             f"(one per row), got {type(row_values).__name__} of shape {shape}")

    def row_array(self, table: CudaTable, values):
        """``values`` (host, one per row of ``table``) in the table's device array of row
        values, allocated on first use and refilled on the launch stream afterwards."""
        layout = table.layout
        host_values = np.ascontiguousarray(values, dtype=table.dtype)
        if host_values.shape != (layout.rows.shape[0],):
            raise ValueError(f"values must have one entry per row ({layout.rows.shape[0]}), "
                             f"got {host_values.shape}")
        if layout.row_values is None:
            layout.row_values = cuda.device_array(host_values.shape, dtype=table.dtype)
        stream = current_stream(table.kind, table.sample)
        # On the launch stream: ordered after the reduction (which the caller waited for)
        # and before the step that reads the values. From pageable host memory the copy
        # returns once host_values is staged, so the host array may go at once.
        layout.row_values.copy_to_device(host_values, stream=stream)
        return layout.row_values

    def reduce_chunks(self, fn, table: CudaTable, scalars, maximum=False,
                      writes=NO_WRITES) -> np.ndarray:
        """Per-chunk partials ``(n_chunks, 2)`` float64 of reducer ``fn``, copied to the host
        (this synchronises: the caller needs the number). ``writes`` (p, s0, s1, s2): the
        arrays ``fn`` also updates, as ``kernels.cpu.reduce_chunks``."""
        writes = tuple(map(bool, writes))
        if any(writes[1:][k] and not table.has[k] for k in range(3)):
            raise ValueError(f"writes {writes} name a state slot absent from the table {table.has}")
        if not table.n_chunks:
            return np.zeros((0, 2), dtype=np.float64)
        layout = table.layout
        if layout.partials is None:
            layout.partials = cuda.device_array((layout.n_chunks, 2), dtype=np.float64)
        stream = current_stream(table.kind, table.sample)
        launch = _launcher(reduce_kernel(fn, maximum, writes), min(layout.n_chunks, MAX_GRID),
                           REDUCE_BLOCK, stream)
        launch(*layout.args, scalars, layout.partials)
        self.launches += 1
        if SIMULATOR:
            return np.array(layout.partials.copy_to_host())
        out = layout.partials.copy_to_host(stream=stream)
        if stream:
            stream.synchronize()
        return out
