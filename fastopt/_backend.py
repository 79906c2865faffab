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


class _CpuBackend:
    name = "cpu"
    xp = np

    def __init__(self):
        from .kernels import cpu
        self._cpu = cpu

    def table(self, params, grads, slots, model=None):
        return self._cpu.ChunkTable(params, grads, slots, model=model)

    def run(self, element, table, scalars, grad_scale=1.0, **options):
        self._cpu.run(element, table, scalars, grad_scale, **options)


_loaded: dict = {}


def get(name: str):
    """The backend object for ``name`` (``"numpy"`` has none: callers run the reference)."""
    be = _loaded.get(name)
    if be is not None:
        return be
    if name == "cpu":
        be = _CpuBackend()
    elif name == "cuda":
        try:
            from .kernels import cuda as cuda_driver
            be = cuda_driver.CudaBackend()
        except Exception as exc:  # ImportError, or a CUDA driver that fails to initialise
            raise BackendUnavailableError(
                "fastopt backend 'cuda' is unavailable: install fastopt[cuda] (numba-cuda, cupy) "
                f"on a machine with an NVIDIA driver ({type(exc).__name__}: {exc})") from exc
    else:
        raise ValueError(f"backend {name!r} has no driver object")
    _loaded[name] = be
    return be
