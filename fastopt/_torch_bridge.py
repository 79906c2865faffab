"""fastopt.torch's plumbing: zero-copy views between torch tensors and the arrays fastopt's
kernels take, CUDA stream ordering, torch's constructor signatures and implementation
switches, hyperparameters given as tensors, and ``opt.state`` as live views of fastopt's state.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import MutableMapping

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)   # stepped through fastopt's 16-bit param modes


# -- DTensors (FSDP2's params): stepped on their local shards ----------------------------------
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                  # (torch built without distributed)
        return None
    return DTensor


DTensor = _dtensor_class()


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory is stepped: a DTensor's local shard, else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def data_ptr(t: torch.Tensor) -> int:
    return local(t).data_ptr()


def like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (a local state tensor) as ``p`` holds it: a DTensor with ``p``'s mesh,
    placements, global shape and stride when ``p`` is one (so that
    ``torch.distributed.checkpoint`` saves and reshards it), else ``t``."""
    if not is_dtensor(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


# -- zero-copy bridges between torch tensors and the arrays fastopt's kernels take ----------
def array_view(t: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory (a DTensor's local shard's)."""
    t = local(t)
    if t.requires_grad:
        t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:       # NumPy has no bfloat16: ml_dtypes' over the bits
            from .lowbit import bfloat16
            return t.view(torch.int16).numpy().view(bfloat16())
        return t.numpy()
    import cupy  # fastopt[cuda]
    return cupy.asarray(t)


def tensor_view(a, device: torch.device) -> torch.Tensor:
    """A torch tensor sharing the memory of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        from .lowbit import bfloat16
        if a.dtype == bfloat16():
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
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


# -- torch's constructor signatures and implementation switches ----------------------------
# torch.optim's arguments that choose an implementation, not the math, with torch's defaults.
# fastopt runs its own fused pass whatever foreach and fused say; capturable and
# differentiable promise what it cannot do, so only their defaults are accepted.
IMPLEMENTATION_OPTIONS = {"foreach": None, "fused": None, "capturable": False,
                          "differentiable": False}
_REFUSED = {
    "capturable": "fastopt computes each step's scalars (bias corrections, lr) on the host "
                  "in Python, so a CUDA graph capturing the step would replay the captured "
                  "step's scalars forever",
    "differentiable": "fastopt's step updates the tensors' memory in place outside autograd, "
                      "so no graph is recorded through it",
}
_KW = inspect.Parameter.KEYWORD_ONLY
_REQUIRED = getattr(importlib.import_module("torch.optim.optimizer"), "required", None)


def torch_signature(name: str, fo_cls: type) -> tuple[inspect.Signature, dict]:
    """fastopt.torch.<name>'s constructor signature and its torch-only options.

    When torch.optim has the class: torch.optim.<name>'s parameters with torch's order,
    kinds and defaults (positional calls bind as in torch), then fastopt's hyperparameters
    the installed torch lacks, then ``backend``, ``flat`` and fastopt's ``**options``, all
    keyword-only. Otherwise fastopt's signature with torch's implementation switches added
    keyword-only. Returns ``(signature, {torch-only option: default})``: the options that
    are not fastopt hyperparameters (foreach, fused, capturable, differentiable).
    """
    fo_params = inspect.signature(fo_cls).parameters
    tail = [p for n, p in fo_params.items() if n == "backend" or p.kind == p.VAR_KEYWORD]
    hyper = {n: p for n, p in fo_params.items() if n != "params" and p not in tail}
    torch_cls = getattr(torch.optim, name, None)
    if isinstance(torch_cls, type) and issubclass(torch_cls, torch.optim.Optimizer):
        params, options = [], {}
        for n, p in inspect.signature(torch_cls).parameters.items():
            if n in hyper and p.default is _REQUIRED:       # (an older torch's SGD lr)
                p = p.replace(default=hyper[n].default)
            elif n != "params" and n not in hyper:
                options[n] = p.default
            params.append(p)
        torch_names = {p.name for p in params}
        params += [p.replace(kind=_KW) for n, p in hyper.items() if n not in torch_names]
    else:
        options = dict(IMPLEMENTATION_OPTIONS)
        params = [fo_params["params"], *hyper.values()]
        params += [inspect.Parameter(n, _KW, default=d) for n, d in options.items()]
    flat = inspect.Parameter("flat", _KW, default=False)
    in_backward = inspect.Parameter("in_backward", _KW, default=False)
    return inspect.Signature([*params, tail[0], flat, in_backward, *tail[1:]]), options


def check_options(group: dict, defaults: dict, where: str = "") -> None:
    """Refuse torch options fastopt cannot honour, naming them; ``fused`` with ``foreach``
    raises torch's RuntimeError."""
    prefix = f"{where}: " if where else ""
    for name, default in defaults.items():
        value = group.get(name, default)
        if value is default:
            continue
        if name in ("foreach", "fused"):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{prefix}{name} must be None or a bool, got {value!r}")
        elif name in _REFUSED:
            if value:
                raise ValueError(f"{prefix}{name}={value!r} is not supported by fastopt.torch: "
                                 f"{_REFUSED[name]}; use {name}=False (the default)")
        elif value != default:
            raise ValueError(f"{prefix}torch's option {name}={value!r} is not supported by "
                             f"fastopt.torch; leave it at its default {default!r}")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError(f"{prefix}`fused` and `foreach` cannot be `True` together.")


def host_value(v, where: str, key: str, index: int | None = None):
    """A hyperparameter as fastopt's host arithmetic takes it (torch accepts tensors).

    A 1-element CPU tensor becomes its Python number (read anew at every step: a tensor
    lr may change in place); tuples and lists element-wise; anything else is returned as it
    is, for fastopt's checks. Other tensors raise, naming ``where[key][index]``.
    """
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.device.type != "cpu":
            label = f"{where}[{key!r}]" if where else key
            label += "" if index is None else f"[{index}]"
            if v.numel() != 1:
                raise ValueError(f"{label} must be a number or a 1-element tensor, got a tensor "
                                 f"of shape {tuple(v.shape)}")
            raise ValueError(f"{label} is a tensor on {v.device}: fastopt computes each step's "
                             "scalars on the host, so a tensor hyperparameter must be on the "
                             "CPU (reading a device tensor would synchronise every step); pass "
                             "a float or a CPU tensor")
        return v.item()
    if isinstance(v, (tuple, list)) and index is None:
        return tuple(host_value(x, where, key, k) for k, x in enumerate(v))
    return v


def to_numpy(v):
    """A host NumPy copy of a state tensor: float32/float64 as they are; uint8 (int8
    state codes), float16 and bfloat16 (low-bit state, Kahan compensations) kept
    exactly; other dtypes widened to float32."""
    if isinstance(v, torch.Tensor):
        v = local(v).detach()           # a DTensor's local shard (DCP hands resharded ones)
        if v.dtype == torch.bfloat16:
            from .lowbit import bfloat16
            return v.view(torch.int16).cpu().numpy().view(bfloat16())
        if v.dtype not in DTYPES + (torch.uint8, torch.float16):
            v = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32)
        return v.cpu().numpy()
    return v


def from_numpy(a, device=None):
    """A torch tensor of a host state array (bfloat16 arrays by their bits)."""
    from .lowbit import bfloat16
    if np.dtype(a.dtype) == bfloat16():
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def check_param(p: torch.Tensor, label: str) -> None:
    if is_dtensor(p):
        p = p._local_tensor
    elif type(p) not in _PLAIN and not (isinstance(p, torch.nn.Parameter) and type(p.data) in _PLAIN):
        raise TypeError(f"{label} is a {type(p).__module__}.{type(p).__name__}, a tensor subclass: "
                        "fastopt.torch steps plain tensors and DTensors (FSDP2, stepped on their "
                        "local shards) in place; this subclass's memory is not a plain strided "
                        "buffer fastopt can update (use its own optimizer, or unwrap it)")
    if p.layout != torch.strided:
        raise TypeError(f"{label} is a {p.layout} tensor; fastopt.torch steps dense tensors")
    if p.dtype not in DTYPES + LOW_PRECISION:
        raise TypeError(f"{label} has dtype {p.dtype}; fastopt.torch steps float32 and float64 "
                        "params, and bfloat16/float16 ones with master_weights=True (float32 "
                        "master weights), kahan_sum=True or stochastic_rounding=True")
    if p.dtype in LOW_PRECISION and p.device.type != "cpu":
        raise TypeError(f"{label} is a {p.dtype} tensor on {p.device}: fastopt.torch steps 16-bit "
                        "params on the CPU only so far; keep a float32 model on the GPU")
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
    float32 array (float64 under a float64 default dtype) refreshed after every step, and
    NAdam's ``'mu_product'`` a 0-d view of fastopt's float32 product. Assigning
    (``opt.state[p] = {...}``, as ZeroRedundancyOptimizer.load_state_dict does) or writing a
    key is recorded and loaded into fastopt, validated, before the next step or state_dict().
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
        param = opt._params[i]
        items = {k: like_param(tensor_view(a, device), param) for k, a in st.items()}
        if opt._fo.has_step_state:
            items["step"] = torch.from_numpy(opt._step_store[i:i + 1]).view(())
        # The spec's host state (NAdam's mu_product): a live 0-d view of fastopt's
        # float32 array over params, as torch's tensor is.
        for name, value in opt._fo._host_views(i).items():
            items[name] = torch.from_numpy(value).view(())
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
