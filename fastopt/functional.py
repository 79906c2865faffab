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

Low-bit state, as the classes' ``state_format`` stores it, is the caller's too: a state
array of bfloat16 (ml_dtypes) beside float32 params is stored in bfloat16; a uint8 one is
int8 blockwise codes (the column's dynamic map: unsigned for non-negative columns, as
:mod:`fastopt.lowbit` picks it) with its float32 absmax array, one value per
``block_size`` elements, given in ``absmax={<argument name>: [array or None per
param]}``. Each tensor's state may take its own format (the classes keep tensors under
``min_8bit_size`` in float32); ``fastopt.lowbit.encode`` makes the initial codes.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _validate, lowbit
from ._plan import _Bucket
from .kernels.layout import BFLOAT16, INT8_SIGNED, INT8_UNSIGNED, NATIVE
from .kernels.lowp import bfloat16_dtype
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


def _stored(name, label, a) -> None:
    """A state or absmax array the step writes: C-contiguous and writeable."""
    if not _validate._contiguous(a):
        raise ValueError(f"{name}: {label} is not C-contiguous; pass np.ascontiguousarray(...) "
                         "and keep that array")
    if not _validate._writeable(a):
        raise ValueError(f"{name}: {label} is read-only; optimizer steps update state in place")


def _storage(name, column, label, s, p):
    """The storage format of state array ``s`` (``label``) of param ``p``: the param's
    dtype, bfloat16 or int8 codes (beside float32 params only)."""
    dt, pt = np.dtype(s.dtype), np.dtype(p.dtype)
    if dt == pt:
        return NATIVE
    if pt == np.float32 and dt == np.uint8:
        return INT8_UNSIGNED if column.unsigned else INT8_SIGNED
    if pt == np.float32 and dt == bfloat16_dtype():
        return BFLOAT16
    raise ValueError(f"{name}: {label} must have params' dtype {pt}, or hold low-bit state "
                     f"beside float32 params (bfloat16, or uint8 codes with their absmax), "
                     f"got {dt}")


def _absmax_lists(name, columns, slot_lists, formats, params, absmax, block):
    """The checked absmax arrays per state position (None where no tensor is int8)."""
    given = {} if absmax is None else absmax
    if not isinstance(given, dict):
        raise TypeError(f"{name}: absmax must be a dict of the int8 columns' absmax lists "
                        f"(argument name -> one array or None per param), got {type(given).__name__}")
    names = {c.functional_name: k for k, c in enumerate(columns)}
    unknown = [key for key in given if key not in names]
    if unknown:
        raise ValueError(f"{name}: absmax has {unknown[0]!r}, which is not a state argument "
                         f"({', '.join(names)})")
    out = []
    for k, column in enumerate(columns):
        key = column.functional_name
        if slot_lists[k] is None:       # inactive for these hyperparameters: ignored, as its arrays
            out.append(None)
            continue
        int8 = [i for i, f in enumerate(formats[k]) if f not in (NATIVE, BFLOAT16)]
        arrays = given.get(key)
        if not int8:
            if arrays is not None and any(a is not None for a in arrays):
                raise ValueError(f"{name}: absmax[{key!r}] is given but no {key} array is uint8 "
                                 "int8 codes")
            out.append(None)
            continue
        if arrays is None:
            raise ValueError(f"{name}: {key}[{int8[0]}] is uint8 (int8 codes): absmax[{key!r}] "
                             "must give its float32 absmax array")
        arrays = list(arrays)
        if len(arrays) != len(params):
            raise ValueError(f"{name}: absmax[{key!r}] has {len(arrays)} entries, expected "
                             f"{len(params)} (one array or None per param)")
        for i, (a, p) in enumerate(zip(arrays, params)):
            label = f"absmax[{key!r}][{i}]"
            if i not in int8:
                if a is not None:
                    raise ValueError(f"{name}: {label} must be None: {key}[{i}] is not uint8 codes")
                continue
            want = lowbit.n_blocks(p.size, block)
            if not _validate.is_array(a) or np.dtype(a.dtype) != np.float32 or a.size != want \
                    or a.ndim != 1:
                raise ValueError(f"{name}: {label} must be a 1-D float32 array of {want} values "
                                 f"(one per {block} elements of params[{i}]), got "
                                 f"{type(a).__name__} {getattr(a, 'dtype', '')} of "
                                 f"{getattr(a, 'size', '?')}")
            if _validate.is_device_array(a) != _validate.is_device_array(slot_lists[k][i]):
                raise ValueError(f"{name}: {label} and {key}[{i}] must both be host or both "
                                 "device arrays")
            _stored(name, label, a)
        out.append(arrays)
    return out


def _step(cls, name, group, step, params, grads, slots, backend, absmax=None, block_size=256):
    """Validate, then run ``cls``'s element over the arrays, one pass per dtype and per
    combination of state formats."""
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
    block = lowbit.StateFormat.checked(lowbit.INT8, block_size, 0).block_size
    everything = list(params)
    labels = [f"params[{i}]" for i in range(len(params))]
    for i, (p, g) in enumerate(zip(params, grads)):
        _validate.param(p, f"{name}: params[{i}]")
        _validate.grad(g, p, i, where=f"{name}: ")
    columns = cls.spec.columns + (None,) * (len(active) - len(cls.spec.columns))
    formats = []
    for slot, column, arrays in zip(active, columns, slot_lists):
        if arrays is None:
            formats.append((NATIVE,) * len(params))
            continue
        kinds = []
        for i, (s, p) in enumerate(zip(arrays, params)):
            label = f"{slot}[{i}]"
            if not _validate.is_array(s):
                _validate.param(s, f"{name}: {label}")          # names the wrong type
            if tuple(s.shape) != tuple(p.shape):
                raise ValueError(f"{name}: {label} must match params[{i}] in shape {tuple(p.shape)}, "
                                 f"got {tuple(s.shape)}")
            kinds.append(_storage(name, column, label, s, p))
            _stored(name, label, s)
        formats.append(tuple(kinds))
        everything.extend(arrays)
        labels += [f"{slot}[{i}]" for i in range(len(arrays))]
    scales = _absmax_lists(name, cls.spec.columns, slot_lists, formats, params, absmax, block)
    for column, arrays in zip(cls.spec.columns, scales):
        for i, a in enumerate(arrays or ()):
            if a is not None:
                everything.append(a)
                labels.append(f"absmax[{column.functional_name!r}][{i}]")
    _no_overlap(everything, labels, name)
    backend_name = _backend.resolve(backend, params[0])
    if cls.spec.per_tensor is not None:
        _backend.require(backend_name, _backend.PER_TENSOR, name)
    low_bit = any(f != NATIVE for kinds in formats for f in kinds)
    if low_bit:
        _backend.require(backend_name, _backend.LOWBIT_STATE, f"{name}: low-bit state arrays")
    be = _backend.get(backend_name)
    cls.spec.fill_host_values(group, step)
    by_kind: dict = {}
    for i, p in enumerate(params):
        key = (np.dtype(p.dtype), tuple(kinds[i] for kinds in formats))
        by_kind.setdefault(key, []).append(i)
    for (_, kinds), idx in by_kind.items():
        bucket = _Bucket(idx, [params[i] for i in idx], [grads[i] for i in idx],
                         tuple(None if s is None else [s[i] for i in idx] for s in slot_lists))
        if low_bit:
            bucket.formats, bucket.block = kinds, block
            bucket.scales = tuple(None if a is None or kinds[k] in (NATIVE, BFLOAT16)
                                  else [a[i] for i in idx] for k, a in enumerate(
                                      scales + [None] * (len(kinds) - len(scales))))
        be.step(cls.spec, group, bucket, step)


# One function per spec with a functional name (fastopt/spec.py: functional_form).
__all__ = []
for _spec in SPECS:
    if _spec.functional:
        globals()[_spec.functional] = functional_form(_spec, CLASSES[_spec.name], _step)
        __all__.append(_spec.functional)
del _spec
