"""Per-call overhead of a tiny step: the optimizer's lock, measured where timing belongs.

The step lock (``Optimizer.step`` holds it so that threads sharing an optimizer step one
after another) should cost next to nothing uncontended: compare the two rows of the
group ``step lock`` (a lock round trip is ~0.1 us; a 16-element step is tens of us).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo


@pytest.mark.parametrize("locked", [True, False], ids=["step (locked)", "step unlocked"])
def test_step_lock_overhead(benchmark, locked):
    params, grads = [np.zeros(16, np.float32)], [np.ones(16, np.float32)]
    opt = fo.Adam(params)
    opt.step(grads)                       # compile or load outside the timing
    benchmark.group = "step lock: Adam, one 16-element tensor"
    fn = (lambda: opt.step(grads)) if locked else (lambda: opt._step_unlocked(grads, None))
    benchmark(fn)
