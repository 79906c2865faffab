"""FlatParams: one contiguous buffer for params and one for grads, with per-tensor views.

An optimizer over a FlatParams allocates each state slot as one more buffer of the same
layout, so a step is one streaming pass over a few long arrays, whatever the number of
tensors. Tensors are packed back to back in the order given (no padding), which keeps
every run of tensors one contiguous range of every buffer.
"""
from __future__ import annotations

import weakref

import numpy as np

from ._backend import is_device_array

# data-buffer address -> FlatParams, so an optimizer given views can find their arena.
_ARENAS: "weakref.WeakValueDictionary[int, FlatParams]" = weakref.WeakValueDictionary()

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
        self.grad = xp.zeros(total, dtype=dtype)
        self.params = self._views(self.data)
        self.grads = self._views(self.grad)
        for view, a in zip(self.params, arrays):
            view[...] = xp.asarray(a, dtype=dtype).reshape(view.shape)
        self._index = {(_address(v), v.shape): i for i, v in enumerate(self.params)}
        _ARENAS[_address(self.data)] = self

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
        self.grad.fill(0)

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
