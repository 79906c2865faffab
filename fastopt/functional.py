"""The functional API: one fused step over caller-owned params, grads and state, in place.

Mirrors ``torch.optim``'s functional forms. The caller keeps the state arrays and the
step count; every call validates all arrays and hyperparameters before touching any.

Every spec has one, generated from it (``fastopt/spec.py: functional_form``), LAMB and
LARS included: their per-tensor pass (a reduction per tensor, the trust ratios on the
host, then the step; ``fastopt/_passes.py``) runs inside the call, over the same
backend object as the class's. The trust ratio is not caller state: it is computed in
each call from the params and gradients passed, and reaches the element through the
driver's per-row value (no array for it on the CPU; on CUDA a device array of one value
per tensor, made with the call's table).
"""
from __future__ import annotations

import numpy as np

from . import _backend, _validate
from ._plan import _Bucket
from .kernels.registry import SPECS
from .optimizers import CLASSES
from .spec import functional_form


def _no_overlap(arrays, labels, name) -> None:
    """No two of the params and state arrays share memory; the error names both by their
    argument (``params[1] and exp_avg[0]``)."""
    try:
        _validate.no_overlap(arrays, "")
    except ValueError:
        spans = sorted((_validate.address(a), _validate.address(a) + _validate.nbytes(a), i)
                       for i, a in enumerate(arrays) if a.size)
        for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                i, j = sorted((i0, i1))
                what = "the same array" if arrays[i] is arrays[j] else "overlapping memory"
                raise ValueError(f"{name}: {labels[i]} and {labels[j]} are {what}; each param "
                                 "and state array must be a distinct array") from None
        raise


def _step(cls, name, group, step, params, grads, slots, backend):
    """Validate, then run ``cls``'s element over the arrays, one pass per dtype."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"{name}: step must be an integer >= 1 (the count including this step), got {step!r}")
    cls._check_group(group, name)
    params, grads = list(params), list(grads)
    if not params:
        raise ValueError(f"{name}: params is empty")
    if len(grads) != len(params):
        raise ValueError(f"{name}: grads has {len(grads)} entries, expected {len(params)}")
    active = cls._active_slots(group)
    slot_lists = []
    for slot, arrays in zip(active, slots):
        if slot is None:
            slot_lists.append(None)
            continue
        if arrays is None:
            raise ValueError(f"{name}: {slot} arrays are required for these hyperparameters")
        arrays = list(arrays)
        if len(arrays) != len(params):
            raise ValueError(f"{name}: {slot} has {len(arrays)} entries, expected {len(params)}")
        slot_lists.append(arrays)
    slot_lists += [None] * (len(active) - len(slot_lists))   # positions past the columns
    everything = list(params)
    labels = [f"params[{i}]" for i in range(len(params))]
    for i, (p, g) in enumerate(zip(params, grads)):
        _validate.param(p, f"{name}: params[{i}]")
        _validate.grad(g, p, i, where=f"{name}: ")
    for slot, arrays in zip(active, slot_lists):
        if arrays is None:
            continue
        for i, (s, p) in enumerate(zip(arrays, params)):
            _validate.param(s, f"{name}: {slot}[{i}]")
            if tuple(s.shape) != tuple(p.shape) or s.dtype != p.dtype:
                raise ValueError(f"{name}: {slot}[{i}] must match params[{i}] in shape {tuple(p.shape)} "
                                 f"and dtype {p.dtype}, got {tuple(s.shape)} {s.dtype}")
        everything.extend(arrays)
        labels += [f"{slot}[{i}]" for i in range(len(arrays))]
    _no_overlap(everything, labels, name)
    backend_name = _backend.resolve(backend, params[0])
    if cls.spec.per_tensor is not None:
        _backend.require(backend_name, _backend.PER_TENSOR, name)
    be = _backend.get(backend_name)
    cls.spec.fill_host_values(group, step)
    by_dtype: dict = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(np.dtype(p.dtype), []).append(i)
    for idx in by_dtype.values():
        bucket = _Bucket(idx, [params[i] for i in idx], [grads[i] for i in idx],
                         tuple(None if s is None else [s[i] for i in idx] for s in slot_lists))
        be.step(cls.spec, group, bucket, step)


# One function per spec with a functional name (fastopt/spec.py: functional_form).
__all__ = []
for _spec in SPECS:
    if _spec.functional:
        globals()[_spec.functional] = functional_form(_spec, CLASSES[_spec.name], _step)
        __all__.append(_spec.functional)
del _spec
