"""Per-tensor scalars: steps that need one number per tensor, on any driver.

LAMB and LARS scale each tensor's update by its trust ratio; Keras's ``clipnorm``
scales each tensor's gradient by its own clip factor. Both are two passes over a table
built with ``merge=False`` (one row per non-empty tensor; :func:`table`):

1. :func:`row_sums`: the driver's ``reduce_chunks`` of a reducer ``fn(p, g, s0, ...,
   s{K-1}, h) -> (a, b)`` (per-chunk float64 partials, on the host), combined per row in
   a fixed order (deterministic whatever the threads or blocks). With ``writes`` the
   reducer returns ``(a, b, p, s0, ..., s{K-1})`` and the driver also stores the arrays
   named (LAMB's first pass writes its moments).
2. :func:`run`: the driver's step, where row ``r`` gets ``values[r]`` either as a
   gradient multiplier (``mode="grad"``) or as the element's state argument ``k``
   (``mode="slot<k>"``, LAMB and LARS use "slot2": read-only, never written; that state
   position must be unused by its optimizer).

Both passes are the drivers' own (``kernels/cpu.py``, ``kernels/cuda.py``: their
``ROW_MODE``); this module adds the per-row bookkeeping. ``backend`` is the backend
object (``fastopt._backend.get(name)``); None, or the CPU backend, means the CPU driver
(kernels/cpu.py: any number K of state columns; the CUDA driver: its own contract).
On CUDA a step is one reduction launch, one small copy of the partials to the host (the
norms are needed there), one copy of the row values back into a device array allocated
once per table, and one step launch.
"""
from __future__ import annotations

import numpy as np

from . import cpu
from .layout import parse_row_mode

MODES = ("grad", "slot2")       # the common ones; "slot<k>" names any state position


def _is_cpu(backend) -> bool:
    return backend is None or getattr(backend, "name", None) == "cpu"


def table(params, grads, slots, backend=None, formats=None, scales=None, block=0):
    """The ``merge=False`` table (one row per non-empty tensor) of ``backend``'s driver;
    ``formats``: the state columns' storage formats (16-bit state given as uint16
    patterns, as on a GPU, needs them); ``scales`` and ``block``: the absmax arrays of
    blockwise (int8) columns and their block size (:class:`~.cpu.ChunkTable`)."""
    if _is_cpu(backend):
        return cpu.ChunkTable(params, grads, slots, merge=False, formats=formats, scales=scales,
                              block=block)
    return backend.table(params, grads, slots, merge=False, formats=formats, scales=scales,
                         block=block)


def row_starts(table) -> np.ndarray:
    """Index of each row's first chunk (rows are non-empty and chunks are in row order):
    the table's ``starts``, computed with its chunks."""
    return table.starts


def row_sums(fn, table, scalars, backend=None, writes=None) -> np.ndarray:
    """``(n_rows, 2)`` float64 sums of ``fn``'s two outputs per row of ``table``.

    ``writes`` (p, s0, ..., s{K-1}): the arrays ``fn`` also updates, the driver's
    ``reduce_chunks`` contract (``fn`` then returns ``(a, b, p, s0, ..., s{K-1})``).
    """
    if table.chunks.shape[0] == 0:
        return np.zeros((0, 2))
    options = {} if writes is None else {"writes": tuple(writes)}
    if _is_cpu(backend):
        partials = cpu.reduce_chunks(fn, table, scalars, **options)
    else:
        partials = backend.reduce_chunks(fn, table, scalars, **options)
    return np.add.reduceat(partials, row_starts(table), axis=0)


def run(element, table, scalars, values, mode="grad", grad_scale=1.0, backend=None,
        writes=None) -> None:
    """One fused step of ``element`` over ``table`` with per-row ``values`` (host, one per
    row; see the module doc); ``writes`` narrows the state slots stored, as the drivers'
    ``run``."""
    if table.chunks.shape[0] == 0:
        return
    if table.merge:
        raise ValueError("per-tensor values need a table built with merge=False")
    if mode is None or parse_row_mode(mode)[0] == 0:
        raise ValueError(f"mode must be 'grad' or 'slot<k>' (one of {MODES}, ...), got {mode!r}")
    n_rows = table.table.shape[0]
    if _is_cpu(backend):
        values = np.ascontiguousarray(values, dtype=table.like.dtype)
        if values.shape != (n_rows,):
            raise ValueError(f"values must have one entry per row ({n_rows}), got {values.shape}")
        cpu.run(element, table, scalars, grad_scale, row_values=values, row_mode=mode,
                writes=writes)
        return
    # The device's array of row values (allocated once per table, refilled here).
    options = {} if writes is None else {"writes": tuple(writes)}
    backend.run(element, table, scalars, grad_scale, row_values=backend.row_array(table, values),
                row_mode=mode, **options)
