"""The CUDA driver: one kernel launch per step over a device-side chunk table.

A step over any number of tensors of one dtype is described, as on the CPU, by rows
``(n, p_addr, g_addr, s0_addr .. s{K-1}_addr[, w_addr])``: K state columns, any number,
and with master weights a 16-bit model copy ``w`` (back-to-back tensors merged, so a
FlatParams arena is one row; an absent column repeats the grad address). On the device
the rows become one *chunk table* and one *span* per column:

- ``span[k]`` is a 1-D array starting at the lowest address of column ``k`` and long
  enough to reach its highest tensor's end, of the column's storage type (the params'
  float dtype, or uint16 for a 16-bit column). It is pointer arithmetic written as
  array indexing: the kernel only touches the elements of the tensors named in the
  table, never the memory between them.
- ``chunks[c] = (count, position, row, offset of each column)``: chunk ``c`` is
  ``count`` consecutive elements of row ``row``, starting at those element offsets into
  the spans; at most a few thousand, sized so a step has enough chunks to fill the
  device. ``position`` counts elements as the CPU driver does for stochastic rounding,
  so both draw the same random bits for the same table and seed.

The kernels are generated from a :class:`kernels.layout.Layout` (which columns are read,
written, in which storage format, per-row values, model copy) by
``kernels/cuda_codegen.py``: a grid-stride loop over chunks (one block per chunk at a
time, its threads striding over the chunk's elements, so loads coalesce; with ``PAIR``
each thread takes two elements per iteration, all their loads issued first), with the
optimizer's element function compiled by ``cuda.jit(device=True)`` and inlined, the same
function the CPU driver inlines, and the scalars' bool flags compiled in as constants.
Host scalars (a NamedTuple) and ``grad_scale`` are kernel arguments, and the launch goes
to the arrays' library's current stream (CuPy's or torch's); nothing is synchronised or
allocated per step. Per-tensor steps (LAMB, LARS, Keras clipnorm; kernels/per_tensor.py)
also pass a device array of one value per row of a ``merge=False`` table, a gradient
multiplier or a read-only state argument as the CPU driver's ``row_values``; their norm
pass copies per-chunk partials to the host (the one synchronisation such a step needs).
Sparse row updates (:meth:`CudaBackend.run_rows`) are one launch of the same body over
the rows an index names. A table is built (and its chunk table uploaded, synchronously)
once per set of arrays; layouts are cached by address, so recurring arrays (the
functional API, gradient buffers that come back at the same addresses) reuse the device
table.

Low-bit state: 16-bit columns (float16, bfloat16; uint16 patterns need their format
given) are widened on load and rounded on store. Blockwise 8-bit columns ("int8-signed",
"int8-unsigned": uint8 codes, one float32 absmax per block of ``block`` elements, given
to :meth:`CudaBackend.table` as ``formats=``, ``scales=``, ``block=``, as to
``cpu.ChunkTable``) have a step kernel of their own, still one launch per step: a thread
block owns whole quantization blocks, finds each block's new absmax with warp shuffles
(and shared memory across warps), and encodes with the CPU encoder's tables, so codes
and absmax are the CPU driver's bit for bit when the element's math is (see
kernels/cuda_codegen.py). A reduction reads them read-only (LAMB's and LARS's first
pass): each code decoded with its block's absmax, nothing re-encoded.

The same kernels run under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), where the
spans are NumPy views of host memory, so the simulator exercises exactly the code the
GPU runs, list mode included; only span construction and stream selection differ, and
the simulator, which has no warp shuffles, exchanges a blockwise step's lanes through
shared memory (:func:`_simulated_warp_xor`, with 2-lane warps so the step's
cross-warp path runs too).
"""
from __future__ import annotations

import math
import operator
import os
import warnings

import numpy as np
from numba import cuda

from . import cuda_codegen as codegen
from .codegen import load
from .cuda_tables import (SIMULATOR, TABLES, CudaTable, current_stream, describe,
                          fixed_columns, grad_addresses, index_description, shape_of, span)
from .layout import BFLOAT16, BLOCKWISE, ROW_SLOT, Layout, parse_row_mode
from .pieces import bind
from .specialize import flags_of

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
# Blockwise steps: lanes per warp (compile time: the absmax's shuffle reduction), and the
# most blocks of a launch (each fills ~10 KB of shared memory per map with the encoder's
# tables, so blocks stride over several chunks at large sizes; not tuned on a GPU yet).
WARP = 32
BLOCKWISE_GRID = 2048
# The simulator runs every CUDA thread as a Python thread: tiny blocks and chunks keep
# tests fast while still crossing chunk and block boundaries.
if SIMULATOR:
    BLOCK, CHUNK_MIN, CHUNK_MAX, TARGET_CHUNKS, REDUCE_BLOCK, MAX_GRID = 4, 8, 32, 16, 4, 3
    WARP = 2


# -- kernels -----------------------------------------------------------------------------
_KERNELS: dict = {}
_DEVICE_FUNCTIONS: dict = {}
_FORMAT_FUNCTIONS: dict = {}


def device_function(fn):
    """``fn`` (an element, or an element piece bound by kernels/pieces.py) as a device
    function calling the device form of every piece it names."""
    if fn not in _DEVICE_FUNCTIONS:
        _DEVICE_FUNCTIONS[fn] = cuda.jit(device=True)(bind(fn, device_function))
    return _DEVICE_FUNCTIONS[fn]


def _warp_xor(value, lane_mask):
    """``value`` of the lane ``lane_mask`` away (xor) in this warp, all lanes taking part."""
    return cuda.shfl_xor_sync(0xFFFFFFFF, value, lane_mask)


_EXCHANGE = 1024        # the most threads of a simulated block


def _simulated_warp_xor(value, lane_mask):
    """:func:`_warp_xor` for the simulator, which has no shuffles: every thread of the
    block calls it at the same point (as every lane of a warp calls the shuffle), puts its
    value in shared memory and reads its partner's, between two ``syncthreads``. A plain
    function: the simulator's device functions swap their module's ``cuda`` global for
    the duration of each thread's call, which threads would race on."""
    from numba.cuda.simulator.kernel import _get_kernel_context
    block = _get_kernel_context()       # the launch's fake ``cuda`` module
    exchange = block.shared.array(_EXCHANGE, np.int64)
    t = block.threadIdx.x
    block.syncthreads()                 # every read of the previous exchange is done
    exchange[t] = value
    block.syncthreads()
    return np.int32(exchange[t ^ lane_mask])


def _compile(fn, generated):
    """The kernel of ``generated`` (codegen.generate) calling ``fn`` as its element."""
    if not _FORMAT_FUNCTIONS:
        _FORMAT_FUNCTIONS.update(codegen.format_functions(cuda.jit(device=True)))
        _FORMAT_FUNCTIONS["warp_xor"] = (_simulated_warp_xor if SIMULATOR
                                         else cuda.jit(device=True)(_warp_xor))
    namespace = dict(_FORMAT_FUNCTIONS, cuda=cuda, np=np, element=device_function(fn),
                     Scalars=generated.scalars_class)
    module = load(generated.text, namespace)
    py_kernel = getattr(module, generated.name)
    options = {}
    if not SIMULATOR and os.environ.get("FASTOPT_CUDA_CACHE") == "1":
        options["cache"] = True     # opt-in on-disk cache of compiled kernels
    kernel = cuda.jit(**options)(py_kernel)
    kernel.fastopt_source = module.__file__     # tests and curious readers: the generated file
    return kernel


def _kernel(kind, fn, layout, scalars, **options):
    flags = flags_of(scalars)
    # With flags, the source rebuilds the scalars: it depends on their class and length.
    shape = (type(scalars), len(scalars)) if flags else None
    key = (kind, fn, layout, flags, shape, tuple(sorted(options.items())))
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _compile(fn, codegen.generate(kind, fn, layout, flags, scalars,
                                                               **options))
    return kernel


def step_kernel(element, layout: Layout, scalars=()):
    """The step kernel for ``element`` over ``layout``, specialised on ``scalars``' bool
    flags (their values, not the numbers), compiled lazily per dtype. A blockwise layout's
    is written for ``BLOCK`` threads per block and ``WARP`` lanes per warp."""
    if layout.block:
        return _kernel(codegen.STEP, element, layout, scalars, threads=BLOCK, warp=min(WARP, BLOCK))
    return _kernel(codegen.STEP, element, layout, scalars, pair=PAIR)


def reduce_kernel(fn, layout: Layout, scalars=(), maximum=False, write_p=False):
    """The reduction kernel for ``fn`` (sum, or max) over ``layout`` (its writes: the
    state columns ``fn`` also stores; ``write_p``: the param too)."""
    return _kernel(codegen.REDUCE, fn, layout, scalars, maximum=bool(maximum),
                   write_p=bool(write_p), rblock=REDUCE_BLOCK)


def rows_kernel(element, layout: Layout, scalars=()):
    """The sparse-row kernel for ``element`` over ``layout``."""
    return _kernel(codegen.ROWS, element, layout, scalars)


_STEPS: dict = {}
_FLAG_GETTERS: dict = {}


def _flag_key(scalars):
    """What ``scalars`` specialises a kernel on, cheaply: for a NamedTuple class, the values
    of its compile-time flag fields (their positions found once per class)."""
    cls = type(scalars)
    if not hasattr(cls, "_fields"):
        return len(scalars), flags_of(scalars)
    get = _FLAG_GETTERS.get(cls)
    if get is None:
        index = [i for i, _ in flags_of(scalars)]
        get = _FLAG_GETTERS[cls] = operator.itemgetter(*index) if index else _no_flags
    return get(scalars)


def _no_flags(scalars):
    return ()


def _step_kernel_for(element, table, scalars, writes, mode, slot, stochastic):
    """:func:`step_kernel` for one ``run``, its layout built and checked on the first call
    only: a step's Python cost is a dict lookup (launches cost 20-90 us as it is)."""
    writes = None if writes is None else tuple(map(bool, writes))
    key = (element, table.columns, writes, mode, slot, stochastic, type(scalars), _flag_key(scalars), PAIR,
           BLOCK, WARP)
    kernel = _STEPS.get(key)
    if kernel is None:
        reads = table.has
        if mode == ROW_SLOT:
            reads = tuple(r and k != slot for k, r in enumerate(reads))
        if writes is not None and len(writes) != table.n_slots:
            raise ValueError(f"writes: one entry per state column ({table.n_slots}), got {len(writes)}")
        layout = Layout.of(reads, writes, table.formats, mode, slot, _model(table, stochastic),
                           table.block)
        kernel = _STEPS[key] = step_kernel(element, layout, scalars)
    return kernel


def _reduction_layout(table, writes, blocked) -> Layout:
    """The layout of a reduction over ``table`` storing the state columns ``writes``, its
    blockwise columns (``blocked``) read-only: decoded, never re-encoded. Layout.of
    refuses a blockwise column read and not written (a step re-encodes each one it
    reads), so the layout is built with them written and their writes then cleared."""
    layout = Layout.of(table.has, tuple(w or b for w, b in zip(writes, blocked)), table.formats,
                       model=_model(table), block=table.block)
    return layout._replace(writes=tuple(w and not b for w, b in zip(layout.writes, blocked)))


def _model(table, stochastic=False) -> str:
    """The layout's model column (kernels/layout.py MODELS) of ``table``'s columns."""
    if table.columns.pure:
        return f"pure-{table.model}-{table.columns.pure}"
    return table.model + ("-stochastic" if stochastic and table.model == BFLOAT16 else "")


# -- launches ----------------------------------------------------------------------------
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


def _chunking():
    return CHUNK_MIN, CHUNK_MAX, TARGET_CHUNKS


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

    def table(self, params, grads, slots, merge=True, model=None, formats=None, scales=None,
              block=0, pure=None) -> CudaTable:
        """The table for ``params``/``grads``/``slots`` (C-contiguous, one dtype, equal sizes).

        ``slots``: one entry per state position of the element (K of them, any number),
        each None (absent) or a list of arrays aligned with ``params``. ``formats``: one
        storage format per position (kernels.layout.FORMATS), default read from the
        arrays' dtypes (float16, ml_dtypes bfloat16; uint16 bits need theirs given).
        ``model``: 16-bit arrays aligned with ``params`` (float16, or bfloat16 as
        ml_dtypes or uint16/int16 bits), which are then float32 master weights; ``grads``
        are then 16-bit, as the model. ``merge=False`` keeps one row per non-empty tensor.
        Blockwise columns (formats "int8-signed", "int8-unsigned": uint8 codes, float32
        params) come with ``scales[k]``, a list of float32 absmax arrays (one value per
        ``block`` elements of each tensor), as ``cpu.ChunkTable``; ``scales`` and
        ``block`` are ignored without blockwise columns. ``pure`` ("kahan" or "stochastic"):
        16-bit params (float16, bfloat16) without master weights, as ``cpu.ChunkTable``:
        the update rounded to nearest with ``model`` their Kahan compensation arrays, or
        (bfloat16) rounded stochastically with no ``model``.
        """
        slots = tuple(slots)
        fixed, columns, kind = fixed_columns(params, slots, model, formats, scales, block, pure)
        sample = params[0] if params else None
        return TABLES(fixed, grad_addresses(grads, columns, fixed), columns, kind, sample, merge,
                      (params, grads, slots, model, scales), _chunking())

    def run(self, element, table: CudaTable, scalars, grad_scale=1.0, row_values=None,
            row_mode=None, writes=None, seed=0, stochastic=False) -> None:
        """One fused step of ``element`` over ``table``: one launch, asynchronous.

        ``row_values`` (a device array of the table's dtype, one value per row of a
        ``merge=False`` table, e.g. from :meth:`row_array`) with ``row_mode`` "grad"
        scales each row's gradients; with "slot<k>" ("slot2") it is the element's state
        argument k (read-only; that column must be absent), as ``kernels.cpu.run``;
        ``writes`` (one bool per state position) narrows the state columns stored, as
        there too. With master weights, the model copy of bfloat16 is rounded
        stochastically when ``stochastic`` (random bits from ``seed`` and the element's
        position in the step), else to nearest even.
        """
        mode, slot = parse_row_mode(row_mode)
        if not table.n_chunks:
            return
        kernel = _step_kernel_for(element, table, scalars, writes, mode, slot, bool(stochastic))
        if mode:
            self._check_row_values(table, row_values)
        else:
            row_values = ()                  # no kernel argument, nothing loaded
        stream = current_stream(table.kind, table.sample)
        grid = min(table.n_chunks, MAX_GRID, BLOCKWISE_GRID if table.block else MAX_GRID)
        launch = _launcher(kernel, grid, BLOCK, stream)
        launch(*table.args, scalars, table.cast(grad_scale), row_values, int(seed) & 0xFFFFFFFF)
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
                      writes=None) -> np.ndarray:
        """Per-chunk partials ``(n_chunks, 2)`` float64 of reducer ``fn``, copied to the host
        (this synchronises: the caller needs the number).

        ``fn(p, g, s0 .. s{K-1}, h) -> (a, b)``; with ``writes`` (p, s0 .. s{K-1}: the
        arrays it also updates) it returns ``(a, b, p, s0 ..)``, as
        ``kernels.cpu.reduce_chunks``. Gradients are read unscaled.
        """
        n_slots = table.n_slots
        writes = (False,) * (1 + n_slots) if writes is None else tuple(map(bool, writes))
        if len(writes) != 1 + n_slots:
            raise ValueError(f"writes: one entry per column (p, s0 .. s{n_slots - 1}), {1 + n_slots} "
                             f"entries, got {len(writes)}")
        if any(w and not h for w, h in zip(writes[1:], table.has)):
            raise ValueError(f"writes {writes} name a state slot absent from the table {table.has}")
        blocked = tuple(f in BLOCKWISE for f in table.formats)
        if any(w and b for w, b in zip(writes[1:], blocked)):
            raise ValueError(f"writes {writes} name a blockwise (int8) state column: a reduction "
                             "stores none (the step re-encodes them)")
        if not table.n_chunks:
            return np.zeros((0, 2), dtype=np.float64)
        layout = table.layout
        if layout.partials is None:
            layout.partials = cuda.device_array((layout.n_chunks, 2), dtype=np.float64)
        stream = current_stream(table.kind, table.sample)
        kernel = reduce_kernel(fn, _reduction_layout(table, writes[1:], blocked), scalars, maximum,
                               writes[0])
        launch = _launcher(kernel, min(layout.n_chunks, MAX_GRID), REDUCE_BLOCK, stream)
        launch(*layout.args, scalars, layout.partials)
        self.launches += 1
        if SIMULATOR:
            return np.array(layout.partials.copy_to_host())
        out = layout.partials.copy_to_host(stream=stream)
        if stream:
            stream.synchronize()
        return out

    def run_rows(self, element, param, index, rows, slots, scalars, grad_scale=1.0,
                 formats=None) -> None:
        """Update only rows ``index`` (unique) of ``param`` from gradient ``rows``: one launch.

        ``param`` and each present slot are device arrays of shape (R, ...), ``rows`` is
        (k, ...) of the param's dtype and ``index`` k integers, on the host or the device
        (a host index is copied over, on the launch stream); as ``kernels.cpu.run_rows``.
        ``formats`` as in :meth:`table`.
        """
        if formats is not None and any(f in BLOCKWISE for f in formats):
            raise ValueError("sparse rows take no blockwise (int8) columns")
        shape = shape_of(param)
        width = math.prod(shape[1:])
        index_addr, k, index_dtype, _ = index_description(index)
        if k == 0 or width == 0:
            return
        p_addr, n, dtype, kind = describe(param)
        r_addr, n_rows, r_dtype, _ = describe(rows)
        if r_dtype != dtype or n_rows != k * width:
            raise ValueError(f"rows must be {k} x {width} {dtype} values (one per index), "
                             f"got {n_rows} {r_dtype}")
        fixed, columns, _ = fixed_columns([param], tuple(None if s is None else [s] for s in slots),
                                           None, formats)
        storage = columns.storage()
        spans = [span(p_addr, n, dtype), span(r_addr, n_rows, dtype)]
        spans += [span(int(fixed[0, 2 + j]), n, storage[2 + j]) if h else spans[1]
                  for j, h in enumerate(columns.has)]
        stream = current_stream(kind, param)
        if index_addr is None:              # a host index: copied to the device per call
            host_index = np.ascontiguousarray(index)
            index = host_index if SIMULATOR else cuda.to_device(host_index, stream=stream)
        else:
            index = span(index_addr, k, index_dtype)
        layout = Layout.of(columns.has, None, columns.formats)
        # A block per row: no more threads than the row's elements (a warp at least).
        block = min(BLOCK, max(min(32, BLOCK), 1 << (width - 1).bit_length()))
        launch = _launcher(rows_kernel(element, layout, scalars), min(k, MAX_GRID), block, stream)
        launch(*spans, spans[1], index, np.int64(width), scalars, dtype.type(grad_scale))
        self.launches += 1


