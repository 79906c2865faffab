"""Adafactor (torch.optim.Adafactor's semantics) on fastopt's optimizer engine.

Adafactor's state is not aligned with its params (a matrix keeps a row and a column
factor) and its step is several passes with reductions between them, so it does not fit
the spec mechanism's elementwise columns (fastopt/spec.py). This class keeps everything
of :class:`~fastopt.optimizer.Optimizer` that does not depend on that (param groups,
gradient checks and plans, ``grad_scale``/``max_grad_norm``, callable lrs, the step lock,
``state``, ``state_dict``) and replaces the rest: hyperparameter checks, state creation,
the step of a bucket (kernels/adafactor.py on the CPU, kernels/adafactor_cuda.py on a
GPU, kernels/reference_adafactor.py for "numpy") and ``load_state_dict`` (state shapes
are torch's: ``row_var`` ``(..., R, 1)``, ``col_var`` ``(..., 1, C)``, ``variance`` like
the param).
"""
from __future__ import annotations

import numpy as np

from . import _validate as v
from ._state import _as_step, adopt, loaded_groups
from .kernels import adafactor as _k
from .kernels import reference_adafactor as _ref
from .kernels import threads
from .optimizer import Optimizer

ROW, COL, VAR = "row_var", "col_var", "variance"


def _eps_pair(value, where):
    prefix = f"{where}: " if where else ""
    try:
        eps1, eps2 = value
    except (TypeError, ValueError):
        raise TypeError(f"{prefix}eps must be a pair (eps1, eps2) with eps1 None or a number, "
                        f"got {value!r}") from None
    if eps1 is not None:
        eps1 = v.number("eps[0] (eps1)", eps1, low=0.0, where=where)
    eps2 = v.number("eps[1] (eps2)", eps2, low=0.0, where=where)
    return (eps1, eps2)


def state_shapes(shape) -> dict:
    """torch's Adafactor state keys and shapes for a param of ``shape``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) >= 2:
        return {ROW: shape[:-1] + (1,), COL: shape[:-2] + (1, shape[-1])}
    return {VAR: shape}


class Adafactor(Optimizer):
    """Adafactor: second moments factored into row and column means (torch.optim.Adafactor).

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
      ICML 2018; torch.optim.Adafactor (torch 2.13): its equations, defaults and state.

    Args:
      params: arrays, param groups or a FlatParams.
      lr: the upper bound of the relative step ``rho_t = min(lr, 1/sqrt(t))`` and the
        weight-decay coefficient's factor (torch's use; 1e-2).
      beta2_decay: ``1 - beta2_t = t ** beta2_decay`` (<= 0; -0.8).
      eps: ``(eps1, eps2)``: eps1 (None: the param dtype's machine epsilon) bounds the
        variance estimate and the row mean from below, eps2 the param RMS in the step
        size ``alpha_t = max(eps2, RMS(p)) rho_t`` ((None, 1e-3)).
      d: the update is divided by ``max(1, RMS(update) / d)`` (>= 1; 1.0).
      weight_decay: decoupled: ``p *= 1 - lr * weight_decay`` (0.0).
      maximize: ascend (False).
      backend: "cpu" (Numba, parallel), "numpy" (the reference), "cuda" or None.

    State per param: ``step``; params with ``ndim >= 2`` ``row_var`` (shape ``(..., R, 1)``)
    and ``col_var`` (``(..., 1, C)``), factored over the last two dims; others
    ``variance`` (the param's shape). State dicts load into torch.optim.Adafactor and back.
    Beyond torch: ``grad_scale=`` and ``max_grad_norm=`` (fused gradient scaling); not
    supported: 16-bit params, low-bit state, sparse gradients.
    """

    spec = None
    # The per-element update (fastopt.torch makes a class of each Optimizer with one).
    element = staticmethod(_k.update_of)
    slot_names = (ROW, COL, VAR)
    has_step_state = True
    supports_sparse = False

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False, backend=None, **options):
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                    "weight_decay": weight_decay, "maximize": maximize}
        for name in ("master_weights", "stochastic_rounding", "kahan_sum"):
            if options.get(name):
                raise NotImplementedError(f"Adafactor does not support {name}=True (16-bit "
                                          "params) yet: its passes have no 16-bit driver")
        super().__init__(params, defaults, backend, **options)
        if not self.state_format.is_default:
            raise NotImplementedError("Adafactor does not support state_format="
                                      f"{self.state_format.name!r}: its factored state is "
                                      "already small; use 'float32'")

    # -- hyperparameters ------------------------------------------------------------------
    @classmethod
    def _check_group(cls, group, where):
        group["lr"] = v.learning_rate(group["lr"], where=where)
        group["beta2_decay"] = v.number("beta2_decay", group["beta2_decay"], high=0.0, where=where)
        group["eps"] = _eps_pair(group["eps"], where)
        group["d"] = v.number("d", group["d"], low=1.0, where=where)
        group["weight_decay"] = v.number("weight_decay", group["weight_decay"], low=0.0, where=where)
        group["maximize"] = v.flag("maximize", group["maximize"], where=where)

    @classmethod
    def _active_slots(cls, group):
        return ()            # state depends on each param's shape: see _ensure_state

    def _ensure_state(self, i, p, group, slot_names=()):
        st = self._state[i]
        if st is None:
            st = self._state[i] = {}
        if st:
            return
        xp = np if isinstance(p, np.ndarray) else _cupy()
        for name, shape in state_shapes(p.shape).items():
            st[name] = xp.zeros(shape, dtype=p.dtype)

    # -- the step -------------------------------------------------------------------------
    def _run_group(self, group, plan, backend_name, scale=1.0):
        for bucket in plan.buckets:
            idx = bucket.indices
            if not idx.size:
                continue
            steps = self._steps[idx] + 1
            states = [self._state[i] for i in idx]
            if backend_name == "numpy":
                _run_reference(group, bucket, states, steps, scale)
            else:
                if bucket.table is None:
                    bucket.table = _tables(bucket, states, backend_name)
                tables = bucket.table
                h = _k.HostScalars(steps[tables.order], tables.sizes, group,
                                   np.dtype(bucket.params[0].dtype), scale)
                if backend_name == "cpu":
                    _k.step_cpu(tables, h, threads.launch)
                else:
                    from .kernels import adafactor_cuda
                    adafactor_cuda.step(tables, h)
            self._steps[idx] += 1

    # -- state dicts ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of fastopt's or torch.optim.Adafactor's (NumPy arrays), all
        or nothing: groups, keys, shapes (torch's state shapes) and steps are checked first
        (groups and the final adoption as every optimizer's: fastopt/_state.py)."""
        loading = loaded_groups(self, state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        loaded = {}
        for pid, st in loading.state.items():
            where = f"state_dict['state'][{pid!r}]"
            gi, i = loading.param_of(pid, st)
            p = params[i]
            if not st:
                continue
            if "step" not in st:
                raise ValueError(f"{where} lacks 'step': it is not an Adafactor state dict")
            shapes = state_shapes(p.shape)
            have = set(st) - {"step"}
            if set(shapes) - have:
                raise ValueError(f"{where} lacks {sorted(set(shapes) - have)}: a param of shape "
                                 f"{tuple(p.shape)} keeps {sorted(shapes)}")
            if have - set(shapes):
                raise ValueError(f"{where} has keys {sorted(have - set(shapes), key=repr)} that a "
                                 f"param of shape {tuple(p.shape)} does not keep ({sorted(shapes)})")
            for key, shape in shapes.items():
                a = st[key]
                if not (v.is_array(a) or hasattr(a, "__array__")):
                    raise TypeError(f"{where}[{key!r}] must be an array, got {type(a).__name__}")
                if tuple(np.shape(a)) != shape:
                    raise ValueError(f"{where}[{key!r}] has shape {tuple(np.shape(a))}, expected "
                                     f"{shape} for params[{i}] of shape {tuple(p.shape)}")
                if np.dtype(getattr(a, "dtype", None) or np.float64).kind != "f":
                    raise TypeError(f"{where}[{key!r}] has dtype {a.dtype}, expected a floating dtype")
            loaded[i] = (p, {k: st[k] for k in shapes}, _as_step(st["step"], f"{where}['step']"),
                         loading.groups[gi])
        adopt(self, loading, loaded)

def _cupy():
    import cupy
    return cupy


def _run_reference(group, bucket, states, steps, scale):
    eps1, eps2 = group["eps"]
    for p, g, st, step in zip(bucket.params, bucket.grads, states, steps):
        if p.size == 0:
            continue
        if scale != 1.0:
            g = g * np.asarray(scale, dtype=g.dtype)
        _ref.adafactor_tensor(p, g, st.get(ROW), st.get(COL), st.get(VAR), step=int(step),
                              lr=float(group["lr"]), beta2_decay=group["beta2_decay"], eps1=eps1,
                              eps2=eps2, d=group["d"], weight_decay=group["weight_decay"],
                              maximize=group["maximize"])


def _tables(bucket, states, backend_name):
    """The bucket's kernel tables: non-empty factored params first, then vector ones;
    ``order`` (positions in the bucket) and ``sizes`` in that order."""
    factored, vectors, fpos, vpos = [], [], [], []
    for k, (p, g, st) in enumerate(zip(bucket.params, bucket.grads, states)):
        if p.size == 0:
            continue
        if ROW in st:
            factored.append((p, g, st[ROW], st[COL]))
            fpos.append(k)
        else:
            vectors.append((p, g, st[VAR]))
            vpos.append(k)
    if backend_name == "cpu":
        tables = _k.CpuTables(factored, vectors)
    else:
        from .kernels import adafactor_cuda
        tables = adafactor_cuda.CudaTables(factored, vectors)
    tables.order = np.array(fpos + vpos, dtype=np.int64)
    tables.sizes = np.array([float(bucket.params[k].size) for k in tables.order])
    return tables
