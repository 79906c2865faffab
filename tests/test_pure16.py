"""16-bit params without master weights: Kahan-compensated (kahan_sum=True) and
stochastically rounded (stochastic_rounding=True) in-place updates.

A float32 master copy costs 4 bytes per parameter; these modes keep the params 16-bit.
The tests compare with the same optimizer run on float32 master weights (the exact
float32 trajectory from the same 16-bit start and 16-bit gradients): Kahan's param plus
its compensation tracks it to about a bfloat16 rounding of the compensation itself,
stochastic rounding tracks it in the mean; the CPU driver equals the NumPy reference
bit for bit (Kahan).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

import fastopt as fo

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes gives NumPy its bfloat16 dtype")
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(5000,), (300,), (1,), (0,), (70, 71)]


def _start(dtype=BF16, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def _grads(t, dtype=BF16, shapes=SHAPES):
    rng = np.random.default_rng(1000 + t)
    return [(rng.standard_normal(s) * 0.1).astype(np.float32).astype(dtype) for s in shapes]


def _train(cls, params, steps, dtype=BF16, shapes=SHAPES, **kwargs):
    opt = cls(params, **kwargs)
    for t in range(steps):
        opt.step(_grads(t, dtype, shapes))
    return opt


OPTIMIZERS = [
    (fo.Adam, dict(lr=1e-3)),
    (fo.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    (fo.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (fo.Lion, dict(lr=1e-4)),
]


@pytest.mark.parametrize("state_format", ["float32", "int8"])
@pytest.mark.parametrize("cls, hp", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_kahan_cpu_equals_reference_bit_for_bit(cls, hp, state_format):
    runs = []
    for backend in ("cpu", "numpy"):
        params = _start()
        opt = _train(cls, params, 6, backend=backend, kahan_sum=True, state_format=state_format, **hp)
        runs.append((params, [opt.state[i]["kahan_comp"] for i in range(len(params)) if i in opt.state]))
    (pc, cc), (pn, cn) = runs
    for a, b in zip(pc + cc, pn + cn):
        assert a.dtype == BF16 and np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("cls, hp", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_kahan_tracks_master_weights(cls, hp):
    shapes = [(4096,)]
    master = _start(shapes=shapes)
    kahan = [p.copy() for p in master]
    opt_m = _train(cls, master, 300, shapes=shapes, master_weights=True, **hp)
    opt_k = _train(cls, kahan, 300, shapes=shapes, kahan_sum=True, **hp)
    exact = opt_m.state[0]["master_param"]
    carried = kahan[0].astype(np.float32) + opt_k.state[0]["kahan_comp"].astype(np.float32)
    moved = np.abs(exact - _start(shapes=shapes)[0].astype(np.float32))
    err = np.abs(carried - exact)
    # the compensation is itself bfloat16: each step may lose up to 2^-9 of it, far
    # below the distance travelled (where params moved measurably at all)
    assert np.median(err) <= 0.02 * np.median(moved) + 1e-6
    # and the 16-bit param is the master rounded: within one bfloat16 step of it
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
    assert np.mean(np.abs(kahan[0].astype(np.float32) - exact) <= step) >= 0.999


def test_kahan_moves_params_where_rounding_alone_would_not():
    """Updates far below half a bfloat16 step: nearest rounding alone never moves a
    param; with Kahan the small updates add up, as with master weights."""
    p = [np.ones(4096, BF16)]
    g = [np.ones(4096, BF16)]
    opt = fo.SGD(p, lr=1e-4, kahan_sum=True)       # each update: 1e-4, half a step: 2e-3
    for _ in range(500):
        opt.step(g)
    assert np.all(np.abs(p[0].astype(np.float32) - 0.95) < 2 ** -8)


def test_stochastic_rounding_is_unbiased_and_deterministic():
    shapes = [(20000,)]
    runs = []
    for seed in (1, 1, 2):
        p = [np.ones(20000, BF16)]
        opt = fo.SGD(p, lr=1e-4, stochastic_rounding=True, seed=seed)
        for _ in range(100):
            opt.step([np.ones(20000, BF16)])
        runs.append(p[0].astype(np.float32))
    assert np.array_equal(runs[0], runs[1])            # same seed: same bits
    assert not np.array_equal(runs[0], runs[2])
    # 100 updates of 1e-4: the mean lands on 0.99 within a few standard errors
    assert abs(runs[0].mean() - 0.99) < 5 * runs[0].std() / np.sqrt(20000) + 1e-4
    del shapes


def test_stochastic_rounding_does_not_depend_on_thread_count():
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            p = _start(shapes=[(200_000,)])
            _train(fo.Adam, p, 3, shapes=[(200_000,)], lr=1e-3, stochastic_rounding=True, seed=5)
            results.append(p[0].view(np.uint16).copy())
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(results[0], results[1])


def test_flat_params_equal_list_with_kahan():
    shapes = [(5000,), (300,), (7,)]
    runs = []
    for flat in (False, True):
        start = _start(shapes=shapes)
        if flat:
            fp = fo.FlatParams(start)
            params = list(fp.params)
        else:
            params = start
        opt = fo.Adam(params, lr=1e-3, kahan_sum=True)
        for t in range(4):
            g = _grads(t, shapes=shapes)
            if flat:
                for dst, src in zip(fp.grads, g):
                    dst[...] = src
                opt.step()
            else:
                opt.step(g)
        runs.append([p.view(np.uint16).copy() for p in params])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_state_dict_round_trip_keeps_the_compensation(tmp_path):
    params = _start()
    opt = _train(fo.Adam, params, 3, lr=1e-3, kahan_sum=True, state_format="bfloat16")
    sd = opt.state_dict()
    assert sd["state"][0]["kahan_comp"].dtype == BF16
    fo.save(tmp_path / "o.npz", sd)
    other_params = [p.copy() for p in params]
    other = fo.Adam(other_params, lr=1e-3, kahan_sum=True, state_format="bfloat16")
    other.load_state_dict(fo.load(tmp_path / "o.npz"))
    g = _grads(99)
    opt.step(g)
    other.step(g)
    for a, b in zip(params, other_params):
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16))


def test_master_weight_state_does_not_load_into_kahan_and_changes_nothing():
    opt_m = _train(fo.Adam, _start(), 2, lr=1e-3, master_weights=True)
    opt_k = _train(fo.Adam, _start(), 2, lr=1e-3, kahan_sum=True)
    before = {k: v.copy() for k, v in opt_k.state[0].items()}
    with pytest.raises(ValueError, match="master"):
        opt_k.load_state_dict(opt_m.state_dict())
    for k, v in opt_k.state[0].items():
        assert np.array_equal(np.asarray(v), np.asarray(before[k]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kahan_sum=True, master_weights=True), ValueError, "kahan_sum"),
    (dict(kahan_sum=True, stochastic_rounding=True), ValueError, "kahan_sum"),
    (dict(kahan_sum="yes"), TypeError, "kahan_sum"),
    (dict(), TypeError, "kahan_sum=True"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fo.Adam(_start(), lr=1e-3, **kwargs)


def test_float16_refuses_stochastic_rounding_but_takes_kahan():
    with pytest.raises(TypeError, match="bfloat16"):
        fo.Adam(_start(np.float16), stochastic_rounding=True)
    params = _start(np.float16)
    opt = _train(fo.Adam, params, 3, dtype=np.float16, lr=1e-3, kahan_sum=True)
    assert opt.state[0]["kahan_comp"].dtype == np.float16
    assert all(np.all(np.isfinite(p.astype(np.float32))) for p in params)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_per_tensor_optimizers_refuse_pure_16_bit(name):
    with pytest.raises(NotImplementedError, match="16-bit"):
        getattr(fo, name)(_start(), kahan_sum=True)


def test_numpy_backend_refuses_stochastic_rounding_before_any_change():
    params = _start()
    before = [p.copy() for p in params]
    opt = fo.Adam(params, lr=1e-3, stochastic_rounding=True, backend="numpy")
    with pytest.raises(NotImplementedError, match="numpy"):
        opt.step(_grads(0))
    assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16)) for a, b in zip(params, before))
    assert len(opt.state) == 0
