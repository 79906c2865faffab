"""fastopt's benchmarks: the cases, the timing, the roof, cold start and the reports.

``fastopt bench`` (the CLI) and the pytest-benchmark suite in ``bench/`` both draw their
cases from here: :data:`~fastopt.benchmark.cases.OPTIMIZERS` (one row per optimizer
configuration, with its bytes per parameter) and the layouts "large", "transformer" and
"small". Importing this package imports neither torch nor matplotlib nor CuPy.
"""
from __future__ import annotations

from .cases import (LAYOUT_TITLES, LAYOUTS, OPTIMIZERS, OptimizerCase, available_optimizers,
                    layout_shapes, parse_size, transformer_shapes)
from .coldstart import cold_start, warmup
from .runner import LayoutData, Result, Target, compare, measure, time_steps
from .suite import BenchConfig, BenchRun, run_bench

__all__ = [
    "OPTIMIZERS", "OptimizerCase", "available_optimizers", "LAYOUTS", "LAYOUT_TITLES",
    "layout_shapes", "parse_size", "transformer_shapes", "LayoutData", "Result", "Target",
    "measure", "time_steps", "compare", "BenchConfig", "BenchRun", "run_bench", "cold_start",
    "warmup",
]
