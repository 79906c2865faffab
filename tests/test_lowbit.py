"""Low-bit optimizer state (``state_format``): int8 blockwise and bfloat16 columns.

The fused drivers against the unfused NumPy reference (kernels/reference_lowbit.py,
written apart from the drivers' encoder), for every optimizer whose state is moments;
the maps and the encoder against their description and a brute-force search
(tests/test_lowbit_bnb.py compares with bitsandbytes' maps and optimizers);
list against FlatParams, thread counts, master weights, state dicts, bad input.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

import fastopt as fo
from cases import ALL_CASES, case_params, on_one_and_all_threads, rel_err, rms, step_on
from fastopt import keras as fk
from fastopt import lowbit
from fastopt.kernels import blockwise
from fastopt.kernels import reference_lowbit as ref
from fastopt.kernels.keras import SPECS as KERAS_SPECS

# Optimizers whose state is moments and that run in one pass (LAMB and LARS, two passes:
# tests/test_lowbit_lamb_lars.py).
LOWBIT_CASES = [c for c in ALL_CASES if c.spec.per_tensor is None]
# Sizes: empty, 1, under the int8 threshold, odd, not a multiple of the block, more than
# one chunk (65536) and not a multiple of it.
SIZES = [(0,), (1,), (300,), (4096,), (5001,), (70, 71), (66000,)]


def _params(sizes, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in sizes]


def _grads(sizes, step, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed * 1000 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in sizes]


def _codes_equal(a, b) -> float:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return 1.0 if a.size == 0 else float(np.mean(a == b))


# -- the maps and the encoder ----------------------------------------------------------------------
def _paper_map(signed: bool) -> np.ndarray:
    """The dynamic map from its description (Dettmers 2016), in float64: decade i of 7
    holds the midpoints of 2^i + 1 (signed) or 2^(i+1) + 1 points evenly spaced in
    [0.1, 1], times 10^(i-6); then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        points = np.linspace(0.1, 1.0, n)
        mids = (points[:-1] + points[1:]) / 2 * 10.0 ** (i - 6)
        values += list(mids) + (list(-mids) if signed else [])
    out = np.sort(np.array(values))
    if signed:
        out[0] = -1.0
    return out


@pytest.mark.parametrize("kind", [blockwise.SIGNED, blockwise.UNSIGNED])
def test_dynamic_map_matches_its_description(kind):
    ours = blockwise.dynamic_map(kind).astype(np.float64)
    paper = _paper_map(kind == blockwise.SIGNED)
    assert ours.shape == (256,) and np.all(np.diff(ours) > 0)
    # float32 rounding of float32 arithmetic: within a few ulps of the exact values
    assert np.allclose(ours, paper, rtol=5e-7, atol=0)
    assert ours[-1] == 1.0 and 0.0 in ours and ours[0] == (-1.0 if kind == blockwise.SIGNED else 0.0)


@numba.njit(cache=True)
def _encode_all(x, table):
    out = np.empty(x.size, np.uint8)
    for i in range(x.size):
        out[i] = blockwise.encode(x[i], table)
    return out


@pytest.mark.parametrize("kind", [blockwise.SIGNED, blockwise.UNSIGNED])
def test_encoder_is_the_nearest_code_ties_to_the_lower(kind):
    q = blockwise.dynamic_map(kind)
    rng = np.random.default_rng(3)
    mids = (q[1:] + q[:-1]) / np.float32(2)
    x = np.concatenate([
        rng.uniform(-1, 1, 20000), 10.0 ** rng.uniform(-12, 0, 20000) * rng.choice([-1, 1], 20000),
        q, mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
        [0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1.0000001]]).astype(np.float32)
    table = blockwise.encoder(kind)
    thresholds = blockwise.thresholds(q)
    # every threshold, the floats beside it, with both signs
    edges = np.concatenate([thresholds, np.nextafter(thresholds, np.float32(2)),
                            np.nextafter(thresholds, np.float32(-2))])
    x = np.concatenate([x, edges, -edges]).astype(np.float32)
    # brute force in float32 arithmetic: the first index of the smallest distance
    brute = np.abs(x[:, None] - q[None, :]).argmin(axis=1)
    fast = _encode_all(x, table)
    assert np.array_equal(fast, brute)
    assert np.array_equal(ref.nearest_codes(x, q), brute)
    codes, _ = lowbit.encode(x.reshape(-1, 1), "int8-" + kind, 1)      # absmax = |x|: x / |x|
    assert np.array_equal(codes.ravel()[np.abs(x) > 0],
                          np.abs(np.sign(x)[:, None] - q[None, :]).argmin(axis=1)[np.abs(x) > 0])


# -- fused drivers against the reference ----------------------------------------------------------
def _run(case, fmt, backend, sizes, steps, hp=None, flat=False, **options):
    params = _params(sizes)
    fp = fo.FlatParams(params) if flat else None
    if flat:
        params = list(fp.params)
    opt = case.fo_cls(params, **(hp or case.hp()), backend=backend, state_format=fmt, **options)
    for t in range(1, steps + 1):
        step_on(opt, _grads(sizes, t), fp)
    return opt, params


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
@pytest.mark.parametrize("case", case_params(LOWBIT_CASES))
def test_driver_matches_reference(case, fmt):
    steps = 4
    opt_c, p_c = _run(case, fmt, "cpu", SIZES, steps)
    opt_n, p_n = _run(case, fmt, "numpy", SIZES, steps)
    scale = rms(p_n)
    for i, (a, b) in enumerate(zip(p_c, p_n)):
        assert a.dtype == np.float32
        # the same float32 math; a state value a rounding away from a code boundary
        # takes the neighbouring code in one and not the other: rare, and small
        assert rel_err(a, b, scale) < 1e-4, f"params[{i}] {a.shape}"
    sd_c, sd_n = opt_c.state_dict()["state"], opt_n.state_dict()["state"]
    assert sd_c.keys() == sd_n.keys()
    for i in sd_c:
        for key, a in sd_c[i].items():
            b = sd_n[i][key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if a.dtype == np.uint8:
                assert _codes_equal(a, b) >= 0.999, f"state[{i}][{key}]"
            elif key != "step":
                af, bf = np.asarray(a, np.float32), np.asarray(b, np.float32)
                assert rel_err(af, bf, rms([bf])) < 1e-2, f"state[{i}][{key}]"


@pytest.mark.parametrize("case", case_params([c for c in LOWBIT_CASES if c.name in ("adam", "sgd", "lion")]))
def test_int8_columns_and_sizes(case):
    """State under int8: uint8 codes and float32 absmax per block for tensors of
    min_8bit_size elements or more, float32 below; bfloat16 everywhere."""
    opt, params = _run(case, "int8", "cpu", SIZES, 1)
    for i, p in enumerate(params):
        st = opt.state[i]
        for name in case.slot_names:
            if name not in st:
                continue
            if p.size >= 4096:
                assert st[name].dtype == np.uint8 and st[name].shape == p.shape
                assert st[name + "_absmax"].shape == (-(-p.size // 256),)
                assert st[name + "_absmax"].dtype == np.float32
            else:
                assert st[name].dtype == np.float32 and name + "_absmax" not in st
    opt, params = _run(case, "bfloat16", "cpu", SIZES, 1)
    for i, p in enumerate(params):
        for name in case.slot_names:
            if name in opt.state[i]:
                assert opt.state[i][name].dtype == lowbit.bfloat16()


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_flat_params_equal_list_bit_for_bit(fmt):
    case = next(c for c in ALL_CASES if c.name == "adam")
    sizes = [(5000,), (256, 20), (4096,), (300,), (66000,), (0,), (1,)]
    opt_l, p_l = _run(case, fmt, "cpu", sizes, 3)
    opt_f, p_f = _run(case, fmt, "cpu", sizes, 3, flat=True)
    for a, b in zip(p_l, p_f):
        assert np.array_equal(a, b)
    sd_l, sd_f = opt_l.state_dict()["state"], opt_f.state_dict()["state"]
    for i in sd_l:
        for key in sd_l[i]:
            assert np.array_equal(np.atleast_1d(sd_l[i][key]).view(np.uint8),
                                  np.atleast_1d(sd_f[i][key]).view(np.uint8)), (i, key)


def test_many_small_tensors_keep_float32_state_and_match():
    case = next(c for c in ALL_CASES if c.name == "adamw")
    sizes = [(17,)] * 1500 + [(5000,)] * 3
    opt_c, p_c = _run(case, "int8", "cpu", sizes, 2, flat=True)
    opt_n, p_n = _run(case, "int8", "numpy", sizes, 2)
    for a, b in zip(p_c, p_n):
        assert rel_err(a, b, rms(p_n)) < 1e-4
    assert opt_c.state[0]["exp_avg"].dtype == np.float32
    assert opt_c.state[1500]["exp_avg"].dtype == np.uint8


def test_thread_count_does_not_change_a_bit():
    case = next(c for c in ALL_CASES if c.name == "adam")
    sizes = [(200_000,), (5001,)]

    def run():
        opt, params = _run(case, "int8", "cpu", sizes, 3)
        return params, opt.state_dict()["state"]

    (p1, s1), (p2, s2) = on_one_and_all_threads(run)
    for a, b in zip(p1, p2):
        assert np.array_equal(a, b)
    for i in s1:
        for key in s1[i]:
            assert np.array_equal(s1[i][key], s2[i][key])


def test_master_weights_with_int8_state():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    case = next(c for c in ALL_CASES if c.name == "adam")
    sizes = [(5000,), (100,)]
    p16 = [p.astype(ml_dtypes.bfloat16) for p in _params(sizes)]
    p32 = [p.astype(np.float32) for p in p16]
    opt16 = fo.Adam(p16, lr=1e-2, master_weights=True, state_format="int8")
    opt32 = fo.Adam(p32, lr=1e-2, state_format="int8")
    for t in range(1, 4):
        g = [gg.astype(ml_dtypes.bfloat16) for gg in _grads(sizes, t)]
        opt16.step(g)
        opt32.step([gg.astype(np.float32) for gg in g])
    for a, b in zip(p16, p32):
        assert np.array_equal(a, b.astype(ml_dtypes.bfloat16))
    assert opt16.state[0]["exp_avg"].dtype == np.uint8
    assert np.array_equal(opt16.state[0]["exp_avg"], opt32.state[0]["exp_avg"])


@pytest.mark.parametrize("spec", KERAS_SPECS, ids=lambda s: s.name)
def test_keras_classes_take_state_format(spec):
    sizes = [(5000,), (300,)]
    results = []
    for backend in ("cpu", "numpy"):
        variables = _params(sizes)
        extra = dict(momentum=0.9) if spec.name in ("SGD", "RMSprop") else {}
        opt = getattr(fk, spec.name)(learning_rate=0.01, backend=backend, state_format="int8", **extra)
        opt.build(variables)
        for t in range(1, 4):
            opt.apply(_grads(sizes, t), variables)
        results.append((variables, opt.state_dict()))
    (pc, sdc), (pn, sdn) = results
    for a, b in zip(pc, pn):
        assert rel_err(a, b, rms(pn)) < 1e-4
    st = sdc["state"][0]
    assert any(np.asarray(a).dtype == np.uint8 for a in st.values())


# -- reliability ------------------------------------------------------------------------------------
def test_all_zero_blocks_and_one_huge_value():
    p = np.zeros(8192, np.float32)
    opt = fo.Adam([p], lr=1e-3, state_format="int8")
    g = np.zeros(8192, np.float32)
    g[300] = 1e15                                  # block 1 holds one huge value
    g[4096:4096 + 256] = np.linspace(-1, 1, 256)   # block 16: ordinary values
    opt.step([g])
    st = opt.state[0]
    absmax = st["exp_avg_absmax"]
    zero_s = int(np.flatnonzero(blockwise.dynamic_map(blockwise.SIGNED) == 0)[0])
    zero_u = int(np.flatnonzero(blockwise.dynamic_map(blockwise.UNSIGNED) == 0)[0])
    # all-zero blocks: absmax 0, every code the code of 0, the params untouched
    quiet = [b for b in range(32) if b not in (1, 16)]
    assert np.all(absmax[quiet] == 0) and np.all(st["exp_avg_sq_absmax"][quiet] == 0)
    mask = np.ones(8192, bool)
    mask[256:512] = mask[4096:4352] = False
    assert np.all(st["exp_avg"][mask] == zero_s) and np.all(st["exp_avg_sq"][mask] == zero_u)
    assert np.all(p[mask] == 0)
    # the huge value is stored exactly as its block's absmax; its neighbours are 0
    assert absmax[1] == np.float32(np.float32(0.1) * np.float32(1e15))
    m = lowbit.decode(st["exp_avg"], absmax, 256, blockwise.dynamic_map(blockwise.SIGNED))
    assert m[300] == absmax[1] and np.all(m[256:300] == 0)
    assert np.all(np.isfinite(p)) and p[300] < 0


def test_nonfinite_gradients_under_grad_scale_skip_the_step():
    params = _params([(5000,)])
    opt = fo.Adam(params, lr=1e-2, state_format="int8")
    opt.step(_grads([(5000,)], 1), grad_scale=0.5)
    before = (params[0].copy(), {k: np.copy(v) for k, v in opt.state[0].items()})
    for bad in (np.nan, np.inf, -np.inf):
        g = _grads([(5000,)], 2)
        g[0][17] = bad
        assert opt.step(g, grad_scale=0.5) is False
        assert np.array_equal(params[0], before[0])
        for k, v in opt.state[0].items():
            assert np.array_equal(np.asarray(v), before[1][k]), k


def test_nan_gradient_without_grad_scale_poisons_only_its_block():
    params = _params([(1024,)], dtype=np.float32)
    opt = fo.Adam(params, lr=1e-2, state_format="int8", min_8bit_size=0)
    g = _grads([(1024,)], 1)
    g[0][5] = np.nan
    opt.step(g)
    st = opt.state[0]
    assert np.isnan(st["exp_avg_absmax"][0]) and np.all(np.isfinite(st["exp_avg_absmax"][1:]))
    assert np.isnan(params[0][5]) and np.all(np.isfinite(params[0][256:]))


# -- state dicts ------------------------------------------------------------------------------------
def _trained(fmt="int8", steps=2, sizes=((5000,), (300,)), **options):
    params = _params(list(sizes))
    opt = fo.Adam(params, lr=1e-2, state_format=fmt, **options)
    for t in range(1, steps + 1):
        opt.step(_grads(list(sizes), t))
    return opt, params


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_state_dict_round_trips_bit_for_bit(tmp_path, fmt):
    opt, params = _trained(fmt)
    sd = opt.state_dict()
    assert sd["state_format"] == {"format": fmt, "block_size": 256, "min_8bit_size": 4096}
    if fmt == "int8":
        assert np.array_equal(sd["state"][0]["exp_avg_qmap"], blockwise.dynamic_map("signed"))
    fo.save(tmp_path / "opt.npz", sd)
    loaded = fo.load(tmp_path / "opt.npz")
    other = fo.Adam([p.copy() for p in params], lr=1e-2, state_format=fmt)
    other.load_state_dict(loaded)
    for i in sd["state"]:
        for key, a in sd["state"][i].items():
            b = other.state_dict()["state"][i][key]
            assert np.asarray(a).dtype == np.asarray(b).dtype
            assert np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8)), key
    g = _grads([(5000,), (300,)], 9)
    opt.step(g)
    other.step(g)
    assert np.array_equal(params[0], other.param_groups[0]["params"][0])


def test_float32_state_loads_into_int8_and_expands_back():
    opt32, params = _trained("float32")
    sd32 = opt32.state_dict()
    opt8 = fo.Adam([p.copy() for p in params], lr=1e-2, state_format="int8")
    opt8.load_state_dict(sd32)
    st = opt8.state[0]
    assert st["exp_avg"].dtype == np.uint8
    m = lowbit.decode(st["exp_avg"], st["exp_avg_absmax"], 256, blockwise.dynamic_map("signed"))
    expected = sd32["state"][0]["exp_avg"]
    # within half the spacing of the map at each value (relative to the block's absmax)
    assert np.max(np.abs(m - expected)) <= 0.01 * np.max(np.abs(expected))
    assert opt8.state[1]["exp_avg"].dtype == np.float32          # 300 < min_8bit_size
    back = fo.Adam([p.copy() for p in params], lr=1e-2)
    back.load_state_dict(opt8.state_dict())
    assert back.state[0]["exp_avg"].dtype == np.float32
    assert np.array_equal(back.state[0]["exp_avg"], m)


def test_torch_state_dict_loads_into_int8():
    torch = pytest.importorskip("torch", reason="torch not installed: no torch state dict to load")
    from cases import sd_to_numpy
    sizes = [(5000,)]
    tp = [torch.tensor(p) for p in _params(sizes)]
    topt = torch.optim.Adam(tp, lr=1e-2)
    for t in range(1, 3):
        for p, g in zip(tp, _grads(sizes, t)):
            p.grad = torch.tensor(g)
        topt.step()
    opt = fo.Adam([p.detach().numpy().copy() for p in tp], lr=1e-2, state_format="int8")
    opt.load_state_dict(sd_to_numpy(topt.state_dict()))
    m = lowbit.decode(opt.state[0]["exp_avg"], opt.state[0]["exp_avg_absmax"], 256,
                      blockwise.dynamic_map("signed"))
    expected = topt.state[tp[0]]["exp_avg"].numpy()
    assert np.max(np.abs(m - expected)) <= 0.01 * np.max(np.abs(expected))


@pytest.mark.parametrize("damage", ["truncated absmax", "wrong block size", "no record",
                                    "codes without absmax", "bad qmap", "wrong shape"])
def test_bad_int8_state_dicts_are_refused_and_change_nothing(damage):
    opt, params = _trained("int8")
    sd = opt.state_dict()
    st = sd["state"][0]
    if damage == "truncated absmax":
        st["exp_avg_absmax"] = st["exp_avg_absmax"][:-1]
    elif damage == "wrong block size":
        sd["state_format"] = dict(sd["state_format"], block_size=128)
    elif damage == "no record":
        del sd["state_format"]
    elif damage == "codes without absmax":
        del st["exp_avg_sq_absmax"]
    elif damage == "bad qmap":
        st["exp_avg_qmap"] = st["exp_avg_qmap"][::-1].copy()
    else:
        st["exp_avg"] = st["exp_avg"][:-1]
    victim, vparams = _trained("int8", steps=1)
    before = victim.state_dict()
    with pytest.raises((ValueError, TypeError)) as info:
        victim.load_state_dict(sd)
    assert "state_dict" in str(info.value)
    after = victim.state_dict()
    for i in before["state"]:
        for key, a in before["state"][i].items():
            assert np.array_equal(np.asarray(a), np.asarray(after["state"][i][key])), key


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(state_format="int4"), "state_format"),
    (dict(state_format="int8", block_size=100), "block_size"),
    (dict(state_format="int8", block_size=256.0), "block_size"),
    (dict(state_format="int8", min_8bit_size=-1), "min_8bit_size"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fo.Adam(_params([(10,)]), **kwargs)


def test_float64_params_refuse_low_bit_state():
    with pytest.raises(TypeError, match="float64"):
        fo.Adam(_params([(10,)], dtype=np.float64), state_format="bfloat16")


def test_sparse_gradients_refuse_low_bit_state_before_any_change():
    p = _params([(100, 8)])
    opt = fo.Adam(p, lr=0.1, state_format="int8")
    before = p[0].copy()
    with pytest.raises(NotImplementedError, match="SparseGrad"):
        opt.step([fo.SparseGrad(np.array([1, 3]), np.ones((2, 8), np.float32))])
    assert np.array_equal(p[0], before) and len(opt.state) == 0


@pytest.mark.parametrize("case", case_params([c for c in ALL_CASES if c.spec.per_tensor is not None]))
def test_per_tensor_optimizers_take_bfloat16_state(case):
    """LAMB and LARS: their reduction pass reads and writes bfloat16 state columns."""
    opt_c, p_c = _run(case, "bfloat16", "cpu", SIZES, 3)
    opt_n, p_n = _run(case, "bfloat16", "numpy", SIZES, 3)
    for a, b in zip(p_c, p_n):
        assert rel_err(a, b, rms(p_n)) < 1e-4
    assert any(np.asarray(v).dtype == lowbit.bfloat16() for v in opt_c.state[2].values())


# -- combinations -----------------------------------------------------------------------------------
def _pair(fmt, backend, **options):
    params = _params([(5000,), (300,), (70, 71)])
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.003, "weight_decay": 0.1}]
    return params, fo.AdamW(groups, lr=0.01, backend=backend, state_format=fmt, **options)


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_groups_none_grads_grad_scale_and_clipping(fmt):
    """Two groups, params skipping steps (None gradients: buckets split by step count),
    grad_scale and fused global-norm clipping: the driver against the reference."""
    runs = []
    for backend in ("cpu", "numpy"):
        params, opt = _pair(fmt, backend, max_grad_norm=1.0)
        for t in range(1, 6):
            grads = _grads([p.shape for p in params], t)
            if t % 2 == 0:
                grads[0] = None
            assert opt.step(grads, grad_scale=0.5)
        runs.append((params, opt.state_dict()))
    (pc, sc), (pn, sn) = runs
    for a, b in zip(pc, pn):
        assert rel_err(a, b, rms(pn)) < 1e-4
    assert int(sc["state"][0]["step"]) == 3 and int(sc["state"][1]["step"]) == 5
    for i in sc["state"]:
        for key, a in sc["state"][i].items():
            if np.asarray(a).dtype == np.uint8:
                assert _codes_equal(a, sn["state"][i][key]) >= 0.999


def test_master_weights_flat_params_with_int8_equal_lists():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    shapes = [(5000,), (256 * 17,), (300,)]
    runs = []
    for flat in (False, True):
        start = [p.astype(ml_dtypes.bfloat16) for p in _params(shapes)]
        if flat:
            fp = fo.FlatParams(start)
            params = list(fp.params)
        else:
            params = start
        opt = fo.Adam(params, lr=1e-2, master_weights=True, state_format="int8")
        for t in range(1, 4):
            g = [x.astype(ml_dtypes.bfloat16) for x in _grads(shapes, t)]
            if flat:
                for dst, src in zip(fp.grads, g):
                    dst[...] = src
                opt.step()
            else:
                opt.step(g)
        runs.append(([p.view(np.uint16).copy() for p in params], opt.state_dict()["state"]))
    (pl, sl), (pf, sf) = runs
    for a, b in zip(pl, pf):
        assert np.array_equal(a, b)
    for i in sl:
        for key in sl[i]:
            assert np.array_equal(np.atleast_1d(sl[i][key]).view(np.uint8),
                                  np.atleast_1d(sf[i][key]).view(np.uint8)), (i, key)


def test_copies_and_pickles_step_their_own_low_bit_state():
    import copy
    import pickle
    params, opt = _pair("int8", "cpu")
    opt.step(_grads([p.shape for p in params], 1))
    twin = copy.deepcopy(opt)
    thawed = pickle.loads(pickle.dumps(opt))
    g = _grads([p.shape for p in params], 2)
    before = [p.copy() for p in params]
    for o in (twin, thawed):
        o.step(g)
    assert all(np.array_equal(a, b) for a, b in zip(params, before))    # the original untouched
    opt.step(g)
    for o in (twin, thawed):
        for a, b in zip(o.param_groups[0]["params"] + o.param_groups[1]["params"], params):
            assert np.array_equal(a, b)
