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
What frameworks do to ``.grad`` and ``.data`` after ``flat=True`` is adopted, checked at
every step before anything is updated:

- a ``.grad`` set to None and not recomputed: that param is skipped, as torch skips it
  (``model.zero_grad()``'s default, a param the loss did not reach);
- a ``.grad`` replaced by another tensor (a backward after ``model.zero_grad()``, HF
  ``Trainer``, DDP's ``gradient_as_bucket_view=True`` bucket views, FSDP1's sharded grads,
  ``ZeroRedundancyOptimizer.zero_grad()``, ``create_graph=True``): copied into the flat
  buffer before every step while it stays there (one more read and write of those
  gradients, 8 B per float32 param); ``opt.zero_grad()`` re-links ``.grad`` to the buffer;
- a ``.data`` rebound (``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)``, FSDP1's
  local shard, accelerate's ``model.to()``): the param is stepped where it now lives, with
  its state carried over, its gradient still read from the flat buffer (it leaves the
  one-pass arena for a chunk table);
- refused with :class:`FlatParamsError` or ValueError, naming the param: a model cast to
  another dtype or shape after the optimizer was built (build a new optimizer).

Zeroing grads with ``opt.zero_grad()`` (or ``set_to_none=False``) keeps the one-pass
path. Params with ``requires_grad=False`` stay where they are and are skipped while their
``.grad`` is None; a flat param that did not contribute to the loss keeps a zero gradient
and is stepped with it (weight decay and momentum still act), as torch steps a param
whose gradient was zeroed in place.

Without ``flat``, a param whose ``.data`` is rebound (e.g. by
``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)``) is followed: the next step
re-targets its state at the new memory.

FSDP2 (``fully_shard``): params that are DTensors are stepped on their local shards, one
fused pass per rank; ``opt.state[p]`` and ``state_dict()`` hold the state as DTensors with
the param's mesh and placements, so ``torch.distributed.checkpoint``
(``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, DCP save and load) saves
and reshards it, to another world size too. ``max_grad_norm=`` reduces the norm over the
mesh (every param sharded on one 1-D mesh). ``flat=True`` is refused for DTensors (FSDP2
owns the shards' storage and all-gathers from it); other tensor subclasses are refused,
naming the class (tests/test_fsdp2.py).

``in_backward=True`` (optimizer-in-backward, as torchtune's): every param with
``requires_grad`` gets a post-accumulate-grad hook that steps it as soon as backward has
its gradient, while that gradient is still in cache, then frees it (``p.grad = None``), so
the gradients never all exist at once. ``opt.step()`` then does nothing (a training
loop that calls it still works) and one state dict holds every param's state. Excluded,
refused at construction: ``flat=True`` (one buffer for every gradient) and
``max_grad_norm=`` (global-norm clipping needs every gradient before any step); gradient
accumulation is excluded by design: every backward steps. ``remove_backward_hooks()``
detaches the hooks (before handing the params to another optimizer).
``examples/optimizer_in_backward.py`` measures its peak memory and time.

Under ``torch.compile``, ``step()``, ``zero_grad()``, ``state_dict()`` and
``load_state_dict()`` are opaque to Dynamo (``torch.compiler.disable``): a compiled
function that calls them breaks its graph there and runs the fused kernel eagerly, so
``torch.compile(opt.step)`` and a compiled forward + backward + step equal the eager run,
and an lr a scheduler changes (read on the host inside the step) recompiles nothing
(tests/test_torch_compile.py).

``opt.state[p]`` holds live torch views of fastopt's state (``'step'`` and NAdam's
``'mu_product'`` included); assigning or writing entries is loaded, validated, before the
next step. ``state_dict()`` returns copies (torch's returns references), and optimizers
can't be pickled or deep-copied: checkpoint through the state dict.

Conformance with torch.optim, and where fastopt.torch differs (on purpose):

- Signatures are the installed torch.optim class's (names, positional order, kinds,
  defaults; e.g. RMSprop's positional ``capturable, foreach, maximize, differentiable``),
  followed by keyword-only ``backend=``, ``flat=`` and fastopt's options (``max_grad_norm=``,
  ...). A fastopt hyperparameter an older torch lacks is keyword-only.
- Param groups and ``state_dict()['param_groups']`` carry torch's keys, the implementation
  switches included, with torch's defaults. ``foreach`` and ``fused`` are recorded and
  change nothing (every step is fastopt's one fused pass); both True raise torch's
  RuntimeError, also for a group added later (torch checks only the constructor's).
- ``capturable=True`` (fastopt computes each step's scalars on the host, so a captured CUDA
  graph would replay stale ones) and ``differentiable=True`` (the step runs outside
  autograd) raise ValueError naming the option: at construction, in ``add_param_group``,
  and at the next step when set into a param group.
- Any hyperparameter may be a 1-element CPU tensor (at construction, in
  ``add_param_group``, assigned into ``param_groups``, in a loaded state dict). It stays in
  ``param_groups`` as given and is read with ``.item()`` at every step, so in-place changes
  are seen. A tensor on another device or with more than one element raises ValueError
  naming the group and key. Beyond torch: also with ``foreach=True``, and Adam's betas may
  mix floats and tensors. The step's scalars are computed in float64 from the tensor's
  value, where torch computes in the tensor's dtype (float32 tensors: last-digit differences).
- Adagrad creates every param's state at construction (``requires_grad=False`` params
  included), as torch does; a group's own ``initial_accumulator_value`` is honoured (torch
  fills every group's ``sum`` with the constructor's value).
- ``load_state_dict`` keeps this optimizer's implementation switches (torch takes the saved
  ones): they say how the saved optimizer ran, not what it learned, and a checkpoint from a
  ``capturable=True`` run loads.
- ``opt.state[p]`` for a param without state is an empty dict that is not inserted (torch's
  defaultdict inserts it, and its state dict then lists ``{}`` for that param); such empty
  entries in a loaded state dict are accepted.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import operator

import numpy as np

try:
    import torch
except ImportError as err:          # (a broken torch install is an ImportError too)
    raise ImportError("fastopt.torch needs PyTorch, which could not be imported "
                      f"({err}): pip install fastopt[torch]") from err

from . import optimizer as _fo_optimizer
from ._torch_bridge import (StateView, array_view, check_options, check_param, data_ptr,
                            from_numpy, host_value, is_dtensor, like_param, local, scalar_dtype,
                            stream_context, tensor_view, to_numpy, torch_signature)
from .flat import FlatParams

__all__ = ["TorchOptimizer", "FlatParamsError", "OPTIMIZERS"]

_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_IMMUTABLE = (float, int, bool, str, type(None))
# Group keys newer torch versions added; a state dict from an older torch lacks them.
_LATE_KEYS = ("maximize", "decoupled_weight_decay")
# The options every fastopt optimizer takes beside its hyperparameters (max_grad_norm=, ...).
_FASTOPT_OPTIONS = frozenset(
    n for n, p in inspect.signature(_fo_optimizer.Optimizer.__init__).parameters.items()
    if p.kind == p.KEYWORD_ONLY)


_opaque = torch.compiler.disable(
    recursive=True, reason="fastopt.torch runs its fused Numba/CUDA kernel eagerly")


def _sparse_rows(g: torch.Tensor):
    """A row-sparse torch gradient (``nn.Embedding(sparse=True)``'s) as fastopt's SparseGrad
    (coalesced: duplicate rows summed, as torch's sparse optimizers do)."""
    from .sparse import SparseGrad
    g = g.coalesce()
    return SparseGrad(g.indices()[0].numpy(), g.values().numpy())


class FlatParamsError(RuntimeError):
    """A ``flat=True`` param's ``.grad`` or ``.data`` no longer lives in the flat buffer."""


class TorchOptimizer(torch.optim.Optimizer):
    """Base of fastopt.torch's optimizers: a torch.optim.Optimizer stepped by fastopt.

    Subclasses set ``_fastopt_class`` (a :class:`fastopt.Optimizer` subclass),
    ``_signature`` and ``_torch_options`` (from :func:`torch_signature`): the constructor
    takes torch.optim's arguments (positional order included), then fastopt's ``backend``,
    ``flat`` and options. Hyperparameters may be 1-element CPU tensors (read as numbers at
    every step). Of torch's implementation switches, ``foreach`` and ``fused`` are recorded
    and change nothing (``fused=True`` with ``foreach=True`` raises, as in torch);
    ``capturable=True`` and ``differentiable=True`` raise ValueError.

    Args:
      params: an iterable of tensors, of (name, tensor) pairs, or of param-group dicts.
      flat: move the params into flat buffers (see the module docstring for the rules).
    """

    _fastopt_class: type | None = None
    _signature: inspect.Signature | None = None
    _torch_options: dict = {}        # torch-only options (foreach, fused, ...) -> torch's default
    _eager_state: bool = False       # torch creates every param's state at construction

    def __init__(self, *args, **kwargs):
        cls = self._fastopt_class
        if cls is None:
            raise TypeError("TorchOptimizer is a base class; use fastopt.torch.Adam, ...")
        bound = self._signature.bind(*args, **kwargs)       # torch's TypeErrors for bad calls
        bound.apply_defaults()
        hyper = dict(bound.arguments)
        options = {}                    # fastopt's **options (max_grad_norm=, ...)
        for name, p in self._signature.parameters.items():
            if p.kind == p.VAR_KEYWORD:
                options = hyper.pop(name)
        params, flat, in_backward = hyper.pop("params"), hyper.pop("flat"), hyper.pop("in_backward")
        unknown = sorted(set(options) - _FASTOPT_OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{unknown[0]!r}")
        switches = {k: hyper.pop(k) for k in self._torch_options}
        check_options(switches, self._torch_options)
        if not isinstance(flat, bool):
            raise TypeError(f"flat must be a bool, got {type(flat).__name__} {flat!r}")
        if not isinstance(in_backward, bool):
            raise TypeError(f"in_backward must be a bool, got {type(in_backward).__name__} {in_backward!r}")
        if in_backward:
            if flat:
                raise ValueError("in_backward=True steps each param as soon as its gradient is ready "
                                 "and frees that gradient; flat=True keeps every gradient in one "
                                 "buffer for one pass: choose one")
            if options.get("max_grad_norm") is not None:
                raise ValueError("in_backward=True steps each param before the other gradients "
                                 "exist, so global-norm clipping (max_grad_norm=) cannot be applied; "
                                 "clip per param in a hook of your own, or step after backward")
        fo_kwargs = {k: host_value(v, "", k) for k, v in hyper.items()}
        fo_kwargs.update(options)
        # validates the arguments (a 2-D probe: Muon takes matrices only)
        probe = cls([np.zeros((1, 1), np.float32)], **fo_kwargs)
        self._fo_kwargs = fo_kwargs      # the fastopt class's arguments (numbers, options)
        self._hp_keys = tuple(probe.defaults)
        self._flat = flat
        self._in_backward = in_backward
        self._dtensor = False            # some params are DTensors (FSDP2): stepped on local shards
        self._hooks: list = []           # in_backward=True: post-accumulate-grad hook handles
        self._fo = None                  # the fastopt optimizer over views of the params
        self._fo_group_of: list = []     # torch group index -> fastopt group index (None: empty)
        self._params: list = []          # torch params in global order (fastopt's indices)
        self._index: dict = {}           # id(param) -> global index
        self._grad_src: list = []        # the tensor each grad array views (None: no grad)
        self._grad_arrays: list = []     # what fastopt steps with (same objects every step)
        self._flat_grad: list = []       # flat=True: the param's grad view (else None)
        self._flat_arrays: list = []     # flat=True: the array fastopt steps it with (else None)
        self._adopted: dict = {}         # flat param index -> a foreign .grad copied in per step
        self._adopted_pairs = ([], [])
        self._data_ptrs: list = []       # each param's data_ptr() when last seen
        self._hp_seen: list = []         # per fastopt group: the torch values last copied
        self._step_dtype = np.float64 if scalar_dtype() == torch.float64 else np.float32
        self._step_store = np.zeros(0, self._step_dtype)   # 'step' per param, viewed by opt.state
        self._step_bytes = b""
        self._flat_buffers: list = []    # (FlatParams, grad tensor) per flat buffer
        self._cuda = False
        defaults = dict(probe.defaults)
        # torch's groups keep the values as given (tensors included)
        defaults.update((k, v) for k, v in hyper.items() if k in defaults)
        defaults.update(switches)
        super().__init__(params, defaults)
        self.state = StateView(self)
        if self._eager_state and self._fo is not None:
            self._create_state()

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
        check_options(group, self._torch_options, where)
        for k, p in enumerate(params):
            check_param(p, f"{where}['params'][{k}]")
            if self._flat and is_dtensor(p):
                raise ValueError(
                    f"{where}['params'][{k}] is a DTensor (FSDP2): its local shard lives in "
                    "storage FSDP2 owns and all-gathers from, so flat=True cannot move it into a "
                    "flat buffer; use flat=False (the step is still one fused pass over the local "
                    "shards)")
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
            fo_group = {"params": arrays,
                        **{key: host_value(group[key], where, key) for key in self._hp_keys}}
            if self._fo is None:
                fo = self._fastopt_class([fo_group], **self._fo_kwargs)
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
        self._flat_arrays.extend(g if fg is not None else None for g, fg in zip(grads, flat_grad))
        self._data_ptrs.extend(map(data_ptr, params))
        if any(map(is_dtensor, params)):
            self._dtensor = True
            self._fo._global_norm = self._sharded_norm
        self._hp_seen.append({})
        self._step_store = np.zeros(len(self._params), self._step_dtype)
        self._sync_steps()
        if isinstance(self.state, StateView):   # (torch's constructor adds groups before it exists)
            self.state._views.clear()
        self._cuda = self._cuda or any(p.device.type == "cuda" for p in params)
        if self._in_backward:
            self._hooks += [p.register_post_accumulate_grad_hook(self._step_in_backward)
                            for p in params if p.requires_grad]

    @torch.no_grad()
    def _flatten(self, params, arrays, grads, flat_grad):
        """Move trainable params (per dtype and device) into FlatParams buffers."""
        buckets: dict = {}
        for k, p in enumerate(params):
            if p.requires_grad:
                buckets.setdefault((p.dtype, p.device), []).append(k)
        for (_, device), ks in buckets.items():
            flat = FlatParams([array_view(params[k]) for k in ks])
            grad = tensor_view(flat.grad, device)
            for j, k in enumerate(ks):
                p = params[k]
                # Each view gets a storage object of its own over its part of the buffer (not
                # a slice of one shared storage), so that code that refuses tensors sharing a
                # storage (safetensors' save_model, accelerate's save_state) sees separate
                # tensors; the memory is still the one flat buffer.
                p.data = tensor_view(flat.params[j], device)
                g = tensor_view(flat.grads[j], device)
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g
                arrays[k] = flat.params[j]
                grads[k] = flat.grads[j]
                flat_grad[k] = g
            self._flat_buffers.append((flat, grad))

    def _create_state(self):
        """Every param's state now, before any step (torch's Adagrad does this), with the
        step count 0; ``requires_grad=False`` params included."""
        fo = self._fo
        for fg, start in zip(fo.param_groups, np.cumsum([0] + fo._group_sizes)):
            slots = tuple(n for n in fo._active_slots(fg) if n is not None)
            with self._stream():
                for k, a in enumerate(fg["params"]):
                    fo._ensure_state(int(start) + k, a, fg, slots)
        self.state._views.clear()

    def _index_of(self, p) -> int:
        i = self._index.get(id(p))
        if i is None:
            raise KeyError("the tensor is not a param of this optimizer")
        return i

    # -- stepping -------------------------------------------------------------------------
    def _sync_groups(self):
        """Copy the torch groups' hyperparameters (changed ones, tensors always) into fastopt's."""
        fo = self._fo
        seen = self._hp_seen
        switches = self._torch_options
        for gi, (tg, fi) in enumerate(zip(self.param_groups, self._fo_group_of)):
            if fi is not None:
                if switches:
                    check_options(tg, switches, f"param_groups[{gi}]")
                fg, last = fo.param_groups[fi], seen[fi]
                for key in self._hp_keys:
                    v = tg[key]
                    if v is not last.get(key) or type(v) not in _IMMUTABLE:
                        # (a tensor lr may change in place: read at every step)
                        fg[key] = host_value(v, f"param_groups[{gi}]", key)
                        last[key] = v

    def remove_backward_hooks(self) -> None:
        """in_backward=True: stop stepping during backward (remove the hooks from the params),
        e.g. before handing the params to another optimizer. The optimizer then steps
        nothing: build a new one (its state dict loads)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def _step_in_backward(self, p):
        """in_backward=True: step ``p`` as soon as backward has accumulated its gradient,
        then free the gradient (torchtune's optimizer-in-backward)."""
        i = self._index[id(p)]
        if data_ptr(p) != self._data_ptrs[i]:
            self._rebind(list(map(data_ptr, self._params)))
        g = local(p.grad)
        if g.layout != torch.strided or not g.is_contiguous():
            raise ValueError(f"the grad of {self._where(i)} is not a dense contiguous tensor")
        grads = [None] * len(self._params)
        grads[i] = array_view(g)
        self._import_state()
        self._sync_groups()
        steps = self._step_store
        if steps.tobytes() != self._step_bytes:
            self._fo._steps[:] = steps
        with self._stream():
            self._fo.step(grads)
        self._sync_steps()
        if self._group_state:
            self._copy_group_state()
        # The step's cached plan holds the gradient array (a view of p.grad's memory): drop
        # it, or the previous param's gradient would outlive its step. (Every call here has
        # another set of gradients, so the plan is rebuilt anyway.)
        plans = self._fo._plans
        plans[:] = [None] * len(plans)
        p.grad = None
    # Opaque to torch.compile: Dynamo must not trace into Numba's dispatcher (it fails
    # there), so a compiled function calling step() breaks its graph here and runs the
    # fused kernel eagerly, as a custom kernel should. Hyperparameters are read on the host
    # inside, so an lr changed by a scheduler never causes a recompile.
    @_opaque
    @torch.no_grad()
    def step(self, closure=None):
        """One fused fastopt step over every param that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fo is None or self._in_backward:      # (in_backward: stepped during backward)
            return loss
        grads = self._current_grads()          # may re-target self._fo at rebound params
        self._import_state()
        fo = self._fo
        self._sync_groups()
        steps = self._step_store
        if steps.tobytes() != self._step_bytes:
            fo._steps[:] = steps                        # a 'step' tensor was written in place
        with self._stream():                    # CUDA: ordered with torch's kernels
            fo.step(grads)
        self._sync_steps()
        if self._group_state:
            self._copy_group_state()
        return loss

    # Group keys the fastopt optimizer itself advances at every step (schedule-free's k,
    # weight_sum, ...): copied back into torch's groups, so param_groups and state_dict()
    # show them, as the schedulefree package's do.
    _group_state: tuple = ()

    def _copy_group_state(self):
        for tg, fi in zip(self.param_groups, self._fo_group_of):
            if fi is not None:
                fg, last = self._fo.param_groups[fi], self._hp_seen[fi]
                for key in self._group_state:
                    tg[key] = last[key] = fg[key]

    def _sharded_norm(self, local_norm: float) -> float:
        """The global 2-norm of gradients sharded over processes (FSDP2's DTensors): the
        squares of every process's local norm summed over the params' mesh. Every DTensor
        param must be sharded (no Replicate placement: its gradient would be counted once
        per replica)."""
        import torch.distributed as dist
        meshes = {id(p.device_mesh): p for p in self._params if is_dtensor(p)}
        if len(meshes) != 1 or any(not pl.is_shard() or p.device_mesh.ndim != 1
                                   for p in self._params if is_dtensor(p) for pl in p.placements):
            raise ValueError("max_grad_norm= over DTensors needs every param sharded (Shard "
                             "placements) on one 1-D device mesh; clip with "
                             "torch.nn.utils.clip_grad_norm_ before the step instead")
        if any(not is_dtensor(p) for p in self._params):
            raise ValueError("max_grad_norm= with DTensor and plain params mixed: their global "
                             "norm is ambiguous; clip with torch.nn.utils.clip_grad_norm_ instead")
        p = next(iter(meshes.values()))
        sq = torch.tensor([local_norm * local_norm], dtype=torch.float64)
        dist.all_reduce(sq, group=p.device_mesh.get_group())
        return float(sq.sqrt())

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
        ptrs = list(map(data_ptr if self._dtensor else _DATA_PTR, params))
        if ptrs != self._data_ptrs:
            self._rebind(ptrs)
        self._copy_adopted()
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
            g = now[i]
            if g is None:
                continue
            g = local(g)
            fg = self._flat_grad[i]
            if g.layout == torch.sparse_coo and fg is None and self._fastopt_class.supports_sparse:
                if g.sparse_dim() != 1:
                    raise TypeError(f"the grad of {self._where(i)} is sparse over {g.sparse_dim()} "
                                    "dims; fastopt steps row-sparse gradients (sparse_dim 1, as "
                                    "nn.Embedding(sparse=True) makes)")
                continue
            if g.layout != torch.strided:
                raise TypeError(f"the grad of {self._where(i)} is a {g.layout} tensor; fastopt.torch "
                                "steps dense gradients" + (" into the flat buffer (flat=True)" if fg is not None
                                                           else "")
                                + ("" if self._fastopt_class.supports_sparse else
                                   ", and row-sparse ones for the optimizers that take them (SGD, "
                                   "Adagrad, Adam, SparseAdam)"))
            if fg is None:
                if not g.is_contiguous():
                    raise ValueError(f"the grad of {self._where(i)} is not contiguous")
            elif g is not fg and (g.shape != fg.shape or g.dtype != fg.dtype or g.device != fg.device):
                raise FlatParamsError(
                    f"{type(self).__name__}(flat=True): the .grad of {self._where(i)} was replaced "
                    f"by a {g.dtype} tensor of shape {tuple(g.shape)} on {g.device}, where the param "
                    f"is {fg.dtype} {tuple(fg.shape)} on {fg.device}: no gradient of this param can "
                    "be taken from it. Nothing was updated.")
        for i in changed:
            g = now[i]
            self._grad_src[i] = g
            fg = self._flat_grad[i]
            if fg is None:
                self._grad_arrays[i] = None if g is None else \
                    _sparse_rows(g) if g.layout == torch.sparse_coo else array_view(g)
            elif g is None:
                # No gradient this step (set to None and not recomputed): skipped, as torch
                # skips it; its flat view is not stepped.
                self._grad_arrays[i] = None
                self._adopted.pop(i, None)
            else:
                # The flat view again, or a tensor a wrapper put there (DDP's bucket views,
                # FSDP's sharded grads, a backward after model.zero_grad()): adopted, copied
                # into the flat view before every step while it stays there.
                self._grad_arrays[i] = self._flat_arrays[i]
                if g is fg:
                    self._adopted.pop(i, None)
                else:
                    self._adopted[i] = g
        self._adopted_pairs = ([self._flat_grad[i] for i in self._adopted], list(self._adopted.values()))

    def _copy_adopted(self):
        """Copy the adopted gradients (tensors a wrapper or a backward after
        ``model.zero_grad()`` put in ``.grad``) into their flat views: one read and one
        write of those gradients per step, the price of keeping the flat buffer's one pass."""
        dst, src = self._adopted_pairs
        if dst:
            torch._foreach_copy_(dst, src)

    def _rebind(self, ptrs):
        moved = [i for i, (a, b) in enumerate(zip(ptrs, self._data_ptrs)) if a != b]
        # Follow each param to its new memory, carrying the state over. A flat param whose
        # .data a wrapper rebound (ZeroRedundancyOptimizer's bucket views, FSDP1's local
        # shard, accelerate's model.to()) is stepped where it now lives, its gradient still
        # taken from the flat buffer: that param leaves the one-pass arena for a chunk table.
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
        with self._stream():
            new = self._fastopt_class(groups, **self._fo_kwargs)
            new.load_state_dict(sd)
        if self._dtensor:
            new._global_norm = self._sharded_norm
        self._fo = new
        self._data_ptrs = ptrs
        self.state._views.clear()

    # -- gradients ------------------------------------------------------------------------
    @_opaque
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

    @_opaque
    def state_dict(self) -> dict:
        """torch.optim's layout, with torch tensors (copies) and torch's param numbering."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {}
        if self._fo is not None:
            self._import_state()
            with self._stream():
                fo_state = self._fo.state_dict()["state"]
            fused = self._fused_params()
            for i, st in fo_state.items():
                device = self._params[i].device
                # 0-d entries ('step', NAdam's 'mu_product') are CPU scalars, as torch keeps them
                # (a fused group's 'step' is float32 whatever the default dtype)
                step_dtype = torch.float32 if i in fused else scalar_dtype()
                p = self._params[i]
                scalars = self._fo._host_views(i).keys() | {"step"}
                state[i] = {k: (torch.tensor(float(v), dtype=step_dtype if k == "step" else scalar_dtype())
                                if k in scalars else
                                # (a state column of a 0-d param keeps its dtype, as torch's)
                                like_param(from_numpy(np.asarray(v), device), p))
                            for k, v in st.items()}
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        sd = {"state": state, "param_groups": groups}
        if self._fo is not None and not self._fo.state_format.is_default:
            sd["state_format"] = self._fo.state_format.record()     # torch ignores the key
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _fused_params(self) -> set:
        """Global indices of the params in groups with ``fused=True``."""
        out, start = set(), 0
        for g in self.param_groups:
            if g.get("fused"):
                out.update(range(start, start + len(g["params"])))
            start += len(g["params"])
        return out

    @_opaque
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or from torch.optim's class of the same name.

        Everything is validated before anything changes (fastopt's all-or-nothing load).
        The implementation switches (foreach, fused, capturable, differentiable) stay this
        optimizer's: they say how the saved optimizer ran, not what it learned.
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
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            for key in _LATE_KEYS:
                if key in g and key not in sg:
                    sg[key] = g[key]
            for key in self._torch_options:
                if key in g:
                    sg[key] = g[key]
                else:
                    sg.pop(key, None)
            if g["params"]:
                where = f"state_dict['param_groups'][{gi}]"
                # (a group-level "step" is pytorch_optimizer's layout: fastopt's loader reads it)
                fo_groups.append({k: (v if k == "params" else host_value(v, where, k))
                                  for k, v in sg.items()
                                  if k in ("params", "step") or k in self._hp_keys})
            sg.pop("step", None)        # the steps live in the params' state, as in torch.optim
        if self._fo is not None:
            # (an empty entry: torch's defaultdict state looked up for a param without state)
            state = {pid: {k: to_numpy(v) for k, v in st.items()}
                     for pid, st in state_dict["state"].items() if not isinstance(st, dict) or st}
            loaded = {"state": state, "param_groups": fo_groups}
            if "state_format" in state_dict:
                loaded["state_format"] = state_dict["state_format"]
            with self._stream():
                self._fo.load_state_dict(loaded)
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


# torch creates these optimizers' state for every param at construction (lazily otherwise).
_EAGER_STATE = frozenset({"Adagrad"})


def _make_class(name: str, fo_cls: type) -> type:
    sig, options = torch_signature(name, fo_cls)
    doc = (f"{name} as a torch.optim.Optimizer stepped by fastopt's fused kernel.\n\n"
           f"Arguments (positional order included), defaults, state keys and state dicts are "
           f"torch.optim.{name}'s (see fastopt.{name}), plus ``flat=True`` to step the model "
           "from flat buffers and fastopt's ``backend=`` and options (``max_grad_norm=``); "
           "fastopt.torch's module docstring lists the rules and where it differs from torch."
           "\n\n" + (inspect.getdoc(fo_cls) or ""))

    def __init__(self, *args, **kwargs):
        TorchOptimizer.__init__(self, *args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    __init__.__qualname__ = f"{name}.__init__"
    body = {"_fastopt_class": fo_cls, "_signature": sig, "_torch_options": options,
            "_eager_state": name in _EAGER_STATE, "__init__": __init__, "__doc__": doc,
            "__module__": __name__, "__qualname__": name}
    from .schedulefree import ScheduleFree
    bases = (TorchOptimizer,)
    if issubclass(fo_cls, ScheduleFree):
        from .kernels.schedulefree import HOST_KEYS
        body["_group_state"] = HOST_KEYS
        bases = (ScheduleFreeSwitch, TorchOptimizer)
    return type(name, bases, body)


class ScheduleFreeSwitch:
    """``train()`` / ``eval()`` of the schedule-free classes, as the schedulefree package's:
    the params hold y in train mode and x in eval mode; one fused pass swaps them. A step
    in eval mode raises (call ``train()`` first); a new optimizer starts in train mode."""

    @_opaque
    @torch.no_grad()
    def train(self) -> None:
        self._switch(False)

    @_opaque
    @torch.no_grad()
    def eval(self) -> None:
        self._switch(True)

    def _switch(self, to_eval: bool) -> None:
        if self._fo is None:
            for g in self.param_groups:
                g["train_mode"] = not to_eval
            return
        self._import_state()
        self._sync_groups()
        with self._stream():
            self._fo.eval() if to_eval else self._fo.train()
        self._copy_group_state()


OPTIMIZERS: dict = {}
"""{name: fastopt.torch class} for every optimizer fastopt provides."""

for _name, _cls in _fastopt_classes().items():
    OPTIMIZERS[_name] = globals()[_name] = _make_class(_name, _cls)
    __all__.append(_name)
del _name, _cls


# -- Lookahead around a fastopt.torch optimizer ------------------------------------------------
class Lookahead(torch.optim.Optimizer):
    """``pytorch_optimizer.Lookahead``'s semantics and state-dict layout around a
    fastopt.torch optimizer: every ``k`` steps of the inner optimizer, the slow weights
    move ``alpha`` of the way to the fast ones and the fast ones are set to them, as one
    fused pass over all params (:class:`fastopt.Lookahead` on the inner fastopt optimizer).

    Args:
      optimizer: a fastopt.torch optimizer (``fastopt.torch.AdamW(model.parameters())``).
      k, alpha, pullback_momentum: as pytorch_optimizer's (5, 0.5, "none").

    ``state_dict()``: ``{"lookahead_state": {(group, index): {"slow_params": tensor}},
    "base_optimizer": <the inner state dict, each group with its "counter">}``, which
    pytorch_optimizer.Lookahead loads, and whose own state dicts load here.
    """

    def __init__(self, optimizer, k: int = 5, alpha: float = 0.5, pullback_momentum: str = "none"):
        from collections import OrderedDict

        from .lookahead import Lookahead as _FoLookahead
        if not isinstance(optimizer, TorchOptimizer):
            raise TypeError("fastopt.torch.Lookahead wraps a fastopt.torch optimizer "
                            f"(fastopt.torch.AdamW(...), ...), got {type(optimizer).__name__}; "
                            "wrap torch.optim optimizers with pytorch_optimizer.Lookahead")
        if optimizer._fo is None:
            raise ValueError("fastopt.torch.Lookahead: the inner optimizer has no params")
        self.optimizer = optimizer
        self._la = _FoLookahead(optimizer._fo, k, alpha, pullback_momentum)
        self.k, self.alpha, self.pullback_momentum = self._la.k, self._la.alpha, self._la.pullback_momentum
        self.defaults = self._la.defaults
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        """``{param: {"slow_params": live view}}`` (``"slow_momentum"`` with "pullback")."""
        out = {}
        for i, st in self._la.state.items():
            p = self.optimizer._params[i]
            out[p] = {k: tensor_view(a, p.device) for k, a in st.items()}
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @_opaque
    def step(self, closure=None):
        """The inner step, then the slow-weight update of the groups that reach k."""
        loss = self.optimizer.step(closure)
        self._la.optimizer = self.optimizer._fo          # (re-targeted when params moved)
        stepped = [i for i, p in enumerate(self.optimizer._params) if p.grad is not None]
        self._la.after_step(stepped)
        return loss

    @_opaque
    def state_dict(self) -> dict:
        base = self.optimizer.state_dict()
        for g, counter in zip(base["param_groups"], self._la._counters):
            g["counter"] = counter
        keys = [(gi, k) for gi, g in enumerate(self.param_groups) for k in range(len(g["params"]))]
        look = {keys[i]: {k: torch.from_numpy(np.array(a)) for k, a in st.items()}
                for i, st in self._la.state.items()}
        return {"lookahead_state": look, "base_optimizer": base}

    @_opaque
    def load_state_dict(self, state_dict: dict) -> None:
        """pytorch_optimizer.Lookahead's layout (tensors) or this class's; all checked
        before anything changes."""
        if not isinstance(state_dict, dict) or "lookahead_state" not in state_dict \
                or "base_optimizer" not in state_dict:
            raise ValueError("Lookahead.load_state_dict: expected a dict with 'lookahead_state' "
                             "and 'base_optimizer' (pytorch_optimizer's Lookahead layout)")
        base = state_dict["base_optimizer"]
        if not isinstance(base, dict) or not isinstance(base.get("param_groups"), (list, tuple)):
            raise ValueError("Lookahead.load_state_dict: 'base_optimizer' must be the inner "
                             "optimizer's state dict")
        look = {key: ({k: to_numpy(v) for k, v in st.items()} if isinstance(st, dict) else st)
                for key, st in dict(state_dict["lookahead_state"]).items()}
        counters = [g.get("counter", 0) for g in base["param_groups"]]
        inner = {**base, "param_groups": [{k: v for k, v in g.items() if k != "counter"}
                                          for g in base["param_groups"]]}
        before = self.optimizer.state_dict()
        self.optimizer.load_state_dict(inner)              # checks, then loads
        try:
            fo_base = self.optimizer._fo.state_dict()
            for g, c in zip(fo_base["param_groups"], counters):
                g["counter"] = c
            self._la.optimizer = self.optimizer._fo
            self._la.load_state_dict({"lookahead_state": look, "base_optimizer": fo_base})
        except BaseException:
            self.optimizer.load_state_dict(before)         # nothing changed
            raise


__all__.append("Lookahead")
