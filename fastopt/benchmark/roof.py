"""The roofs: how fast a step could possibly be on this machine.

The roof of an optimizer is the roof kernel (``fastopt.kernels.roof.roof_element``: it
reads p, g and every live state slot and writes p and the slots, with trivial math) run
through the *same* driver with the *same* slot mask as the optimizer, on one contiguous
buffer per array, in the same process. Its time is the memory-bandwidth floor for that
optimizer's step; ``roof_fraction = achieved GB/s / roof GB/s`` = roof time / step time.
A multi-pass step (``case.passes``: LAMB, LARS) has a roof of the same passes, each
reading and writing what the optimizer's pass does, through the same reduction and
per-row step drivers on a one-row-per-tensor table.

On a GPU there are two: the roof kernel through fastopt's CUDA driver, and a
device-to-device ``memcpy`` moving the same number of bytes as one step (half read,
half written): the copy bandwidth of the card.
"""
from __future__ import annotations

import numpy as np

from .cases import OptimizerCase
from .runner import LayoutData, Target


def roof_bytes_per_param(case: OptimizerCase, dtype=np.float32) -> int:
    """Bytes the roof moves per parameter: the optimizer's own (same reads and writes)."""
    return case.bytes_per_param(dtype)


def _passes_step(case: OptimizerCase, table, cast, reduce_chunks, run):
    """One step of ``case.passes`` with trivial math, on the drivers given."""
    from fastopt.kernels import roof
    steps = []
    for one in case.passes:
        reads = " ".join(x for x in one.reads.split() if x != "p")
        scalars = roof.pass_scalars(reads, cast)
        if one.reduce:
            steps.append(lambda s=scalars, w=one.write_mask(): reduce_chunks(
                roof.pass_reducer, table, s, writes=w))
        else:
            steps.append(lambda s=scalars, w=one.write_mask()[1:]: run(
                roof.pass_element, table, s, writes=w))
    return lambda: [f() for f in steps]


def roof_target(case: OptimizerCase, data: LayoutData) -> Target:
    """The optimizer's access pattern with trivial math, through the same CPU driver."""
    from fastopt.kernels import cpu, roof
    p, g = data.params.copy(), data.grads.copy()
    slots = tuple([np.zeros_like(p)] if live else None for live in case.slot_mask())
    if case.passes:
        table = cpu.ChunkTable([p], [g], slots, merge=False)
        ones = np.ones(table.table.shape[0], dtype=p.dtype)
        step = _passes_step(case, table, p.dtype.type, cpu.reduce_chunks,
                            lambda fn, t, s, writes: cpu.run(fn, t, s, row_values=ones,
                                                             row_mode="slot2", writes=writes))
        return Target(step, keep=(table, slots), numba_cpu=True)
    table = cpu.ChunkTable([p], [g], slots)
    scalars = roof.roof_scalars(p.dtype.type)
    element = roof.ROOF_ELEMENTS[len(slots)]
    return Target(lambda: cpu.run(element, table, scalars), keep=(table, slots),
                  numba_cpu=True)


def roof_cuda_target(case: OptimizerCase, data: LayoutData) -> Target:
    """The roof kernel through fastopt's CUDA driver, on one device buffer per array."""
    from fastopt import _backend
    from fastopt.kernels import roof

    from .gpu import device_module, sync
    xp = device_module()
    be = _backend.get("cuda")
    p, g = xp.array(data.params), xp.array(data.grads)
    slots = tuple([xp.zeros_like(p)] if live else None for live in case.slot_mask())
    if case.passes:
        table = be.table([p], [g], slots, merge=False)
        ones = be.row_array(table, np.ones(table.table.shape[0], dtype=data.dtype))
        step = _passes_step(case, table, data.dtype.type, be.reduce_chunks,
                            lambda fn, t, s, writes: be.run(fn, t, s, row_values=ones,
                                                            row_mode="slot2", writes=writes))
        return Target(step, sync=sync, keep=(p, g, slots, table, ones))
    table = be.table([p], [g], slots)
    scalars = roof.roof_scalars(data.dtype.type)
    return Target(lambda: be.run(roof.roof_element, table, scalars), sync=sync,
                  keep=(p, g, slots, table))


def copy_cuda_target(case: OptimizerCase, data: LayoutData) -> Target:
    """A device-to-device memcpy moving the roof's bytes per step (half read, half written)."""
    from .gpu import device_module, simulated, sync
    xp = device_module()
    nbytes = roof_bytes_per_param(case, data.dtype) * data.n_params // 2
    src = xp.ones(nbytes, dtype=xp.uint8)
    dst = xp.empty_like(src)
    if simulated():
        return Target(lambda: xp.copyto(dst, src), sync=sync, keep=(src, dst))
    return Target(lambda: dst.data.copy_from_device(src.data, nbytes), sync=sync, keep=(src, dst))
