"""Per-tensor scalars for the CPU driver: steps that need one number per tensor.

LAMB and LARS scale each tensor's update by its trust ratio; Keras's ``clipnorm``
scales each tensor's gradient by its own clip factor. Both are two passes over a
:class:`~fastopt.kernels.cpu.ChunkTable` built with ``merge=False`` (one row per
non-empty tensor):

1. :func:`row_sums`: ``cpu.reduce_chunks`` of a reducer ``fn(p, g, s0, s1, s2, h) ->
   (a, b)``, combined per row in a fixed order (deterministic whatever the threads).
2. :func:`run`: the step, one ``prange`` over chunks like ``cpu.run``, where row ``r``
   gets ``values[r]`` either as a gradient multiplier (``mode="grad"``) or as the
   element's third state argument (``mode="slot2"``: read-only, never written; the
   element's third state position must be unused by its optimizer).

The drivers of ``kernels/cpu.py`` have one scalar for the whole launch; a generic
version of this feature there would be ``run(..., row_values=None, mode=...)``: one
extra int64-indexed load per chunk, no change to the elements.
"""
from __future__ import annotations

import hashlib
import inspect
import types as pytypes

import numba
import numpy as np
from numba import prange

from . import cpu
from .cpu import _view  # noqa: F401  (used by the templates, inlined)

MODES = ("grad", "slot2")


def _grad_template(table, chunks, like, h, grad_scale, values):
    # ELEMENT, HAS0, HAS1, HAS2 are compile-time constants injected by _compile.
    for c in prange(chunks.shape[0]):
        r = chunks[c, 0]
        lo = chunks[c, 1]
        hi = chunks[c, 2]
        n = table[r, 0]
        scale = grad_scale * values[r]
        p = _view(table[r, 1], n, like)[lo:hi]
        g = _view(table[r, 2], n, like)[lo:hi]
        s0 = _view(table[r, 3], n, like)[lo:hi]
        s1 = _view(table[r, 4], n, like)[lo:hi]
        s2 = _view(table[r, 5], n, like)[lo:hi]
        for i in range(hi - lo):
            out = ELEMENT(p[i], g[i] * scale, s0[i], s1[i], s2[i], h)  # noqa: F821
            p[i] = out[0]
            if HAS0:  # noqa: F821
                s0[i] = out[1]
            if HAS1:  # noqa: F821
                s1[i] = out[2]
            if HAS2:  # noqa: F821
                s2[i] = out[3]


def _slot2_template(table, chunks, like, h, grad_scale, values):
    for c in prange(chunks.shape[0]):
        r = chunks[c, 0]
        lo = chunks[c, 1]
        hi = chunks[c, 2]
        n = table[r, 0]
        value = values[r]
        p = _view(table[r, 1], n, like)[lo:hi]
        g = _view(table[r, 2], n, like)[lo:hi]
        s0 = _view(table[r, 3], n, like)[lo:hi]
        s1 = _view(table[r, 4], n, like)[lo:hi]
        for i in range(hi - lo):
            out = ELEMENT(p[i], g[i] * grad_scale, s0[i], s1[i], value, h)  # noqa: F821
            p[i] = out[0]
            if HAS0:  # noqa: F821
                s0[i] = out[1]
            if HAS1:  # noqa: F821
                s1[i] = out[2]


_COMPILED: dict = {}


def _compile(template, element, has):
    key = (template, element, has)
    fn = _COMPILED.get(key)
    if fn is None:
        namespace = dict(globals())
        namespace.update(ELEMENT=numba.njit(inline="always", cache=True)(element),
                         HAS0=has[0], HAS1=has[1], HAS2=has[2])
        f = pytypes.FunctionType(template.__code__, namespace, template.__name__)
        src = inspect.getsource(element)
        mask = "".join("1" if x else "0" for x in has)
        # One on-disk cache entry per template, element, slot mask and element source.
        f.__qualname__ = (f"{template.__name__.strip('_')}_{element.__name__}_{mask}_"
                          f"{hashlib.sha1(src.encode()).hexdigest()[:10]}")
        fn = _COMPILED[key] = numba.njit(parallel=True, cache=True, nogil=True)(f)
    return fn


def row_starts(table) -> np.ndarray:
    """Index of each row's first chunk (rows are non-empty and chunks are in row order)."""
    rows = table.chunks[:, 0]
    return np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))


def row_sums(fn, table, scalars) -> np.ndarray:
    """``(n_rows, 2)`` float64 sums of ``fn``'s two outputs per row of ``table``."""
    if table.chunks.shape[0] == 0:
        return np.zeros((0, 2))
    partials = cpu.reduce_chunks(fn, table, scalars)
    return np.add.reduceat(partials, row_starts(table), axis=0)


def run(element, table, scalars, values, mode="grad", grad_scale=1.0) -> None:
    """One fused step of ``element`` over ``table`` with per-row ``values`` (see module doc)."""
    if table.chunks.shape[0] == 0:
        return
    if table.merge:
        raise ValueError("per-tensor values need a ChunkTable built with merge=False")
    values = np.ascontiguousarray(values, dtype=table.like.dtype)
    if values.shape != (table.table.shape[0],):
        raise ValueError(f"values must have one entry per row ({table.table.shape[0]}), got {values.shape}")
    template = {"grad": _grad_template, "slot2": _slot2_template}[mode]
    has = table.has
    if mode == "slot2":
        has = (has[0], has[1], False)
    _compile(template, element, has)(table.table, table.chunks, table.like, scalars,
                                     table.like.dtype.type(grad_scale), values)
