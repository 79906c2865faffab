"""fastopt.Adafactor against torch.optim.Adafactor (torch 2.13), the oracle.

Each backend (cpu: the Numba passes; numpy: the reference; cuda: under the CUDA
simulator, or on a GPU) is stepped side by side with torch.optim.Adafactor over a grid
of hyperparameters and shapes (0-d, one element, odd 1-D sizes, matrices with a
dimension of 1, 3-D and 4-D params that torch factors over their last two dims, sizes
that cross the kernels' tiles and chunks, many small tensors), float32 and float64,
100+ steps with a learning-rate change on the way; state dicts go both ways; bad
hyperparameters and bad state dicts are refused with nothing changed.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import adafactor as kern

from cases import needs, optional_module

torch = optional_module("torch")
needs_torch = needs(torch, "torch.optim.Adafactor is the oracle")

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

SHAPES = [(), (1,), (7,), (33,), (5, 3), (1, 6), (6, 1), (1, 1), (2, 3, 4), (3, 1, 5),
          (2, 2, 3, 5)]
# Tiles and chunks crossed: rows split into column tiles, several row tiles, chunks.
BIG = [(3, kern.TILE_COLS + 17), (kern.TILE_ROWS * 2 + 3, 9), (kern.CHUNK + 5,)]
GRID = [
    {},
    dict(eps=(1e-30, 1e-3), d=2.0, weight_decay=0.1, maximize=True, beta2_decay=-0.5, lr=0.05),
    dict(eps=(1e-3, 0.0), beta2_decay=0.0, weight_decay=0.01),
    dict(eps=(None, 0.1), d=1.5, lr=0.2, beta2_decay=-1.0),
]
TOL = {np.float32: 2e-4, np.float64: 1e-11}


def _arrays(shapes, dtype, rng):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _close(fo_arrays, torch_tensors, dtype, what):
    for k, (a, t) in enumerate(zip(fo_arrays, torch_tensors)):
        b = t.detach().cpu().numpy()
        a = np.asarray(a)
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        err = float(np.max(np.abs(a - b))) / scale if b.size else 0.0
        assert err <= TOL[dtype], f"{what}[{k}] shape {b.shape}: relative error {err:.3g}"


def _run_pair(shapes, dtype, hyper, backend, steps, seed=0, lr_change=None, dev=None):
    rng = np.random.default_rng(seed)
    params = _arrays(shapes, dtype, rng)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    if dev is not None:
        params = [dev(p) for p in params]
    opt = fo.Adafactor(params, backend=backend, **hyper)
    topt = torch.optim.Adafactor(tparams, **hyper)
    for t in range(steps):
        if lr_change is not None and t == steps // 2:
            opt.param_groups[0]["lr"] = lr_change
            topt.param_groups[0]["lr"] = lr_change
        grads = _arrays(shapes, dtype, rng)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads if dev is None else [dev(g) for g in grads])
    return opt, topt, params, tparams


def _host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _check_against(opt, topt, params, tparams, dtype):
    _close([_host(p) for p in params], tparams, dtype, "params")
    tstate = topt.state_dict()["state"]
    assert sorted(opt.state_dict()["state"]) == sorted(tstate)
    for i, st in tstate.items():
        mine = opt.state_dict()["state"][i]
        assert set(mine) == set(st), (i, set(mine), set(st))
        assert float(mine["step"]) == float(st["step"])
        for key in st:
            if key != "step":
                assert mine[key].shape == tuple(st[key].shape), (i, key)
                assert mine[key].dtype == dtype
                _close([mine[key]], [st[key]], dtype, f"state[{i}][{key!r}]")


@needs_torch
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", GRID, ids=[f"h{k}" for k in range(len(GRID))])
def test_oracle_grid(backend, dtype, hyper):
    opt, topt, params, tparams = _run_pair(SHAPES, dtype, hyper, backend, steps=110, lr_change=0.003)
    _check_against(opt, topt, params, tparams, dtype)


@needs_torch
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_oracle_tiles_and_chunks(backend, dtype):
    opt, topt, params, tparams = _run_pair(BIG + [(4, 5)], dtype, GRID[1], backend, steps=12)
    _check_against(opt, topt, params, tparams, dtype)


@needs_torch
def test_oracle_many_small_tensors():
    rng = np.random.default_rng(1)
    shapes = [tuple(int(n) for n in rng.integers(1, 6, size=rng.integers(0, 4))) for _ in range(2000)]
    opt, topt, params, tparams = _run_pair(shapes, np.float32, GRID[1], "cpu", steps=5, seed=2)
    _check_against(opt, topt, params, tparams, np.float32)


def test_cpu_matches_reference_closely():
    """The Numba passes and the NumPy reference agree far inside the torch tolerance."""
    rng = np.random.default_rng(3)
    shapes = SHAPES + BIG
    a = _arrays(shapes, np.float64, rng)
    b = [x.copy() for x in a]
    oa = fo.Adafactor(a, backend="cpu", weight_decay=0.1)
    ob = fo.Adafactor(b, backend="numpy", weight_decay=0.1)
    for _ in range(20):
        grads = _arrays(shapes, np.float64, rng)
        oa.step(grads)
        ob.step(grads)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@needs_torch
def test_none_grads_and_skipped_params_count_their_own_steps():
    rng = np.random.default_rng(4)
    shapes = [(4, 3), (5,)]
    params = _arrays(shapes, np.float32, rng)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt, topt = fo.Adafactor(params), torch.optim.Adafactor(tparams)
    for t in range(30):
        grads = _arrays(shapes, np.float32, rng)
        if t % 3 == 0:
            grads[0] = None
        for tp, g in zip(tparams, grads):
            tp.grad = None if g is None else torch.tensor(g)
        topt.step()
        opt.step(grads)
    _check_against(opt, topt, params, tparams, np.float32)


@needs_torch
def test_param_groups_with_their_own_hyperparameters():
    rng = np.random.default_rng(5)
    shapes = [(6, 4), (9,), (2, 3, 3)]
    params = _arrays(shapes, np.float64, rng)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = fo.Adafactor([{"params": params[:2], "weight_decay": 0.2},
                        {"params": params[2:], "maximize": True, "d": 3.0}], lr=0.05)
    topt = torch.optim.Adafactor([{"params": tparams[:2], "weight_decay": 0.2},
                                  {"params": tparams[2:], "maximize": True, "d": 3.0}], lr=0.05)
    for _ in range(40):
        grads = _arrays(shapes, np.float64, rng)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads)
    _check_against(opt, topt, params, tparams, np.float64)


@needs_torch
def test_grad_scale_and_max_grad_norm_as_torch_with_scaled_grads():
    rng = np.random.default_rng(6)
    shapes = [(6, 4), (9,)]
    params = _arrays(shapes, np.float64, rng)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = fo.Adafactor(params, max_grad_norm=0.5, eps=(1e-3, 1e-3))
    topt = torch.optim.Adafactor(tparams, eps=(1e-3, 1e-3))
    for _ in range(15):
        grads = _arrays(shapes, np.float64, rng)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g * 8.0)
        torch.nn.utils.clip_grad_norm_(tparams, 0.5)
        topt.step()
        assert opt.step([g * 64.0 for g in grads], grad_scale=0.125)
    _check_against(opt, topt, params, tparams, np.float64)
    before = [p.copy() for p in params]
    assert not opt.step([np.full(s, np.inf) for s in shapes], grad_scale=0.5)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)


def test_deep_copy_steps_its_own_state():
    rng = np.random.default_rng(11)
    shapes = [(5, 3), (7,)]
    params = _arrays(shapes, np.float32, rng)
    opt = fo.Adafactor(params)
    opt.step(_arrays(shapes, np.float32, rng))
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    grads = _arrays(shapes, np.float32, rng)
    opt.step(grads)
    twin.step(grads)
    for a, b in zip(params, twin_params):
        assert a is not b
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(opt.state[0]["col_var"], twin.state[0]["col_var"])


def test_empty_params_step_without_error():
    params = [np.zeros((0,), np.float32), np.zeros((0, 3), np.float32), np.ones((2, 2), np.float32)]
    opt = fo.Adafactor(params)
    opt.step([np.zeros_like(p) + 1 for p in params])
    assert opt.state[1]["row_var"].shape == (0, 1) and opt.state[1]["col_var"].shape == (1, 3)
    assert float(opt.state[0]["step"]) == 1.0 and np.all(np.isfinite(params[2]))


def test_flat_params_equal_list_mode():
    rng = np.random.default_rng(7)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    a = _arrays(shapes, np.float32, rng)
    flat = fo.FlatParams([x.copy() for x in a])
    oa, ob = fo.Adafactor(a), fo.Adafactor(flat)
    for _ in range(10):
        grads = _arrays(shapes, np.float32, rng)
        for k, g in enumerate(grads):
            flat.grads[k][...] = g
        oa.step(grads)
        ob.step()
    for x, y in zip(a, flat.params):
        np.testing.assert_array_equal(x, y)


# -- state dicts --------------------------------------------------------------------------------
def _numpy_sd(tsd):
    return {"state": {i: {k: v.numpy().copy() for k, v in st.items()} for i, st in tsd["state"].items()},
            "param_groups": copy.deepcopy(tsd["param_groups"])}


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_state_dicts_both_ways(dtype):
    rng = np.random.default_rng(8)
    shapes = [(), (5,), (4, 3), (2, 3, 5)]
    hyper = dict(weight_decay=0.05, eps=(1e-20, 1e-3))
    # torch -> fastopt: both continue from torch's state
    opt, topt, params, tparams = _run_pair(shapes, dtype, hyper, "cpu", steps=7, seed=9)
    fresh = [p.detach().numpy().copy() for p in tparams]
    mine = fo.Adafactor(fresh, **hyper)
    mine.load_state_dict(_numpy_sd(topt.state_dict()))
    # fastopt -> torch: a fresh torch optimizer loads fastopt's state dict
    t2 = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt2 = torch.optim.Adafactor(t2, **hyper)
    sd = opt.state_dict()
    topt2.load_state_dict({"state": {i: {k: torch.tensor(v) for k, v in st.items()}
                                     for i, st in sd["state"].items()},
                           "param_groups": sd["param_groups"]})
    for _ in range(20):
        grads = _arrays(shapes, dtype, rng)
        for tp, tp2, g in zip(tparams, t2, grads):
            tp.grad = torch.tensor(g)
            tp2.grad = torch.tensor(g)
        topt.step()
        topt2.step()
        mine.step(grads)
        opt.step(grads)
    _check_against(mine, topt, fresh, tparams, dtype)
    _close(params, t2, dtype, "fastopt->torch params")
    assert float(topt2.state_dict()["state"][2]["step"]) == 27.0


def _bad_state_dicts(sd):
    def edit(fn):
        out = copy.deepcopy(sd)
        fn(out)
        return out
    yield "wrong row_var shape", edit(lambda s: s["state"][2].__setitem__("row_var", np.zeros((3, 1))))
    yield "col_var as param", edit(lambda s: s["state"][2].__setitem__("col_var", np.zeros((4, 3))))
    yield "missing col_var", edit(lambda s: s["state"][2].pop("col_var"))
    yield "variance for a matrix", edit(lambda s: s["state"][2].__setitem__("variance", np.zeros((4, 3))))
    yield "matrix state for a vector", edit(lambda s: s["state"][1].__setitem__("row_var", np.zeros((5, 1))))
    yield "wrong variance shape", edit(lambda s: s["state"][1].__setitem__("variance", np.zeros(4)))
    yield "integer state", edit(lambda s: s["state"][1].__setitem__("variance", np.zeros(5, np.int64)))
    yield "negative step", edit(lambda s: s["state"][0].__setitem__("step", np.float32(-1)))
    yield "fractional step", edit(lambda s: s["state"][0].__setitem__("step", np.float32(1.5)))
    yield "missing step", edit(lambda s: s["state"][0].pop("step"))
    yield "unknown param id", edit(lambda s: s["state"].__setitem__(17, s["state"][0]))
    yield "bad d", edit(lambda s: s["param_groups"][0].__setitem__("d", 0.5))
    yield "bad eps", edit(lambda s: s["param_groups"][0].__setitem__("eps", (None, -1.0)))
    yield "missing beta2_decay", edit(lambda s: s["param_groups"][0].pop("beta2_decay"))
    yield "other optimizer", {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99),
                                                              "params": [0, 1, 2, 3]}]}


def test_bad_state_dicts_refused_with_nothing_changed():
    rng = np.random.default_rng(10)
    shapes = [(), (5,), (4, 3), (2, 3, 5)]
    params = _arrays(shapes, np.float32, rng)
    opt = fo.Adafactor(params, weight_decay=0.1)
    for _ in range(3):
        opt.step(_arrays(shapes, np.float32, rng))
    good = opt.state_dict()
    for what, bad in _bad_state_dicts(good):
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert after["param_groups"] == good["param_groups"], what
        for i, st in good["state"].items():
            for k, a in st.items():
                np.testing.assert_array_equal(after["state"][i][k], a, err_msg=what)
    # and the optimizer still steps as a twin that never saw the bad loads
    twin_params = [p.copy() for p in params]
    twin = fo.Adafactor(twin_params, weight_decay=0.1)
    twin.load_state_dict(good)
    grads = _arrays(shapes, np.float32, rng)
    opt.step(grads)
    twin.step(grads)
    for a, b in zip(params, twin_params):
        np.testing.assert_array_equal(a, b)


# -- bad hyperparameters and options ---------------------------------------------------------------
BAD = [dict(lr=-1.0), dict(lr=float("nan")), dict(beta2_decay=0.5), dict(eps=(-1.0, 1e-3)),
       dict(eps=(None, -1e-3)), dict(eps=1e-3), dict(eps=(None, None)), dict(eps=(1e-3, 1e-3, 1.0)),
       dict(d=0.5), dict(weight_decay=-0.1), dict(maximize=1), dict(d="2")]


@pytest.mark.parametrize("bad", BAD, ids=[next(iter(b)) + str(k) for k, b in enumerate(BAD)])
def test_bad_hyperparameters_refused(bad):
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        fo.Adafactor([np.zeros(3, np.float32)], **bad)
    params = [np.ones((3, 2), np.float32)]
    opt = fo.Adafactor(params)
    opt.step([np.ones((3, 2), np.float32)])
    before = opt.state_dict()
    p_before = params[0].copy()
    opt.param_groups[0].update(bad)
    with pytest.raises((ValueError, TypeError), match=name):
        opt.step([np.ones((3, 2), np.float32)])
    np.testing.assert_array_equal(params[0], p_before)
    after = opt.state_dict()
    assert float(after["state"][0]["step"]) == float(before["state"][0]["step"])
    np.testing.assert_array_equal(after["state"][0]["row_var"], before["state"][0]["row_var"])


def test_unsupported_options_refused():
    p = [np.zeros(3, np.float32)]
    for options in (dict(master_weights=True), dict(kahan_sum=True), dict(state_format="int8")):
        with pytest.raises(NotImplementedError, match="Adafactor"):
            fo.Adafactor(p, **options)
    with pytest.raises(TypeError, match="foreach"):
        fo.Adafactor(p, foreach=True)
    opt = fo.Adafactor([np.zeros((4, 2), np.float32)])
    with pytest.raises(TypeError, match="sparse"):
        opt.step([fo.SparseGrad(np.array([0]), np.ones((1, 2), np.float32))])


@needs_torch
def test_defaults_and_signature_are_torchs():
    import inspect
    mine = inspect.signature(fo.Adafactor).parameters
    theirs = inspect.signature(torch.optim.Adafactor).parameters
    for name in ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize"):
        assert mine[name].default == theirs[name].default, name
        assert mine[name].kind == theirs[name].kind, name


# -- fastopt.torch ------------------------------------------------------------------------------------
@needs_torch
def test_fastopt_torch_class_matches_torch_optim():
    import fastopt.torch as ft
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    m2 = copy.deepcopy(m1)
    m3 = copy.deepcopy(m1)
    o1 = torch.optim.Adafactor(m1.parameters(), weight_decay=0.1, lr=0.05)
    o2 = ft.Adafactor(m2.parameters(), weight_decay=0.1, lr=0.05)
    o3 = ft.Adafactor(m3.parameters(), weight_decay=0.1, lr=0.05, flat=True)
    x = torch.randn(16, 5)

    def run(n, pairs=((m1, o1), (m2, o2))):
        for _ in range(n):
            for m, o in pairs:
                o.zero_grad()
                m(x).pow(2).sum().backward()
                o.step()

    run(15, ((m1, o1), (m2, o2), (m3, o3)))
    for a, b in zip(m2.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)        # flat buffers: the same steps
    sd = o2.state_dict()
    assert set(sd["state"][0]) == {"step", "row_var", "col_var"}
    assert set(sd["state"][1]) == {"step", "variance"}
    o1.load_state_dict(o2.state_dict())
    o2.load_state_dict(o1.state_dict())
    run(10)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- CUDA (simulator or GPU) --------------------------------------------------------------------------
def _gpu():
    if SIM:
        return False
    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        return False
    try:
        import cupy  # noqa: F401
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


GPU = _gpu()
needs_cuda = pytest.mark.skipif(not (SIM or GPU),
                                reason="run with NUMBA_ENABLE_CUDASIM=1 (CUDA simulator) or on a GPU")


def _dev(a):
    if SIM:
        return np.array(a, copy=True)
    import cupy
    return cupy.asarray(a)


@needs_torch
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", GRID[:2], ids=["h0", "h1"])
def test_cuda_oracle(dtype, hyper):
    shapes = [(), (1,), (7,), (5, 3), (1, 6), (6, 1), (2, 3, 4)]
    opt, topt, params, tparams = _run_pair(shapes, dtype, hyper, "cuda", steps=10, lr_change=0.003,
                                           dev=_dev)
    _check_against(opt, topt, params, tparams, dtype)


@needs_torch
@needs_cuda
def test_cuda_oracle_100_steps():
    shapes = [(), (9,), (4, 3), (2, 2, 3)]
    opt, topt, params, tparams = _run_pair(shapes, np.float64, GRID[1], "cuda", steps=100,
                                           lr_change=0.003, dev=_dev)
    _check_against(opt, topt, params, tparams, np.float64)


@needs_torch  # the bench times torch.optim.Adafactor beside fastopt
def test_bench_record():
    from fastopt.benchmark import adafactor as bench
    rec = bench.run("quick", repeats=1, warmup=1)
    assert rec["params"] == sum(int(np.prod(s)) for s in bench.LAYOUTS["quick"]())
    assert rec["fastopt_ms"] > 0 and rec["torch_ms"] > 0 and rec["roof_ms"] > 0
    assert rec["speedup_vs_torch"] == pytest.approx(rec["torch_ms"] / rec["fastopt_ms"])
    assert len(bench.lines([rec])) == 2
