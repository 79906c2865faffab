"""Backend choice: explicit argument > ``with fastopt.backend(...)`` > FASTOPT_BACKEND > auto.

A backend runs one fused step of an element function over aligned lists of arrays of one
dtype. ``"cpu"`` is the Numba driver, ``"numpy"`` the reference (it runs the reference
functions instead of elements), ``"cuda"`` the numba-cuda driver (imported on first use).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np

BACKENDS = ("cpu", "numpy", "cuda")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastopt_backend", default=None)


class BackendUnavailableError(ImportError):
    """A requested backend cannot be loaded; ``__cause__`` holds the original import error."""


@contextlib.contextmanager
def backend(name: str):
    """Use backend ``name`` for steps inside the ``with`` block (per thread and task)."""
    _check_name(name, "backend")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


def _check_name(name, what):
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")


def is_device_array(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def resolve(explicit: str | None, sample=None) -> str:
    """The backend name for a step, by the precedence rule above."""
    for name, what in ((explicit, "backend"), (_current.get(), "fastopt.backend()"),
                       (os.environ.get("FASTOPT_BACKEND") or None, "FASTOPT_BACKEND")):
        if name is not None:
            _check_name(name, what)
            return name
    return "cuda" if sample is not None and is_device_array(sample) else "cpu"


# -- what each backend can do: the one place a combination is refused -----------------------
MASTER_WEIGHTS = "master weights (16-bit params)"
SPARSE_ROWS = "sparse gradient rows (SparseGrad)"
PER_TENSOR = "per-tensor passes (LAMB, LARS)"
DENSE = "dense steps"
LOWBIT_STATE = "16-bit and 8-bit state (state_format)"
PURE_KAHAN = "16-bit params without master weights (kahan_sum)"
PURE_STOCHASTIC = "16-bit params rounded stochastically without master weights"

CAPABILITIES = {
    "cpu": frozenset({DENSE, MASTER_WEIGHTS, SPARSE_ROWS, PER_TENSOR, LOWBIT_STATE, PURE_KAHAN,
                      PURE_STOCHASTIC}),
    "numpy": frozenset({DENSE, MASTER_WEIGHTS, SPARSE_ROWS, PER_TENSOR, LOWBIT_STATE, PURE_KAHAN}),
    "cuda": frozenset({DENSE, MASTER_WEIGHTS, SPARSE_ROWS, PER_TENSOR, LOWBIT_STATE, PURE_KAHAN,
                       PURE_STOCHASTIC}),
}
"""{backend: the features it runs}; :func:`require` refuses the others."""


def require(name: str, feature: str, what: str) -> None:
    """Raise NotImplementedError, naming ``what`` asked for it, when backend ``name``
    lacks ``feature``: before anything is mutated."""
    if feature not in CAPABILITIES[name]:
        have = [b for b in BACKENDS if feature in CAPABILITIES[b]]
        raise NotImplementedError(f"{what}: {feature} run on the {', '.join(map(repr, have))} "
                                  f"backend{'s' if len(have) > 1 else ''}, not {name!r}")


# -- one interface: step a bucket, step sparse rows ----------------------------------------------
class _Driver:
    """A compiled driver (``kernels/cpu.py``, ``kernels/cuda.py``) behind the interface the
    optimizers call: :meth:`step` a bucket of tensors, :meth:`step_rows` of a sparse
    gradient. Anything else (``table``, ``run``, ``reduce_chunks``, ...) is the driver's."""

    def __init__(self, name, driver):
        self.name = name
        self.driver = driver

    def __getattr__(self, attr):
        return getattr(self.driver, attr)

    def step(self, spec, group, bucket, step, scale=1.0, seed=0, stochastic=False) -> None:
        if spec.per_tensor is not None:
            from . import _passes
            _passes.run(spec, group, bucket, step, self, scale)
            return
        if bucket.table is None:
            options = {} if bucket.formats is None else dict(
                formats=bucket.formats, scales=bucket.scales, block=bucket.block)
            if bucket.pure is not None:
                options.update(pure=bucket.pure, model=bucket.compensation)
            else:
                options["model"] = bucket.model
            bucket.table = self.driver.table(bucket.params, bucket.grads, bucket.slots, **options)
        cast = np.float32 if bucket.pure is not None else np.dtype(bucket.params[0].dtype).type
        scalars = spec.scalars(group, step, cast)
        # the seed: stochastic rounding of 16-bit params (master weights' or pure ones)
        options = {"seed": seed} if bucket.model is None else {"seed": seed, "stochastic": stochastic}
        self.driver.run(spec.element, bucket.table, scalars, scale, **options)

    def step_rows(self, spec, group, step, param, index, rows, slots, scale=1.0) -> None:
        scalars = (spec.sparse.scalars or spec.scalars)(group, step, param.dtype.type)
        self.driver.run_rows(spec.element, param, index, rows, slots, scalars, scale)


class _Reference:
    """The ``"numpy"`` backend: the independent reference behind the same interface."""

    name = "numpy"
    xp = np

    def step(self, spec, group, bucket, step, scale=1.0, seed=0, stochastic=False) -> None:
        if bucket.pure is not None:
            self._pure_step(spec, group, bucket, step, scale, seed)
            return
        cast = np.dtype(bucket.params[0].dtype).type
        grads = bucket.grads
        if bucket.model is not None:
            grads = [g.astype(np.float32) for g in grads]
        if scale != 1.0:
            grads = [g * cast(scale) for g in grads]
        if bucket.formats is not None:
            from .kernels import reference_lowbit
            reference_lowbit.step(spec, group, step, bucket.params, grads, bucket.slots,
                                  bucket.formats, bucket.scales, bucket.block)
        else:
            spec.run_reference(group, step, bucket.params, grads, bucket.slots)
        if bucket.model is not None:
            for w, master in zip(bucket.model, bucket.params):
                w[...] = master.astype(w.dtype)          # round to nearest even

    def _pure_step(self, spec, group, bucket, step, scale, seed) -> None:
        """Pure 16-bit params with Kahan compensation: the float32 step on widened copies,
        then each param gets ``round(p + c)`` with ``c`` its carried error plus the exact
        update, and keeps what rounding left out (``kernels/codegen.py`` _param_store)."""
        if bucket.pure != "kahan":  # pragma: no cover - refused by the capability table
            raise NotImplementedError("stochastic rounding of pure 16-bit params runs on 'cpu'")
        wide = [p.astype(np.float32) for p in bucket.params]
        before = [w.copy() for w in wide]
        grads = [g.astype(np.float32) * np.float32(scale) for g in bucket.grads]
        widened = _Bucket32(bucket, wide, grads)
        self.step(spec, group, widened, step, seed=seed)
        for p, c, p0, new in zip(bucket.params, bucket.compensation, before, wide):
            comp = c.astype(np.float32) + (new - p0)
            p[...] = (p0 + comp).astype(p.dtype)
            c[...] = (comp - (p.astype(np.float32) - p0)).astype(c.dtype)

    def step_rows(self, spec, group, step, param, index, rows, slots, scale=1.0) -> None:
        rows = rows if scale == 1.0 else rows * rows.dtype.type(scale)
        if spec.sparse.reference is not None:
            spec.sparse.reference(group, step, param, index, rows, slots)
            return
        # The dense step with a gradient that is zero outside the rows.
        dense = np.zeros_like(param)
        dense[index] = rows
        spec.run_reference(group, step, [param], [dense], tuple(None if s is None else [s] for s in slots))


class _Bucket32:
    """A pure 16-bit bucket seen through float32 copies of its params and gradients."""

    def __init__(self, bucket, params, grads):
        self.params, self.grads, self.slots = params, grads, bucket.slots
        self.formats, self.scales, self.block = bucket.formats, bucket.scales, bucket.block
        self.model = self.pure = None


class _CpuBackend:
    """``kernels/cpu.py`` as a driver object."""

    name = "cpu"
    xp = np

    def __init__(self):
        from .kernels import cpu
        self._cpu = cpu

    def table(self, params, grads, slots, model=None, merge=True, **options):
        return self._cpu.ChunkTable(params, grads, slots, merge=merge, model=model, **options)

    def run(self, element, table, scalars, grad_scale=1.0, **options):
        self._cpu.run(element, table, scalars, grad_scale, **options)

    def run_rows(self, element, param, index, rows, slots, scalars, grad_scale=1.0):
        self._cpu.run_rows(element, param, index, rows, slots, scalars, grad_scale)

    def reduce_chunks(self, fn, table, scalars, **options):
        return self._cpu.reduce_chunks(fn, table, scalars, **options)


_loaded: dict = {}


def get(name: str):
    """The backend object for ``name``: :meth:`_Driver.step` and :meth:`_Driver.step_rows`
    for every backend, and for "cpu" and "cuda" the driver's own methods too."""
    be = _loaded.get(name)
    if be is not None:
        return be
    if name == "cpu":
        be = _Driver("cpu", _CpuBackend())
    elif name == "numpy":
        be = _Reference()
    elif name == "cuda":
        try:
            from .kernels import cuda as cuda_driver
            be = _Driver("cuda", cuda_driver.CudaBackend())
        except Exception as exc:  # ImportError, or a CUDA driver that fails to initialise
            raise BackendUnavailableError(
                "fastopt backend 'cuda' is unavailable: install fastopt[cuda] (numba-cuda, cupy) "
                f"on a machine with an NVIDIA driver ({type(exc).__name__}: {exc})") from exc
    else:
        _check_name(name, "backend")
    _loaded[name] = be
    return be
