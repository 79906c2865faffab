"""pytest-benchmark suite over fastopt.benchmark's cases (not part of ``python -m pytest``).

Run:  python -m pytest bench/ --benchmark-only
      python -m pytest bench/ --benchmark-only --benchmark-json=out.json
      python -m pytest bench/ --benchmark-only --benchmark-autosave   # then --benchmark-compare

Environment (sizes stay modest by default so the suite runs in a few minutes):
  FASTOPT_BENCH_SIZE        parameters of the large and transformer layouts (default 1M; 64M
                            for the issue's targets)
  FASTOPT_BENCH_OPTIMIZERS  comma-separated names or "all" (default: the default rows)
  FASTOPT_BENCH_LAYOUTS     comma-separated: large, transformer, small (default: all)
  FASTOPT_BENCH_DTYPE       float32 (default) or float64
"""
from __future__ import annotations

import os

import pytest

from fastopt.benchmark.cases import (LAYOUTS, available_optimizers, format_count,
                                     parse_layouts, parse_size)
from fastopt.benchmark.runner import LayoutData

SIZE = parse_size(os.environ.get("FASTOPT_BENCH_SIZE", "1M"))
DTYPE = os.environ.get("FASTOPT_BENCH_DTYPE", "float32")
OPTIMIZERS = available_optimizers(os.environ.get("FASTOPT_BENCH_OPTIMIZERS") or None)
LAYOUT_NAMES = parse_layouts(os.environ.get("FASTOPT_BENCH_LAYOUTS") or ",".join(LAYOUTS))

_DATA: dict = {}


def layout_data(layout: str) -> LayoutData:
    """The layout's initial params and grads, built once per session (one layout kept)."""
    data = _DATA.get(layout)
    if data is None:
        _DATA.clear()
        data = _DATA[layout] = LayoutData(layout, SIZE, DTYPE)
    return data


def group_name(layout: str) -> str:
    data = layout_data(layout)
    plural = "" if data.n_tensors == 1 else "s"
    return f"{layout}: {format_count(data.n_params)} params in {data.n_tensors} tensor{plural}, {DTYPE}"


def run_benchmark(benchmark, target, case, layout, impl, *, slow=False, bytes_per_param=None):
    """Warm ``target`` up outside the timing, then time its step (with device sync)."""
    data = layout_data(layout)
    benchmark.group = group_name(layout)
    benchmark.name = f"{case.name} {impl}"
    target.step()                       # compile (or load from the cache) and allocate state
    target.step()
    if target.sync is not None:
        target.sync()

    def step():
        target.step()
        if target.sync is not None:
            target.sync()

    if slow:
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(step)
    if bytes_per_param is None:
        bytes_per_param = case.bytes_per_param(DTYPE)
    nbytes = bytes_per_param * data.n_params
    benchmark.extra_info.update(optimizer=case.name, layout=layout, impl=impl, mode=target.mode,
                                n_params=data.n_params, n_tensors=data.n_tensors,
                                bytes_per_param=bytes_per_param, dtype=DTYPE)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9


def pytest_collection_modifyitems(config, items):
    # Keep each layout's rows together so its arrays are built once.
    order = {name: i for i, name in enumerate(LAYOUT_NAMES)}
    items.sort(key=lambda it: order.get(getattr(it, "callspec", None) and it.callspec.params.get("layout"), 99))


@pytest.fixture(autouse=True)
def _free_between_tests():
    yield
    import gc
    gc.collect()
