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

A training loop passes the same params and state arrays at every call. Each function
keeps what its last call established about them (:class:`_Checked`: weak references,
each array's shape, strides, dtype and writeability, and on the CPU the chunk tables'
addresses), so a
call over the same host arrays, unchanged, checks only its gradients and the
hyperparameters: 200 tensors took 6.9 ms a call when everything was checked again.
Any other call is checked in full.
"""
from __future__ import annotations

import weakref

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


# -- the last call's checks, for the next call over the same arrays ---------------------------
def _signature(a) -> tuple:
    """What the checks of a host array depend on, besides its identity: shape, strides,
    dtype and writeability. Its address is not read (``__array_interface__`` costs about
    ten times these four): an ndarray's data moves only when ``resize`` changes its size,
    which its shape shows (``data`` cannot be assigned)."""
    return a.shape, a.strides, a.dtype, a.flags.writeable


class _Checked:
    """A call's arrays as its checks passed them: params, then each state argument's
    arrays, then the absmax arrays (None where a position has none), held weakly; their
    :func:`_signature`; the params' addresses; and per bucket its tensors' positions,
    state formats and, on the CPU, its chunk table's fixed addresses
    (:class:`~fastopt.kernels.cpu.ChunkTable`).

    A later call is over the same arrays, unchanged, when each is the very object (alive:
    the caller passed it) with the same signature. Then everything checked about them,
    one by one (dtype, contiguity, writeability, shapes, formats, absmax sizes) and
    together (no two share memory), holds again, and their addresses are the table's.
    Weak references keep no array alive past its caller's use of it."""

    __slots__ = ("key", "backend_name", "refs", "signatures", "param_sigs", "buckets")

    def __init__(self, key, backend_name, arrays, params, buckets):
        self.key, self.backend_name = key, backend_name
        self.refs = [None if a is None else weakref.ref(a) for a in arrays]
        self.signatures = [None if a is None else _signature(a) for a in arrays]
        self.param_sigs = [(_validate.address(p), _validate.signature(p)) for p in params]
        self.buckets = buckets

    def same(self, key, arrays) -> bool:
        if key != self.key or len(arrays) != len(self.refs):
            return False
        for a, ref, sig in zip(arrays, self.refs, self.signatures):
            if a is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not a or _signature(a) != sig:
                return False
        return True


_LAST: dict = {}     # functional name -> _Checked of its last call


def _arrays_of(params, slot_lists, absmax):
    """Every array of a call but the gradients, in :class:`_Checked`'s order; None when
    the call is not one to remember (device arrays, or an absmax that is not a dict of
    lists: those calls are checked in full, which also refuses them)."""
    arrays = list(params)
    for arrays_k in slot_lists:
        if arrays_k is not None:
            arrays += arrays_k
    if absmax:
        if not isinstance(absmax, dict):
            return None
        for key in sorted(absmax):
            value = absmax[key]
            if not isinstance(value, (list, tuple)):
                return None
            arrays.append(key)          # marks where each argument's arrays start
            arrays += value
    if not all(a is None or isinstance(a, str) or type(a) is np.ndarray for a in arrays):
        return None
    return [a if not isinstance(a, str) else None for a in arrays]


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
    remembered = _arrays_of(params, slot_lists, absmax)
    key = (block, tuple(s is None for s in slot_lists),
           tuple(sorted(absmax)) if isinstance(absmax, dict) else None)
    last = _LAST.get(name)
    if remembered is not None and last is not None and last.same(key, remembered):
        # the arrays pass as before: the backend is all that is left to check
        backend_name = _backend.resolve(backend, params[0])
        if backend_name == last.backend_name:
            given = absmax or {}
            scales = [None if c is None else given.get(c.functional_name)
                      for c in cls.spec.columns + (None,) * (len(active) - len(cls.spec.columns))]
            _run_checked(cls, name, group, step, params, grads, slot_lists, scales, last)
            return
    _LAST.pop(name, None)
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
        kind = (np.dtype(p.dtype), tuple(kinds[i] for kinds in formats))
        by_kind.setdefault(kind, []).append(i)
    scales += [None] * (len(active) - len(scales))
    buckets = []
    for (_, kinds), idx in by_kind.items():
        bucket = _bucket(idx, kinds if low_bit else None, block, params, grads, slot_lists, scales)
        be.step(cls.spec, group, bucket, step)
        buckets.append((idx, kinds if low_bit else None, _fixed_of(bucket.table)))
    if remembered is not None:
        _LAST[name] = _Checked(key, backend_name, remembered, params, buckets)


def _bucket(idx, kinds, block, params, grads, slot_lists, scales) -> _Bucket:
    """The tensors ``idx`` of a call, with their state formats ``kinds`` (None: all in
    the params' dtype)."""
    bucket = _Bucket(idx, [params[i] for i in idx], [grads[i] for i in idx],
                     tuple(None if s is None else [s[i] for i in idx] for s in slot_lists))
    if kinds is not None:
        bucket.formats, bucket.block = kinds, block
        bucket.scales = tuple(None if a is None or kinds[k] in (NATIVE, BFLOAT16)
                              else [a[i] for i in idx] for k, a in enumerate(scales))
    return bucket


def _fixed_of(table):
    """A CPU chunk table's addresses that do not change with the gradients, and how it
    was made; None for other backends (their tables, if any, are made anew each call)."""
    from .kernels.cpu import ChunkTable
    if type(table) is not ChunkTable or table.pure is not None or table.low_kind:
        return None
    return table.fixed, table.formats, table.block, table.merge


def _run_checked(cls, name, group, step, params, grads, slot_lists, scales, last):
    """A call over the arrays of the last call, unchanged (:class:`_Checked`): only the
    gradients are checked (each against its param, as every call does), then each bucket
    runs over the chunk table of the last call, re-targeted at these gradients.
    ``scales``: the absmax lists per state position (used where a tensor is int8)."""
    addresses = [_validate.grad(g, p, i, pa, where=f"{name}: ", p_sig=sig)
                 for i, (p, g, (pa, sig)) in enumerate(zip(params, grads, last.param_sigs))]
    be = _backend.get(last.backend_name)
    cls.spec.fill_host_values(group, step)
    for idx, kinds, fixed in last.buckets:
        bucket = _bucket(idx, kinds, last.key[0], params, grads, slot_lists, scales)
        if fixed is not None:
            from .kernels.cpu import ChunkTable
            table_fixed, formats, block, merge = fixed
            bucket.table = ChunkTable(bucket.params, bucket.grads, bucket.slots,
                                      [addresses[i] for i in idx], table_fixed, merge, None,
                                      formats, bucket.scales if kinds is not None else None,
                                      block)
        be.step(cls.spec, group, bucket, step)


# One function per spec with a functional name (fastopt/spec.py: functional_form).
__all__ = []
for _spec in SPECS:
    if _spec.functional:
        globals()[_spec.functional] = functional_form(_spec, CLASSES[_spec.name], _step)
        __all__.append(_spec.functional)
del _spec
