"""The roofs: how fast a step could possibly be on this machine.

The roof of an optimizer is the roof kernel (``fastopt.kernels.roof.roof_element``: it
reads p, g and every live state slot and writes p and the slots, with trivial math) run
through the *same* driver with the *same* slot mask as the optimizer, on one contiguous
buffer per array, in the same process. Its time is the memory-bandwidth floor for that
optimizer's step; ``roof_fraction = achieved GB/s / roof GB/s`` = roof time / step time.
A multi-pass step (``case.passes``: LAMB, LARS) has a roof of the same passes, each
reading and writing what the optimizer's pass does, through the same reduction and
per-row step drivers on a one-row-per-tensor table.

Low-bit state (``state_format`` "bfloat16" or "int8") has roofs of its own: the
loops of :func:`fastopt.kernels.roof.lowbit_roof`, which read and write the params
(float32), read the gradients and read and write each live state column as uint16
(bfloat16) or as uint8 codes plus one float32 absmax per 256 elements (int8), with
trivial math, in the driver's chunks, on one contiguous buffer per array. The driver's
own 16-bit or blockwise loads and stores are the format's math (rounding; absmax,
encoding), which a roof must not time. Where a layout keeps some tensors' state in
float32 (int8: tensors under 4096 elements), the roof also runs the float32 roof over
that many elements, so it moves the row's bytes. A multi-pass step (LAMB, LARS) with
bfloat16 state runs its pass roofs through the drivers on bfloat16 state columns; with
int8 state, the low-bit loops of its int8 passes (``case.passes_for("int8")``: a
reduction that reads the codes and absmax, then the step).

On a GPU there are two: the roof kernel through fastopt's CUDA driver, and a
device-to-device ``memcpy`` moving the same number of bytes as one step (half read,
half written): the copy bandwidth of the card.
"""
from __future__ import annotations

import numpy as np

from .cases import OptimizerCase
from .runner import LayoutData, Target


def roof_bytes_per_param(case: OptimizerCase, dtype=np.float32, state_format="float32",
                         shapes=None) -> float:
    """Bytes the roof moves per parameter: the optimizer's own (same reads and writes;
    a low-bit roof's blocks run over one buffer, not per tensor, which may save a few
    absmax values where a tensor's size is not a whole number of blocks)."""
    return case.bytes_per_param(dtype, state_format, shapes)


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


def roof_target(case: OptimizerCase, data: LayoutData, state_format="float32") -> Target:
    """The optimizer's access pattern with trivial math, through the same CPU driver
    (low-bit state: :func:`lowbit_roof_target`)."""
    if state_format != "float32":
        return lowbit_roof_target(case, data, state_format)
    return _float_roof(case, data.params.copy(), data.grads.copy())


def _float_roof(case: OptimizerCase, p, g, slot_dtype=None) -> Target:
    from fastopt.kernels import cpu, roof
    slots = tuple([np.zeros(p.size, dtype=slot_dtype or p.dtype)] if live else None
                  for live in case.slot_mask())
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


def lowbit_roof_target(case: OptimizerCase, data: LayoutData, state_format: str) -> Target:
    """The roof of ``case`` with its state in ``state_format`` ("bfloat16", "int8") on
    ``data``'s layout (see the module docstring)."""
    from fastopt import lowbit
    from fastopt.kernels import cpu, roof, threads

    from .cases import lowbit_sizes
    if state_format not in roof.LOWBIT_KINDS:
        raise ValueError(f"no low-bit roof for state format {state_format!r}")
    if case.passes and state_format == "bfloat16":
        return _float_roof(case, data.params.copy(), data.grads.copy(), lowbit.bfloat16())
    k_slots = sum(case.slot_mask())
    n_low, n_native = lowbit_sizes(state_format, data.shapes)
    parts, keep = [], []
    if n_native:      # tensors whose state keeps the params' dtype: the float32 roof
        rest = _float_roof(case, data.params[n_low:].copy(), data.grads[n_low:].copy())
        parts.append(rest.step)
        keep.append(rest.keep)
    if n_low and case.passes:
        step, args = _int8_passes(case, data.params[:n_low].copy(), data.grads[:n_low].copy())
        parts.append(step)
        keep.append(args)
    elif n_low:
        p, g = data.params[:n_low].copy(), data.grads[:n_low].copy()
        scale = p.dtype.type(1e-12)
        fn = roof.lowbit_roof(state_format, k_slots)
        if state_format == "bfloat16":
            cols = [np.zeros(n_low, np.uint16) for _ in range(k_slots)]
            args = (p, g, *cols, scale, cpu.CHUNK)
        else:
            block = lowbit.blockwise.BLOCK
            cols = [np.zeros(n_low, np.uint8) for _ in range(k_slots)]
            cols += [np.ones(lowbit.n_blocks(n_low, block), np.float32) for _ in range(k_slots)]
            args = (p, g, *cols, scale, block, cpu.CHUNK)
        parts.append(lambda: threads.launch(fn, *args))
        keep.append(args)
    step = parts[0] if len(parts) == 1 else (lambda: [f() for f in parts])
    return Target(step, keep=keep, numba_cpu=True)


def _int8_passes(case: OptimizerCase, p, g):
    """A multi-pass step's roof over int8 state columns (``case.passes_for("int8")``):
    a reduction reads p, g and the codes and absmax of the columns it reads (the
    "int8-read" loop); a step reads p, g and its columns and writes p and them (the
    "int8" loop; each step pass must write every column it reads, as LAMB's and LARS's
    do). One code and one absmax array per state position the passes name, shared by
    them."""
    from fastopt import lowbit
    from fastopt.kernels import cpu, roof, threads
    block = lowbit.blockwise.BLOCK
    passes = case.passes_for("int8")
    named = sorted({int(x[1:]) for one in passes for x in one.reads.split() if x.startswith("s")})
    codes = {k: np.zeros(p.size, np.uint8) for k in named}
    absmax = {k: np.ones(lowbit.n_blocks(p.size, block), np.float32) for k in named}
    out = np.zeros(-(-p.size // cpu.CHUNK), np.float32)
    scale = p.dtype.type(1e-12)
    steps = []
    for one in passes:
        cols = [int(x[1:]) for x in one.reads.split() if x.startswith("s")]
        args = [*(codes[k] for k in cols), *(absmax[k] for k in cols)]
        if one.reduce:
            fn, args = roof.lowbit_roof(roof.INT8_READ, len(cols)), (p, g, *args, out, block, cpu.CHUNK)
        else:
            written = [int(x[1:]) for x in one.writes.split() if x.startswith("s")]
            if sorted(written) != sorted(cols) or "p" not in one.writes.split():
                raise ValueError(f"{case.name}: no int8 roof for a pass reading {one.reads!r} "
                                 f"and writing {one.writes!r}")
            fn, args = roof.lowbit_roof("int8", len(cols)), (p, g, *args, scale, block, cpu.CHUNK)
        steps.append(lambda fn=fn, args=args: threads.launch(fn, *args))
    return (lambda: [f() for f in steps]), (p, g, list(codes.values()), list(absmax.values()), out)


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
