"""The machine and libraries a benchmark ran on (``fastopt info``, the JSON record)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

_FEATURES = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512fp16",
             "amx-tile", "neon", "sve", "asimd")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    """LLVM's name for the host CPU and the vector features Numba compiles for."""
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features()
        return dict(llvm_cpu=llvm.get_host_cpu_name(),
                    features=[f for f in _FEATURES if features.get(f, False)])
    except Exception as exc:  # pragma: no cover - exotic platforms
        return dict(llvm_cpu=None, features=[], error=str(exc))


def threading_layer() -> str:
    """Numba's threading layer: the one in use once a parallel kernel ran, else the one
    configured (``import fastopt`` asks for TBB unless someone chose: kernels/threads.py)."""
    import numba

    import fastopt  # noqa: F401  (chooses the layer on import)
    try:
        return numba.threading_layer()
    except ValueError:
        return f"{numba.config.THREADING_LAYER} (not started yet)"


def start_threading_layer() -> None:
    """Run one tiny parallel step so the threading layer is chosen and reportable."""
    import numpy as np

    from fastopt.kernels import cpu, roof
    a, g = np.ones(8, np.float32), np.ones(8, np.float32)
    cpu.run(roof.roof_element, cpu.ChunkTable([a], [g], (None, None, None)),
            roof.roof_scalars(np.float32))


def torch_info(import_torch=True) -> dict | None:
    if not import_torch and "torch" not in sys.modules:
        return None
    try:
        import torch
    except Exception as exc:
        return dict(available=False, error=f"{type(exc).__name__}: {exc}")
    return dict(available=True, version=torch.__version__, threads=torch.get_num_threads(),
                cuda=bool(torch.cuda.is_available()))


def backend_status() -> dict:
    """{backend: "available ..." or "unavailable: why"} for fastopt's backends."""
    from fastopt import _backend

    from .gpu import gpu_available
    from fastopt.kernels import threads
    out = {"cpu": f"available (Numba, threading layer {threads.describe()})",
           "numpy": "available (reference)"}
    ok, why = gpu_available()
    if not ok:
        out["cuda"] = f"unavailable: {why}"
    else:
        try:
            _backend.get("cuda")
            out["cuda"] = f"available ({why})"
        except Exception as exc:
            out["cuda"] = f"unavailable: {exc}"
    return out


def machine_info(import_torch=True) -> dict:
    """Everything a benchmark figure depends on, as plain JSON-able values."""
    import numba
    import numpy as np
    import psutil

    import fastopt
    import fastopt.kernels.cpu  # noqa: F401  (pins the threading layer before
    #                             numba.get_num_threads below starts the pool)

    from .gpu import gpu_available
    gpu_ok, gpu = gpu_available()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    info = dict(
        platform=platform.platform(),
        python=sys.version.split()[0],
        cpu_model=cpu_model(),
        cpu=cpu_features(),
        logical_cores=os.cpu_count(),
        physical_cores=psutil.cpu_count(logical=False),
        usable_cores=affinity,
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        numba_threads=numba.get_num_threads(),
        threading_layer=threading_layer(),
        numba_cache_dir=os.environ.get("NUMBA_CACHE_DIR") or None,
        versions=dict(fastopt=fastopt.__version__, numpy=np.__version__, numba=numba.__version__,
                      llvmlite=_version("llvmlite"), tbb=_version("tbb"), torch=_version("torch"),
                      cupy=_version("cupy-cuda12x") or _version("cupy"),
                      numba_cuda=_version("numba-cuda")),
        torch=torch_info(import_torch),
        gpu=gpu if gpu_ok else None,
        gpu_status=None if gpu_ok else gpu,
    )
    return info
