"""The CPU driver: one ``prange`` over a chunk table, for any optimizer and any tensors.

A step is described by a *tensor table* and a *chunk table*:

- ``table[r] = (n, p_addr, g_addr, s0_addr, ..., s{K-1}_addr[, model_addr])``: row ``r``
  is a run of ``n`` elements of params, grads and K state columns, each given by the
  address of its first element. A row is one tensor in list mode, or a stretch of a
  FlatParams arena covering many tensors. An absent state column is never stored; in
  its place the element gets the gradient (as the CUDA driver): a step passes the
  scaled gradient it already holds, a reduction loads the column like any other, from
  the gradient's address that the table repeats there (and in its format). So one
  reduction driver serves every table whose columns differ only in which are present
  (Keras's per-tensor gradient norm runs over tables of 0 to 3 state columns).
- ``chunks[c] = (r, lo, hi)``: chunk ``c`` is elements ``[lo, hi)`` of row ``r``;
  chunks hold at most :data:`CHUNK` elements, so threads get balanced work.

The loops are generated from a :class:`~.layout.Layout` (which columns are read and
written, each one's storage format, the per-row value, the model column of master
weights; kernels/codegen.py) with the optimizer's element function inlined. Each
(loop, element, layout, setting of the scalars' bool flags) is compiled once and cached
on disk (``cache=True``), keyed by the element's source and the layout.
"""
from __future__ import annotations

import numpy as np

from . import codegen, lowp, threads
from .layout import BFLOAT16, BLOCKWISE, FLOAT16, NATIVE, ROW_SLOT, Layout, parse_row_mode
from .specialize import flags_of

# Elements per chunk: 256 KiB of float32 per array, a few chunks per thread per MB.
CHUNK = 1 << 16

# Elements per block of a reduction: summed in the element's own precision, then added
# to the chunk's float64 sum. A loop with float64 accumulators runs at the float64
# vector width (4 lanes in 256-bit registers) and LAMB's divisions and square root ran
# at that width too; float32 block sums keep the loop 8 lanes wide. 1024 float32
# squares spread over LLVM's 32 partial sums are 32 terms each: an error near 2e-6 in
# the worst case, far below one float32 ulp of the resulting norm's use.
REDUCE_BLOCK = 1024

# Numba's threading layer is TBB unless someone chose before fastopt was imported
# (kernels/threads.py); every parallel call below goes through threads.launch, which
# keeps thread- and fork-safety on the layer in use.

_DRIVERS: dict = {}
# The driver of each call's arguments, found with one hash of what they are made of: a
# step of many small tensors is short, and building and hashing a Layout on every call
# cost 20 us on the 2-core machine.
_BY_CALL: dict = {}
_BITS = np.uint16(0)        # the element type of 16-bit columns
_MODEL_OF_KIND = {lowp.FLOAT16: FLOAT16, lowp.BFLOAT16: BFLOAT16}


def _compiled(kind: str, element, layout: Layout, flags: tuple, **options):
    key = (kind, element, layout, flags, tuple(sorted(options.items())))
    fn = _DRIVERS.get(key)
    if fn is None:
        fn = _DRIVERS[key] = codegen.build(kind, element, layout, flags, CHUNK, REDUCE_BLOCK,
                                           **options)
    return fn


def _as_layout(layout) -> Layout:
    # A bare mask of present (read and written) slots, as driver() took before layouts.
    return layout if isinstance(layout, Layout) else Layout.of(layout)


def driver(element, layout, flags: tuple = ()):
    """The compiled step driver for ``element`` over ``layout`` (a :class:`Layout`, or a
    tuple of present slots), specialised on the scalars' ``flags`` (:func:`flags_of`)."""
    return _compiled("step", element, _as_layout(layout), flags)


def reducer(fn, layout, maximum: bool = False, flags: tuple = (), write_p: bool = False):
    """The compiled reduction driver for ``fn`` over ``layout`` (sum, or max when
    ``maximum``); ``layout.writes`` and ``write_p``: the columns it also stores."""
    # The block sums' additions may be reassociated (specialize.accumulate): LLVM
    # vectorises them with several accumulators. Each chunk is still summed by one thread
    # in an order fixed by the compiled code, so results do not depend on the thread count.
    return _compiled("reduce", fn, _as_layout(layout), flags, maximum=bool(maximum),
                     write_p=bool(write_p))


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def merge_runs(rows, itemsizes, block=0, n_absmax=0):
    """Merge each row ``(n, addr, addr, ...)`` into the previous one where every address
    column continues it in memory (``itemsizes``: bytes per element of each column).

    With ``block``, the last ``n_absmax`` columns hold one float32 per block of ``block``
    elements: a row continues the previous one only when that one is whole blocks."""
    if rows.shape[0] < 2:
        return rows
    n = rows[:-1, :1]
    ends = rows[:-1, 1:] + n * itemsizes
    if n_absmax:
        ends[:, -n_absmax:] = rows[:-1, -n_absmax:] + 4 * (-(-n // block))
    continues = np.all(rows[1:, 1:] == ends, axis=1)
    if n_absmax:
        continues &= n[:, 0] % block == 0
    starts = np.flatnonzero(np.concatenate([[True], ~continues]))
    merged = rows[starts].copy()
    merged[:, 0] = np.add.reduceat(rows[:, 0], starts)
    return merged


def column_format(dtype, native, given=None) -> str:
    """The storage format of a state column of ``dtype`` beside params of ``native``:
    ``given`` checked against the dtype, or inferred from it (uint16 patterns and uint8
    blockwise codes need it)."""
    dtype, native = np.dtype(dtype), np.dtype(native)
    allowed = {NATIVE: (native,), FLOAT16: (np.dtype(np.float16), np.dtype(np.uint16)),
               BFLOAT16: tuple(d for d in (lowp.bfloat16_dtype(), np.dtype(np.uint16))
                               if d is not None)}
    for fmt in BLOCKWISE:
        allowed[fmt] = (np.dtype(np.uint8),) if native == np.float32 else ()
    if given is None:
        inferred = [f for f, dtypes in allowed.items() if dtype in dtypes]
        if len(inferred) != 1:
            raise TypeError(f"a state column of {dtype} beside {native} params: "
                            + ("give its format (formats=)" if dtype == np.uint16 else
                               f"expected {native}, float16 or bfloat16"))
        return inferred[0]
    if given not in allowed:
        raise ValueError(f"unknown storage format {given!r}; expected one of {tuple(allowed)}")
    if dtype not in allowed[given]:
        if not allowed[given]:
            raise TypeError(f"a {given!r} state column needs float32 params (or float32 master "
                            f"weights), not {native}")
        raise TypeError(f"a {given!r} state column cannot be {dtype}; expected one of "
                        f"{[str(d) for d in allowed[given]]}")
    return given


class ChunkTable:
    """Tensor and chunk tables for one step over aligned lists of arrays.

    ``params[i]``, ``grads[i]`` and ``slots[k][i]`` (``slots``: K state columns, each a
    list or None) are C-contiguous arrays of equal size (validated by the caller).
    ``formats[k]`` is the storage format of column ``k`` (kernels/layout.py FORMATS):
    "native" (the params' dtype), "float16" or "bfloat16" (float16, ml_dtypes.bfloat16
    or uint16 arrays of their bit patterns); by default inferred from the dtypes.
    Consecutive tensors that sit back to back in memory in every column (a FlatParams
    arena) merge into one row, so an arena is streamed as one run whatever its number
    of tensors.

    With ``model`` (16-bit arrays aligned with ``params``), ``params`` are the float32
    master weights and the driver also writes each updated weight, rounded, into
    ``model``; grads then have the model's 16-bit dtype.

    Blockwise columns (formats "int8-signed", "int8-unsigned": uint8 codes) come with
    ``scales[k]``, a list of float32 absmax arrays (one value per ``block`` elements of
    each tensor); their addresses follow the state columns' (and the model's) in the
    table, and a FlatParams run merges only across tensors of whole blocks.

    The addresses of params, state and model are taken once; :meth:`with_grads`
    re-targets the table at new gradient arrays for the cost of reading their addresses.
    """

    __slots__ = ("fixed", "table", "chunks", "starts", "like", "low_kind", "has", "formats",
                 "n_elements", "refs", "merge", "scales", "block", "pure", "regrad")

    def __init__(self, params, grads, slots, grad_addresses=None, fixed=None, merge=True,
                 model=None, formats=None, scales=None, block=0, pure=None):
        slots = tuple(slots)
        self.has = tuple(s is not None for s in slots)
        dtype = np.dtype(params[0].dtype) if params else np.dtype(np.float32)
        if pure is not None:
            # pure 16-bit params (no master weights): ``model`` is the Kahan column or None
            if pure not in ("kahan", "stochastic"):
                raise ValueError(f"pure must be 'kahan' or 'stochastic', got {pure!r}")
            if params and lowp.kind_of(dtype) == 0:
                raise TypeError(f"pure 16-bit steps take float16 or bfloat16 params, got {dtype}")
            if (pure == "kahan") != (model is not None):
                raise ValueError("pure='kahan' needs its compensation arrays (model=), "
                                 "pure='stochastic' none")
            low, math = dtype, np.dtype(np.float32)
        else:
            low = None if model is None else np.dtype(model[0].dtype)
            math = dtype
        self.pure = pure
        self.like = math.type(0)
        self.low_kind = 0 if low is None else lowp.kind_of(low)
        if formats is not None and len(formats) != len(slots):
            raise ValueError(f"formats must have one entry per state column ({len(slots)}), "
                             f"got {len(formats)}")
        if grads:
            # The driver reads gradients as the model's 16-bit patterns, or as the params'
            # dtype: a table without its model would read 16-bit gradients as float32.
            want = dtype if low is None else low
            if np.dtype(grads[0].dtype) != want:
                raise TypeError(f"the gradients are {np.dtype(grads[0].dtype)}, expected {want}"
                                + ("; 16-bit gradients need the table of their master weights "
                                   "(model=the 16-bit params)" if low is None else ""))
        # An absent column is read as the gradient: in the gradient's format.
        grad_format = _MODEL_OF_KIND.get(self.low_kind, NATIVE)
        if fixed is None:
            formats = tuple(grad_format if s is None else NATIVE if not params else
                            column_format(s[0].dtype, math, None if formats is None else formats[k])
                            for k, s in enumerate(slots))
            fixed = self._fixed(params, slots, model)
        elif formats is None:
            formats = tuple(grad_format if s is None else NATIVE for s in slots)
        self.formats = tuple(formats)
        blocked = [k for k, f in enumerate(self.formats) if f in BLOCKWISE]
        if blocked:
            block = _check_blockwise(params, slots, scales, block, blocked, CHUNK)
            if fixed.shape[1] == 2 + len(slots) + (model is not None):
                fixed = np.concatenate([fixed, _absmax_addresses(scales, blocked, len(params))],
                                       axis=1)
        else:
            block, scales = 0, None
        self.scales, self.block = scales, int(block)
        self.fixed = fixed
        if grad_addresses is None:
            grad_addresses = [address(g) if g.size else 0 for g in grads]
        full = np.empty((len(params), fixed.shape[1] + 1), dtype=np.int64)
        full[:, :2] = fixed[:, :2]
        full[:, 2] = np.asarray(grad_addresses, dtype=np.int64)
        full[:, 3:] = fixed[:, 2:]
        for k in np.flatnonzero(~np.array(self.has, dtype=bool)):
            full[:, 3 + k] = full[:, 2]
        nonempty = np.flatnonzero(full[:, 0] > 0)
        full = full[nonempty]
        # Bytes per element of each address column, for the back-to-back test.
        grad_size = 2 if low is not None else dtype.itemsize
        itemsizes = np.array([dtype.itemsize, grad_size]
                             + [math.itemsize if f == NATIVE else 1 if f in BLOCKWISE else 2
                                for f in self.formats]
                             + [2] * (model is not None) + [4] * len(blocked), dtype=np.int64)
        # merge=False keeps one row per non-empty tensor (per-tensor reductions need it).
        self.merge = merge
        self.table = merge_runs(full, itemsizes, self.block, len(blocked)) if merge else full
        self.chunks, self.starts = self._split(self.table[:, 0])
        self.n_elements = int(self.table[:, 0].sum())
        # The table holds raw addresses: keep every array alive while the table lives.
        self.refs = (params, grads, slots, model)
        self.regrad = self._regrad(full, itemsizes, nonempty, len(blocked))

    def _regrad(self, full, itemsizes, nonempty, n_absmax):
        """``(non-empty tensors, gradient-address columns)`` when new gradients cannot
        change the rows: no two rows merged, and no two whose other columns (params,
        present state, model, absmax) continue each other could merge whatever the
        gradients are. Then :meth:`with_grads` only writes the new addresses; else None."""
        if self.table.shape[0] != full.shape[0]:
            return None
        columns = [2] + [3 + k for k, h in enumerate(self.has) if not h]   # absent: the gradient's
        if self.merge and full.shape[0] > 1:
            fixed = [c for c in range(1, full.shape[1]) if c not in columns]
            if merge_runs(full[:, [0] + fixed], itemsizes[[c - 1 for c in fixed]], self.block,
                          n_absmax).shape[0] != full.shape[0]:
                return None
        return nonempty, columns

    @staticmethod
    def _fixed(params, slots, model):
        """Columns n, p, s0 ... s{K-1}[, model]: the addresses a new gradient keeps."""
        k_slots = len(slots)
        fixed = np.zeros((len(params), 2 + k_slots + (model is not None)), dtype=np.int64)
        for i, p in enumerate(params):
            fixed[i, 0] = p.size
            if p.size:
                fixed[i, 1] = address(p)
                for k, s in enumerate(slots):
                    if s is not None:
                        fixed[i, 2 + k] = address(s[i])
                if model is not None:
                    fixed[i, 2 + k_slots] = address(model[i])
        return fixed

    @staticmethod
    def _split(sizes):
        """The chunks ``(row, lo, hi)`` and each row's first chunk (rows are non-empty)."""
        counts = -(-sizes // CHUNK)
        row_of = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        first = np.repeat(starts, counts)
        lo = (np.arange(row_of.size, dtype=np.int64) - first) * CHUNK
        hi = np.minimum(lo + CHUNK, sizes[row_of])
        return np.ascontiguousarray(np.stack([row_of, lo, hi], axis=1)), starts

    def with_grads(self, grads, grad_addresses=None) -> "ChunkTable":
        """The same params and state over new gradient arrays: where the rows cannot change
        (:meth:`_regrad`), a copy with the new addresses written in; else made anew."""
        params, _, slots, model = self.refs
        if self.regrad is None:
            return ChunkTable(params, grads, slots, grad_addresses, self.fixed, self.merge, model,
                              self.formats, self.scales, self.block, self.pure)
        nonempty, columns = self.regrad
        if grad_addresses is None:
            grad_addresses = [address(g) if g.size else 0 for g in grads]
        out = object.__new__(ChunkTable)
        for name in ChunkTable.__slots__:
            setattr(out, name, getattr(self, name))
        out.table = self.table.copy()
        out.table[:, columns] = np.asarray(grad_addresses, dtype=np.int64)[nonempty, None]
        out.refs = (params, grads, slots, model)
        return out

    def layout(self, writes=None, row_mode=None, stochastic=False, load_absent=False) -> Layout:
        """The layout of a pass over this table: every present column is read, and with
        ``load_absent`` every absent one too (from the gradient's address: the gradient
        as stored); ``writes`` (one per state column) narrows which present ones are
        stored; ``row_mode`` as :func:`run`."""
        mode, slot = parse_row_mode(row_mode)
        n_slots = len(self.has)
        if writes is not None and len(writes) != n_slots:
            raise ValueError(f"writes must have one entry per state column ({n_slots}), "
                             f"got {len(writes)}")
        reads = [True] * n_slots if load_absent else list(self.has)
        stored = tuple(h and (writes is None or bool(writes[k])) for k, h in enumerate(self.has))
        if mode == ROW_SLOT:
            if not 0 <= slot < n_slots:
                raise ValueError(f"row_mode 'slot{slot}' names no state position of a table "
                                 f"with {n_slots}")
            reads[slot] = False          # the row's value takes the column's place
        model = _MODEL_OF_KIND.get(self.low_kind, "")
        if self.pure == "stochastic":
            model = f"pure-{model}-stochastic"
        elif self.pure == "kahan":
            model = f"pure-{model}-kahan"
        elif stochastic and model == BFLOAT16:
            model = "bfloat16-stochastic"
        return Layout.of(reads, stored, self.formats, mode, slot, model, self.block)


def _check_blockwise(params, slots, scales, block, blocked, chunk) -> int:
    """The checked block size of a table with blockwise columns ``blocked``."""
    block = int(block)
    if block <= 0 or chunk % block:
        raise ValueError(f"block must be a positive divisor of {chunk} (a power of two), got {block}")
    if scales is None or len(scales) != len(slots):
        raise ValueError("blockwise columns need scales: one list of absmax arrays per state column")
    for k in blocked:
        if slots[k] is None or scales[k] is None or len(scales[k]) != len(params):
            raise ValueError(f"blockwise column {k} needs its codes and one absmax array per param")
        for i, (p, a) in enumerate(zip(params, scales[k])):
            want = -(-p.size // block)
            if a.dtype != np.float32 or a.size != want or not a.flags.c_contiguous:
                raise ValueError(f"the absmax of column {k}, param {i}, must be a contiguous float32 "
                                 f"array of {want} values (one per {block} elements), got "
                                 f"{a.dtype} of {a.size}")
    return block


def _absmax_addresses(scales, blocked, n_params) -> np.ndarray:
    out = np.zeros((n_params, len(blocked)), dtype=np.int64)
    for j, k in enumerate(blocked):
        for i, a in enumerate(scales[k]):
            out[i, j] = address(a) if a.size else 0
    return out


def run(element, table: ChunkTable, scalars, grad_scale=1.0, seed=0, stochastic=False,
        row_values=None, row_mode=None, writes=None) -> None:
    """One fused step of ``element`` over every chunk of ``table``.

    ``element(p, g, s0, ..., s{K-1}, h) -> (p, s0, ..., s{K-1})`` with K the table's
    number of state columns. Each gradient is multiplied by ``grad_scale`` as it is
    read (1.0 leaves it exact). For master-weight tables of bfloat16, ``stochastic``
    rounds the model copy stochastically with random bits derived from ``seed`` and the
    element's position. ``row_values`` (one per row of a ``merge=False`` table) with
    ``row_mode`` "grad" scales each row's gradients; with "slot<k>" ("slot2" for LAMB
    and LARS) it is the element's state argument k (read-only; that column is not
    loaded): see kernels/per_tensor.py. ``writes`` (one bool per state column) narrows
    which present columns are stored: the others are read-only for this step (LAMB's
    second pass). The param is always written.
    """
    if table.chunks.shape[0] == 0:
        return
    if writes is not None:
        writes = tuple(writes)
    flags = flags_of(scalars)
    key = ("step", element, table.has, table.formats, table.low_kind, writes, row_mode,
           bool(stochastic), table.block, table.pure, flags, table.like.dtype, type(scalars))
    fn = _BY_CALL.get(key)
    first = fn is None
    if first:
        fn = _compiled("step", element, table.layout(writes, row_mode, stochastic), flags)
    if row_mode is not None and row_values is None:
        raise ValueError(f"row_mode {row_mode!r} needs row_values (one per row)")
    args = (table.table, table.chunks, table.like, _BITS, scalars, table.like.dtype.type(grad_scale),
            row_values if row_mode is not None else None, np.uint32(seed & 0xFFFFFFFF))
    threads.launch(fn, *args)
    if first:
        # row_values' dtype is not part of the key: such calls keep the dispatcher
        _BY_CALL[key] = _entry_point(fn, args) if row_mode is None else fn


def _entry_point(fn, args):
    """The compiled overload of dispatcher ``fn`` for ``args``, called directly: a call
    through the dispatcher types every argument again (about 2.5 us of a short step).
    Only for calls whose every argument type the caller's key fixes."""
    try:
        cres = fn.overloads.get(tuple(fn.typeof_pyval(a) for a in args))
    except Exception:  # pragma: no cover - anything unexpected: keep the dispatcher
        return fn
    return fn if cres is None else cres.entry_point


def reduce_chunks(fn, table: ChunkTable, scalars, maximum=False, accumulate=np.float64,
                  writes=None) -> np.ndarray:
    """Per-chunk partials ``(n_chunks, 2)`` of ``fn`` over ``table``, in ``accumulate`` precision.

    ``fn(p, g, s0, ..., s{K-1}, h) -> (a, b)``. Rows of the chunk table are
    ``table.chunks[:, 0]``; combine partials per row with ``np.add.reduceat`` /
    ``np.maximum.reduceat`` (fixed order, deterministic). ``writes`` (p, s0, ...,
    s{K-1}: K + 1 bools): the arrays ``fn`` also updates (it then returns
    ``(a, b, p, s0, ..., s{K-1})``); a written state column must be present.
    """
    out = np.zeros((table.chunks.shape[0], 2), dtype=accumulate)
    if writes is not None:
        writes = tuple(writes)
    flags = flags_of(scalars)
    key = ("reduce", fn, table.has, table.formats, table.low_kind, table.pure, table.block, writes,
           bool(maximum), flags)
    driver_fn = _BY_CALL.get(key)
    if driver_fn is None:
        mask = _reduce_writes(table, writes)
        if not out.shape[0]:
            return out
        driver_fn = _BY_CALL[key] = reducer(fn, _reduction_layout(table, mask[1:]), maximum, flags,
                                            mask[0])
    if out.shape[0]:
        threads.launch(driver_fn, table.table, table.chunks, table.like, _BITS, scalars, out)
    return out


def _reduce_writes(table: ChunkTable, writes) -> tuple:
    """The checked write mask of a reduction: p and each state column, all present."""
    n_slots = len(table.has)
    mask = (False,) * (n_slots + 1) if writes is None else tuple(map(bool, writes))
    if len(mask) != n_slots + 1:
        raise ValueError(f"writes must name p and each state column ({n_slots + 1} entries), "
                         f"got {len(mask)}")
    if any(w and not h for w, h in zip(mask[1:], table.has)):
        raise ValueError(f"writes {mask} name a state slot absent from the table {table.has}")
    if any(w and f in BLOCKWISE for w, f in zip(mask[1:], table.formats)):
        raise ValueError(f"writes {mask} name a blockwise (int8) state column: a reduction "
                         "stores none (the step re-encodes them)")
    return mask


def _reduction_layout(table: ChunkTable, writes) -> Layout:
    """The layout of a reduction over ``table`` storing the state columns ``writes``:
    every column read, blockwise ones read-only (decoded, never re-encoded:
    codegen._blockwise_reduce_source). Layout.of refuses a read-only blockwise column, as
    the steps re-encode every blockwise column they read; the reduction's layout is that
    layout with their writes cleared."""
    blocked = tuple(f in BLOCKWISE for f in table.formats)
    layout = table.layout(tuple(w or b for w, b in zip(writes, blocked)), load_absent=True)
    if not any(blocked):
        return layout
    return layout._replace(writes=tuple(w and not b for w, b in zip(layout.writes, blocked)))


def _rows_column(s, shape, fmt):
    # Numba has no float16 or bfloat16 arrays on the CPU: 16-bit columns go as uint16.
    s = s.reshape(shape)
    return s if fmt == NATIVE else s.view(np.uint16)


def run_rows(element, param, index, rows, slots, scalars, grad_scale=1.0, formats=None) -> None:
    """Update only rows ``index`` (unique) of ``param`` with gradient ``rows``, in parallel.

    ``param`` and each present state column (``slots``: K of them, None where absent)
    are arrays of shape (R, ...); ``rows`` is (k, ...). ``formats`` as for
    :class:`ChunkTable`.
    """
    if index.size == 0:
        return
    slots = tuple(slots)
    if formats is not None and len(formats) != len(slots):
        raise ValueError(f"formats must have one entry per state column ({len(slots)})")
    formats = tuple(NATIVE if s is None else
                    column_format(s.dtype, param.dtype, None if formats is None else formats[k])
                    for k, s in enumerate(slots))
    width = int(np.prod(param.shape[1:], dtype=np.int64))
    p2 = param.reshape(param.shape[0], width)
    columns = [_rows_column(s, p2.shape, f) for s, f in zip(slots, formats) if s is not None]
    layout = Layout.of([s is not None for s in slots], None, formats)
    threads.launch(_compiled("rows", element, layout, flags_of(scalars)), p2,
                   rows.reshape(index.size, width), *columns, index, param.dtype.type(0),
                   scalars, param.dtype.type(grad_scale))
