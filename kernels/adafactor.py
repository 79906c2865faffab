"""Adafactor's CPU kernels: factored second moments in three parallel passes.

References:
  Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
  ICML 2018; equations, defaults and state layout as torch.optim.Adafactor (torch 2.13):
  see kernels/reference_adafactor.py for the algorithm.

Adafactor is not elementwise: a param with ``ndim >= 2`` keeps a row factor ``row_var``
(shape ``(..., R, 1)``) and a column factor ``col_var`` (``(..., 1, C)``), and its update
needs per-tensor norms. Each dtype group is stepped in passes, every one a Numba
``prange``; factored params are cut into tiles of at most ``TILE_ROWS`` rows by
``TILE_COLS`` columns of one matrix of the batch, vector (0-d, 1-d) params into chunks:

1. :func:`factored_sums`: per tile, each row's sum of ``g^2`` (one entry per row and
   column tile), the tile's column sums of ``g^2`` (one entry per column and row tile:
   the per-thread partials of the column reduction) and ``||p||^2``.
   :func:`vector_moments`: per chunk of a vector param, ``variance`` updated (written),
   ``||p||^2`` and ``||u||^2``.
2. :func:`factored_finish` (per tensor, small): the row and column partials combined in
   a fixed order, ``row_var`` and ``col_var`` lerped, the per-matrix mean of ``row_var``.
3. :func:`factored_update_sq`: ``||u||^2`` per tile, ``u = g / sqrt(max(r c / m, eps1^2))``.
4. host: ``alpha / max(1, RMS(u) / d)`` per tensor (float64, vectorised over tensors).
5. :func:`factored_apply`, :func:`vector_apply`: ``p = p * decay - step * u``, with ``u``
   recomputed by the same operations as in its norm's pass (the same bits).

A float32 parameter moves 4 reads of ``g``-sized data and one write per element in the
factored passes (g three times, p twice, p written once: 24 bytes). Sums inside a tile
row or a block are in the param's dtype, with reassociable additions (vectorised; see
kernels/specialize.py), and are added in float64 across rows, blocks and tiles, always
in the same order: the results do not depend on the number of threads.
Scalars are in the param's dtype (float32 loops stay float32).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from .codegen import view
from .specialize import accumulate

TILE_COLS = 4096          # columns of a tile (wider rows are split)
TILE_ELEMENTS = 1 << 16   # elements of a tile: rows = TILE_ELEMENTS // columns ...
TILE_ROWS = 128           # ... at most this many (the column partials are summed in the
#                           param's dtype over a tile's rows)
CHUNK = 1 << 16           # elements of a vector param's chunk
BLOCK = 1024              # elements summed in the param's dtype before a float64 add

# Factored table columns (int64): addresses of p, g, row_var, col_var; B, R, C; tile rows
# and columns; column and row tiles per matrix; offsets into the row and column partials,
# into the per-matrix means and into the tiles.
P, G, RV, CV, NB, NR, NC, TR, TC, NCB, NRB, ROW_OFF, COL_OFF, MEAN_OFF, TILE_OFF = range(15)
# Vector table columns: addresses of p, g, variance; size.
VP, VG, VV, VN = range(4)

_JIT = dict(cache=True, nogil=True, error_model="numpy")


def cast_like(x, like):
    """``x`` in ``like``'s float type (inside compiled code; Python ints and floats would
    promote a float32 loop to float64)."""
    return type(like)(x)


@overload(cast_like, inline="always")
def _cast_like(x, like):
    if like == types.float32:
        return lambda x, like: np.float32(x)
    return lambda x, like: np.float64(x)


@numba.njit(inline="always", **_JIT)
def lerp(start, end, weight, rest):
    """torch's lerp (``rest = 1 - weight``): from the start for weights under 0.5, from
    the end otherwise."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * rest


@numba.njit(inline="always", **_JIT)
def update_of(x, var, eps1sq):
    """``x / sqrt(max(var, eps1^2))`` (NaN variances stay NaN, as torch's clamp_min)."""
    if var < eps1sq:
        var = eps1sq
    return x / math.sqrt(var)


@numba.njit(parallel=True, **_JIT)
def factored_sums(ftab, tiles, like, gmul, rowacc, colpart, tile_psq):
    """Pass 1 over the factored params' tiles: row partials, column partials, ||p||^2."""
    zero = cast_like(0.0, like)
    for t in prange(tiles.shape[0]):
        f, b, rb, cb = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
        R, C = ftab[f, NR], ftab[f, NC]
        n = ftab[f, NB] * R * C
        p = view(ftab[f, P], n, like)
        g = view(ftab[f, G], n, like)
        r0 = rb * ftab[f, TR]
        r1 = min(R, r0 + ftab[f, TR])
        c0 = cb * ftab[f, TC]
        width = min(C, c0 + ftab[f, TC]) - c0
        ncb = ftab[f, NCB]
        col = ftab[f, COL_OFF] + (b * ftab[f, NRB] + rb) * C + c0
        for c in range(width):
            colpart[col + c] = zero
        psq = 0.0
        for r in range(r0, r1):
            base = (b * R + r) * C + c0
            acc = zero
            pacc = zero
            # Two loops: the reductions alone vectorise; with the column store beside
            # them LLVM (which cannot rule out aliasing of addresses) kept the loop scalar.
            for c in range(width):
                x = g[base + c] * gmul
                acc = accumulate(acc, x * x)
                y = p[base + c]
                pacc = accumulate(pacc, y * y)
            for c in range(width):
                x = g[base + c] * gmul
                colpart[col + c] += x * x
            rowacc[ftab[f, ROW_OFF] + (b * R + r) * ncb + cb] = acc
            psq += pacc
        tile_psq[t] = psq


@numba.njit(parallel=True, **_JIT)
def factored_finish(ftab, like, weights, rests, eps1, rowacc, colpart, means):
    """Per factored param: row and column means of g^2 from the partials (fixed order),
    ``row_var``/``col_var`` lerped towards them, each matrix's clamped mean of row_var."""
    for f in prange(ftab.shape[0]):
        B, R, C = ftab[f, NB], ftab[f, NR], ftab[f, NC]
        ncb, nrb = ftab[f, NCB], ftab[f, NRB]
        rv = view(ftab[f, RV], B * R, like)
        cv = view(ftab[f, CV], B * C, like)
        w = weights[f]
        rest = rests[f]
        row0 = ftab[f, ROW_OFF]
        col0 = ftab[f, COL_OFF]
        for b in range(B):
            total = 0.0
            for r in range(R):
                s = 0.0
                for j in range(ncb):
                    s += rowacc[row0 + (b * R + r) * ncb + j]
                mean = cast_like(s, like) / cast_like(C, like)
                i = b * R + r
                rv[i] = lerp(rv[i], mean, w, rest)
                total += rv[i]
            for c in range(C):
                s = 0.0
                for j in range(nrb):
                    s += colpart[col0 + (b * nrb + j) * C + c]
                mean = cast_like(s, like) / cast_like(R, like)
                i = b * C + c
                cv[i] = lerp(cv[i], mean, w, rest)
            m = cast_like(total, like) / cast_like(R, like)
            if m < eps1:
                m = eps1
            means[ftab[f, MEAN_OFF] + b] = m


@numba.njit(parallel=True, **_JIT)
def factored_update_sq(ftab, tiles, like, gmul, eps1sq, means, tile_usq):
    """Pass 3: ||u||^2 per tile, ``u = g / sqrt(max(row_var col_var / mean, eps1^2))``."""
    zero = cast_like(0.0, like)
    for t in prange(tiles.shape[0]):
        f, b, rb, cb = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
        B, R, C = ftab[f, NB], ftab[f, NR], ftab[f, NC]
        g = view(ftab[f, G], B * R * C, like)
        rv = view(ftab[f, RV], B * R, like)
        cv = view(ftab[f, CV], B * C, like)
        m = means[ftab[f, MEAN_OFF] + b]
        r0 = rb * ftab[f, TR]
        r1 = min(R, r0 + ftab[f, TR])
        c0 = cb * ftab[f, TC]
        width = min(C, c0 + ftab[f, TC]) - c0
        usq = 0.0
        for r in range(r0, r1):
            base = (b * R + r) * C + c0
            a = rv[b * R + r]
            acc = zero
            for c in range(width):
                u = update_of(g[base + c] * gmul, (a * cv[b * C + c0 + c]) / m, eps1sq)
                acc = accumulate(acc, u * u)
            usq += acc
        tile_usq[t] = usq


@numba.njit(parallel=True, **_JIT)
def factored_apply(ftab, tiles, like, gmul, eps1sq, means, decay, step):
    """Pass 5: ``p = p * decay - step * u`` (``decay``, ``step``: per tensor)."""
    for t in prange(tiles.shape[0]):
        f, b, rb, cb = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
        B, R, C = ftab[f, NB], ftab[f, NR], ftab[f, NC]
        p = view(ftab[f, P], B * R * C, like)
        g = view(ftab[f, G], B * R * C, like)
        rv = view(ftab[f, RV], B * R, like)
        cv = view(ftab[f, CV], B * C, like)
        m = means[ftab[f, MEAN_OFF] + b]
        keep = decay[f]
        s = step[f]
        r0 = rb * ftab[f, TR]
        r1 = min(R, r0 + ftab[f, TR])
        c0 = cb * ftab[f, TC]
        width = min(C, c0 + ftab[f, TC]) - c0
        buf = np.empty(width, means.dtype)
        for r in range(r0, r1):
            base = (b * R + r) * C + c0
            a = rv[b * R + r]
            # The update goes through a row buffer: a loop that reads g and the column
            # factor and writes p stayed scalar (addresses of unknown aliasing).
            for c in range(width):
                buf[c] = update_of(g[base + c] * gmul, (a * cv[b * C + c0 + c]) / m, eps1sq)
            for c in range(width):
                p[base + c] = p[base + c] * keep - s * buf[c]


@numba.njit(parallel=True, **_JIT)
def vector_moments(vtab, chunks, like, gmul, eps1sq, weights, rests, chunk_psq, chunk_usq):
    """Vector params' pass 1: ``variance`` lerped towards g^2 (written); ||p||^2, ||u||^2."""
    zero = cast_like(0.0, like)
    for k in prange(chunks.shape[0]):
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        n = vtab[t, VN]
        p = view(vtab[t, VP], n, like)
        g = view(vtab[t, VG], n, like)
        v = view(vtab[t, VV], n, like)
        w = weights[t]
        rest = rests[t]
        psq = 0.0
        usq = 0.0
        for start in range(lo, hi, BLOCK):
            end = min(hi, start + BLOCK)
            pacc = zero
            uacc = zero
            for i in range(start, end):
                x = g[i] * gmul
                var = lerp(v[i], x * x, w, rest)
                v[i] = var
                y = p[i]
                pacc = accumulate(pacc, y * y)
                u = update_of(x, var, eps1sq)
                uacc = accumulate(uacc, u * u)
            psq += pacc
            usq += uacc
        chunk_psq[k] = psq
        chunk_usq[k] = usq


@numba.njit(parallel=True, **_JIT)
def vector_apply(vtab, chunks, like, gmul, eps1sq, decay, step):
    """Vector params' pass 2: ``p = p * decay - step * g / sqrt(max(variance, eps1^2))``."""
    for k in prange(chunks.shape[0]):
        t, lo, hi = chunks[k, 0], chunks[k, 1], chunks[k, 2]
        n = vtab[t, VN]
        p = view(vtab[t, VP], n, like)
        g = view(vtab[t, VG], n, like)
        v = view(vtab[t, VV], n, like)
        keep = decay[t]
        s = step[t]
        for i in range(lo, hi):
            p[i] = p[i] * keep - s * update_of(g[i] * gmul, v[i], eps1sq)


# -- tables (host) --------------------------------------------------------------------------
def _address(a) -> int:
    return int(a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else \
        int(a.__cuda_array_interface__["data"][0])


def tile_shape(R: int, C: int) -> tuple:
    """(rows, columns) of a factored matrix's tiles."""
    cols = max(1, min(C, TILE_COLS))
    rows = max(1, min(R, TILE_ROWS, TILE_ELEMENTS // cols))
    return rows, cols


class CpuTables:
    """One dtype group's tables: factored params (with their ``row_var``, ``col_var``)
    cut into tiles, vector params (with their ``variance``) into chunks, and the
    partial-sum buffers the passes fill (allocated once per set of arrays)."""

    def __init__(self, factored, vectors):
        # factored: [(p, g, row_var, col_var)], vectors: [(p, g, variance)] (non-empty params)
        self.factored, self.vectors = factored, vectors
        rows, tiles = [], []
        row_off = col_off = mean_off = 0
        for f, (p, g, rv, cv) in enumerate(factored):
            R, C = int(p.shape[-2]), int(p.shape[-1])
            B = int(p.size // (R * C)) if R * C else int(np.prod(p.shape[:-2], dtype=np.int64))
            tr, tc = tile_shape(R, C)
            nrb, ncb = -(-R // tr) if R else 0, -(-C // tc) if C else 0
            rows.append((_address(p), _address(g), _address(rv), _address(cv), B, R, C, tr, tc,
                         ncb, nrb, row_off, col_off, mean_off, len(tiles)))
            for b in range(B):
                for rb in range(nrb):
                    for cb in range(ncb):
                        tiles.append((f, b, rb, cb))
            row_off += B * R * ncb
            col_off += B * nrb * C
            mean_off += B
        self.ftab = np.array(rows, dtype=np.int64).reshape(len(rows), 15)
        self.tiles = np.array(tiles, dtype=np.int64).reshape(len(tiles), 4)
        self.tile_owner = self.tiles[:, 0].copy()
        dtype = np.dtype((factored or vectors)[0][0].dtype)
        self.like = dtype.type(0)
        self.rowacc = np.zeros(row_off, dtype)
        self.colpart = np.zeros(col_off, dtype)
        self.means = np.zeros(mean_off, dtype)
        self.tile_psq = np.zeros(len(tiles))
        self.tile_usq = np.zeros(len(tiles))
        vrows, chunks = [], []
        for t, (p, g, v) in enumerate(vectors):
            n = int(p.size)
            vrows.append((_address(p), _address(g), _address(v), n))
            for lo in range(0, n, CHUNK):
                chunks.append((t, lo, min(n, lo + CHUNK)))
        self.vtab = np.array(vrows, dtype=np.int64).reshape(len(vrows), 4)
        self.chunks = np.array(chunks, dtype=np.int64).reshape(len(chunks), 3)
        self.chunk_owner = self.chunks[:, 0].copy()
        self.chunk_psq = np.zeros(len(chunks))
        self.chunk_usq = np.zeros(len(chunks))


def _per_tensor(partials, owner, n):
    """Per-tensor sums of per-tile partials (in tile order: deterministic)."""
    return np.bincount(owner, weights=partials, minlength=n) if n else np.zeros(0)


def step_cpu(tables: CpuTables, h, launch) -> None:
    """One Adafactor step over ``tables`` with the host scalars ``h`` (:func:`host_scalars`
    per tensor, float64 arrays: factored first, then vectors) via ``launch(fn, *args)``."""
    like = tables.like
    cast = like.dtype.type
    nf, nv = tables.ftab.shape[0], tables.vtab.shape[0]
    gmul, eps1, eps1sq = cast(h.gmul), cast(h.eps1), cast(h.eps1 * h.eps1)
    weights = h.weight.astype(like.dtype)
    rests = cast(1.0) - weights           # as torch's lerp: 1 - weight in the dtype
    if nf:
        launch(factored_sums, tables.ftab, tables.tiles, like, gmul, tables.rowacc,
               tables.colpart, tables.tile_psq)
        launch(factored_finish, tables.ftab, like, weights[:nf], rests[:nf], eps1, tables.rowacc,
               tables.colpart, tables.means)
        launch(factored_update_sq, tables.ftab, tables.tiles, like, gmul, eps1sq, tables.means,
               tables.tile_usq)
    if nv:
        launch(vector_moments, tables.vtab, tables.chunks, like, gmul, eps1sq, weights[nf:],
               rests[nf:], tables.chunk_psq, tables.chunk_usq)
    psq = np.concatenate([_per_tensor(tables.tile_psq, tables.tile_owner, nf),
                          _per_tensor(tables.chunk_psq, tables.chunk_owner, nv)])
    usq = np.concatenate([_per_tensor(tables.tile_usq, tables.tile_owner, nf),
                          _per_tensor(tables.chunk_usq, tables.chunk_owner, nv)])
    step = step_sizes(psq, usq, h).astype(like.dtype)
    decay = np.full(nf + nv, cast(h.decay))
    if nf:
        launch(factored_apply, tables.ftab, tables.tiles, like, gmul, eps1sq, tables.means,
               decay[:nf], step[:nf])
    if nv:
        launch(vector_apply, tables.vtab, tables.chunks, like, gmul, eps1sq, decay[nf:], step[nf:])


# -- host scalars -----------------------------------------------------------------------------
class HostScalars:
    """A dtype group's step scalars: per tensor ``weight`` (= 1 - beta2_hat_t), ``rho``
    and ``size`` (float64 arrays); ``gmul`` (gradient multiplier: -scale when
    maximizing), ``eps1``, ``eps2``, ``d``, ``decay`` (1 - lr * weight_decay)."""

    __slots__ = ("weight", "rho", "size", "gmul", "eps1", "eps2", "d", "decay")

    def __init__(self, steps, sizes, group, dtype, scale=1.0):
        lr = float(group["lr"])
        eps1, eps2 = group["eps"]
        steps = np.asarray(steps, dtype=np.float64)
        self.weight = steps ** float(group["beta2_decay"])
        self.rho = np.minimum(lr, 1.0 / np.sqrt(steps))
        self.size = np.asarray(sizes, dtype=np.float64)
        self.gmul = -float(scale) if group["maximize"] else float(scale)
        self.eps1 = float(np.finfo(dtype).eps) if eps1 is None else float(eps1)
        self.eps2 = float(eps2)
        self.d = float(group["d"])
        wd = float(group["weight_decay"])
        self.decay = 1.0 - lr * wd if wd != 0 else 1.0


def step_sizes(psq, usq, h) -> np.ndarray:
    """``alpha_t / max(1, RMS(u) / d)`` per tensor (float64, as torch's host arithmetic):
    ``alpha_t = max(eps2, RMS(p)) rho_t`` with RMS(p) before weight decay."""
    with np.errstate(all="ignore"):
        root = np.sqrt(h.size)
        rms_p = np.sqrt(psq) / root
        rms_u = np.sqrt(usq) / root
        # Python's max(a, nan) is a: NaN norms (empty tensors, overflow) keep the bound.
        alpha = np.where(rms_p > h.eps2, rms_p, h.eps2) * h.rho
        denom = np.where(rms_u / h.d > 1.0, rms_u / h.d, 1.0)
        return alpha / denom
