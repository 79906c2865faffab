"""Cold start and ahead-of-time compilation.

:func:`cold_start` times the first step in a fresh Python process, once with an empty
Numba cache (the driver is compiled) and once with the cache that run filled (the driver
is loaded from disk): what a user waits for before the first step of a training run.
:func:`warmup` compiles every optimizer's drivers ahead of time into Numba's on-disk
cache (``fastopt warmup``), so later processes only load them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .cases import OPTIMIZERS, OptimizerCase, available_optimizers

# Runs in the fresh process: import, build, first step, second step; prints JSON.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastopt as fo
from fastopt.benchmark.cases import available_optimizers
t1 = time.perf_counter()
case = available_optimizers(sys.argv[1])[0]
flat = fo.FlatParams([np.ones(int(sys.argv[3]), dtype=sys.argv[2])])
flat.grad[...] = 1e-3
opt = case.make(flat, backend="cpu")
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
opt.step()
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, setup_s=t2 - t1, first_step_s=t3 - t2,
                      second_step_s=t4 - t3)))
"""


def _child(case: OptimizerCase, dtype: str, n: int, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, case.name, dtype, str(n)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child for {case.name} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def cold_start(cases, dtype="float32", n=1 << 20, timeout=300.0) -> list[dict]:
    """First-step times in fresh processes, with an empty and then a warm Numba cache.

    Returns one dict per (case, cache) with ``optimizer``, ``cache`` ("empty" or "warm"),
    ``import_s`` (import numpy + fastopt), ``first_step_s`` (the first ``step()``:
    compile or cache load, threading-layer start, state allocation), ``second_step_s``
    and ``process_s`` (the whole child process, interpreter start included).
    """
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="fastopt-numba-cache-") as cache_dir:
            for cache in ("empty", "warm"):
                row = dict(optimizer=case.name, cache=cache, dtype=str(np.dtype(dtype)), n_params=n)
                try:
                    row.update(_child(case, str(np.dtype(dtype)), n, cache_dir, timeout))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                    row["error"] = str(exc)
                rows.append(row)
    return rows


def warmup_cases(names=None) -> list[tuple[OptimizerCase, dict]]:
    """(case, hyperparameter overrides) pairs covering the drivers of every row and variant.

    Drivers are compiled per element, slot mask and flag setting (weight decay on or
    off, maximize, nesterov, ...): each distinct class and set of hyperparameters is
    stepped once. Other settings compile on first use, then load from the disk cache.
    """
    cases = available_optimizers(names) if names else available_optimizers("all")
    out, seen = [], set()
    for case in cases:
        for overrides in ({}, *case.variants):
            key = (case.fastopt, tuple(sorted({**case.kwargs, **overrides}.items())))
            if key not in seen:
                seen.add(key)
                out.append((case, dict(overrides)))
    return out


def warmup_plan(names=None, dtypes=("float32", "float64"), roof=True) -> list[tuple]:
    """The drivers :func:`warmup` compiles, in order: ``(case, overrides, dtype)`` for an
    optimizer setting, ``(None, mask, dtype)`` for the roof kernel of a slot mask."""
    plan, done_roofs = [], set()
    for case, overrides in warmup_cases(names):
        mask = tuple(s is not None for s in case.active_slots(**overrides))
        for dtype in dtypes:
            plan.append((case, overrides, dtype))
            if roof and (mask, dtype) not in done_roofs:
                done_roofs.add((mask, dtype))
                plan.append((None, mask, dtype))
    return plan


def warmup(names=None, dtypes=("float32", "float64"), roof=True, progress=None, plan=None) -> list[dict]:
    """Compile (or load) every optimizer's CPU drivers into Numba's on-disk cache.

    Args:
      names: optimizer CLI names (default: every available row of the table).
      dtypes: storage dtypes to compile for.
      roof: also compile the roof kernels the benchmark uses.
      progress: optional callable ``progress(description)`` called before each driver.
      plan: the drivers, as :func:`warmup_plan` returns them (default: its plan for
        ``names``, ``dtypes`` and ``roof``).
    Returns:
      One dict per driver: ``optimizer`` ("roof" for a roof kernel), ``overrides``,
      ``dtype``, ``slots``, ``seconds``, ``how`` ("compiled", "cache" or "process").
    """
    from fastopt.kernels import cpu
    from fastopt.kernels import roof as roof_kernels

    from .runner import _cache_probe
    rows = []
    for case, what, dtype in (warmup_plan(names, dtypes, roof) if plan is None else plan):
        probe = _cache_probe()
        if case is None:                  # the roof kernel of slot mask `what`
            if progress is not None:
                progress(f"roof {'+'.join(f's{k}' for k, m in enumerate(what) if m) or 'p, g'} {dtype}")
            slots = tuple([np.zeros(8, dtype)] if m else None for m in what)
            table = cpu.ChunkTable([np.ones(8, dtype)], [np.ones(8, dtype)], slots)
            t0 = time.perf_counter()
            cpu.run(roof_kernels.roof_element, table, roof_kernels.roof_scalars(np.dtype(dtype).type))
            rows.append(dict(optimizer="roof", overrides={}, dtype=dtype,
                             slots=[f"s{k}" for k, live in enumerate(what) if live],
                             seconds=time.perf_counter() - t0, how=probe()))
            continue
        if progress is not None:
            progress(f"{case.name} {what or ''} {dtype}".replace("  ", " "))
        a = np.ones(8, dtype=dtype)
        t0 = time.perf_counter()
        case.make([a], backend="cpu", **what).step([np.full(8, 1e-3, dtype=dtype)])
        rows.append(dict(optimizer=case.name, overrides=what, dtype=dtype,
                         slots=[s for s in case.active_slots(**what) if s],
                         seconds=time.perf_counter() - t0, how=probe()))
    return rows


__all__ = ["cold_start", "warmup", "warmup_cases", "warmup_plan", "OPTIMIZERS"]
