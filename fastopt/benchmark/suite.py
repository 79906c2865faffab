"""The benchmark run behind ``fastopt bench``: plan the rows, time them, compare them.

For each layout, for each optimizer, in one process: the roof kernel, fastopt in
FlatParams and list mode and torch (fused where it supports it, else foreach) are built
side by side and timed interleaved (sample by sample, so the fraction of the roof and the
ratio to torch survive a machine whose speed drifts); then the NumPy reference alone
(fewer repeats: it is slow); then the CUDA rows when a GPU is present. Then, per low-bit
state format of that optimizer (``state_formats``: by default bfloat16 and int8 for
adam), the format's roof and fastopt's two modes, interleaved, and for int8
bitsandbytes' CPU 8-bit optimizer alone (as slow as the NumPy reference: as few
repeats). Low-bit rows run on the CPU; a format an optimizer does not support, or int8
on a layout whose tensors are all under 4096 elements (their state stays float32, so the
rows would repeat the float32 ones), is skipped with a note before anything is timed. Each group builds
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

from .cases import (FLOAT32, INT8, LAYOUTS, LOWBIT_DEFAULT, STATE_FORMATS, OptimizerCase,
                    available_optimizers, layout_shapes, lowbit_sizes, parse_layouts, parse_size,
                    parse_state_formats)
from .clipping import VARIANTS, run_clip_comparison
from .roof import copy_cuda_target, roof_bytes_per_param, roof_cuda_target, roof_target
from .runner import (BNB_CLASSES, LayoutData, Result, bnb_target, compare, fastopt_target,
                     import_bitsandbytes, numpy_target, time_together, torch_target, warm_up)

BACKENDS = ("roof", "fastopt", "numpy", "torch", "cuda", "bnb")
SLOW_BACKENDS = ("numpy", "bnb")     # timed alone, with numpy_repeats samples
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
    # Optimizer state formats to run (STATE_FORMATS), for every optimizer; None: float32
    # for every optimizer, and bfloat16 and int8 too for LOWBIT_DEFAULT (float32 runs).
    state_formats: list = None

    def __post_init__(self):
        if self.optimizers is None:
            self.optimizers = available_optimizers()
        if self.state_formats is not None:
            self.state_formats = parse_state_formats(self.state_formats)
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
        low = [f for f in self.state_formats or () if f != FLOAT32]
        if low and self.dtype != "float32":
            raise ValueError(f"state formats {', '.join(low)} need float32 params (--dtype "
                             f"float32): {self.dtype} params keep {self.dtype} state")

    def formats_for(self, case: OptimizerCase) -> list:
        """The state formats requested for ``case`` (before checking it supports them)."""
        if self.state_formats is not None:
            return list(self.state_formats)
        if self.dtype == "float32" and case.name in LOWBIT_DEFAULT:
            return list(STATE_FORMATS)
        return [FLOAT32]

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


def _bnb_status(config: BenchConfig, formats: dict, notes: list) -> bool:
    """Whether bitsandbytes' rows run: wanted, an int8 row of an optimizer it has, and
    importable; otherwise a note says why not (when it was wanted)."""
    wanted = [c.name for c in config.optimizers
              if INT8 in formats.get(c.name, ()) and c.name in BNB_CLASSES]
    if "bnb" not in config.backends or not wanted:
        return False
    why = None
    try:
        import_bitsandbytes()         # imports torch (the torch rows need not be wanted)
    except Exception as exc:
        why = (f"bitsandbytes is not importable ({type(exc).__name__}: {exc}); "
               "pip install bitsandbytes")
    if why:
        notes.append(f"bnb 8-bit rows ({', '.join(wanted)} int8) skipped: {why}")
        return False
    return True


def state_plan(config: BenchConfig, notes: list) -> tuple[dict, dict]:
    """The state formats each optimizer runs with (``{name: [formats]}``) and the layouts
    each low-bit format skips (``{format: [layouts]}``), with a note for each format an
    optimizer does not support and each skipped layout."""
    formats = {}
    for case in config.optimizers:
        keep = []
        for fmt in config.formats_for(case):
            why = case.state_support(fmt, config.dtype)
            if why is None:
                keep.append(fmt)
            elif config.state_formats is not None or why != "it has no state":
                notes.append(f"{case.name} {fmt}: no rows: {why}")
        formats[case.name] = keep
    skipped = {}
    if any(INT8 in f for f in formats.values()):
        for layout in config.layouts:
            if lowbit_sizes(INT8, layout_shapes(layout, config.size))[0] == 0:
                skipped.setdefault(INT8, []).append(layout)
                notes.append(f"{layout} int8: no rows: every tensor is under 4096 elements, "
                             "and those keep float32 state (as in bitsandbytes), so the rows "
                             "would repeat the float32 ones")
    return formats, skipped


def _plan(config: BenchConfig, torch_ok: bool, gpu_ok: bool, torch_cuda: bool,
          formats: dict | None = None, skipped: dict | None = None, bnb_ok: bool = False) -> list:
    """Groups of rows ``(layout, case, state, [(kind, mode), ...])``; a group's rows are
    timed together, interleaved (the roof beside fastopt), the others alone."""
    groups = []
    b = set(config.backends)
    skipped = skipped or {}
    for layout in config.layouts:
        for case in config.optimizers:
            fmts = [FLOAT32] if formats is None else formats.get(case.name, [FLOAT32])
            if FLOAT32 in fmts:
                together = [("roof", "")] if "roof" in b else []
                if "fastopt" in b:
                    together += [("fastopt", m) for m in config.modes]
                # torch in the same interleaved group: the vs-torch ratios, like the
                # fraction of the roof, then survive a shared machine whose speed drifts.
                if torch_ok and case.torch_class() is not None:
                    together += [("torch", "")]
                groups.append((layout, case, FLOAT32, together))
                if "numpy" in b:
                    groups.append((layout, case, FLOAT32, [("numpy", "")]))
                if gpu_ok:
                    together = [("roof-cuda", ""), ("copy-cuda", "")]
                    together += [("fastopt-cuda", m) for m in config.modes]
                    groups.append((layout, case, FLOAT32, together))
                    if torch_cuda and case.torch_class() is not None:
                        groups.append((layout, case, FLOAT32, [("torch-cuda", "")]))
            for fmt in fmts:
                if fmt == FLOAT32 or layout in skipped.get(fmt, ()):
                    continue
                together = [("roof", "")] if "roof" in b else []
                if "fastopt" in b:
                    together += [("fastopt", m) for m in config.modes]
                groups.append((layout, case, fmt, together))
                if fmt == INT8 and bnb_ok and case.name in BNB_CLASSES:
                    groups.append((layout, case, fmt, [("bnb", "")]))
    return [g for g in groups if g[3]]


def _target(kind: str, case: OptimizerCase, data: LayoutData, mode: str, state: str = FLOAT32):
    if kind == "roof":
        return roof_target(case, data) if state == FLOAT32 else roof_target(case, data, state)
    if kind == "fastopt":
        return (fastopt_target(case, data, mode) if state == FLOAT32
                else fastopt_target(case, data, mode, state_format=state))
    if kind == "numpy":
        return numpy_target(case, data)
    if kind == "torch":
        return torch_target(case, data)
    if kind == "bnb":
        return bnb_target(case, data)
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


def _run_group(config, layout, case, rows, data, notes, state=FLOAT32) -> list:
    """Build the group's targets, time them together, return their results."""
    t0 = time.perf_counter()
    pairs, failed = [], []
    for kind, mode in rows:
        device = "cuda" if kind.endswith("-cuda") else "cpu"
        roof = kind in ("roof", "roof-cuda", "copy-cuda")
        if state == FLOAT32:
            nbytes = (roof_bytes_per_param(case, config.dtype) if roof
                      else case.bytes_per_param(config.dtype))
        else:
            nbytes = (roof_bytes_per_param(case, config.dtype, state, data.shapes) if roof
                      else case.bytes_per_param(config.dtype, state, data.shapes))
        result = Result(case.name, layout, kind, mode, device, config.dtype, data.n_params,
                        data.n_tensors, nbytes, state=state)
        try:
            pairs.append((result, _target(kind, case, data, mode, state)))
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
        slow = all(r.backend in SLOW_BACKENDS for r, _ in live)
        try:
            time_together(live, config.numpy_repeats if slow else config.repeats,
                          max_time_s=None if slow else config.max_time_s)
        except Exception as exc:
            for result, _ in live:
                result.error = f"{type(exc).__name__}: {exc}"
                failed.append(result)
    out = [r for r, _ in pairs] + failed[:n_build_failed]
    for r in failed:
        fmt = "" if state == FLOAT32 else f" {state}"
        notes.append(f"{layout} {case.name}{fmt} {r.label}: {r.error}")
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
        if "torch" in config.backends and torch_ok and case.torch and ":" in case.torch \
                and case.torch_class() is not None:
            notes.append(f"{case.name}: the 'torch oracle' row is {case.torch.replace(':', '.')} "
                         "(torch-based; torch.optim has no counterpart)")
        if "torch" in config.backends and torch_ok and case.torch_class() is None:
            notes.append(f"{case.name}: torch.optim has no counterpart; no torch row")
    formats, skipped = state_plan(config, notes)
    if gpu_ok and any(f != FLOAT32 for fmts in formats.values() for f in fmts):
        notes.append("cuda: bfloat16 and int8 state rows run on the CPU only")
    bnb_ok = _bnb_status(config, formats, notes)
    if bnb_ok and config.threads:
        import torch
        torch.set_num_threads(config.threads)
    early_notes = len(notes)
    if log is not None:
        for note in notes:
            log(f"note: {note}")

    plan = _plan(config, torch_ok, gpu_ok, torch_cuda, formats, skipped, bnb_ok)
    n_rows = sum(len(rows) for *_, rows in plan)
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
        for layout, case, state, rows in plan:
            if data is None or data.layout != layout:
                data = None
                gc.collect()
                data = LayoutData(layout, config.size, config.dtype, seed=config.seed)
                rss_floor = proc.memory_info().rss
                layout_info[layout] = dict(n_params=data.n_params, n_tensors=data.n_tensors)
            fmt = "" if state == FLOAT32 else f" {state}"
            bar.set_postfix_str(f"{layout} {case.name}{fmt} {' + '.join(k for k, _ in rows)}")
            results += _run_group(config, layout, case, rows, data, notes, state=state)
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
        extra = {"state_formats": formats}
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
    summary = lowbit_summary(results, config)
    if summary:
        extra["lowbit_summary"] = summary
    return BenchRun(config, results, cold, machine_info(import_torch=torch_ok), notes,
                    time.perf_counter() - t_start, layout_info, extra, early_notes)


def lowbit_summary(results: list, config: BenchConfig) -> list[dict]:
    """Per layout and optimizer with low-bit rows: each format's speed-up over float32
    (fastopt, in FlatParams mode when it ran, else list mode), int8's over bitsandbytes,
    and the resident state bytes per parameter of each format (and of bitsandbytes)."""
    out = []
    mode = "flat" if "flat" in config.modes else (config.modes[0] if config.modes else "")
    for layout in config.layouts:
        for case in config.optimizers:
            rows = [r for r in results if r.ok and r.layout == layout and r.optimizer == case.name
                    and r.device == "cpu"]
            fast = {r.state: r for r in rows if r.backend == "fastopt" and r.mode == mode}
            if not any(s != FLOAT32 for s in fast):
                continue
            bnb = next((r for r in rows if r.backend == "bnb"), None)
            entry = dict(layout=layout, optimizer=case.name, mode=mode,
                         speedup_vs_float32={s: r.speedup_vs_float32 for s, r in fast.items()
                                             if s != FLOAT32},
                         speedup_vs_bnb=fast[INT8].speedup_vs_bnb if INT8 in fast else None,
                         state_bytes_per_param={s: r.state_bytes_per_param for s, r in fast.items()},
                         uncertain={s: [u for u in r.uncertain if u in ("speedup_vs_float32",
                                                                       "speedup_vs_bnb")]
                                    for s, r in fast.items() if s != FLOAT32},
                         bnb=None if bnb is None else dict(
                             ms=bnb.median_s * 1e3, state_bytes_per_param=bnb.state_bytes_per_param,
                             optimizer=BNB_CLASSES.get(case.name)))
            out.append(entry)
    return out
