"""Argument checks shared by the optimizers, the functional API and checkpoints.

Every check raises before anything is mutated, with a message naming the argument (and
the tensor index) and what was expected.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers

import numba
import numpy as np

from ._backend import is_device_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def number(name, value, *, low=None, high=None, low_open=False, high_open=False, where=""):
    """A finite real number in [low, high] (open ends where asked)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{prefix}{name} must be finite, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{prefix}{name} must be in {rng}, got {value}")
    return value


def learning_rate(value, where=""):
    """A learning rate: a real number >= 0, or a callable of the step count (a schedule,
    e.g. fastopt.schedules.ExponentialDecay) evaluated at each step."""
    if callable(value):
        return value
    return number("lr", value, low=0.0, where=where)


def flag(name, value, where=""):
    if not isinstance(value, (bool, np.bool_)):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def betas(value, where=""):
    prefix = f"{where}: " if where else ""
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise TypeError(f"{prefix}betas must be a pair (beta1, beta2), got {value!r}") from None
    number("betas[0]", b1, low=0.0, high=1.0, high_open=True, where=where)
    number("betas[1]", b2, low=0.0, high=1.0, high_open=True, where=where)
    return (float(b1), float(b2))


def _describe(a):
    return f"{type(a).__name__} of shape {getattr(a, 'shape', '?')} and dtype {getattr(a, 'dtype', '?')}"


def is_array(a) -> bool:
    return isinstance(a, np.ndarray) or is_device_array(a)


def is_torch_tensor(a) -> bool:
    """A torch.Tensor or nn.Parameter, recognised without importing torch."""
    return type(a).__module__.split(".", 1)[0] == "torch" and hasattr(a, "detach")


def torch_hint(owner=None) -> str:
    """Where torch tensors go instead: fastopt.torch's class of the same name."""
    cls = f"fastopt.torch.{owner}" if owner else "the fastopt.torch class of the same name"
    return (f"fastopt's own optimizers step NumPy and CUDA arrays; for torch tensors use {cls}"
            "(model.parameters(), ...) (a torch.optim.Optimizer with the same arguments), "
            "or pass tensor.numpy() views")


def _contiguous(a) -> bool:
    flags = getattr(a, "flags", None)
    return bool(flags["C_CONTIGUOUS"]) if flags is not None else True


def _writeable(a) -> bool:
    flags = getattr(a, "flags", None)
    if isinstance(a, np.ndarray):
        return bool(flags.writeable)
    return True


def low_precision_dtypes() -> tuple:
    """float16 and (when ml_dtypes is installed) bfloat16: stepped with float32 master weights."""
    from .kernels.lowp import bfloat16_dtype
    bf16 = bfloat16_dtype()
    return (np.dtype(np.float16),) + ((bf16,) if bf16 is not None else ())


def param(p, label, allow_low_precision=False, owner=None):
    """A parameter: a writeable, C-contiguous float32/float64 array (or float16/bfloat16
    when the optimizer keeps float32 master weights). ``owner`` (the optimizer's class
    name) only makes the message for torch tensors name the class to use."""
    if not is_array(p):
        if is_torch_tensor(p):
            raise TypeError(f"{label} is a torch {type(p).__name__}; {torch_hint(owner)}")
        raise TypeError(f"{label} must be a NumPy array or a CUDA array, got {type(p).__name__}")
    dt = np.dtype(p.dtype)
    if dt not in FLOAT_DTYPES:
        if dt in low_precision_dtypes():
            if not allow_low_precision:
                raise TypeError(f"{label} has dtype {dt}: 16-bit params are stepped with float32 "
                                "master weights (master_weights=True), or in place with "
                                "kahan_sum=True or stochastic_rounding=True")
        else:
            raise TypeError(f"{label} has dtype {dt}; fastopt steps float32 and float64 arrays "
                            "(and float16/bfloat16 with master_weights=True); integer, complex, "
                            "object and other dtypes are not optimizable")
    if not _contiguous(p):
        raise ValueError(f"{label} is not C-contiguous; pass np.ascontiguousarray(param) and keep that array")
    if not _writeable(p):
        raise ValueError(f"{label} is read-only; optimizer steps update params in place")


def address(a) -> int:
    if is_device_array(a):
        return a.__cuda_array_interface__["data"][0]
    return a.__array_interface__["data"][0]


def nbytes(a) -> int:
    return int(a.size) * np.dtype(a.dtype).itemsize


def no_overlap(arrays, label):
    """No two arrays share memory (the same array twice, or overlapping views)."""
    spans = sorted((address(a), address(a) + nbytes(a), i) for i, a in enumerate(arrays) if a.size)
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            i, j = sorted((i0, i1))
            what = "the same array" if arrays[i] is arrays[j] else "overlapping memory"
            raise ValueError(f"{label}[{i}] and {label}[{j}] are {what}; each parameter must be a distinct array")


@numba.njit(cache=True)
def _data_pointer(a):
    return a.ctypes.data


# dtypes whose data address Numba reads (a compiled function per dtype and number of
# dimensions, on first use); other arrays' is read from ``__array_interface__``
_NUMBA_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def data_address(a) -> int:
    """The data address of a host ndarray. Read by a compiled function for float32 and
    float64 (about 0.4 us; ``__array_interface__`` builds a dict for it, about 3 us on
    the 2-core AMD VM): a step with new gradient arrays reads one per tensor."""
    if a.dtype in _NUMBA_DTYPES:
        return _data_pointer(a)
    return a.__array_interface__["data"][0]


def signature(p):
    """``(shape, dtype, nbytes)`` of a host ndarray param (what a gradient must match), or
    None for other arrays."""
    if type(p) is not np.ndarray:
        return None
    return p.shape, p.dtype, p.nbytes


def grad(g, p, index, p_address=None, where="", p_sig=None) -> int:
    """``grads[index]`` is aligned with ``params[index]``: same shape and dtype,
    C-contiguous, not the param, not overlapping it. Returns the gradient's data address.

    ``p_sig`` (:func:`signature` of ``p``, with ``p_address``) makes the common case
    three attribute reads and :func:`data_address`: for thousands of small tensors this
    check is most of a step's Python time.
    """
    if p_sig is not None and type(g) is np.ndarray:
        if g.shape == p_sig[0] and g.dtype == p_sig[1] and g.flags.c_contiguous:
            ga = data_address(g)
            n = p_sig[2]
            if n and ga < p_address + n and p_address < ga + n:
                raise ValueError(f"{where}grads[{index}] is params[{index}] itself or overlaps "
                                 "its memory; a gradient must be a separate array")
            return ga
    if (type(g) is np.ndarray and type(p) is np.ndarray and g.shape == p.shape
            and g.dtype == p.dtype and g.flags.c_contiguous):
        # Fast path for the common case: only the aliasing test is left.
        ga = g.__array_interface__["data"][0]
        if g.size:
            pa = p.__array_interface__["data"][0] if p_address is None else p_address
            if ga < pa + p.nbytes and pa < ga + g.nbytes:
                raise ValueError(f"{where}grads[{index}] is params[{index}] itself or overlaps "
                                 "its memory; a gradient must be a separate array")
        return ga
    label, param_label = f"{where}grads[{index}]", f"params[{index}]"
    if not is_array(g):
        if is_torch_tensor(g):
            raise TypeError(f"{label} is a torch {type(g).__name__}; pass grads as NumPy arrays "
                            "(tensor.numpy() shares memory), or step torch params with the "
                            "fastopt.torch class of the same name")
        raise TypeError(f"{label} must be an array or None, got {type(g).__name__}")
    if is_device_array(g) != is_device_array(p):
        raise TypeError(f"{label} is a {'device' if is_device_array(g) else 'host'} array but "
                        f"{param_label} is a {'device' if is_device_array(p) else 'host'} array; "
                        "host and device arrays cannot be mixed in one step")
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"{label} has shape {tuple(g.shape)}, expected {tuple(p.shape)} like {param_label}")
    if np.dtype(g.dtype) != np.dtype(p.dtype):
        raise TypeError(f"{label} has dtype {g.dtype}, expected {p.dtype} like {param_label}")
    if not _contiguous(g):
        xp = "cupy" if is_device_array(g) else "np"
        raise ValueError(f"{label} is not C-contiguous (strides {getattr(g, 'strides', '?')}); "
                         f"pass {xp}.ascontiguousarray(grads[{index}]) instead (steps read "
                         "gradients in place and never copy one behind your back)")
    ga, pa = address(g), address(p)
    if g.size and ga < pa + nbytes(p) and pa < ga + nbytes(g):
        raise ValueError(f"{label} is {param_label} itself or overlaps its memory; "
                         "a gradient must be a separate array")
    return ga


def state_array(s, p, label, param_label):
    """A state tensor loaded for a parameter: same shape; cast to its dtype on copy."""
    if not (is_array(s) or hasattr(s, "__array__")):
        raise TypeError(f"{label} must be an array, got {type(s).__name__}")
    shape = tuple(np.shape(s))
    if shape != tuple(p.shape):
        raise ValueError(f"{label} has shape {shape}, expected {tuple(p.shape)} like {param_label}")
    dt = np.dtype(s.dtype) if hasattr(s, "dtype") else None
    if dt is None or dt.kind != "f":
        raise TypeError(f"{label} has dtype {dt}, expected a floating dtype")


# Names other libraries give a torch.optim argument: {name: (torch.optim's name, the fix)}.
_RENAMED = {
    "learning_rate": ("lr", "lr= (torch.optim's name; fastopt.keras classes take learning_rate=)"),
    "epsilon": ("eps", "eps= (torch.optim's name; fastopt.keras classes take epsilon=)"),
    "beta_1": ("betas", "betas=(beta1, beta2) (fastopt.keras classes take beta_1= and beta_2=)"),
    "beta_2": ("betas", "betas=(beta1, beta2) (fastopt.keras classes take beta_1= and beta_2=)"),
    "global_clipnorm": ("max_grad_norm", "max_grad_norm= (the global 2-norm clip, fused into the step)"),
    "clipnorm": ("max_grad_norm", "max_grad_norm= for a global-norm clip (fastopt.keras classes "
                                  "take clipnorm=)"),
}
# torch.optim's implementation switches: every fastopt step is already one fused pass.
_TORCH_IMPL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def did_you_mean(names, known) -> str:
    """`` (did you mean 'a' -> 'b'?)`` for the unknown ``names`` with a likely spelling."""
    hints = []
    for name in sorted(names):
        renamed = _RENAMED.get(name, (None,))[0]
        close = [renamed] if renamed in known else difflib.get_close_matches(name, list(known), n=1)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def unexpected_keywords(cls, unexpected, defaults):
    """Raise TypeError for keyword arguments ``cls`` does not take, naming the fix."""
    name = cls.__name__
    try:
        sig = inspect.signature(cls).parameters.items()
        known = [n for n, p in sig if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "params"]
    except (TypeError, ValueError):
        known = []
    known = list(dict.fromkeys(known + list(defaults) + ["backend", "max_grad_norm", "master_weights",
                                                        "kahan_sum", "state_format", "block_size",
                                                        "min_8bit_size",
                                                         "stochastic_rounding", "seed"]))
    bad = sorted(unexpected)[0]
    msg = f"{name}() got an unexpected keyword argument {bad!r}"
    if bad in _RENAMED and _RENAMED[bad][0] in known:
        raise TypeError(f"{msg}; {name} takes {_RENAMED[bad][1]}")
    if bad in _TORCH_IMPL_FLAGS:
        raise TypeError(f"{msg}: torch.optim's implementation switch has no counterpart here "
                        f"(every fastopt step is one fused compiled pass); drop {bad}=")
    close = difflib.get_close_matches(bad, known, n=1)
    hint = f"; did you mean {close[0]}=?" if close else ""
    raise TypeError(f"{msg}{hint} ({name} takes {', '.join(known)})")
