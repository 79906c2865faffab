"""CUDA targets: fastopt's CUDA backend, torch on the GPU, and the GPU roofs.

Everything here is guarded: :func:`gpu_available` says whether CuPy sees a device, and
CPU-only machines never import CuPy or touch a driver. The CUDA rows call fastopt
through its public API (``backend="cuda"``, FlatParams over CuPy arrays); timings
synchronise the device inside each sample.

The GPU roofs (the roof kernel through the CUDA driver, the device-to-device copy) are
in :mod:`.roof`.
"""
from __future__ import annotations

import os
import sys

from .cases import OptimizerCase
from .runner import LayoutData, Target


def gpu_available() -> tuple[bool, str]:
    """(True, device name) when CuPy sees a CUDA device, else (False, why not)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1 (CUDA simulator: no timings)"
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no cupy, no driver, no device
        return False, f"{type(exc).__name__}: {exc}".strip()
    if n < 1:
        return False, "no CUDA device"
    return True, gpu_name()


def gpu_name() -> str | None:
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def simulated() -> bool:
    """Under Numba's CUDA simulator the CUDA backend steps host (NumPy) arrays: the CUDA
    targets can then be built and stepped (a plumbing check), though never timed."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def device_module():
    """CuPy, or NumPy under the CUDA simulator."""
    if simulated():
        import numpy
        return numpy
    import cupy
    return cupy


def sync():
    """Wait for the device (nothing to wait for under the simulator)."""
    if not simulated():
        import cupy
        cupy.cuda.runtime.deviceSynchronize()


def fastopt_cuda_target(case: OptimizerCase, data: LayoutData, mode: str) -> Target:
    """fastopt's CUDA backend over a device FlatParams (``flat``) or device arrays (``list``)."""
    import fastopt as fo
    xp = device_module()
    params_dev, grads_dev = xp.array(data.params), xp.array(data.grads)   # one upload each
    if mode == "flat":
        flat = fo.FlatParams(data.views(params_dev))
        flat.grad[...] = grads_dev
        opt = case.make(flat, backend="cuda")
        step, keep = opt.step, (flat, opt)
    elif mode == "list":
        params = [v.copy() for v in data.views(params_dev)]
        grads = [v.copy() for v in data.views(grads_dev)]
        opt = case.make(params, backend="cuda")
        step, keep = (lambda: opt.step(grads)), (params, grads, opt)
    else:
        raise ValueError(f"mode must be 'flat' or 'list', got {mode!r}")
    return Target(step, sync=sync, mode=mode, keep=keep)


def torch_cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def free_memory() -> None:
    """Return CuPy's cached blocks so the next target starts from a clean pool."""
    try:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:
        pass
    torch = sys.modules.get("torch")      # only if the run imported it
    if torch is not None and torch_cuda_available():
        torch.cuda.empty_cache()
