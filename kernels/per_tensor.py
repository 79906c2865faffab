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

Both passes are ``kernels/cpu.py``'s drivers; this module adds the per-row bookkeeping.
"""
from __future__ import annotations

import numpy as np

from . import cpu

MODES = ("grad", "slot2")


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
    cpu.run(element, table, scalars, grad_scale, row_values=values, row_mode=mode)
