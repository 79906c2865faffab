"""The CPU driver: one ``prange`` over a chunk table, for any optimizer and any tensors.

A step is described by a *tensor table* and a *chunk table*:

- ``table[r] = (n, p_addr, g_addr, s0_addr, s1_addr, s2_addr)``: row ``r`` is a run of
  ``n`` elements of params, grads and up to three state slots, each given by the address
  of its first element. A row is one tensor in list mode, or a stretch of a FlatParams
  arena covering many tensors. An absent state slot repeats the grad address; the driver
  is specialised not to write it.
- ``chunks[c] = (r, lo, hi)``: chunk ``c`` is elements ``[lo, hi)`` of row ``r``;
  chunks hold at most :data:`CHUNK` elements, so threads get balanced work.

The driver knows chunks and addresses, never optimizer math: the per-element update is
the optimizer's element function, inlined into the loop. Each (element, slot mask,
setting of the scalars' bool flags) is compiled once and cached on disk (``cache=True``).
"""
from __future__ import annotations

import types as pytypes

import numba
import numpy as np
from numba import carray, prange, types
from numba.extending import intrinsic

from . import lowp, threads
from .specialize import accumulate, flag_tag, flags_of, freezer, source_tag

# Elements per chunk: 256 KiB of float32 per array, a few chunks per thread per MB.
CHUNK = 1 << 16



# Numba's threading layer is TBB unless someone chose before fastopt was imported
# (kernels/threads.py); every parallel call below goes through threads.launch, which
# keeps thread- and fork-safety on the layer in use.


@intrinsic
def _address_to_pointer(typingctx, address, like):
    """Reinterpret an integer address as a pointer to elements of ``like``'s type."""
    pointer_type = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, like), codegen


def _view(address, n, like):
    return carray(_address_to_pointer(address, like), n)


_view = numba.njit(inline="always", cache=True)(_view)


def _driver_template(table, chunks, like, h, grad_scale, row_values):
    # ELEMENT, HAS0..2 and ROW_MODE are compile-time constants injected by _instantiate.
    # grad_scale multiplies every gradient on the fly (unscaling, fused clipping).
    # ROW_MODE 1: row r's gradients are also multiplied by row_values[r] (a per-tensor
    # clip factor); ROW_MODE 2: row_values[r] is the element's third state argument,
    # read-only (a per-tensor trust ratio). ROW_MODE 0: row_values is None, unused.
    for c in prange(chunks.shape[0]):
        hc = FREEZE(h)  # noqa: F821  (inside the loop: parfor bodies are outlined)
        r = chunks[c, 0]
        lo = chunks[c, 1]
        hi = chunks[c, 2]
        n = table[r, 0]
        scale = grad_scale
        if ROW_MODE == 1:  # noqa: F821
            scale = grad_scale * row_values[r]
        # Slice first, then loop from 0: LLVM vectorises this form.
        p = _view(table[r, 1], n, like)[lo:hi]
        g = _view(table[r, 2], n, like)[lo:hi]
        s0 = _view(table[r, 3], n, like)[lo:hi]
        s1 = _view(table[r, 4], n, like)[lo:hi]
        s2 = _view(table[r, 5], n, like)[lo:hi]
        for i in range(hi - lo):
            if ROW_MODE == 2:  # noqa: F821
                third = row_values[r]
            else:
                third = s2[i]
            out = ELEMENT(p[i], g[i] * scale, s0[i], s1[i], third, hc)  # noqa: F821
            p[i] = out[0]
            if HAS0:  # noqa: F821
                s0[i] = out[1]
            if HAS1:  # noqa: F821
                s1[i] = out[2]
            if HAS2:  # noqa: F821
                s2[i] = out[3]


_DRIVERS: dict = {}


def _instantiate(template, prefix: str, fn, flags=(), **constants):
    """Compile ``template`` with ``fn`` inlined as its global ELEMENT, the scalars' bool
    fields ``flags`` (:func:`flags_of`) as constants and ``constants`` frozen as globals.
    The qualname names the on-disk cache entry: one per template, function, flags,
    constants and function source.
    """
    namespace = dict(globals())
    namespace.update(constants)
    namespace["ELEMENT"] = numba.njit(inline="always", cache=True)(fn)
    namespace["FREEZE"] = freezer(flags)
    compiled = pytypes.FunctionType(template.__code__, namespace, template.__name__)
    tag = "".join(str(int(v)) for k, v in sorted(constants.items())) + "_" + flag_tag(flags)
    compiled.__qualname__ = f"{prefix}_{fn.__name__}_{tag}_{source_tag(fn)}"
    return numba.njit(parallel=True, cache=True, nogil=True)(compiled)


def _cached(key, make):
    fn = _DRIVERS.get(key)
    if fn is None:
        fn = _DRIVERS[key] = make()
    return fn


ROW_MODES = {None: 0, "grad": 1, "slot2": 2}


def driver(element, has: tuple[bool, bool, bool], flags: tuple = (), row_mode: int = 0):
    """The compiled chunk-table driver for ``element`` with state slots ``has``,
    specialised on the scalars' ``flags``."""
    return _cached(("step", element, has, flags, row_mode), lambda: _instantiate(
        _driver_template, "step", element, flags, HAS0=has[0], HAS1=has[1], HAS2=has[2],
        ROW_MODE=row_mode))


def _rows_template(p, g, s0, s1, s2, index, h, grad_scale):
    # Sparse row update: p and s* are (rows, width) views of a param and its state; g is
    # (k, width), the coalesced gradient rows for the unique row ids in index. Absent
    # state slots are passed as p and never written.
    for k in prange(index.size):
        hc = FREEZE(h)  # noqa: F821
        r = index[k]
        pr = p[r]
        gr = g[k]
        a0 = s0[r]
        a1 = s1[r]
        a2 = s2[r]
        for j in range(pr.size):
            out = ELEMENT(pr[j], gr[j] * grad_scale, a0[j], a1[j], a2[j], hc)  # noqa: F821
            pr[j] = out[0]
            if HAS0:  # noqa: F821
                a0[j] = out[1]
            if HAS1:  # noqa: F821
                a1[j] = out[2]
            if HAS2:  # noqa: F821
                a2[j] = out[3]


def run_rows(element, param, index, rows, slots, scalars, grad_scale=1.0) -> None:
    """Update only rows ``index`` (unique) of ``param`` with gradient ``rows``, in parallel.

    ``param`` and each present slot are arrays of shape (R, ...); ``rows`` is (k, ...).
    """
    if index.size == 0:
        return
    has = tuple(s is not None for s in slots)
    width = int(np.prod(param.shape[1:], dtype=np.int64))
    p2 = param.reshape(param.shape[0], width)
    s2 = [p2 if s is None else s.reshape(p2.shape) for s in slots]
    flags = flags_of(scalars)
    fn = _cached(("rows", element, has, flags), lambda: _instantiate(
        _rows_template, "rows", element, flags, HAS0=has[0], HAS1=has[1], HAS2=has[2]))
    threads.launch(fn, p2, rows.reshape(index.size, width), s2[0], s2[1], s2[2], index,
                   scalars, param.dtype.type(grad_scale))


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def merge_runs(rows, itemsizes):
    """Merge each row ``(n, addr, addr, ...)`` into the previous one where every address
    column continues it in memory (``itemsizes``: bytes per element of each column)."""
    if rows.shape[0] < 2:
        return rows
    ends = rows[:-1, 1:] + rows[:-1, :1] * itemsizes
    continues = np.all(rows[1:, 1:] == ends, axis=1)
    starts = np.flatnonzero(np.concatenate([[True], ~continues]))
    merged = rows[starts].copy()
    merged[:, 0] = np.add.reduceat(rows[:, 0], starts)
    return merged


class ChunkTable:
    """Tensor and chunk tables for one step over aligned lists of arrays.

    ``params[i]``, ``grads[i]`` and ``slots[k][i]`` are C-contiguous arrays of equal size
    (validated by the caller); params and slots share one dtype. Consecutive tensors
    that sit back to back in memory in every column (a FlatParams arena) merge into one
    row, so an arena is streamed as one run whatever its number of tensors.

    With ``model`` (16-bit arrays aligned with ``params``), ``params`` are the float32
    master weights and the driver also writes each updated weight, rounded, into
    ``model``; grads then have the model's 16-bit dtype.

    The addresses of params, state and model are taken once; :meth:`with_grads`
    re-targets the table at new gradient arrays for the cost of reading their addresses.
    """

    __slots__ = ("fixed", "table", "chunks", "starts", "like", "low_kind", "has", "n_elements",
                 "refs", "merge")

    def __init__(self, params, grads, slots, grad_addresses=None, fixed=None, merge=True,
                 model=None):
        self.has = tuple(s is not None for s in slots)
        dtype = np.dtype(params[0].dtype) if params else np.dtype(np.float32)
        self.like = dtype.type(0)
        self.low_kind = 0 if model is None else lowp.kind_of(model[0].dtype)
        if grads:
            # The driver reads gradients as the model's 16-bit patterns, or as the params'
            # dtype: a table without its model would read 16-bit gradients as float32.
            want = dtype if model is None else np.dtype(model[0].dtype)
            if np.dtype(grads[0].dtype) != want:
                raise TypeError(f"the gradients are {np.dtype(grads[0].dtype)}, expected {want}"
                                + ("; 16-bit gradients need the table of their master weights "
                                   "(model=the 16-bit params)" if model is None else ""))
        if fixed is None:
            # columns: n, p, s0, s1, s2[, model] (absent slots: replaced by the grad address)
            fixed = np.zeros((len(params), 5 if model is None else 6), dtype=np.int64)
            for i, p in enumerate(params):
                fixed[i, 0] = p.size
                if p.size:
                    fixed[i, 1] = address(p)
                    for k, s in enumerate(slots):
                        if s is not None:
                            fixed[i, 2 + k] = address(s[i])
                    if model is not None:
                        fixed[i, 5] = address(model[i])
        self.fixed = fixed
        if grad_addresses is None:
            grad_addresses = [address(g) if g.size else 0 for g in grads]
        g_addr = np.asarray(grad_addresses, dtype=np.int64)
        full = np.empty((len(params), fixed.shape[1] + 1), dtype=np.int64)
        full[:, :2] = fixed[:, :2]
        full[:, 2] = g_addr
        for k in range(3):
            full[:, 3 + k] = fixed[:, 2 + k] if self.has[k] else g_addr
        full[:, 6:] = fixed[:, 5:]
        full = full[full[:, 0] > 0]
        # Bytes per element of each address column, for the back-to-back test.
        grad_size = 2 if model is not None else dtype.itemsize
        itemsizes = np.array([dtype.itemsize, grad_size]
                             + [dtype.itemsize if h else grad_size for h in self.has]
                             + [2] * (full.shape[1] - 6), dtype=np.int64)
        # merge=False keeps one row per non-empty tensor (per-tensor reductions need it).
        self.merge = merge
        self.table = merge_runs(full, itemsizes) if merge else full
        self.chunks, self.starts = self._split(self.table[:, 0])
        self.n_elements = int(self.table[:, 0].sum())
        # The table holds raw addresses: keep every array alive while the table lives.
        self.refs = (params, grads, slots, model)

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
        """The same params and state over new gradient arrays."""
        params, _, slots, model = self.refs
        return ChunkTable(params, grads, slots, grad_addresses, self.fixed, self.merge, model)


def _master_template(table, chunks, like, bits, h, grad_scale, seed):
    # Master weights: p and s* are float32; g and the model copy are 16-bit patterns of
    # kind KIND (kernels.lowp). Writes the master weight, the state and the rounded copy.
    for c in prange(chunks.shape[0]):
        hc = FREEZE(h)  # noqa: F821
        r = chunks[c, 0]
        lo = chunks[c, 1]
        hi = chunks[c, 2]
        n = table[r, 0]
        p = _view(table[r, 1], n, like)[lo:hi]
        g = _view(table[r, 2], n, bits)[lo:hi]
        s0 = _view(table[r, 3], n, like)[lo:hi]
        s1 = _view(table[r, 4], n, like)[lo:hi]
        s2 = _view(table[r, 5], n, like)[lo:hi]
        w = _view(table[r, 6], n, bits)[lo:hi]
        for i in range(hi - lo):
            out = ELEMENT(p[i], lowp.widen(g[i], KIND) * grad_scale,  # noqa: F821
                          s0[i], s1[i], s2[i], hc)
            p[i] = out[0]
            if HAS0:  # noqa: F821
                s0[i] = out[1]
            if HAS1:  # noqa: F821
                s1[i] = out[2]
            if HAS2:  # noqa: F821
                s2[i] = out[3]
            w[i] = lowp.round_to_bits(out[0], KIND, seed, c * CHUNK + i)  # noqa: F821


def run(element, table: ChunkTable, scalars, grad_scale=1.0, seed=0, stochastic=False,
        row_values=None, row_mode=None, writes=None) -> None:
    """One fused step of ``element`` over every chunk of ``table``.

    Each gradient is multiplied by ``grad_scale`` as it is read (1.0 leaves it exact).
    For master-weight tables of bfloat16, ``stochastic`` rounds the model copy
    stochastically with random bits derived from ``seed`` and the element's position.
    ``row_values`` (one per row of a ``merge=False`` table) with ``row_mode`` "grad"
    scales each row's gradients; with "slot2" it is the element's third state argument
    (read-only; that slot must be absent): see kernels/per_tensor.py.
    ``writes`` (three bools) narrows which present state slots are stored: the others
    are read-only for this step (LAMB's second pass). The param is always written.
    """
    if table.chunks.shape[0] == 0:
        return
    scale = table.like.dtype.type(grad_scale)
    mode = ROW_MODES[row_mode]
    has = table.has
    if writes is not None:
        if table.low_kind:
            raise NotImplementedError("write masks with master weights")
        has = tuple(bool(w) and h for w, h in zip(writes, has))
    if mode:
        if table.low_kind:
            raise NotImplementedError("per-row values with master weights")
        has = (has[0], has[1], False) if mode == 2 else has
        threads.launch(driver(element, has, flags_of(scalars), mode), table.table,
                       table.chunks, table.like, scalars, scale, row_values)
        return
    if table.low_kind:
        kind = table.low_kind
        if stochastic and kind == lowp.BFLOAT16:
            kind = lowp.BFLOAT16_STOCHASTIC
        # Cached on disk like every driver. (It once was not: a cached master kernel
        # "crashed on new gradient arrays", most likely the split-bucket bug that read
        # 16-bit gradients as float32 past their end. tests/test_master_weights.py steps
        # new gradients in a fresh process from a warm cache.)
        flags = flags_of(scalars)
        fn = _cached(("master", element, table.has, kind, flags), lambda: _instantiate(
            _master_template, "master", element, flags, HAS0=table.has[0],
            HAS1=table.has[1], HAS2=table.has[2], KIND=kind))
        threads.launch(fn, table.table, table.chunks, table.like, np.uint16(0), scalars,
                       scale, np.uint32(seed & 0xFFFFFFFF))
        return
    threads.launch(driver(element, has, flags_of(scalars)), table.table, table.chunks,
                   table.like, scalars, scale, None)


# Elements per block of a reduction: summed in the element's own precision, then added
# to the chunk's float64 sum. A loop with float64 accumulators runs at the float64
# vector width (4 lanes in 256-bit registers) and LAMB's divisions and square root ran
# at that width too; float32 block sums keep the loop 8 lanes wide. 1024 float32
# squares spread over LLVM's 32 partial sums are 32 terms each: an error near 2e-6 in
# the worst case, far below one float32 ulp of the resulting norm's use.
REDUCE_BLOCK = 1024


def _reduce_template(table, chunks, like, h, out):
    # ELEMENT(p, g, s0, s1, s2, h) -> (a, b), or with WRITES, (a, b, p, s0, s1, s2):
    # WRITE_P and WRITE0..2 store those (a reduction that also updates state, as LAMB's
    # first pass). MAXIMUM picks max instead of sum. One partial per chunk, combined by
    # the caller in a fixed order: the result does not depend on the number of threads.
    for c in prange(chunks.shape[0]):
        hc = FREEZE(h)  # noqa: F821
        r = chunks[c, 0]
        lo = chunks[c, 1]
        hi = chunks[c, 2]
        n = table[r, 0]
        acc_a = out[c, 0] * 0
        acc_b = out[c, 1] * 0
        for start in range(lo, hi, REDUCE_BLOCK):
            stop = min(start + REDUCE_BLOCK, hi)
            # Slice first, then loop from 0: LLVM vectorises this form.
            p = _view(table[r, 1], n, like)[start:stop]
            g = _view(table[r, 2], n, like)[start:stop]
            s0 = _view(table[r, 3], n, like)[start:stop]
            s1 = _view(table[r, 4], n, like)[start:stop]
            s2 = _view(table[r, 5], n, like)[start:stop]
            block_a = like - like   # unifies with the element's output type
            block_b = like - like
            for i in range(stop - start):
                res = ELEMENT(p[i], g[i], s0[i], s1[i], s2[i], hc)  # noqa: F821
                if WRITE_P:  # noqa: F821
                    p[i] = res[2]
                if WRITE0:  # noqa: F821
                    s0[i] = res[3]
                if WRITE1:  # noqa: F821
                    s1[i] = res[4]
                if WRITE2:  # noqa: F821
                    s2[i] = res[5]
                if MAXIMUM:  # noqa: F821
                    block_a = max(block_a, res[0])
                    block_b = max(block_b, res[1])
                else:
                    block_a = accumulate(block_a, res[0])
                    block_b = accumulate(block_b, res[1])
            if MAXIMUM:  # noqa: F821
                acc_a = max(acc_a, block_a)
                acc_b = max(acc_b, block_b)
            else:
                acc_a += block_a
                acc_b += block_b
        out[c, 0] = acc_a
        out[c, 1] = acc_b


NO_WRITES = (False, False, False, False)


def reducer(fn, maximum: bool, flags: tuple = (), writes: tuple = NO_WRITES):
    """The compiled reduction driver for ``fn`` (sum, or max when ``maximum``),
    specialised on the scalars' ``flags``; ``writes`` = which of (p, s0, s1, s2) it stores."""
    # The block sums' additions may be reassociated (_accumulate): LLVM vectorises them
    # with several accumulators. Each chunk is still summed by one thread in an order
    # fixed by the compiled code, so results do not depend on the thread count.
    return _cached(("reduce", fn, maximum, flags, writes), lambda: _instantiate(
        _reduce_template, "reduce", fn, flags, MAXIMUM=maximum,
        WRITE_P=writes[0], WRITE0=writes[1], WRITE1=writes[2], WRITE2=writes[3]))


def reduce_chunks(fn, table: ChunkTable, scalars, maximum=False, accumulate=np.float64,
                  writes=NO_WRITES) -> np.ndarray:
    """Per-chunk partials ``(n_chunks, 2)`` of ``fn`` over ``table``, in ``accumulate`` precision.

    Rows of the chunk table are ``table.chunks[:, 0]``; combine partials per row with
    ``np.add.reduceat`` / ``np.maximum.reduceat`` (fixed order, deterministic).
    ``writes`` (p, s0, s1, s2): the arrays ``fn`` also updates (it then returns
    ``(a, b, p, s0, s1, s2)``); a written slot must be present in the table.
    """
    if any(writes[1:][k] and not table.has[k] for k in range(3)):
        raise ValueError(f"writes {writes} name a state slot absent from the table {table.has}")
    out = np.zeros((table.chunks.shape[0], 2), dtype=accumulate)
    if out.shape[0]:
        threads.launch(reducer(fn, maximum, flags_of(scalars), tuple(map(bool, writes))),
                       table.table, table.chunks, table.like, scalars, out)
    return out
