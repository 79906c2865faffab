"""The benchmark run behind ``fastopt bench``: plan the rows, time them, compare them.

For each layout, for each optimizer, in one process: the roof kernel, fastopt in
FlatParams and list mode and torch (fused where it supports it, else foreach) are built
side by side and timed interleaved (sample by sample, so the fraction of the roof and the
ratio to torch survive a machine whose speed drifts); then the NumPy reference alone
(fewer repeats: it is slow); then the CUDA rows when a GPU is present. Each group builds
its own arrays from the layout's shared initial values and frees them before the next:
peak memory is about four copies of one optimizer's arrays plus the initial values.
Then, inside the same progress bar and total, the cold-start children and the fused
clipping comparison (:mod:`.clipping`, when ``adam`` is among the optimizers).
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time

import numpy as np
import psutil

from .cases import LAYOUTS, OptimizerCase, available_optimizers, parse_layouts, parse_size
from .clipping import VARIANTS, run_clip_comparison
from .roof import copy_cuda_target, roof_bytes_per_param, roof_cuda_target, roof_target
from .runner import (LayoutData, Result, compare, fastopt_target, numpy_target, time_together,
                     torch_target, warm_up)

BACKENDS = ("roof", "fastopt", "numpy", "torch", "cuda")
DEFAULT_SIZE = "8M"


@dataclasses.dataclass
class BenchConfig:
    """What to run. ``fastopt bench`` builds one from its flags; defaults are the quick run."""

    optimizers: list = None                 # OptimizerCase rows (None: the default rows)
    layouts: list = dataclasses.field(default_factory=lambda: list(LAYOUTS))
    size: int = parse_size(DEFAULT_SIZE)    # parameters of "large" and "transformer"
    dtype: str = "float32"
    backends: tuple = BACKENDS              # subset of BACKENDS; unavailable ones are skipped
    modes: tuple = ("flat", "list")         # fastopt modes
    repeats: int = 15
    numpy_repeats: int = 3
    max_time_s: float = 1.0                 # per row: stop sampling after this (>= 3 samples)
    memory: bool = True
    cold_start: list = None                 # OptimizerCase rows to cold-start (None: none)
    cold_start_size: int = 1 << 20
    threads: int | None = None
    seed: int = 0
    clip: bool = True                       # the clipping comparison, where it applies

    def __post_init__(self):
        if self.optimizers is None:
            self.optimizers = available_optimizers()
        if self.threads is not None:
            import numba
            top = numba.config.NUMBA_NUM_THREADS
            if not 1 <= int(self.threads) <= top:
                raise ValueError(f"threads must be between 1 and {top} (Numba's "
                                 f"NUMBA_NUM_THREADS on this machine), got {self.threads}")
        self.layouts = parse_layouts(self.layouts)
        self.size = parse_size(self.size)
        self.dtype = str(np.dtype(self.dtype))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        unknown = set(self.backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
        bad = set(self.modes) - {"flat", "list"}
        if bad:
            raise ValueError(f"unknown modes {sorted(bad)}; choose from flat, list")
        if self.repeats < 1 or self.numpy_repeats < 1:
            raise ValueError("repeats must be at least 1")
        if not self.max_time_s > 0:
            raise ValueError(f"max_time_s must be positive, got {self.max_time_s}")

    @property
    def clip_applies(self) -> bool:
        """Whether the run includes the clipping comparison: it is Adam's (fused global-norm
        clipping against clip-then-step and torch), so it runs when ``adam`` is among the
        optimizers, fastopt among the backends, in float32, and ``clip`` is on."""
        return (self.clip and self.dtype == "float32" and "fastopt" in self.backends
                and any(c.name == "adam" for c in self.optimizers))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizers"] = [c.name for c in self.optimizers]
        d["cold_start"] = [c.name for c in self.cold_start or []]
        d["backends"] = list(self.backends)
        d["modes"] = list(self.modes)
        return d


@dataclasses.dataclass
class BenchRun:
    """The outcome: rows, cold-start records, machine, config, notes and wall time."""

    config: BenchConfig
    results: list
    cold_start: list
    machine: dict
    notes: list
    total_s: float
    layout_info: dict
    extra: dict = dataclasses.field(default_factory=dict)   # further sections (clipping)
    early_notes: int = 0                    # notes[:early_notes] were known before the run


def _torch_status(wanted: bool, notes: list) -> bool:
    if not wanted:
        return False
    try:
        import torch  # noqa: F401
    except Exception as exc:
        notes.append(f"torch rows skipped: torch is not importable ({type(exc).__name__}: {exc})")
        return False
    return True


def _plan(config: BenchConfig, torch_ok: bool, gpu_ok: bool, torch_cuda: bool) -> list:
    """Groups of rows ``(layout, case, [(kind, mode), ...])``; a group's rows are timed
    together, interleaved (the roof beside fastopt), the others alone."""
    groups = []
    b = set(config.backends)
    for layout in config.layouts:
        for case in config.optimizers:
            together = [("roof", "")] if "roof" in b else []
            if "fastopt" in b:
                together += [("fastopt", m) for m in config.modes]
            # torch in the same interleaved group: the vs-torch ratios, like the fraction
            # of the roof, then survive a shared machine whose speed drifts.
            if torch_ok and case.torch_class() is not None:
                together += [("torch", "")]
            groups.append((layout, case, together))
            if "numpy" in b:
                groups.append((layout, case, [("numpy", "")]))
            if gpu_ok:
                together = [("roof-cuda", ""), ("copy-cuda", "")]
                together += [("fastopt-cuda", m) for m in config.modes]
                groups.append((layout, case, together))
                if torch_cuda and case.torch_class() is not None:
                    groups.append((layout, case, [("torch-cuda", "")]))
    return [g for g in groups if g[2]]


def _target(kind: str, case: OptimizerCase, data: LayoutData, mode: str):
    if kind == "roof":
        return roof_target(case, data)
    if kind == "fastopt":
        return fastopt_target(case, data, mode)
    if kind == "numpy":
        return numpy_target(case, data)
    if kind == "torch":
        return torch_target(case, data)
    from . import gpu
    if kind == "roof-cuda":
        return roof_cuda_target(case, data)
    if kind == "copy-cuda":
        return copy_cuda_target(case, data)
    if kind == "fastopt-cuda":
        return gpu.fastopt_cuda_target(case, data, mode)
    if kind == "torch-cuda":
        return torch_target(case, data, device="cuda")
    raise ValueError(kind)


def _run_group(config, layout, case, rows, data, notes) -> list:
    """Build the group's targets, time them together, return their results."""
    t0 = time.perf_counter()
    pairs, failed = [], []
    for kind, mode in rows:
        device = "cuda" if kind.endswith("-cuda") else "cpu"
        roof = kind in ("roof", "roof-cuda", "copy-cuda")
        nbytes = (roof_bytes_per_param(case, config.dtype) if roof
                  else case.bytes_per_param(config.dtype))
        result = Result(case.name, layout, kind, mode, device, config.dtype, data.n_params,
                        data.n_tensors, nbytes)
        try:
            pairs.append((result, _target(kind, case, data, mode)))
        except Exception as exc:  # one failing row must not sink the run
            result.error = f"{type(exc).__name__}: {exc}"
            failed.append(result)
    n_build_failed = len(failed)
    live = []
    for result, target in pairs:           # a row that fails to warm up leaves the group
        try:
            warm_up(result, target, config.memory and result.device == "cpu")
            live.append((result, target))
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            failed.append(result)
    if live:
        numpy_only = all(r.backend == "numpy" for r, _ in live)
        try:
            time_together(live, config.numpy_repeats if numpy_only else config.repeats,
                          max_time_s=None if numpy_only else config.max_time_s)
        except Exception as exc:
            for result, _ in live:
                result.error = f"{type(exc).__name__}: {exc}"
                failed.append(result)
    out = [r for r, _ in pairs] + failed[:n_build_failed]
    for r in failed:
        notes.append(f"{layout} {case.name} {r.label}: {r.error}")
    wall = time.perf_counter() - t0
    for r in out:
        r.wall_s = wall
    return out


def run_bench(config: BenchConfig, progress: bool = True, log=None) -> BenchRun:
    """Run every planned row, the cold-start children and the clipping comparison.

    Args:
      config: what to run.
      progress: show a progress bar (stderr) over every stage.
      log: optional ``log(line)`` called before any timing with each note already known
        (torch or CUDA missing, optimizers without a torch counterpart), so the user
        learns of a missing backend at the start, not after the run.
    Returns:
      A :class:`BenchRun`.
    """
    from tqdm import tqdm

    from . import gpu
    from .coldstart import cold_start
    from .machine import machine_info
    t_start = time.perf_counter()
    notes: list = []
    torch_ok = _torch_status("torch" in config.backends, notes)
    gpu_ok, gpu_why = gpu.gpu_available() if "cuda" in config.backends else (False, "")
    if "cuda" in config.backends and not gpu_ok:
        notes.append(f"cuda rows skipped: {gpu_why}")
    torch_cuda = gpu_ok and torch_ok and gpu.torch_cuda_available()
    if config.threads:
        import numba
        numba.set_num_threads(config.threads)
        if torch_ok:
            import torch
            torch.set_num_threads(config.threads)
    for case in config.optimizers:
        if "torch" in config.backends and torch_ok and case.torch_class() is None:
            notes.append(f"{case.name}: torch.optim has no counterpart; no torch row")
    early_notes = len(notes)
    if log is not None:
        for note in notes:
            log(f"note: {note}")

    plan = _plan(config, torch_ok, gpu_ok, torch_cuda)
    n_rows = sum(len(rows) for _, _, rows in plan)
    n_cold = len(config.cold_start or [])
    n_clip = (len(VARIANTS) - (not torch_ok)) if config.clip_applies else 0
    bar = tqdm(total=n_rows + n_cold + n_clip, desc="fastopt bench", unit="row", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    results: list = []
    layout_info: dict = {}
    data = None
    proc = psutil.Process()
    rss_floor = 0
    try:
        for layout, case, rows in plan:
            if data is None or data.layout != layout:
                data = None
                gc.collect()
                data = LayoutData(layout, config.size, config.dtype, seed=config.seed)
                rss_floor = proc.memory_info().rss
                layout_info[layout] = dict(n_params=data.n_params, n_tensors=data.n_tensors)
            bar.set_postfix_str(f"{layout} {case.name} {' + '.join(k for k, _ in rows)}")
            results += _run_group(config, layout, case, rows, data, notes)
            # Refcounting frees a group's arrays; a full collection (0.1-0.3 s with numba
            # and torch loaded) runs only when something survived in a cycle.
            if proc.memory_info().rss > rss_floor + (64 << 20):
                gc.collect()
                rss_floor = max(rss_floor, proc.memory_info().rss)
            if any(kind.endswith("-cuda") for kind, _ in rows):
                gpu.free_memory()
            bar.update(len(rows))
        data = None
        gc.collect()
        cold = []
        if config.cold_start:
            bar.set_postfix_str("cold start (fresh processes)")
            cold = cold_start(config.cold_start, config.dtype, config.cold_start_size)
            notes += [f"cold start {c['optimizer']} ({c['cache']} cache): {c['error']}"
                      for c in cold if "error" in c]
            bar.update(n_cold)
        extra = {}
        if n_clip:
            bar.set_postfix_str("clipping + adam: fused, clip-then-step"
                                + (", torch" if torch_ok else ""))
            try:
                extra["clipping"] = run_clip_comparison(config.size, config.dtype, torch=torch_ok)
            except Exception as exc:  # like a row: reported, the run goes on
                notes.append(f"clipping comparison: {type(exc).__name__}: {exc}")
            gc.collect()
            bar.update(n_clip)
    finally:
        bar.close()
    compare(results)
    return BenchRun(config, results, cold, machine_info(import_torch=torch_ok), notes,
                    time.perf_counter() - t_start, layout_info, extra, early_notes)
