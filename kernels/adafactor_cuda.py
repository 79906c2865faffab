"""Adafactor's CUDA kernels (numba-cuda): the passes of kernels/adafactor.py on a GPU.

Per factored param (viewed as ``B`` matrices of ``R x C``): a block per row sums ``g^2``
and ``p^2`` along it (coalesced, shared-memory tree), a thread per column sums ``g^2``
down it (adjacent threads read adjacent columns), a thread per row and per column
lerps ``row_var`` and ``col_var``, a thread per matrix takes the mean of ``row_var``,
a block per row sums ``u^2``, one thread turns the norms into the step size (on the
device: no host synchronisation), and a grid-stride loop applies it. Vector params:
one pass updating ``variance`` with per-block partial norms, one thread for the step
size, one apply. Sums are float64; the update is computed in the param's dtype by the
same device function in the norm pass and the apply pass.

This first version launches per tensor (8 launches per factored param, 3 per vector
param), on the arrays' library's current stream; it is tested under the CUDA simulator
against the reference and torch, not yet tuned on a GPU.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .cuda_tables import SIMULATOR, current_stream

BLOCK = 4 if SIMULATOR else 256       # threads per block (a power of two: the tree)
MAX_GRID = 3 if SIMULATOR else 4096


@cuda.jit(device=True, inline=True)
def _update(x, var, eps1sq):
    if var < eps1sq:
        var = eps1sq
    return x / math.sqrt(var)


@cuda.jit(device=True, inline=True)
def _block_sum2(sa, sb, a, b):
    """Tree-sum two float64 values over the block (shared arrays ``sa``, ``sb``)."""
    t = cuda.threadIdx.x
    sa[t] = a
    sb[t] = b
    cuda.syncthreads()
    half = BLOCK // 2
    while half > 0:
        if t < half:
            sa[t] += sa[t + half]
            sb[t] += sb[t + half]
        cuda.syncthreads()
        half //= 2
    out_a, out_b = sa[0], sb[0]
    cuda.syncthreads()
    return out_a, out_b


@cuda.jit
def row_sums(p, g, gmul, C, rowsq, rowpsq):
    """A block per row (grid-stride): sums of (g gmul)^2 and p^2 along the row."""
    sa = cuda.shared.array(BLOCK, np.float64)
    sb = cuda.shared.array(BLOCK, np.float64)
    M = rowsq.shape[0]
    for r in range(cuda.blockIdx.x, M, cuda.gridDim.x):
        a = 0.0
        b = 0.0
        for c in range(cuda.threadIdx.x, C, BLOCK):
            x = g[r * C + c] * gmul
            y = p[r * C + c]
            a += x * x
            b += y * y
        a, b = _block_sum2(sa, sb, a, b)
        if cuda.threadIdx.x == 0:
            rowsq[r] = a
            rowpsq[r] = b


@cuda.jit
def col_sums(g, gmul, R, C, colsq):
    """A thread per column of each matrix: the sum of (g gmul)^2 down it."""
    for j in range(cuda.grid(1), colsq.shape[0], cuda.gridsize(1)):
        b = j // C
        c = j - b * C
        s = 0.0
        for r in range(R):
            x = g[(b * R + r) * C + c] * gmul
            s += x * x
        colsq[j] = s


@cuda.jit
def lerp_means(var, sq, count, weight):
    """``var = lerp(var, sq / count, weight)`` elementwise (torch's lerp, in float64)."""
    for i in range(cuda.grid(1), var.shape[0], cuda.gridsize(1)):
        mean = sq[i] / count
        old = var[i] * 1.0
        if weight < 0.5:
            var[i] = old + weight * (mean - old)
        else:
            var[i] = mean - (mean - old) * (1.0 - weight)


@cuda.jit
def row_means(rv, R, eps1, means):
    """A thread per matrix: the mean of its ``row_var``, at least eps1 (NaN stays)."""
    for b in range(cuda.grid(1), means.shape[0], cuda.gridsize(1)):
        s = 0.0
        for r in range(R):
            s += rv[b * R + r]
        m = s / R
        if m < eps1:
            m = eps1
        means[b] = m


@cuda.jit
def update_rows(g, gmul, rv, cv, means, R, C, eps1sq, rowusq):
    """A block per row: the sum of u^2 along it."""
    sa = cuda.shared.array(BLOCK, np.float64)
    sb = cuda.shared.array(BLOCK, np.float64)
    M = rowusq.shape[0]
    for r in range(cuda.blockIdx.x, M, cuda.gridDim.x):
        b = r // R
        a = rv[r]
        m = means[b]
        s = 0.0
        for c in range(cuda.threadIdx.x, C, BLOCK):
            u = _update(g[r * C + c] * gmul, (a * cv[b * C + c]) / m, eps1sq)
            s += u * u
        s, _ = _block_sum2(sa, sb, s, 0.0)
        if cuda.threadIdx.x == 0:
            rowusq[r] = s


@cuda.jit
def step_size(psq, usq, n, rho, eps2, d, out):
    """One thread: ``max(eps2, RMS(p)) rho / max(1, RMS(u) / d)`` into ``out[0]``
    (``psq``, ``usq``: partial sums, added in order)."""
    if cuda.grid(1) == 0:
        a = 0.0
        for i in range(psq.shape[0]):
            a += psq[i]
        b = 0.0
        for i in range(usq.shape[0]):
            b += usq[i]
        root = math.sqrt(n)
        rms_p = math.sqrt(a) / root
        rms_u = math.sqrt(b) / root
        alpha = (rms_p if rms_p > eps2 else eps2) * rho
        denom = rms_u / d if rms_u / d > 1.0 else 1.0
        out[0] = alpha / denom


@cuda.jit
def factored_apply(p, g, gmul, rv, cv, means, R, C, eps1sq, keep, step):
    s = step[0]
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        r = i // C
        c = i - r * C
        b = r // R
        u = _update(g[i] * gmul, (rv[r] * cv[b * C + c]) / means[b], eps1sq)
        p[i] = p[i] * keep - s * u


@cuda.jit
def vector_moments(p, g, v, gmul, eps1sq, weight, rest, psq, usq):
    """Grid-stride: ``variance`` lerped towards g^2; per-block partial ||p||^2, ||u||^2."""
    sa = cuda.shared.array(BLOCK, np.float64)
    sb = cuda.shared.array(BLOCK, np.float64)
    a = 0.0
    b = 0.0
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        x = g[i] * gmul
        x2 = x * x
        old = v[i]
        if weight < 0.5:
            var = old + weight * (x2 - old)
        else:
            var = x2 - (x2 - old) * rest
        v[i] = var
        y = p[i]
        a += y * y
        u = _update(x, var, eps1sq)
        b += u * u
    a, b = _block_sum2(sa, sb, a, b)
    if cuda.threadIdx.x == 0:
        psq[cuda.blockIdx.x] = a
        usq[cuda.blockIdx.x] = b


@cuda.jit
def vector_apply(p, g, v, gmul, eps1sq, keep, step):
    s = step[0]
    for i in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        p[i] = p[i] * keep - s * _update(g[i] * gmul, v[i], eps1sq)


# -- host side ---------------------------------------------------------------------------------
def _flat(a):
    return a.reshape(a.size)


def _grid(n):
    return max(1, min(MAX_GRID, -(-n // BLOCK)))


def _kind(a):
    return "numpy" if isinstance(a, np.ndarray) else "cupy" if type(a).__module__.startswith("cupy") \
        else "other"


class CudaTables:
    """One dtype group's params and state as flat device views, with the per-tensor
    scratch arrays (row, column and block partial sums; the step size) made once."""

    def __init__(self, factored, vectors):
        self.factored, self.vectors = [], []
        sample = (factored or vectors)[0][0]
        self.dtype = np.dtype(sample.dtype)
        self.stream = current_stream(_kind(sample), sample)
        for p, g, rv, cv in factored:
            R, C = int(p.shape[-2]), int(p.shape[-1])
            B = int(p.size // (R * C))
            M = B * R
            scratch = dict(rowsq=cuda.device_array(M), rowpsq=cuda.device_array(M),
                           colsq=cuda.device_array(B * C), rowusq=cuda.device_array(M),
                           means=cuda.device_array(B, self.dtype), step=cuda.device_array(1, self.dtype))
            self.factored.append((_flat(p), _flat(g), _flat(rv), _flat(cv), B, R, C, scratch))
        for p, g, v in vectors:
            grid = _grid(int(p.size))
            scratch = dict(psq=cuda.device_array(grid), usq=cuda.device_array(grid),
                           step=cuda.device_array(1, self.dtype), grid=grid)
            self.vectors.append((_flat(p), _flat(g), _flat(v), scratch))


def step(tables: CudaTables, h) -> None:
    """One Adafactor step over ``tables`` (host scalars ``h``: kernels/adafactor.HostScalars)."""
    cast = tables.dtype.type
    st = tables.stream
    gmul, eps1sq = cast(h.gmul), cast(h.eps1 * h.eps1)
    keep = cast(h.decay)
    nf = len(tables.factored)
    for f, (p, g, rv, cv, B, R, C, s) in enumerate(tables.factored):
        M = B * R
        w = float(h.weight[f])
        row_sums[max(1, min(MAX_GRID, M)), BLOCK, st](
            p, g, gmul, C, s["rowsq"], s["rowpsq"])
        col_sums[_grid(B * C), BLOCK, st](g, gmul, R, C, s["colsq"])
        lerp_means[_grid(M), BLOCK, st](rv, s["rowsq"], float(C), w)
        lerp_means[_grid(B * C), BLOCK, st](cv, s["colsq"], float(R), w)
        row_means[_grid(B), BLOCK, st](rv, R, float(h.eps1), s["means"])
        update_rows[max(1, min(MAX_GRID, M)), BLOCK, st](g, gmul, rv, cv, s["means"], R, C,
                                                         eps1sq, s["rowusq"])
        step_size[1, 1, st](s["rowpsq"], s["rowusq"], float(h.size[f]), float(h.rho[f]),
                            h.eps2, h.d, s["step"])
        factored_apply[_grid(M * C), BLOCK, st](p, g, gmul, rv, cv, s["means"], R, C, eps1sq,
                                               keep, s["step"])
    for k, (p, g, v, s) in enumerate(tables.vectors):
        t = nf + k
        w = cast(h.weight[t])
        vector_moments[s["grid"], BLOCK, st](p, g, v, gmul, eps1sq, w, cast(1.0) - w,
                                             s["psq"], s["usq"])
        step_size[1, 1, st](s["psq"], s["usq"], float(h.size[t]), float(h.rho[t]), h.eps2,
                            h.d, s["step"])
        vector_apply[s["grid"], BLOCK, st](p, g, v, gmul, eps1sq, keep, s["step"])
