"""Gradient clipping with torch's formulas, one fused pass per operation for any number of tensors.

``clip_grad_norm`` is one reduction pass (the total norm) and, when the coefficient is
below 1, one scaling pass; ``clip_grad_value`` is one clamping pass; ``global_norm`` is
the reduction alone. On the CPU each pass is one ``prange`` over the chunk table of all
gradients (:mod:`fastopt.kernels.cpu`); the ``"numpy"`` backend runs plain NumPy.

Determinism: the norm is accumulated in float64 per fixed-size chunk of each tensor and
the chunk partials are combined in a fixed order, so the result has the same bits for any
number of threads, and for a FlatParams as for the same tensors as separate arrays.

References:
  torch.nn.utils.clip_grad_norm_, clip_grad_value_, get_total_norm (torch 2.13).
"""
from __future__ import annotations

import collections
import math
import numbers
import threading

import numpy as np

from . import _backend, _validate
from .flat import FlatParams
from .kernels import clip as kclip

_FAST_DTYPES = _validate.FLOAT_DTYPES   # float32, float64: the compiled drivers' dtypes


class NonFiniteNormError(RuntimeError):
    """The total gradient norm is NaN or infinite and ``error_if_nonfinite=True``."""


# -- argument handling --------------------------------------------------------------------------
def _sequence(grads, what: str) -> list:
    """The list of gradient entries in ``grads``: a FlatParams (its per-tensor views, the
    tensors torch would see), one array, or an iterable (None entries allowed)."""
    if isinstance(grads, FlatParams):
        return grads.grads
    if _validate.is_array(grads):
        return [grads]
    try:
        return list(grads)
    except TypeError:
        raise TypeError(f"{what}: grads must be an array, a list of arrays or a FlatParams, "
                        f"got {type(grads).__name__}") from None


def _validated(seq, what: str, writeable: bool) -> list:
    """The non-empty arrays of ``seq`` (None skipped, as torch skips params without a
    grad), each checked: floating point, C-contiguous, writeable when asked, disjoint."""
    out = []
    for i, g in enumerate(seq):
        if g is None:
            continue
        label = f"{what}: grads[{i}]"
        if not _validate.is_array(g):
            raise TypeError(f"{label} must be a NumPy or CUDA array (or None), got {type(g).__name__}")
        if np.dtype(g.dtype).kind != "f":
            raise TypeError(f"{label} has dtype {g.dtype}; gradients must be floating point")
        if not _validate._contiguous(g):
            raise ValueError(f"{label} is not C-contiguous; pass np.ascontiguousarray(grad)")
        if writeable and not _validate._writeable(g):
            raise ValueError(f"{label} is read-only; clipping modifies gradients in place")
        if g.size:
            out.append(g)
    _validate.no_overlap(out, f"{what}: grads")
    return out


class _Prepared:
    """Validated gradients grouped by dtype, with their chunk tables built on first use."""

    __slots__ = ("seq", "arrays", "groups", "writeable", "tables")

    def __init__(self, seq, arrays, writeable):
        self.seq = seq              # holds every entry alive, so the cache key's ids stay theirs
        self.arrays = arrays
        self.groups = _by_dtype(arrays)
        self.writeable = writeable
        self.tables: dict = {}

    def table(self, be, k: int, merge: bool):
        key = (be.name, k, merge)
        t = self.tables.get(key)
        if t is None:
            t = self.tables[key] = _table(be, self.groups[k][1], merge)
        return t


# The last few gradient lists seen, keyed by the identities of their entries: a training
# loop passes the same arrays every step, and validating and tabling 2000 tensors costs
# milliseconds. An entry keeps its arrays alive until it is evicted (or clear_cache()).
_CACHE_SIZE = 4
_cache: "collections.OrderedDict[tuple, _Prepared]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget the cached gradient lists (and release the arrays they hold)."""
    with _cache_lock:
        _cache.clear()


def _prepare(grads, what: str, writeable: bool) -> _Prepared:
    seq = _sequence(grads, what)
    key = tuple(map(id, seq))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and (hit.writeable or not writeable):
            _cache.move_to_end(key)
            return hit
    prep = _Prepared(list(seq), _validated(seq, what, writeable), writeable)
    with _cache_lock:
        _cache[key] = prep
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return prep


def _real(name, value, what, low=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{what}: {name} must not be NaN")
    if low is not None and value < low:
        raise ValueError(f"{what}: {name} must be >= {low}, got {value}")
    return value


def _norm_type(norm_type, what) -> float:
    try:
        p = float(norm_type)          # torch accepts 'inf' and friends the same way
    except (TypeError, ValueError):
        raise TypeError(f"{what}: norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError(f"{what}: norm_type must not be NaN")
    return p


def _by_dtype(arrays) -> list:
    """Arrays grouped by dtype, groups in order of first appearance (a fixed order)."""
    groups: dict = {}
    for a in arrays:
        groups.setdefault(np.dtype(a.dtype), []).append(a)
    return list(groups.items())


def _backend_name(backend, arrays) -> str:
    return _backend.resolve(backend, arrays[0] if arrays else None)


def _device_backend(name: str, dtype, what: str):
    """The driver object for a compiled pass over ``dtype`` arrays, or None for NumPy."""
    if name == "numpy":
        return None
    if name == "cpu" and dtype not in _FAST_DTYPES:
        return None               # float16 and friends: NumPy (the drivers are 32/64-bit)
    return _backend.get(name)


# -- the norm ------------------------------------------------------------------------------------
def _numpy_partials(arrays, norm_type) -> np.ndarray:
    """Per-tensor float64 partials laid out like the driver's (n, 2) chunk partials."""
    out = np.zeros((len(arrays), 2), dtype=np.float64)
    with np.errstate(all="ignore"):
        for i, g in enumerate(arrays):
            x = np.abs(np.asarray(g, dtype=np.float64).ravel())
            if norm_type == 2.0:
                out[i, 0] = np.sum(x * x)
            elif norm_type == 1.0:
                out[i, 0] = np.sum(x)
            elif norm_type == math.inf:
                out[i, 0] = np.max(x)
                out[i, 1] = float(np.isnan(x).any())
            elif norm_type == 0.0:
                out[i, 0] = np.count_nonzero(x)
            else:
                out[i, 0] = np.sum(x ** norm_type)
    return out


def _min_abs(arrays) -> float:
    """The -inf "norm": the smallest magnitude (NaN if any NaN), in NumPy."""
    if not arrays:
        return 0.0
    return float(min((np.min(np.abs(np.asarray(g, dtype=np.float64))) for g in arrays),
                     key=lambda v: (not math.isnan(v), v)))


def _table(be, arrays, merge=True):
    """A chunk table with the gradients in the params and the grads columns."""
    if be.name == "cpu":
        from .kernels import cpu
        return cpu.ChunkTable(arrays, arrays, (None, None, None), merge=merge)
    return be.table(arrays, arrays, (None, None, None), merge=merge)


def _per_tensor(partials, table) -> np.ndarray:
    """Chunk partials summed per row (per tensor when the table is unmerged)."""
    if table.chunks.shape[0] == 0:
        return np.zeros(0)
    return np.add.reduceat(partials[:, 0], table.starts)


def _total_norm(prep: _Prepared, norm_type, backend, what) -> float:
    """torch's total norm: the ``norm_type``-norm of the per-tensor norms. For every p but
    0 that is the norm of all elements as one vector; for p = 0 it counts the tensors
    holding a non-zero (torch's ``vector_norm(stack(norms), 0)``)."""
    if not prep.arrays:
        return 0.0
    name = _backend_name(backend, prep.arrays)
    if norm_type == -math.inf:
        if name == "cuda":
            raise NotImplementedError(f"{what}: norm_type=-inf is not implemented on the CUDA backend")
        return _min_abs(prep.arrays)
    reducer, maximum, scalars = kclip.norm_plan(norm_type)
    parts = []
    for k, (dtype, group) in enumerate(prep.groups):
        be = _device_backend(name, dtype, what)
        if be is None:
            part = _numpy_partials(group, norm_type)
            parts.append(part if norm_type != 0 else part[:, :1])
            continue
        # One row per tensor (unmerged): the chunking, hence the bits, do not depend on
        # whether the tensors sit back to back (a FlatParams) or apart.
        table = prep.table(be, k, merge=False)
        part = _reduce(be, reducer, table, scalars, maximum, what)
        parts.append(part if norm_type != 0 else _per_tensor(part, table)[:, None])
    if norm_type == 0:
        return float(np.count_nonzero(np.concatenate(parts)))
    return kclip.finish_norm(np.concatenate(parts), norm_type)


def _reduce(be, reducer, table, scalars, maximum, what) -> np.ndarray:
    if be.name == "cpu":
        from .kernels import cpu
        return cpu.reduce_chunks(reducer, table, scalars, maximum=maximum)
    reduce_chunks = getattr(be, "reduce_chunks", None)
    if reduce_chunks is None:
        raise NotImplementedError(
            f"{what}: the {be.name!r} backend has no reduction driver "
            "(it needs reduce_chunks(fn, table, scalars, maximum) -> host float64 (n_chunks, 2)); "
            "use backend='cpu' on host arrays")
    return np.asarray(reduce_chunks(reducer, table, scalars, maximum=maximum), dtype=np.float64)


def _coef_type(arrays):
    """The dtype torch computes the coefficient in: the gradients' promoted dtype, but at
    least float32 (a float16 norm overflows at 65504 and would zero every gradient)."""
    return np.float64 if any(np.dtype(a.dtype) == np.float64 for a in arrays) else np.float32


def _each_dtype(prep: _Prepared, backend, what, host, element, scalars) -> None:
    """One in-place pass per dtype group over the gradients: ``element`` with
    ``scalars(dtype)`` on a device backend, ``host(g, dtype)`` on the NumPy reference."""
    if not prep.arrays:
        return
    name = _backend_name(backend, prep.arrays)
    for k, (dtype, group) in enumerate(prep.groups):
        be = _device_backend(name, dtype, what)
        if be is None:
            for g in group:
                host(g, dtype)
            continue
        # The grads are the table's params (written) and its grads (read, unused).
        be.run(element, prep.table(be, k, merge=True), scalars(dtype))


def _scale(prep: _Prepared, factor, backend, what) -> None:
    """Multiply every gradient by ``factor`` in place (one pass per dtype)."""
    _each_dtype(prep, backend, what, lambda g, dt: np.multiply(g, dt.type(factor), out=g),
                kclip.scale_element, lambda dt: kclip.ScaleScalars(dt.type(factor)))


# -- public API ------------------------------------------------------------------------------------
def global_norm(grads, norm_type=2.0, *, backend=None) -> float:
    """The p-norm of all gradients seen as one vector (float64 accumulation).

    Args:
      grads: a list of arrays (None entries skipped), one array, or a FlatParams.
      norm_type: 2, 1, ``inf``, ``-inf`` (smallest magnitude), 0 (non-zero count) or any
        other p (``sum(|g|^p)^(1/p)``), as ``torch.linalg.vector_norm``'s ``ord``.
      backend: ``"cpu"``, ``"numpy"``, ``"cuda"`` or None (context, env var, then auto).

    Returns:
      The norm as a Python float; the same bits for any number of threads.
    """
    what = "global_norm"
    p = _norm_type(norm_type, what)
    return _total_norm(_prepare(grads, what, writeable=False), p, backend, what)


def all_finite(grads, *, backend=None) -> bool:
    """True when no gradient holds a NaN or an infinity (one reduction pass).

    A sum of non-finite counts rather than a max, so the pass vectorises wherever the
    reduction driver allows reassociating sums.
    """
    return _all_finite(_prepare(grads, "all_finite", writeable=False), backend, "all_finite")


def _all_finite(prep: _Prepared, backend, what) -> bool:
    if not prep.arrays:
        return True
    name = _backend_name(backend, prep.arrays)
    count = 0.0
    for k, (dtype, group) in enumerate(prep.groups):
        be = _device_backend(name, dtype, what)
        if be is None:
            count += sum(float(np.count_nonzero(~np.isfinite(g))) for g in group)
            continue
        part = _reduce(be, kclip.nonfinite_reducer, prep.table(be, k, merge=False),
                       kclip.NormScalars(0.0), False, what)
        count += float(np.sum(part[:, 0]))
    return count == 0


def clip_grad_norm(grads, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                   *, backend=None) -> float:
    """Scale gradients in place so that their total norm is at most ``max_norm``.

    torch's formula: ``g *= min(max_norm / (total_norm + 1e-6), 1)`` with the coefficient
    evaluated in the gradients' dtype as torch does (see :func:`kernels.clip.clip_coefficient`).
    When the coefficient is exactly 1 the scaling pass is skipped (multiplying by 1 changes
    no bits), so an unclipped call costs one read of the gradients.

    Args:
      grads: a list of arrays (None entries skipped), one array, or a FlatParams.
      max_norm: the largest allowed total norm (>= 0; ``inf`` never clips).
      norm_type: the norm's order, as in :func:`global_norm`.
      error_if_nonfinite: raise :class:`NonFiniteNormError` (a RuntimeError) instead of
        scaling when the total norm is NaN or infinite; the gradients are left untouched.
      foreach: accepted for torch compatibility and ignored (the pass is always fused).
      backend: ``"cpu"``, ``"numpy"``, ``"cuda"`` or None.

    Returns:
      The total norm before clipping, as a Python float (float64 accumulation; torch
      returns it rounded to the gradients' dtype).
    """
    what = "clip_grad_norm"
    max_norm = _real("max_norm", max_norm, what, low=0.0)
    p = _norm_type(norm_type, what)
    error_if_nonfinite = _validate.flag("error_if_nonfinite", error_if_nonfinite, what)
    prep = _prepare(grads, what, writeable=True)
    total = _total_norm(prep, p, backend, what)
    if error_if_nonfinite and not math.isfinite(total):
        raise NonFiniteNormError(
            f"The total norm of order {p} for gradients is non-finite ({total}), so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set error_if_nonfinite=False")
    if prep.arrays:
        coef = kclip.clip_coefficient(total, max_norm, _coef_type(prep.arrays))
        if coef != 1:                  # NaN != 1 too: torch scales by NaN, and so do we
            _scale(prep, coef, backend, what)
    return total


def clip_grads_with_norm(grads, max_norm, total_norm, foreach=None, *, backend=None) -> None:
    """Scale gradients by torch's coefficient for a total norm computed beforehand
    (torch's ``clip_grads_with_norm_``): ``clip_grad_norm`` = :func:`global_norm` + this."""
    what = "clip_grads_with_norm"
    max_norm = _real("max_norm", max_norm, what, low=0.0)
    if isinstance(total_norm, bool) or not isinstance(total_norm, numbers.Real):
        raise TypeError(f"{what}: total_norm must be a real number, got {type(total_norm).__name__}")
    prep = _prepare(grads, what, writeable=True)
    if prep.arrays:
        coef = kclip.clip_coefficient(float(total_norm), max_norm, _coef_type(prep.arrays))
        if coef != 1:
            _scale(prep, coef, backend, what)


def clip_grad_value(grads, clip_value, foreach=None, *, backend=None) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place (one pass).

    torch's semantics: clamp_min then clamp_max, NaN stays NaN.

    Args:
      grads: a list of arrays (None entries skipped), one array, or a FlatParams.
      clip_value: the bound (>= 0; ``inf`` leaves every finite value alone).
      foreach: accepted for torch compatibility and ignored.
      backend: ``"cpu"``, ``"numpy"``, ``"cuda"`` or None.
    """
    what = "clip_grad_value"
    clip_value = _real("clip_value", clip_value, what, low=0.0)
    prep = _prepare(grads, what, writeable=True)
    _each_dtype(prep, backend, what,
                lambda g, dt: np.clip(g, -dt.type(clip_value), dt.type(clip_value), out=g),
                kclip.clamp_element,
                lambda dt: kclip.ClampScalars(-dt.type(clip_value), dt.type(clip_value)))
