"""The NumPy reference of low-bit state: blockwise 8-bit and bfloat16 columns, unfused.

Written from the published description (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022, section 2): a tensor is cut into blocks of ``B``
elements; each block is normalised by its largest magnitude (its *absmax*, kept in
float32), and each normalised value is stored as the index of the nearest value of a
256-entry map. It shares nothing with the drivers' encoder (kernels/blockwise.py) but
the map's values: the search is a binary search and a comparison of the two float32
distances (a tie keeps the lower code), not the drivers' bucket table. Normalising
multiplies by the float32 reciprocal of the absmax (as the drivers do; bitsandbytes
divides, which rounds differently in rare cases); an all-zero block has absmax 0 and
every value takes the code of 0.

:func:`step` runs an optimizer's reference on a bucket whose columns are low-bit:
decode every column to float32, run the float32 reference, encode the results. For LAMB
and LARS the reference's trust ratio is then taken over this step's float32 values (the
decoded state updated in float32), the values the CPU driver's int8 passes apply too
(fastopt/_passes.py).
"""
from __future__ import annotations

import numpy as np

from . import blockwise
from .layout import BFLOAT16, INT8_SIGNED, INT8_UNSIGNED, NATIVE

_KIND = {INT8_SIGNED: blockwise.SIGNED, INT8_UNSIGNED: blockwise.UNSIGNED}


def dequantize(codes, absmax, qmap, block):
    """float32 values: ``qmap[code] * absmax[block of the element]``."""
    flat = np.asarray(codes).reshape(-1)
    per_element = np.repeat(np.asarray(absmax, np.float32), block)[:flat.size]
    return (np.asarray(qmap, np.float32)[flat] * per_element).reshape(np.shape(codes))


def nearest_codes(x, qmap):
    """The index of the nearest ``qmap`` value to each float32 ``x`` (ties: the lower)."""
    x = np.asarray(x, np.float32)
    q = np.asarray(qmap, np.float32)
    left = np.clip(np.searchsorted(q, x, side="right") - 1, 0, q.size - 1)
    right = np.minimum(left + 1, q.size - 1)
    with np.errstate(invalid="ignore"):
        go_right = np.abs(x - q[right]) < np.abs(x - q[left])
    return np.where(go_right, right, left).astype(np.uint8)


def quantize(values, qmap, block):
    """``(codes, absmax)`` of float32 ``values`` (codes in their shape)."""
    x = np.asarray(values, np.float32).reshape(-1)
    n_blocks = -(-x.size // block)
    codes = np.empty(x.size, np.uint8)
    absmax = np.empty(n_blocks, np.float32)
    for b in range(n_blocks):
        part = x[b * block:(b + 1) * block]
        top = np.max(np.abs(part))                     # NaN in the block: NaN
        absmax[b] = top
        inv = np.float32(1.0) / top if top > 0 else np.float32(0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            codes[b * block:(b + 1) * block] = nearest_codes(part * inv, qmap)
    return codes.reshape(np.shape(values)), absmax


def step(spec, group, step_count, params, grads, slots, formats, scales, block):
    """One reference step over params whose state columns are stored in ``formats``."""
    wide = []
    for k, (column, fmt) in enumerate(zip(slots, formats)):
        if column is None or fmt == NATIVE:
            wide.append(column)
        elif fmt == BFLOAT16:
            wide.append([a.astype(np.float32) for a in column])
        else:
            qmap = blockwise.dynamic_map(_KIND[fmt])
            wide.append([dequantize(a, scales[k][i], qmap, block) for i, a in enumerate(column)])
    spec.run_reference(group, step_count, params, grads, tuple(wide))
    for k, (column, fmt) in enumerate(zip(slots, formats)):
        if column is None or fmt == NATIVE:
            continue
        for i, (stored, values) in enumerate(zip(column, wide[k])):
            if fmt == BFLOAT16:
                stored[...] = values.astype(stored.dtype)      # round to nearest even
            else:
                codes, absmax = quantize(values, blockwise.dynamic_map(_KIND[fmt]), block)
                stored[...] = codes
                scales[k][i][...] = absmax
