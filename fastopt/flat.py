"""FlatParams: one contiguous buffer for params and one for grads, with per-tensor views.

An optimizer over a FlatParams allocates each state slot as one more buffer of the same
layout, so a step is one streaming pass over a few long arrays, whatever the number of
tensors. Tensors are packed back to back in the order given (no padding), which keeps
every run of tensors one contiguous range of every buffer.

FlatParams *copies* its input arrays: the optimizer steps ``flat.params`` (views of
``flat.data``), never the arrays it was built from. An optimizer given those original
arrays while their FlatParams is alive warns (:class:`FlatParamsCopyWarning`): the usual
mistake is stepping ``w`` and reading ``flat.params``, or the other way round.
"""
from __future__ import annotations

import sys
import warnings
import weakref

import numpy as np

from ._backend import is_device_array

# data-buffer address -> FlatParams, so an optimizer given views can find their arena.
_ARENAS: "weakref.WeakValueDictionary[int, FlatParams]" = weakref.WeakValueDictionary()

# id(original array) -> (weak ref to it, weak ref to the FlatParams that copied it, index).
# Arrays are unhashable, so the key is the id; the entry goes when either dies.
_COPIED: dict = {}


class FlatParamsCopyWarning(UserWarning):
    """An optimizer was given an array that a live FlatParams copied: stepping it leaves
    the FlatParams' views (``flat.params``) unchanged."""


def _forget_original(ref):
    entry = _COPIED.get(ref.key)
    if entry is not None and entry[0] is ref:
        del _COPIED[ref.key]


def _forget_flat(ref):
    for key in ref.key:
        entry = _COPIED.get(key)
        if entry is not None and entry[1] is ref:
            del _COPIED[key]


def _remember_originals(arrays, flat) -> None:
    keys = []
    for i, a in enumerate(arrays):
        try:
            ref = weakref.KeyedRef(a, _forget_original, id(a))
        except TypeError:          # an array type without weak references: not tracked
            continue
        keys.append((id(a), ref, i))
    flat_ref = weakref.KeyedRef(flat, _forget_flat, tuple(k for k, _, _ in keys))
    for key, ref, i in keys:
        _COPIED[key] = (ref, flat_ref, i)


def copied_into(array):
    """``(flat, i)`` when ``array`` is the i-th input a live FlatParams copied, else None.

    One dict lookup: checked when params are added to an optimizer, never per step.
    """
    entry = _COPIED.get(id(array))
    if entry is None or entry[0]() is not array:
        return None
    flat = entry[1]()
    return None if flat is None else (flat, entry[2])


def warn_if_copied(labelled, owner="Optimizer") -> None:
    """Warn (:class:`FlatParamsCopyWarning`) about the first param of ``(label, param)``
    pairs that a live FlatParams copied: its view is what the FlatParams moves."""
    for label, p in labelled:
        hit = copied_into(p)
        if hit is not None:
            flat, i = hit
            warnings.warn(
                f"{label} is the array that {flat!r} copied as its tensor {i}: FlatParams copies "
                "its inputs, so stepping this array leaves flat.params unchanged (and "
                f"flat.params[{i}] never moves). Pass the FlatParams itself ({owner}(flat, ...)) "
                f"or flat.params[{i}] instead", FlatParamsCopyWarning, stacklevel=_user_stacklevel())
            return


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside fastopt (called from the
    function that warns)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "fastopt":
        frame, level = frame.f_back, level + 1
    return level


def _supported_dtypes():
    from ._validate import FLOAT_DTYPES, low_precision_dtypes
    return FLOAT_DTYPES + low_precision_dtypes()


def _array_module(arrays):
    if any(is_device_array(a) for a in arrays):
        import cupy
        return cupy
    return np


def _address(a) -> int:
    if is_device_array(a):
        return a.__cuda_array_interface__["data"][0]
    return a.__array_interface__["data"][0]


class FlatParams:
    """Copies ``arrays`` into one flat buffer and hands out views of it.

    The inputs are copied, not adopted: optimizers built on this FlatParams update
    ``params`` (and ``data``), and the original arrays keep their initial values. Give the
    optimizer the FlatParams itself or its ``params``; an optimizer given the originals
    (while this FlatParams is alive) warns with :class:`FlatParamsCopyWarning`.

    Gradients: ``step()`` without ``grads`` reads ``grad``, which starts at zero. A
    FlatParams whose ``grad``/``grads`` were never accessed cannot hold a gradient, so
    such a step raises ``ValueError`` (nothing changes) rather than stepping with zeros,
    which would still apply weight decay and momentum and advance the step count.
    ``zero_grad()`` does not count as writing a gradient. Once gradients are in use, a
    zero gradient is a gradient like any other: the param is stepped with it (torch's
    semantics for a gradient zeroed in place, ``zero_grad(set_to_none=False)``).

    Args:
      arrays: the initial parameter values (NumPy arrays, or CuPy/device arrays for a
        device buffer); all of one floating dtype.
      dtype: storage dtype (default: the arrays' dtype).

    Attributes:
      data, grad: the 1-D parameter and gradient buffers (grad starts at zero).
      params, grads: per-tensor views into ``data`` and ``grad``, shaped like the inputs.
      offsets: start of each tensor in the buffers.
    """

    def __init__(self, arrays, dtype=None):
        arrays = list(arrays)
        if not arrays:
            raise ValueError("FlatParams: arrays must not be empty")
        from ._validate import is_torch_tensor
        for i, a in enumerate(arrays):
            if is_torch_tensor(a):
                raise TypeError(f"FlatParams: arrays[{i}] is a torch {type(a).__name__}; FlatParams "
                                "holds NumPy/CUDA arrays. For a torch model use the fastopt.torch "
                                "optimizer of the same name with flat=True (it moves the params "
                                "into one buffer in place)")
            if not (hasattr(a, "dtype") and hasattr(a, "shape")):
                raise TypeError(f"FlatParams: arrays[{i}] must be an array (NumPy, CuPy or CUDA), "
                                f"got {type(a).__name__}")
        xp = _array_module(arrays)
        dtypes = {np.dtype(a.dtype) for a in arrays}
        if dtype is None:
            if len(dtypes) != 1:
                raise TypeError(f"FlatParams: arrays have several dtypes {sorted(map(str, dtypes))}; "
                                "pass dtype= or build one FlatParams per dtype")
            dtype = dtypes.pop()
        dtype = np.dtype(dtype)
        if dtype not in _supported_dtypes():
            raise TypeError(f"FlatParams: dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        shapes = [tuple(a.shape) for a in arrays]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.xp = xp
        self.dtype = dtype
        self.shapes = shapes
        self.data = xp.empty(total, dtype=dtype)
        self._grad = xp.zeros(total, dtype=dtype)
        self.params = self._views(self.data)
        self._grads = self._views(self._grad)
        # False until grad/grads are handed out: until then the gradients are surely zero.
        self._grad_used = False
        for view, a in zip(self.params, arrays):
            view[...] = xp.asarray(a, dtype=dtype).reshape(view.shape)
        self._index = {(_address(v), v.shape): i for i, v in enumerate(self.params)}
        _ARENAS[_address(self.data)] = self
        _remember_originals(arrays, self)

    @property
    def grad(self):
        """The 1-D gradient buffer (starts at zero)."""
        self._grad_used = True
        return self._grad

    @property
    def grads(self):
        """Per-tensor views of :attr:`grad`, shaped like the params."""
        self._grad_used = True
        return self._grads

    def _views(self, buffer):
        return [buffer[lo:hi].reshape(shape)
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def new_buffer(self, fill=0.0, dtype=None):
        """A buffer of the same size (and dtype unless given), filled with ``fill``; used
        for state slots, which are float32 for 16-bit params."""
        return self.xp.full(self.data.size, fill, dtype=self.dtype if dtype is None else dtype)

    def views_of(self, buffer):
        """Per-tensor views of another buffer with this layout."""
        return self._views(buffer)

    def index_of(self, param) -> int | None:
        """Position of ``param`` among ``self.params`` if it is one of these views."""
        return self._index.get((_address(param), tuple(param.shape)))

    def zero_grad(self):
        """Zero the gradient buffer in place (not counted as writing a gradient)."""
        self._grad.fill(0)

    def __len__(self):
        return len(self.params)

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self):
        return f"FlatParams({len(self)} tensors, {self.numel} elements, {self.dtype})"


def arena_of(param) -> "FlatParams | None":
    """The FlatParams whose view ``param`` is, if any."""
    base = param
    while getattr(base, "base", None) is not None:
        base = base.base
    flat = _ARENAS.get(_address(base)) if hasattr(base, "__array_interface__") or is_device_array(base) else None
    if flat is not None and flat.index_of(param) is not None:
        return flat
    return None
