"""Timing: build each benchmark target, warm it up, time its steps, measure its memory.

A *target* is one row of the results: an optimizer case on a layout through one
implementation (the roof kernel, fastopt in FlatParams or list mode, the NumPy
reference, torch, or their CUDA counterparts in :mod:`.gpu`). Every target is warmed up
outside the timed region (the first call, which compiles or loads the Numba driver, is
timed on its own as ``first_call_s``), then timed as the median of ``repeats`` samples;
a sample runs enough steps to last ``min_sample_s`` so that sub-millisecond steps are
not dominated by the clock.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
import tracemalloc
from typing import Callable

import numpy as np

from .cases import OptimizerCase, layout_shapes


@dataclasses.dataclass
class Result:
    """One timed row. Derived columns (roof fraction, speed-ups) are set by :func:`compare`."""

    optimizer: str
    layout: str
    backend: str            # roof, fastopt, numpy, torch, bnb, roof-cuda, fastopt-cuda, torch-cuda, copy-cuda
    mode: str               # flat, list, fused, foreach, ref, 8-bit (bnb), "" (roof, copy)
    device: str             # cpu or cuda
    dtype: str
    n_params: int
    n_tensors: int
    bytes_per_param: float   # moved by one step (an int for float32 state)
    times_s: list = dataclasses.field(default_factory=list)
    steps_per_sample: int = 1
    first_call_s: float | None = None
    compiled: str | None = None        # fastopt cpu: "compiled", "cache" (loaded from disk) or "process"
    peak_alloc_bytes: int | None = None  # tracemalloc peak during one step (NumPy/Python heap)
    peak_rss_bytes: int | None = None    # process peak-RSS increase during one step
    roof_fraction: float | None = None
    speedup_vs_numpy: float | None = None
    speedup_vs_torch: float | None = None
    error: str | None = None
    wall_s: float | None = None          # the row's group: setup, warm-up, memory, timing
    # Ratios among roof_fraction, speedup_vs_numpy, speedup_vs_torch that are not firm
    # figures (see :func:`ratio_is_uncertain`); set by :func:`compare`.
    uncertain: list = dataclasses.field(default_factory=list)
    # The optimizer state's storage: "float32" (the params' own dtype), "bfloat16", "int8".
    state: str = "float32"
    # Resident bytes per parameter of the optimizer's state arrays, measured on the
    # object after its first step (:func:`state_nbytes`); None for the roofs.
    state_bytes_per_param: float | None = None
    # A low-bit row's time against the same backend and mode with float32 state, and an
    # int8 row's against bitsandbytes' 8-bit optimizer (their time / this time).
    speedup_vs_float32: float | None = None
    speedup_vs_bnb: float | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.mode}".strip()

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else math.nan

    @property
    def spread(self) -> float:
        """Half the interquartile range over the median (0.05 = +-5 %)."""
        if len(self.times_s) < 2:
            return 0.0
        q = np.percentile(self.times_s, [25, 75])
        return float((q[1] - q[0]) / 2 / self.median_s)

    @property
    def params_per_s(self) -> float:
        return self.n_params / self.median_s

    @property
    def gb_per_s(self) -> float:
        return self.n_params * self.bytes_per_param / self.median_s / 1e9

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.ok:
            d.update(ms_median=self.median_s * 1e3, ms_min=min(self.times_s) * 1e3,
                     ms_p25=float(np.percentile(self.times_s, 25)) * 1e3,
                     ms_p75=float(np.percentile(self.times_s, 75)) * 1e3,
                     spread=self.spread, params_per_s=self.params_per_s, gb_per_s=self.gb_per_s)
        d["repeats"] = len(self.times_s)
        return d


@dataclasses.dataclass
class Target:
    """A ready-to-time step: ``step()`` runs one step, ``sync()`` waits for the device."""

    step: Callable[[], object]
    sync: Callable[[], object] | None = None
    mode: str = ""
    keep: object = None                  # arrays/optimizers that must outlive the timing
    numba_cpu: bool = False              # runs fastopt's Numba CPU drivers: report compile/cache
    # Untimed pause after each sample: torch's OpenMP workers spin-wait for about 15 ms
    # after its ops and would take the cores from the next row timed (measured: that row
    # up to 1.6x slower, 20% spread). OMP_WAIT_POLICY=PASSIVE instead would make torch
    # itself 10x slower on many small tensors, which is not its real speed.
    settle_s: float = 0.0
    # Resident bytes of the optimizer state the step keeps (None: not an optimizer).
    state_nbytes: Callable[[], int] | None = None


class LayoutData:
    """The initial parameters and gradients of one layout, shared by every target."""

    def __init__(self, layout: str, size: int, dtype, seed: int = 0):
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.shapes = layout_shapes(layout, size)
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(self.offsets[-1])
        rng = np.random.default_rng(seed)
        self.params = rng.standard_normal(n, dtype=np.float32).astype(self.dtype, copy=False)
        self.grads = rng.standard_normal(n, dtype=np.float32).astype(self.dtype, copy=False)
        self.grads *= 1e-2

    @property
    def n_params(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    def views(self, buf) -> list:
        return [buf[lo:hi].reshape(s) for lo, hi, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def copies(self, buf) -> list:
        """Separate arrays (list mode): one allocation per tensor."""
        return [v.copy() for v in self.views(buf)]


# ------------------------------------------------------------------------ cpu targets
def fastopt_target(case: OptimizerCase, data: LayoutData, mode: str, backend="cpu",
                   state_format="float32") -> Target:
    """fastopt through a FlatParams (``mode="flat"``) or over separate arrays (``"list"``),
    its state in ``state_format``."""
    import fastopt as fo
    extra = {} if state_format == "float32" else {"state_format": state_format}
    if mode == "flat":
        flat = fo.FlatParams(data.views(data.params))
        flat.grad[...] = data.grads
        opt = case.make(flat, backend=backend, **extra)
        step, keep = opt.step, (flat, opt)
    elif mode == "list":
        params, grads = data.copies(data.params), data.copies(data.grads)
        opt = case.make(params, backend=backend, **extra)
        step, keep = (lambda: opt.step(grads)), (params, grads, opt)
    else:
        raise ValueError(f"mode must be 'flat' or 'list', got {mode!r}")
    return Target(step, mode=mode, keep=keep, numba_cpu=backend == "cpu",
                  state_nbytes=lambda: state_nbytes(case._engine(opt)))


def numpy_target(case: OptimizerCase, data: LayoutData) -> Target:
    """The independent NumPy reference (fastopt's ``"numpy"`` backend), list mode."""
    params, grads = data.copies(data.params), data.copies(data.grads)
    opt = case.make(params, backend="numpy")
    return Target(lambda: opt.step(grads), mode="ref", keep=(params, grads, opt),
                  state_nbytes=lambda: state_nbytes(case._engine(opt)))


def _torch_params(data: LayoutData, device="cpu") -> list:
    import torch
    params = []
    for p, g in zip(data.views(data.params), data.views(data.grads)):
        t = torch.nn.Parameter(torch.from_numpy(p.copy()).to(device))
        t.grad = torch.from_numpy(g.copy()).to(device)
        params.append(t)
    return params


def torch_target(case: OptimizerCase, data: LayoutData, device="cpu") -> Target | None:
    """torch.optim with ``fused=True`` where torch supports it on the device, else foreach."""
    cls = case.torch_class()
    if cls is None:
        return None
    import torch
    params = _torch_params(data, device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    errors = []
    # torch.optim: fused, else foreach; a torch-based oracle elsewhere (pytorch_optimizer,
    # schedulefree) as it comes.
    for impl in ("fused", "foreach") if cls.__module__.startswith("torch.") else ("plain",):
        try:
            opt = cls(params, **case.torch_hyperparameters, **({} if impl == "plain" else {impl: True}))
            if hasattr(opt, "train"):
                opt.train()     # schedule-free: steps only in train mode
            opt.step()      # unsupported fused paths raise here, not in the constructor
        except (TypeError, RuntimeError, ValueError) as exc:
            errors.append(f"{impl}: {exc}")
            continue
        return Target(opt.step, sync=sync, mode="oracle" if impl == "plain" else impl, keep=(params, opt),
                      settle_s=0.03 if device == "cpu" else 0.0,
                      state_nbytes=lambda o=opt: state_nbytes(o))
    raise RuntimeError("; ".join(errors))


# ----------------------------------------------------------------------- bitsandbytes
# bitsandbytes' 8-bit optimizers by bench row: blockwise codes of the same dynamic maps,
# 256 elements per block, tensors under 4096 elements in float32 (as fastopt's "int8").
BNB_CLASSES = {"adam": "Adam8bit", "adamw": "AdamW8bit"}


def import_bitsandbytes():
    """bitsandbytes, imported without picking up a top-level ``kernels`` package from
    the current folder (fastopt's source tree has one; bitsandbytes' CPU backend takes
    any ``kernels`` module for the Hugging Face kernel hub's and logs a warning when it is
    not). Raises ImportError (or whatever the import raised) when it is not importable."""
    import logging
    import os
    import sys
    import warnings
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]

    def ours(entry):
        folder = os.path.join(entry or os.getcwd(), "kernels")
        return os.path.isfile(os.path.join(folder, "roof.py")) and os.path.isfile(
            os.path.join(folder, "blockwise.py"))

    hidden = [e for e in sys.path if ours(e)]
    saved_path, stray = list(sys.path), sys.modules.get("kernels")
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    sys.path[:] = [e for e in sys.path if e not in hidden]
    if stray is not None and ours(os.path.dirname(os.path.dirname(getattr(stray, "__file__", "") or ""))):
        del sys.modules["kernels"]
    quiet.setLevel(logging.ERROR)         # the 4-bit CPU matmul's kernel-hub warning only
    try:
        with warnings.catch_warnings():   # torch.jit deprecations of its import, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            import bitsandbytes
    finally:
        sys.path[:] = saved_path
        quiet.setLevel(level)
        if stray is not None and "kernels" not in sys.modules:
            sys.modules["kernels"] = stray
    return bitsandbytes


def bnb_target(case: OptimizerCase, data: LayoutData) -> Target:
    """bitsandbytes' CPU 8-bit optimizer (:data:`BNB_CLASSES`) over torch tensors of the
    layout, with the case's hyperparameters."""
    bnb = import_bitsandbytes()
    cls = getattr(bnb.optim, BNB_CLASSES[case.name])
    params = _torch_params(data)
    opt = cls(params, **case.torch_hyperparameters)
    return Target(opt.step, mode="8-bit", keep=(params, opt), settle_s=0.03,
                  state_nbytes=lambda: state_nbytes(opt))


# ------------------------------------------------------------------- resident state
def _base(a):
    while isinstance(getattr(a, "base", None), np.ndarray):
        a = a.base
    return a


def state_nbytes(opt) -> int:
    """Resident bytes of an optimizer's state arrays, each underlying buffer counted once.

    fastopt (and the NumPy reference): every array of its per-param state (moments,
    int8 codes and absmax), by the buffer it is a view of: a FlatParams' state lives in
    one buffer per column and storage, and such a buffer counts whole, whatever part of
    it the params use. torch and bitsandbytes: every tensor in ``opt.state`` (moments,
    codes, absmax, maps, step counters), by storage. Scalars are not counted.
    """
    seen: dict = {}
    per_param = getattr(opt, "_state", None)
    if isinstance(per_param, list):
        for st in per_param:
            for a in (st or {}).values():
                if hasattr(a, "nbytes") and hasattr(a, "dtype"):
                    b = _base(a)
                    seen[id(b)] = (b, int(b.nbytes))
        return sum(n for _, n in seen.values())
    for st in getattr(opt, "state", {}).values():
        for t in st.values():
            storage = getattr(t, "untyped_storage", None)
            if storage is None:
                continue
            s = storage()
            seen[(s.data_ptr(), s.nbytes())] = (s, int(s.nbytes()))
    return sum(n for _, n in seen.values())


def _compiled_counts() -> tuple[int, int]:
    """(on-disk cache hits, compilations) summed over every fastopt CPU driver so far."""
    import sys as _sys
    registries = []
    for name, attr in (("fastopt.kernels.cpu", "_DRIVERS"), ("fastopt.kernels.per_tensor", "_COMPILED"),
                       ("fastopt.kernels.roof", "_LOWBIT")):
        module = _sys.modules.get(name)
        if module is not None:
            registries.append(getattr(module, attr, {}))
    hits = misses = 0
    for registry in registries:
        for fn in list(registry.values()):
            stats = getattr(fn, "stats", None)
            if stats is not None:
                hits += sum(stats.cache_hits.values())
                misses += sum(stats.cache_misses.values())
    return hits, misses


def _cache_probe():
    """A function saying how the calls made since this call got their drivers:
    'compiled' (something was compiled), 'cache' (loaded from Numba's on-disk cache) or
    'process' (everything was already compiled in this process)."""
    hits0, misses0 = _compiled_counts()

    def probe():
        hits, misses = _compiled_counts()
        if misses > misses0:
            return "compiled"
        return "cache" if hits > hits0 else "process"
    return probe


# --------------------------------------------------------------------------- timing
def _sample(target: Target, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        target.step()
    if target.sync is not None:
        target.sync()
    return (time.perf_counter() - t0) / k


def time_interleaved(targets, repeats: int, min_sample_s=2e-3, max_time_s=None) -> list:
    """Per-step times of ``repeats`` samples of each target, taken round-robin.

    Interleaving makes the ratios between targets (the fraction of the roof) robust to
    a machine whose speed drifts during the run. Each round starts one target later than
    the one before, so every target follows every other equally often. With a fixed
    order the row timed right after the roof (FlatParams) came out 5-10% below the list
    row at 8M parameters, though the two run equally fast when timed on their own. A
    first one-step sample sizes each target's samples (and counts when one step is long
    enough on its own). Stops early after ``max_time_s`` once every target has three
    samples. Returns ``[(times, k)]``.
    """
    start = time.perf_counter()
    first = []
    for t in targets:
        first.append(_sample(t, 1))
        if t.settle_s:
            time.sleep(t.settle_s)
    ks = [max(1, min(1000, int(min_sample_s / max(e, 1e-7)))) for e in first]
    outs = [[e] if k == 1 else [] for e, k in zip(first, ks)]
    repeats = max(1, repeats)
    rows = list(zip(targets, ks, outs))
    rotation = 0
    while any(len(o) < repeats for o in outs):
        if (max_time_s is not None and min(map(len, outs)) >= 3
                and time.perf_counter() - start > max_time_s):
            break
        rotation = (rotation + 1) % len(rows)
        for t, k, o in rows[rotation:] + rows[:rotation]:
            if len(o) < repeats:
                o.append(_sample(t, k))
                if t.settle_s:
                    time.sleep(t.settle_s)
    return list(zip(outs, ks))


def median_ms(targets: dict, repeats: int, per_sample: int = 1) -> tuple[dict, dict]:
    """Warm each named target up (two untimed calls: compiling, state, first touches),
    time them interleaved (:func:`time_interleaved`) and return ``({name: median ms per
    step}, {name: every sample's ms per step})``; a call of a target runs ``per_sample``
    steps. Targets that are None are left out."""
    named = [(n, t) for n, t in targets.items() if t is not None]
    for _, t in named:
        t.step()
        t.step()
    timed = time_interleaved([t for _, t in named], repeats)
    every = {n: [x * 1e3 / per_sample for x in times] for (n, _), (times, _) in zip(named, timed)}
    return {n: statistics.median(v) for n, v in every.items()}, every


class thread_count:
    """Within it, Numba and torch (when importable) run ``threads`` threads (None: Numba's
    count, torch set to match); both counts are restored after."""

    def __init__(self, threads=None):
        self.threads = threads

    def __enter__(self):
        import numba
        try:
            import torch
        except ImportError:
            torch = None
        self._saved = (numba.get_num_threads(), torch and torch.get_num_threads(), torch)
        if self.threads is not None:
            numba.set_num_threads(int(self.threads))
        if torch is not None:
            torch.set_num_threads(numba.get_num_threads())
        return numba.get_num_threads()

    def __exit__(self, *exc):
        import numba
        numba.set_num_threads(self._saved[0])
        if self._saved[2] is not None:
            self._saved[2].set_num_threads(self._saved[1])
        return False


def time_steps(step, repeats: int, sync=None, min_sample_s=2e-3, max_time_s=None):
    """Per-step times of ``repeats`` samples of ``step`` (seconds), and steps per sample."""
    return time_interleaved([Target(step, sync)], repeats, min_sample_s, max_time_s)[0]


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def step_memory(step, sync=None) -> tuple[int, int | None]:
    """(tracemalloc peak, peak-RSS increase) in bytes over one call of ``step``.

    tracemalloc sees NumPy's data allocations and Python objects; the RSS figure catches
    everything else (torch's allocator, native code). Without Linux's peak-RSS reset it
    falls back to the RSS difference after the step (psutil).
    """
    import psutil
    proc = psutil.Process()
    tracemalloc.start()
    try:
        rss0 = proc.memory_info().rss
        resettable = _peak_rss_reset()
        tracemalloc.reset_peak()
        step()
        if sync is not None:
            sync()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    hwm = _status_kib("VmHWM") if resettable else None
    after = hwm * 1024 if hwm is not None else proc.memory_info().rss
    return int(peak), max(0, int(after - rss0))


def warm_up(result: Result, target: Target, memory=True) -> None:
    """The first call (timed alone: compile or cache load, state allocation) and a
    second one (caches, pages; its memory is measured)."""
    probe = _cache_probe() if target.numba_cpu else None
    t0 = time.perf_counter()
    target.step()
    if target.sync is not None:
        target.sync()
    result.first_call_s = time.perf_counter() - t0
    if probe is not None:
        result.compiled = probe()
    if target.state_nbytes is not None and result.n_params:
        result.state_bytes_per_param = target.state_nbytes() / result.n_params
    if memory:
        result.peak_alloc_bytes, result.peak_rss_bytes = step_memory(target.step, target.sync)
    else:
        target.step()
        if target.sync is not None:
            target.sync()


def time_together(pairs, repeats: int, *, min_sample_s=2e-3, max_time_s=None) -> None:
    """Time warmed-up (result, target) pairs interleaved and fill the results' times.

    ``max_time_s`` is per target (the group may sample for ``len(pairs)`` times as long).
    """
    budget = None if max_time_s is None else max_time_s * len(pairs)
    timings = time_interleaved([t for _, t in pairs], repeats, min_sample_s, budget)
    for (result, target), (times, k) in zip(pairs, timings):
        result.times_s, result.steps_per_sample = times, k
        result.mode = target.mode or result.mode


def measure_together(pairs, repeats: int, *, memory=True, min_sample_s=2e-3, max_time_s=None):
    """Warm up every (result, target) pair, then time them interleaved; fills the results."""
    for result, target in pairs:
        warm_up(result, target, memory)
    time_together(pairs, repeats, min_sample_s=min_sample_s, max_time_s=max_time_s)
    return [r for r, _ in pairs]


def measure(result: Result, target: Target, repeats: int, *, memory=True,
            min_sample_s=2e-3, max_time_s=None) -> Result:
    """Warm ``target`` up, time it and fill ``result`` in."""
    return measure_together([(result, target)], repeats, memory=memory,
                            min_sample_s=min_sample_s, max_time_s=max_time_s)[0]


# ------------------------------------------------------------------------ comparison
_ROOF_OF = {"cpu": ("roof",), "cuda": ("roof-cuda", "copy-cuda")}

# A ratio of two rows' medians is printed as a firm figure only when the two rows' combined
# spread is at most this (half the interquartile range over the median, added in
# quadrature): on a loaded machine a row at +-43% once printed "vs torch 4143x".
NOISY_SPREAD = 0.15


def ratio_is_uncertain(ratio: float, spread_a: float, spread_b: float,
                       limit: float = NOISY_SPREAD) -> bool:
    """Whether the ratio of two medians, each with its relative spread, is not a firm
    figure: their combined spread ``sqrt(a² + b²)`` exceeds ``limit``, or the ratio lies
    within that spread of 1 (no measurable difference: a "1.05x speed-up" at +-8%)."""
    combined = math.hypot(spread_a, spread_b)
    if combined > limit:
        return True
    return ratio > 0 and abs(math.log(ratio)) < math.log1p(combined)


_RATIOS = ("roof_fraction", "speedup_vs_numpy", "speedup_vs_torch", "speedup_vs_float32",
           "speedup_vs_bnb")


def compare(results: list[Result]) -> list[Result]:
    """Set each row's fraction of the roof and its speed-ups over NumPy, torch, the same
    row with float32 state and bitsandbytes.

    The fraction of the roof compares bandwidths (achieved GB/s over the roof's GB/s);
    the roof moves the row's own bytes (multi-pass steps too), so it is the time ratio. Rows are compared within (optimizer,
    layout, dtype): the roof of the row's device and state format
    (the roof kernel; on CUDA the device-to-device copy where the CUDA roof is missing),
    the NumPy reference and torch on the same device (with the row's state format, or
    else their float32 rows: neither has low-bit state), the row of the same backend and
    mode with float32 state (low-bit rows) and bitsandbytes' 8-bit row (int8 rows). A
    ratio whose two rows are too noisy to quote (:func:`ratio_is_uncertain`) is named in
    the row's ``uncertain`` list; a row's ratio to itself (the roof's 1.00) never is.
    """
    groups: dict = {}
    for r in results:
        if r.ok:
            groups.setdefault((r.optimizer, r.layout, r.dtype), []).append(r)
    for rows in groups.values():
        by = {(r.backend, r.device, r.state): r for r in rows}
        modes = {(r.backend, r.device, r.state, r.mode): r for r in rows}

        def find(backend, device, state, fallback=True):
            return by.get((backend, device, state)) or (
                by.get((backend, device, "float32")) if fallback else None)

        for r in rows:
            roof = next((by[(b, r.device, r.state)] for b in _ROOF_OF[r.device]
                         if (b, r.device, r.state) in by), None)
            others = {
                "roof_fraction": None if r.backend == "copy-cuda" else roof,
                "speedup_vs_numpy": find("numpy", r.device, r.state),
                "speedup_vs_torch": find("torch-cuda" if r.device == "cuda" else "torch",
                                         r.device, r.state),
                "speedup_vs_float32": (modes.get((r.backend, r.device, "float32", r.mode))
                                       if r.state != "float32" else None),
                "speedup_vs_bnb": by.get(("bnb", "cpu", r.state)) if r.state == "int8" else None,
            }
            r.uncertain = []
            for name in _RATIOS:
                other = others[name]
                if other is None:
                    continue
                ratio = (r.gb_per_s / other.gb_per_s if name == "roof_fraction"
                         else other.median_s / r.median_s)
                setattr(r, name, ratio)
                if other is not r and ratio_is_uncertain(ratio, r.spread, other.spread):
                    r.uncertain.append(name)
    return results
