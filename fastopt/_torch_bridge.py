"""fastopt.torch's plumbing: zero-copy views between torch tensors and the arrays fastopt's
kernels take, CUDA stream ordering, and ``opt.state`` as live views of fastopt's state.
"""
from __future__ import annotations

import contextlib
from collections.abc import MutableMapping

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64)


# -- zero-copy bridges between torch tensors and the arrays fastopt's kernels take ----------
def array_view(t: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy  # fastopt[cuda]
    return cupy.asarray(t)


def tensor_view(a, device: torch.device) -> torch.Tensor:
    """A torch tensor sharing the memory of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=device)


_STREAMS: dict = {}


def _cuda_device(params):
    return next((p.device for p in params if p.device.type == "cuda"), None)


def stream_context(params):
    """``_on_torch_stream`` for CUDA params, a no-op for CPU ones."""
    device = _cuda_device(params)
    return contextlib.nullcontext() if device is None else _on_torch_stream(device)


def _on_torch_stream(device):
    """Make torch's current CUDA stream CuPy's current stream, so fastopt's launch (which
    goes to CuPy's current stream) is ordered after the backward that made the grads and
    before whatever torch runs next, with no synchronisation."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ptr = torch.cuda.current_stream(index).cuda_stream
    stream = _STREAMS.get((index, ptr))
    if stream is None:
        import cupy
        stream = _STREAMS[(index, ptr)] = cupy.cuda.ExternalStream(ptr, index)
    return stream


def plain(v):
    """Hyperparameters as fastopt takes them: tensors (torch allows tensor lr) to numbers."""
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (tuple, list)):
        return tuple(plain(x) for x in v)
    return v


def to_numpy(v):
    if isinstance(v, torch.Tensor):
        v = v.detach()
        if v.dtype not in DTYPES:
            v = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32)
        return v.cpu().numpy()
    return v


def scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_param(p: torch.Tensor, label: str) -> None:
    if p.layout != torch.strided:
        raise TypeError(f"{label} is a {p.layout} tensor; fastopt.torch steps dense tensors")
    if p.dtype not in DTYPES:
        raise TypeError(f"{label} has dtype {p.dtype}; fastopt.torch steps float32 and float64 "
                        "params (keep float32 master weights for bfloat16/float16 models)")
    if p.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{label} is on device {p.device}; fastopt.torch steps CPU and CUDA tensors")
    if not p.is_contiguous():
        raise ValueError(f"{label} is not contiguous; fastopt.torch steps contiguous params")


class ParamState(dict):
    """One param's ``opt.state[p]``: writes are recorded and loaded before the next step."""

    __slots__ = ("_owner", "_param")

    def __init__(self, owner, param, items=()):
        super().__init__(items)
        self._owner = owner
        self._param = param

    def _changed(self):
        self._owner._written[id(self._param)] = self

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key, *default):
        out = super().pop(key, *default)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def clear(self):
        super().clear()
        self._changed()

    def __reduce__(self):          # copies and pickles are plain dicts
        return (dict, (dict(self),))


class StateView(MutableMapping):
    """``opt.state``: {param: {key: tensor}}, live zero-copy views of fastopt's state.

    Tensors share memory with the state the kernels update; ``'step'`` is a 0-d view of a
    float32 array refreshed after every step. Assigning (``opt.state[p] = {...}``, as
    ZeroRedundancyOptimizer.load_state_dict does) or writing a key is recorded and loaded
    into fastopt, validated, before the next step or state_dict().
    """

    def __init__(self, opt):
        self._opt = opt
        self._views: dict = {}      # index -> (fastopt's state dict, n keys, ParamState)
        self._written: dict = {}    # id(param) -> ParamState assigned or written by the user

    def _fo_state(self, i):
        fo = self._opt._fo
        return fo._state[i] if fo is not None else None

    def __getitem__(self, p):
        w = self._written.get(id(p))
        if w is not None:
            return w
        i = self._opt._index_of(p)
        st = self._fo_state(i)
        if not st:
            return ParamState(self, p)          # torch's defaultdict: {} for a param without state
        cached = self._views.get(i)
        if cached is not None and cached[0] is st and cached[1] == len(st):
            return cached[2]
        opt = self._opt
        device = opt._params[i].device
        items = {k: tensor_view(a, device) for k, a in st.items()}
        if opt._fo.has_step_state:
            items["step"] = torch.from_numpy(opt._step_store[i:i + 1]).view(())
        view = ParamState(self, p, items)
        self._views[i] = (st, len(st), view)
        return view

    def __setitem__(self, p, value):
        self._opt._index_of(p)
        ParamState(self, p, dict(value))._changed()

    def __delitem__(self, p):
        self[p] = {}

    def __contains__(self, p):
        i = self._opt._index.get(id(p))
        if i is None:
            return False
        w = self._written.get(id(p))
        return bool(w) if w is not None else bool(self._fo_state(i))

    def __iter__(self):
        return (p for p in self._opt._params if p in self)

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} params with state)"
