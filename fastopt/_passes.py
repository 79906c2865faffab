"""A spec's per-tensor pass (``Spec.per_tensor``): a reduction per tensor, host
arithmetic, then the step with one value per tensor (LAMB's and LARS's trust ratios).

The "cpu" and "cuda" backends run both passes over one ``merge=False`` table (one row per
tensor; kernels/per_tensor.py): one reduction and one step per dtype group.
"""
from __future__ import annotations

import numpy as np


def run(spec, group, bucket, step, backend, scale) -> None:
    from .kernels import per_tensor
    rule = spec.per_tensor
    if bucket.table is None:
        bucket.table = per_tensor.table(bucket.params, bucket.grads, bucket.slots, backend,
                                        formats=bucket.formats)
    cast = np.dtype(bucket.params[0].dtype).type
    # The reducer reads raw gradients: it applies the step's gradient scale itself.
    scalars = spec.scalars(group, step, cast)._replace(grad_scale=cast(scale))
    sums = per_tensor.row_sums(rule.reducer, bucket.table, scalars, backend, rule.writes)
    values = rule.values(group, sums)
    mode = "slot2" if rule.mode == "slot" else rule.mode
    per_tensor.run(spec.element, bucket.table, scalars, values, mode=mode, grad_scale=scale,
                   backend=backend, writes=rule.step_writes)
