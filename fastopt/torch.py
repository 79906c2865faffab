"""fastopt.torch: ``torch.optim`` optimizers that run fastopt's fused kernels in place.

``fastopt.torch.Adam(model.parameters(), lr=1e-3)`` is a :class:`torch.optim.Optimizer`
with torch.optim.Adam's arguments, param groups, state keys and state-dict layout, whose
step is one fastopt pass over the tensors' own memory: no copies. CPU tensors reach the
kernels as NumPy views (``tensor.numpy()`` shares memory); CUDA tensors as CuPy views over
``__cuda_array_interface__``, launched on torch's current stream (needs fastopt[cuda]; the
CPU test suite does not run it, ``examples/torch_cuda_check.py`` does on a GPU). Every
fastopt optimizer has a class here under the same name (see
:data:`OPTIMIZERS`), and each class also takes fastopt's own extras (``max_grad_norm=``,
``backend=``).

Interchangeable with torch.optim: a state dict saved by ``torch.optim.Adam`` loads into
``fastopt.torch.Adam`` and back; torch's LR schedulers, ``zero_grad``, params whose
``.grad`` is None (skipped, as torch does), ``DistributedDataParallel`` and
``ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.Adam)`` work.

``flat=True`` moves the params of each group (per dtype and device) into one fastopt
:class:`~fastopt.FlatParams` buffer: every ``p.data`` becomes a view of the flat
parameter buffer and every ``p.grad`` a view of the flat gradient buffer, so backward
accumulates straight into it and a step is one streaming pass over a few long arrays.
The rules after ``flat=True`` (checked on every step; a violation raises
:class:`FlatParamsError` before anything is updated):

- zero grads in place: ``opt.zero_grad()`` (it always zeroes the flat buffer in place,
  whatever ``set_to_none`` says) or ``model.zero_grad(set_to_none=False)`` (also for
  wrappers: ``ZeroRedundancyOptimizer(...).zero_grad(set_to_none=False)``). Setting a
  ``.grad`` to None (``model.zero_grad()``'s default) lets the next backward allocate a
  new gradient outside the buffer. ``opt.zero_grad()`` re-links such grads.
- never assign ``p.grad = ...`` or ``p.data = ...`` and don't move or cast the model
  (``.to()``, ``.half()``, ``.cuda()``) after building the optimizer; in-place changes
  (``p.data.copy_(...)``, ``model.load_state_dict(...)``) are fine.
- no ``create_graph=True`` backward (it replaces ``.grad`` by a new tensor).
- params with ``requires_grad=False`` stay where they are and are skipped while their
  ``.grad`` is None; a flat param that did not contribute to the loss keeps a zero
  gradient and is stepped with it (weight decay and momentum still act), as torch steps a
  param whose gradient was zeroed in place.

Without ``flat``, a param whose ``.data`` is rebound (e.g. by
``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)``) is followed: the next step
re-targets its state at the new memory.

``opt.state[p]`` holds live torch views of fastopt's state (``'step'`` included); assigning
or writing entries is loaded, validated, before the next step. ``state_dict()`` returns
copies (torch's returns references), and optimizers can't be pickled or deep-copied:
checkpoint through the state dict.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import operator

import numpy as np
import torch

from . import optimizer as _fo_optimizer
from ._torch_bridge import (StateView, array_view, check_param, plain, scalar_dtype,
                            stream_context, tensor_view, to_numpy)
from .flat import FlatParams

__all__ = ["TorchOptimizer", "FlatParamsError", "OPTIMIZERS"]

_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_IMMUTABLE = (float, int, bool, str, type(None))
# Group keys newer torch versions added; a state dict from an older torch lacks them.
_LATE_KEYS = ("maximize", "decoupled_weight_decay")


class FlatParamsError(RuntimeError):
    """A ``flat=True`` param's ``.grad`` or ``.data`` no longer lives in the flat buffer."""


class TorchOptimizer(torch.optim.Optimizer):
    """Base of fastopt.torch's optimizers: a torch.optim.Optimizer stepped by fastopt.

    Subclasses set ``_fastopt_class`` (a :class:`fastopt.Optimizer` subclass); the
    constructor takes that class's arguments (torch.optim's names and defaults) plus
    ``flat`` and ignores torch's implementation switches ``foreach`` and ``fused``.

    Args:
      params: an iterable of tensors, of (name, tensor) pairs, or of param-group dicts.
      flat: move the params into flat buffers (see the module docstring for the rules).
    """

    _fastopt_class: type | None = None

    def __init__(self, params, *args, flat: bool = False, foreach=None, fused=None,
                 capturable: bool = False, differentiable: bool = False, **kwargs):
        cls = self._fastopt_class
        if cls is None:
            raise TypeError("TorchOptimizer is a base class; use fastopt.torch.Adam, ...")
        if capturable or differentiable:
            raise ValueError(f"{type(self).__name__}: capturable=True and differentiable=True "
                             "are not supported by fastopt.torch")
        if not isinstance(flat, bool):
            raise TypeError(f"flat must be a bool, got {type(flat).__name__} {flat!r}")
        probe = cls([np.zeros(1, np.float32)], *args, **kwargs)   # validates the arguments
        self._ctor = (args, kwargs)
        self._hp_keys = tuple(probe.defaults)
        self._flat = flat
        self._fo = None                  # the fastopt optimizer over views of the params
        self._fo_group_of: list = []     # torch group index -> fastopt group index (None: empty)
        self._params: list = []          # torch params in global order (fastopt's indices)
        self._index: dict = {}           # id(param) -> global index
        self._grad_src: list = []        # the tensor each grad array views (None: no grad)
        self._grad_arrays: list = []     # what fastopt steps with (same objects every step)
        self._flat_grad: list = []       # flat=True: the param's grad view (else None)
        self._data_ptrs: list = []       # each param's data_ptr() when last seen
        self._hp_seen: list = []         # per fastopt group: the torch values last copied
        self._step_store = np.zeros(0, np.float32)   # 'step' of each param, viewed by opt.state
        self._step_bytes = b""
        self._flat_buffers: list = []    # (FlatParams, grad tensor) per flat buffer
        self._cuda = False
        super().__init__(params, dict(probe.defaults))
        self.state = StateView(self)

    # -- construction ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the group joins the fastopt optimizer."""
        n = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self._attach(self.param_groups[-1], n)
        except BaseException:
            del self.param_groups[n:]
            raise

    def _attach(self, group, gi):
        params = group["params"]
        where = f"param_groups[{gi}]"
        for k, p in enumerate(params):
            check_param(p, f"{where}['params'][{k}]")
        if not params:                 # ZeroRedundancyOptimizer gives a rank empty groups
            self._fo_group_of.append(None)
            return
        arrays = [None] * len(params)
        grads = [None] * len(params)
        flat_grad = [None] * len(params)
        with stream_context(params):
            if self._flat:
                self._flatten(params, arrays, grads, flat_grad)
            for k, p in enumerate(params):
                if arrays[k] is None:
                    arrays[k] = array_view(p)
            fo_group = {"params": arrays, **{key: plain(group[key]) for key in self._hp_keys}}
            if self._fo is None:
                args, kwargs = self._ctor
                fo = self._fastopt_class([fo_group], *args, **kwargs)
            else:
                fo = self._fo
                fo.add_param_group(fo_group)
        # fastopt accepted the group: record it.
        self._fo = fo
        self._fo_group_of.append(len(fo.param_groups) - 1)
        base = len(self._params)
        for k, p in enumerate(params):
            self._index[id(p)] = base + k
        self._params.extend(params)
        self._grad_src.extend(flat_grad)
        self._grad_arrays.extend(grads)
        self._flat_grad.extend(flat_grad)
        self._data_ptrs.extend(p.data_ptr() for p in params)
        self._hp_seen.append({})
        self._step_store = np.zeros(len(self._params), np.float32)
        self._sync_steps()
        if isinstance(self.state, StateView):   # (torch's constructor adds groups before it exists)
            self.state._views.clear()
        self._cuda = self._cuda or any(p.device.type == "cuda" for p in params)

    @torch.no_grad()
    def _flatten(self, params, arrays, grads, flat_grad):
        """Move trainable params (per dtype and device) into FlatParams buffers."""
        buckets: dict = {}
        for k, p in enumerate(params):
            if p.requires_grad:
                buckets.setdefault((p.dtype, p.device), []).append(k)
        for (_, device), ks in buckets.items():
            flat = FlatParams([array_view(params[k]) for k in ks])
            data = tensor_view(flat.data, device)
            grad = tensor_view(flat.grad, device)
            for j, k in enumerate(ks):
                p = params[k]
                lo, hi = int(flat.offsets[j]), int(flat.offsets[j + 1])
                p.data = data[lo:hi].view(p.shape)
                g = grad[lo:hi].view(p.shape)
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g
                arrays[k] = flat.params[j]
                grads[k] = flat.grads[j]
                flat_grad[k] = g
            self._flat_buffers.append((flat, grad))

    def _index_of(self, p) -> int:
        i = self._index.get(id(p))
        if i is None:
            raise KeyError("the tensor is not a param of this optimizer")
        return i

    # -- stepping -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One fused fastopt step over every param that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fo is None:
            return loss
        grads = self._current_grads()          # may re-target self._fo at rebound params
        self._import_state()
        fo = self._fo
        seen = self._hp_seen
        for tg, fi in zip(self.param_groups, self._fo_group_of):
            if fi is not None:
                fg, last = fo.param_groups[fi], seen[fi]
                for key in self._hp_keys:
                    v = tg[key]
                    if v is not last.get(key) or type(v) not in _IMMUTABLE:
                        fg[key] = plain(v)             # (a tensor lr may change in place)
                        last[key] = v
        steps = self._step_store
        if steps.tobytes() != self._step_bytes:
            fo._steps[:] = steps                        # a 'step' tensor was written in place
        with self._stream():                    # CUDA: ordered with torch's kernels
            fo.step(grads)
        self._sync_steps()
        return loss

    def _stream(self):
        return stream_context(self._params) if self._cuda else contextlib.nullcontext()

    def _sync_steps(self):
        np.copyto(self._step_store, self._fo._steps, casting="unsafe")
        self._step_bytes = self._step_store.tobytes()

    def _current_grads(self):
        """The grad arrays for this step; checks flat links and rebound params first."""
        params = self._params
        now = list(map(_GRAD, params))
        if not all(map(operator.is_, now, self._grad_src)):
            self._regrad(now)
        ptrs = list(map(_DATA_PTR, params))
        if ptrs != self._data_ptrs:
            self._rebind(ptrs)
        return self._grad_arrays

    def _where(self, i):
        for gi, g in enumerate(self.param_groups):
            if i < len(g["params"]):
                p = g["params"][i]
                return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
            i -= len(g["params"])
        return f"param {i}"

    def _regrad(self, now):
        changed = [i for i, (g, s) in enumerate(zip(now, self._grad_src)) if g is not s]
        for i in changed:
            if self._flat_grad[i] is not None:
                how = "is None" if now[i] is None else "is a tensor outside the flat buffer"
                raise FlatParamsError(
                    f"{type(self).__name__}(flat=True): the .grad of {self._where(i)} {how}: it was "
                    "set to None or replaced (model.zero_grad(), a wrapper's zero_grad() such as "
                    "ZeroRedundancyOptimizer's, zero_grad(set_to_none=True) or p.grad = None before "
                    "backward; p.grad = ...; a create_graph=True backward), so "
                    "this step would not see the gradient in the flat buffer. "
                    f"{len(changed)} param(s) affected. Zero grads with opt.zero_grad() or "
                    "model.zero_grad(set_to_none=False) and never assign p.grad; opt.zero_grad() "
                    "re-links the grads. Nothing was updated.")
        for i in changed:
            g = now[i]
            if g is not None:
                if g.layout != torch.strided:
                    raise TypeError(f"the grad of {self._where(i)} is a {g.layout} tensor; "
                                    "fastopt.torch steps dense gradients")
                if not g.is_contiguous():
                    raise ValueError(f"the grad of {self._where(i)} is not contiguous")
        for i in changed:
            g = now[i]
            self._grad_src[i] = g
            self._grad_arrays[i] = None if g is None else array_view(g)

    def _rebind(self, ptrs):
        moved = [i for i, (a, b) in enumerate(zip(ptrs, self._data_ptrs)) if a != b]
        flat = [i for i in moved if self._flat_grad[i] is not None]
        if flat:
            raise FlatParamsError(
                f"{type(self).__name__}(flat=True): the .data of {self._where(flat[0])} was rebound "
                "(p.data = ..., model.to()/half()/cuda(), or a wrapper that re-buckets params), so "
                "it no longer lives in the flat buffer and this step would update stale memory. "
                f"{len(flat)} param(s) affected. After flat=True change params only in place "
                "(p.data.copy_(...), model.load_state_dict(...)). Nothing was updated.")
        # Not flat: follow the param to its new memory, carrying the state over.
        fo = self._fo
        with self._stream():
            sd = fo.state_dict()
        groups = []
        for fg in fo.param_groups:
            groups.append({**{k: v for k, v in fg.items() if k != "params"}, "params": list(fg["params"])})
        arrays = [p for g in groups for p in g["params"]]
        for i in moved:
            p = self._params[i]
            check_param(p, self._where(i))
            if tuple(p.shape) != tuple(arrays[i].shape) or np.dtype(arrays[i].dtype) != array_view(p).dtype:
                raise ValueError(f"{self._where(i)} was rebound to a tensor of another shape or "
                                 f"dtype (was {tuple(arrays[i].shape)} {arrays[i].dtype}); build a new optimizer")
        moved_set, start = set(moved), 0
        for g in groups:
            for k in range(len(g["params"])):
                if start + k in moved_set:
                    g["params"][k] = array_view(self._params[start + k])
            start += len(g["params"])
        args, kwargs = self._ctor
        with self._stream():
            new = self._fastopt_class(groups, *args, **kwargs)
            new.load_state_dict(sd)
        self._fo = new
        self._data_ptrs = ptrs
        self.state._views.clear()

    # -- gradients ------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients as torch does; flat buffers are always zeroed in place (and a flat
        param whose .grad was set to None or replaced is re-linked to its view)."""
        for _, grad in self._flat_buffers:
            grad.zero_()
        for p, fg in zip(self._params, self._flat_grad):
            if fg is not None:
                if p.grad is not fg:
                    p.grad = fg
                continue
            g = p.grad
            if g is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    # -- state ----------------------------------------------------------------------------
    def _import_state(self):
        """Load what was assigned or written in ``opt.state`` into fastopt (validated)."""
        written = self.state._written
        if not written:
            return
        with self._stream():
            sd = self._fo.state_dict()
            for pid, entry in written.items():
                i = self._index[pid]
                if entry:
                    sd["state"][i] = {k: to_numpy(v) for k, v in entry.items()}
                else:
                    sd["state"].pop(i, None)
            self._fo.load_state_dict(sd)
        written.clear()
        self.state._views.clear()
        self._sync_steps()

    def state_dict(self) -> dict:
        """torch.optim's layout, with torch tensors (copies) and torch's param numbering."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {}
        if self._fo is not None:
            self._import_state()
            with self._stream():
                fo_state = self._fo.state_dict()["state"]
            for i, st in fo_state.items():
                device = self._params[i].device
                state[i] = {k: (torch.tensor(float(v), dtype=scalar_dtype()) if k == "step"
                                else torch.from_numpy(v).to(device)) for k, v in st.items()}
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        sd = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or from torch.optim's class of the same name.

        Everything is validated before anything changes (fastopt's all-or-nothing load).
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved = copy.deepcopy(state_dict["param_groups"])
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        fo_groups = []
        for g, sg in zip(self.param_groups, saved):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            for key in _LATE_KEYS:
                if key in g and key not in sg:
                    sg[key] = g[key]
            if g["params"]:
                fo_groups.append({k: (v if k == "params" else plain(v)) for k, v in sg.items()
                                  if k == "params" or k in self._hp_keys})
        if self._fo is not None:
            state = {pid: {k: to_numpy(v) for k, v in st.items()}
                     for pid, st in state_dict["state"].items()}
            with self._stream():
                self._fo.load_state_dict({"state": state, "param_groups": fo_groups})
            self.state._written.clear()
            self.state._views.clear()
            self._sync_steps()
            for last in self._hp_seen:
                last.clear()
        for g, sg in zip(self.param_groups, saved):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
        self.param_groups = saved
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} holds views of the model's memory and cannot be "
                        "pickled or deep-copied; save and load its state_dict() instead")


# -- one class per fastopt optimizer -----------------------------------------------------------
def _fastopt_classes() -> dict:
    """fastopt's optimizer classes by name: those fastopt exports, then fastopt.family's."""
    import fastopt
    modules = [fastopt]
    try:
        modules.append(importlib.import_module("fastopt.family"))
    except ImportError:
        pass
    found = {}
    for mod in modules:
        for name in getattr(mod, "__all__", dir(mod)):
            obj = getattr(mod, name, None)
            if (isinstance(obj, type) and issubclass(obj, _fo_optimizer.Optimizer)
                    and obj is not _fo_optimizer.Optimizer and obj.element is not None
                    and not obj.__module__.startswith("fastopt.keras")):
                found.setdefault(name, obj)
    return found


def _make_class(name: str, fo_cls: type) -> type:
    sig = inspect.signature(fo_cls)
    params = list(sig.parameters.values())
    params.append(inspect.Parameter("flat", inspect.Parameter.KEYWORD_ONLY, default=False))
    params.sort(key=lambda p: p.kind)         # stable: keyword-only ones after the rest
    doc = (f"{name} as a torch.optim.Optimizer stepped by fastopt's fused kernel.\n\n"
           f"Arguments, defaults, state keys and state dicts are torch.optim.{name}'s (see "
           f"fastopt.{name}), plus ``flat=True`` to step the model from flat buffers "
           "(fastopt.torch's module docstring lists the rules).\n\n"
           + (inspect.getdoc(fo_cls) or ""))
    cls = type(name, (TorchOptimizer,), {"_fastopt_class": fo_cls, "__doc__": doc,
                                         "__module__": __name__, "__qualname__": name})
    cls.__signature__ = sig.replace(parameters=params)
    return cls


OPTIMIZERS: dict = {}
"""{name: fastopt.torch class} for every optimizer fastopt provides."""

for _name, _cls in _fastopt_classes().items():
    OPTIMIZERS[_name] = globals()[_name] = _make_class(_name, _cls)
    __all__.append(_name)
del _name, _cls
