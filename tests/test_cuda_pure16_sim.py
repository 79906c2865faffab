"""16-bit params without master weights on the CUDA driver, under the CUDA simulator.

``kahan_sum=True`` (float16 or bfloat16 params with a 16-bit Kahan compensation) and
``stochastic_rounding=True`` without master weights (bfloat16): the same optimizer on
backend "cuda" and on backend "cpu", from the same params and gradients, must store the
same param and compensation bits, step after step. The simulator computes with NumPy
float32 scalars, which round as the CPU driver's compiled float32 math does, and the
CUDA kernel draws stochastic rounding's bits from the same hash of the seed and the
element's position as the CPU driver (kernels/cuda_tables.cpu_positions), so every
comparison is exact. The Kahan formula is checked independently against the NumPy
reference by tests/test_pure16.py; this file checks the CUDA kernels against the CPU's.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_cuda_pure16_sim.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastopt as fo

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim,
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes gives NumPy its bfloat16 dtype")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
SHAPES = [(0,), (1,), (3, 5), (700,)]    # empty, one, odd 2-D, several thread blocks
STEPS = 4

OPTIMIZERS = [
    (fo.Adam, dict(lr=1e-3)),
    (fo.AdamW, dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
    (fo.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (fo.Lion, dict(lr=1e-4, weight_decay=0.01)),
]


def _start(dtype, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def _grads(t, dtype, shapes=SHAPES):
    rng = np.random.default_rng(1000 + t)
    return [(rng.standard_normal(s) * 0.1).astype(np.float32).astype(dtype) for s in shapes]


def _bits(a):
    return np.asarray(a).view(np.uint16 if np.asarray(a).dtype.itemsize == 2 else np.uint8)


def _run_both(cls, hp, dtype, shapes=SHAPES, **options):
    """(cpu params, cpu opt), (cuda params, cuda opt) after STEPS steps; checked after each."""
    runs = []
    for backend in ("cpu", "cuda"):
        params = _start(dtype, shapes)
        runs.append((params, cls(params, backend=backend, **hp, **options)))
    (pc, oc), (pg, og) = runs
    for t in range(STEPS):
        grads = _grads(t, dtype, shapes)
        oc.step(grads)
        og.step([g.copy() for g in grads])
        for i, (a, b) in enumerate(zip(pc, pg)):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_array_equal(_bits(b), _bits(a), err_msg=f"params[{i}] after step {t + 1}")
    return (pc, oc), (pg, og)


# (the simulator runs each GPU thread in Python: float16 on two optimizers, for CI's time)
@pytest.mark.parametrize("cls, hp, dtype", [
    pytest.param(c, h, d, id=f"{c.__name__}-{name}")
    for (c, h), d, name in [(o, BF16, "bf16") for o in OPTIMIZERS]
    + [(o, F16, "f16") for o in OPTIMIZERS[1:3]]])
def test_kahan_cuda_equals_cpu_bit_for_bit(cls, hp, dtype):
    (pc, oc), (pg, og) = _run_both(cls, hp, dtype, kahan_sum=True)
    moved = 0
    for i, p in enumerate(pc):
        if p.size == 0:
            continue
        for key in oc.state[i]:
            if key == "step":
                continue
            np.testing.assert_array_equal(_bits(og.state[i][key]), _bits(oc.state[i][key]),
                                          err_msg=f"state[{i}][{key!r}]")
        moved += int(np.count_nonzero(oc.state[i]["kahan_comp"].astype(np.float32)))
    assert moved, "the compensation never held an error: the test would not see a wrong one"


@pytest.mark.parametrize("cls, hp", OPTIMIZERS[1:2], ids=lambda x: getattr(x, "__name__", ""))
def test_kahan_with_int8_state_cuda_equals_cpu(cls, hp):
    # one tensor with int8 state (a block of 256 and a bit), one under min_8bit_size
    shapes = [(300,), (7,)]
    (pc, oc), (pg, og) = _run_both(cls, hp, BF16, shapes, kahan_sum=True, state_format="int8",
                                   min_8bit_size=256)
    for key, value in oc.state[0].items():
        if key != "step":
            np.testing.assert_array_equal(np.asarray(og.state[0][key]).view(np.uint8),
                                          np.asarray(value).view(np.uint8), err_msg=key)
    assert oc.state[0]["exp_avg"].dtype == np.uint8 and oc.state[0]["exp_avg_absmax"].size == 2
    assert oc.state[1]["exp_avg"].dtype != np.uint8         # under min_8bit_size: not int8


@pytest.mark.parametrize("cls, hp", OPTIMIZERS[::3], ids=lambda x: getattr(x, "__name__", ""))
def test_stochastic_rounding_cuda_equals_cpu_bit_for_bit(cls, hp):
    (pc, oc), _ = _run_both(cls, hp, BF16, stochastic_rounding=True, master_weights=False)
    assert "kahan_comp" not in oc.state[3]


def test_stochastic_rounding_is_not_round_to_nearest():
    """The CUDA kernel really draws: over many elements some land on the farther
    neighbour, which rounding to nearest never does."""
    shapes = [(2000,)]
    params = _start(BF16, shapes)
    start = params[0].astype(np.float32)
    opt = fo.SGD(params, lr=1e-3, backend="cuda", stochastic_rounding=True, master_weights=False)
    g = _grads(0, BF16, shapes)
    opt.step(g)
    exact = start - np.float32(1e-3) * g[0].astype(np.float32)
    nearest = exact.astype(BF16).astype(np.float32)
    got = params[0].astype(np.float32)
    assert np.all(np.abs(got - exact) <= np.abs(np.spacing(exact.astype(BF16)).astype(np.float32)) * 2)
    assert np.count_nonzero(got != nearest) > 50


def test_float16_stochastic_rounding_is_refused_on_cuda_as_on_cpu():
    params = _start(F16, [(10,)])
    with pytest.raises((TypeError, ValueError, NotImplementedError), match="bfloat16"):
        opt = fo.Adam(params, backend="cuda", stochastic_rounding=True, master_weights=False)
        opt.step(_grads(0, F16, [(10,)]))
