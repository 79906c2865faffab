"""Memory: a step allocates nothing proportional to the parameter count, and nothing grows.

- tracemalloc peak of one step over a 20M-parameter FlatParams (and a 20M-element
  array in list mode), with fused clipping and gradient scaling: a few hundred KB at
  most, i.e. nothing of the order of the 80 MB a temporary copy of one buffer would
  take. (``FASTOPT_SLOW=1`` adds the issue's 100M-parameter run, marked slow.)
- RSS after many steps of that optimizer: no growth.
- 10,000 steps of small optimizers (fresh gradient arrays each step, an lr changed
  every step, gradient scaling, clipping): no growth of the memory blocks in use, of
  RSS, or of the number of compiled drivers and their specialisations.
"""
from __future__ import annotations

import gc
import os
import sys
import tracemalloc
import weakref

import numpy as np
import psutil
import pytest

import fastopt as fo
from fastopt.kernels import cpu

from reliability_cases import STATS

PEAK_LIMIT = 256 << 10          # bytes: "a few hundred KB"
slow = pytest.mark.skipif(os.environ.get("FASTOPT_SLOW") != "1",
                          reason="100M parameters: set FASTOPT_SLOW=1")


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_of(fn) -> int:
    """Peak bytes traced while ``fn`` runs (allocations alive before it are not counted)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _flat_run(n, cls=fo.Adam, **options):
    sizes = [n - 1000 - 7, 1000, 7]
    flat = fo.FlatParams([np.zeros(s, np.float32) for s in sizes])
    flat.grad[...] = 1e-3
    opt = cls(flat, **options)
    for _ in range(2):                       # state created, tables cached
        assert opt.step(**({"grad_scale": 0.5} if "max_grad_norm" in options else {}))
    return flat, opt


def _assert_small_step_peak(n):
    for cls, options, kw in ((fo.Adam, {}, {}),
                             (fo.AdamW, {"max_grad_norm": 1.0}, {"grad_scale": 0.5}),
                             (fo.LAMB, {}, {})):
        flat, opt = _flat_run(n, cls, **options)
        peaks = [peak_of(lambda: opt.step(**kw)) for _ in range(3)]
        STATS["memory_steps_traced"] += len(peaks)
        assert max(peaks) < PEAK_LIMIT, f"{cls.__name__} {options}: step peak {peaks} bytes"
        # and the buffers really were stepped
        assert flat.data[0] != 0
        flat = opt = None            # release the 320 MB before the next optimizer
        gc.collect()


def test_step_peak_is_small_on_20m_flat_params():
    _assert_small_step_peak(20_000_000)


@slow
@pytest.mark.slow
def test_step_peak_is_small_on_100m_flat_params():
    _assert_small_step_peak(100_000_000)


def test_step_peak_is_small_on_a_20m_array_in_list_mode():
    n = 20_000_000
    params = [np.zeros(n, np.float32), np.zeros(3, np.float32)]
    grads = [np.full(n, 1e-3, np.float32), np.ones(3, np.float32)]
    opt = fo.Adam(params, amsgrad=True)
    opt.step(grads)
    opt.step(grads)
    peaks = [peak_of(lambda: opt.step(grads)) for _ in range(3)]
    assert max(peaks) < PEAK_LIMIT, peaks


def test_rss_does_not_grow_over_many_steps():
    flat, opt = _flat_run(20_000_000, fo.Adam, max_grad_norm=1.0)
    for _ in range(3):
        opt.step(grad_scale=0.5)
    gc.collect()
    before = rss()
    for _ in range(40):
        opt.step(grad_scale=0.5)
    gc.collect()
    growth = rss() - before
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 40 steps of 20M params"


def _driver_specialisations():
    return len(cpu._DRIVERS), sum(len(getattr(d, "signatures", ())) for d in cpu._DRIVERS.values())


SMALL = [
    ("adam", lambda p: fo.Adam(p, lr=1e-3, amsgrad=True)),
    ("sgd", lambda p: fo.SGD(p, lr=1e-3, momentum=0.9, nesterov=True)),
    ("nadam", lambda p: fo.NAdam(p, lr=1e-3, max_grad_norm=1.0)),
    ("lamb", lambda p: fo.LAMB(p, lr=1e-3)),
]


def _small_run(build):
    """A small optimizer and a step function: new grad arrays every step (copies), an
    lr with a new value every step (as a schedule gives), a gradient scale on every
    other step."""
    rng = np.random.default_rng(0)
    shapes = [(17, 5), (64,), (), (3, 2, 2)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = build(params)
    grad_pool = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(8)]

    def step(t):
        g = [a.copy() for a in grad_pool[t % 8]]
        opt.param_groups[0]["lr"] = 1e-3 * (1 + t * 1e-6)
        if t % 2:
            return opt.step(g, grad_scale=1.0 + (t % 3))
        return opt.step(g)
    return params, step


@pytest.mark.parametrize("name,build", SMALL, ids=[n for n, _ in SMALL])
def test_ten_thousand_steps_grow_nothing(name, build):
    """Python objects (pymalloc blocks: every leaked array, list or float is one), RSS,
    and compiled drivers and specialisations are the same after 10,000 more steps.

    (Not tracemalloc's current size: CPython's float and tuple free lists keep objects
    that tracemalloc still counts, tens of KB that move with the last few thousand
    steps; the block count of a real leak grows by 10,000.)"""
    params, step = _small_run(build)
    for t in range(1000):                       # warm: every path compiled and cached
        assert step(t)
    gc.collect()
    drivers_before = _driver_specialisations()
    blocks_before, rss_before = sys.getallocatedblocks(), rss()
    for t in range(1000, 11_000):
        step(t)
    gc.collect()
    blocks = sys.getallocatedblocks() - blocks_before
    rss_growth = rss() - rss_before
    assert _driver_specialisations() == drivers_before, "new compiled specialisations appeared"
    assert blocks < 500, f"{name}: {blocks} more memory blocks in use after 10,000 steps"
    assert rss_growth < 8 << 20, f"{name}: RSS grew by {rss_growth / 2**20:.1f} MiB"
    assert np.all(np.isfinite(params[0]))
    STATS["memory_small_steps"] += 10_000


def _release_check(max_grad_norm):
    p = [np.zeros(1000, np.float32)]
    opt = fo.Adam(p, max_grad_norm=max_grad_norm)
    refs = []
    for _ in range(8):
        g = [np.ones(1000, np.float32)]
        refs.append(weakref.ref(g[0]))
        opt.step(g)
        del g
    gc.collect()
    return [r() is not None for r in refs]


def test_old_gradient_arrays_are_released():
    """The optimizer keeps at most the last gradient list (its cached plan)."""
    alive = _release_check(None)
    assert not any(alive[:-1]), alive


def test_old_gradient_arrays_are_released_with_clipping():
    alive = _release_check(1.0)
    assert not any(alive[:-1]), alive
