"""A spec's per-tensor pass (``Spec.per_tensor``): a reduction per tensor, host
arithmetic, then the step with one value per tensor (LAMB's and LARS's trust ratios).

The "cpu" and "cuda" backends run both passes over one ``merge=False`` table (one row per
tensor; kernels/per_tensor.py): one reduction and one step per dtype group.

With int8 (blockwise) state a reduction that stores state columns (LAMB's moments)
stores nothing: the step recomputes them from the old state and the gradient, as the
reduction did, and stores them; its element is told by its scalars' ``recompute`` flag.
So each column is quantized once per step, and the update applies the very float32
values the reduction's sums were taken over, as with float32 state.
"""
from __future__ import annotations

import numpy as np


def run(spec, group, bucket, step, backend, scale) -> None:
    from .kernels import per_tensor
    rule = spec.per_tensor
    if bucket.table is None:
        bucket.table = per_tensor.table(bucket.params, bucket.grads, bucket.slots, backend,
                                        formats=bucket.formats, scales=bucket.scales,
                                        block=bucket.block)
    cast = np.dtype(bucket.params[0].dtype).type
    # The reducer reads raw gradients: it applies the step's gradient scale itself.
    scalars = spec.scalars(group, step, cast)._replace(grad_scale=cast(scale))
    writes, step_writes = rule.writes, rule.step_writes
    if getattr(bucket.table, "block", 0) and writes is not None:
        writes, step_writes = None, None
        scalars = scalars._replace(recompute=True)
    sums = per_tensor.row_sums(rule.reducer, bucket.table, scalars, backend, writes)
    values = rule.values(group, sums)
    mode = "slot2" if rule.mode == "slot" else rule.mode
    per_tensor.run(spec.element, bucket.table, scalars, values, mode=mode, grad_scale=scale,
                   backend=backend, writes=step_writes)
