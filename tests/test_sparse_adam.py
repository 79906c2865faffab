"""fastopt.SparseAdam against torch.optim.SparseAdam (torch 2.13).

(a) ``reference_sparse_adam`` against torch.optim.SparseAdam, and the element (compiled
    with ``numba.njit``) against the reference bit for bit.
(b) ``fastopt.SparseAdam`` (backends "cpu" and "numpy"; "cuda" under the simulator) with
    ``fastopt.SparseGrad`` rows against torch.optim.SparseAdam with sparse COO gradients
    built from the same (repeated, unsorted) indices and rows, which torch coalesces:
    120 steps, empty gradients (the step counts, nothing changes), params that get no
    gradient at some steps, 1-row, 2-D and 3-D params, two param groups, an lr changed
    mid-run, maximize, float32 and float64. Params, ``exp_avg``, ``exp_avg_sq`` and
    ``step`` are compared at every step.
(c) Dense gradients are refused (list, one array, FlatParams) naming the gradient and
    suggesting Adam, with nothing changed; bad hyperparameters as torch refuses them.
(d) State dicts both ways with torch.optim.SparseAdam (torch keeps ``step`` as a Python
    int: fastopt's float32 0-d ``step`` is turned into an int for torch).

Tolerance: 4 ulp of the dtype times the run's scale of each quantity (its largest
magnitude so far), as tests/test_adan.py explains. torch sums repeated indices in its
own order when it coalesces, and computes ``(g - m) (1 - beta1)`` with its vector
kernels; the rows otherwise follow the same operations in the same order.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import fastopt as fo
from fastopt import SparseGrad
from fastopt.kernels.reference_sparse_adam import coalesce, sparse_adam, sparse_adam_dense_rows
from fastopt.kernels.sparse_adam import SPEC, sparse_adam_element, sparse_adam_scalars

from cases import RunScales, assert_within_ulps

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ULPS = 4
STEPS = 120
SLOTS = ("exp_avg", "exp_avg_sq")
SHAPES = [(1, 3), (64, 5), (1,), (40,), (9, 2, 3)]   # rows x row shape; 1-row params included
HPARAMS = {
    "defaults": dict(lr=1e-3),
    "fast": dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-6),
    "maximize": dict(lr=1e-2, betas=(0.8, 0.99), maximize=True),
}


def _assert_close(ours, theirs, scale, dtype, what):
    assert_within_ulps(ours, theirs, scale, dtype, what, ULPS)


def _batch(rng, shape, dtype, step):
    """Indices with repeats in random order (empty every 7th step), and their rows."""
    rows = shape[0]
    n = 0 if step % 7 == 0 else int(rng.integers(1, 2 * rows + 3))
    idx = rng.integers(0, rows, size=n)
    vals = (rng.standard_normal((n,) + shape[1:]) * 10.0 ** rng.uniform(-2, 1)).astype(dtype)
    return idx, vals


def _torch_grad(idx, vals, shape):
    import torch
    return torch.sparse_coo_tensor(torch.from_numpy(idx.astype(np.int64))[None],
                                   torch.from_numpy(vals.copy()), shape)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch.optim.SparseAdam is SparseAdam's oracle")


# -- (a) the reference and the element -----------------------------------------------------
@pytest.mark.parametrize("row", list(HPARAMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_matches_torch(torch, dtype, row):
    hp = {**dict(betas=(0.9, 0.999), eps=1e-8, maximize=False), **HPARAMS[row]}
    rng = np.random.default_rng(1)
    shape = (30, 4)
    p = rng.standard_normal(shape).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    t = torch.tensor(p.copy())
    opt = torch.optim.SparseAdam([t], **hp)
    scales = RunScales()
    for step in range(1, STEPS + 1):
        idx, vals = _batch(rng, shape, dtype, step)
        t.grad = _torch_grad(idx, vals, shape)
        opt.step()
        sparse_adam_dense_rows(p, idx, vals, m, v, step=step, lr=hp["lr"], beta1=hp["betas"][0],
                               beta2=hp["betas"][1], eps=hp["eps"], maximize=hp["maximize"])
        _assert_close([p], [t.numpy()], scales.update("p", [t.numpy()]), dtype, f"param {step}")
        for name, ours in zip(SLOTS, (m, v)):
            theirs = opt.state[t][name].numpy()
            _assert_close([ours], [theirs], scales.update(name, [theirs]), dtype, f"{name} {step}")
    assert opt.state[t]["step"] == STEPS


def test_reference_touches_only_named_rows():
    p = np.arange(12.0).reshape(4, 3)
    m, v = np.zeros_like(p), np.zeros_like(p)
    before = p.copy()
    sparse_adam_dense_rows(p, np.array([2, 0, 2]), np.ones((3, 3)), m, v, step=1)
    assert np.array_equal(p[[1, 3]], before[[1, 3]]) and np.all(m[[1, 3]] == 0)
    np.testing.assert_allclose(m[2], 0.1 * 2.0) and np.testing.assert_allclose(m[0], 0.1)
    # step 1: bias-corrected m / sqrt(v) = g / |g|, so each named row moves by lr
    np.testing.assert_allclose(before[[0, 2]] - p[[0, 2]], 1e-3, rtol=1e-6)
    uniq, summed = coalesce(np.array([3, 1, 3]), np.array([[1.0], [2.0], [4.0]]))
    assert uniq.tolist() == [1, 3] and summed.ravel().tolist() == [2.0, 5.0]


@functools.lru_cache(maxsize=None)
def _njit_rows():
    import numba

    from fastopt.kernels.codegen import cpu_function
    element = cpu_function(sparse_adam_element)

    @numba.njit
    def run(p, index, rows, m, v, h):
        for k in range(index.size):
            r = index[k]
            for j in range(p.shape[1]):
                p[r, j], m[r, j], v[r, j] = element(p[r, j], rows[k, j], m[r, j], v[r, j], h)

    return run


@pytest.mark.parametrize("row", list(HPARAMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_matches_reference_bit_for_bit(dtype, row):
    hp = {**dict(betas=(0.9, 0.999), eps=1e-8, maximize=False), **HPARAMS[row]}
    rng = np.random.default_rng(2)
    shape = (20, 3)
    p = rng.standard_normal(shape).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    pe, me, ve = p.copy(), m.copy(), v.copy()
    for step in range(1, 60):
        idx, vals = _batch(rng, shape, dtype, step)
        uniq, summed = coalesce(idx, vals)
        sparse_adam(p, uniq, summed, m, v, step=step, lr=hp["lr"], beta1=hp["betas"][0],
                    beta2=hp["betas"][1], eps=hp["eps"], maximize=hp["maximize"])
        _njit_rows()(pe, uniq, summed, me, ve, sparse_adam_scalars(hp, step, np.dtype(dtype).type))
        for a, b, name in ((pe, p, "param"), (me, m, "exp_avg"), (ve, v, "exp_avg_sq")):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, step {step}")


# -- (b) the class against torch.optim.SparseAdam --------------------------------------------
def _run_against_torch(torch, dtype, row, backend, steps=STEPS, shapes=SHAPES):
    hp = HPARAMS[row]
    rng = np.random.default_rng(abs(hash((row, backend, np.dtype(dtype).str))) % 2 ** 32)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ours = [a.copy() for a in init]
    theirs = [torch.tensor(a.copy()) for a in init]
    half = len(shapes) // 2
    # two groups: the second with its own lr
    opt = fo.SparseAdam([{"params": ours[:half]}, {"params": ours[half:], "lr": hp["lr"] * 2}],
                        backend=backend, **hp)
    ref = torch.optim.SparseAdam([{"params": theirs[:half]},
                                  {"params": theirs[half:], "lr": hp["lr"] * 2}], **hp)
    scales = RunScales()
    counts = [0] * len(shapes)
    for step in range(1, steps + 1):
        if step == steps // 2:
            for o in (opt, ref):
                o.param_groups[0]["lr"] *= 0.5
        grads = []
        for i, (shape, t) in enumerate(zip(shapes, theirs)):
            if (step + i) % 11 == 0:          # no gradient for this param at this step
                grads.append(None)
                t.grad = None
                continue
            idx, vals = _batch(rng, shape, dtype, step + i)
            grads.append(SparseGrad(idx, vals))
            t.grad = _torch_grad(idx, vals, shape)
            counts[i] += 1
        assert opt.step(grads) is True
        ref.step()
        want = [t.numpy() for t in theirs]
        _assert_close(ours, want, scales.update("param", want), dtype, f"param ({row}, step {step})")
        for i, t in enumerate(theirs):
            if t not in ref.state:
                assert i not in opt.state
                continue
            assert int(opt.state[i]["step"]) == ref.state[t]["step"] == counts[i]
        for name in SLOTS:
            have = [i for i, t in enumerate(theirs) if t in ref.state]
            want = [ref.state[theirs[i]][name].numpy() for i in have]
            _assert_close([np.asarray(opt.state[i][name]) for i in have], want,
                          scales.update(name, want), dtype, f"{name} ({row}, step {step})")
    for a, b in zip(ours, init):
        assert np.max(np.abs(a.astype(np.float64) - b)) > 1e-5, "a param did not move"
    return opt


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("row", list(HPARAMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimizer_matches_torch(torch, dtype, row, backend):
    _run_against_torch(torch, dtype, row, backend)


@pytest.mark.skipif(not SIM, reason="the 'cuda' backend runs here under the CUDA simulator "
                                    "(NUMBA_ENABLE_CUDASIM=1)")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_simulator_matches_torch(torch, dtype):
    _run_against_torch(torch, dtype, "fast", "cuda", steps=25, shapes=[(1, 2), (6, 3), (5,)])


def test_empty_gradient_counts_a_step_and_changes_nothing():
    p = np.ones((5, 2), np.float32)
    opt = fo.SparseAdam([p], lr=0.1)
    opt.step([SparseGrad(np.zeros(0, np.int64), np.zeros((0, 2), np.float32))])
    assert int(opt.state[0]["step"]) == 1 and np.all(p == 1)
    assert np.all(opt.state[0]["exp_avg"] == 0) and np.all(opt.state[0]["exp_avg_sq"] == 0)
    opt.step([SparseGrad(np.array([4]), np.ones((1, 2), np.float32))])
    assert int(opt.state[0]["step"]) == 2
    assert np.all(p[:4] == 1) and np.all(p[4] < 1)


# -- (c) what is refused ----------------------------------------------------------------------
def test_dense_gradients_are_refused_and_change_nothing():
    p, q = np.ones((4, 3), np.float32), np.ones(5, np.float32)
    opt = fo.SparseAdam([p, q], lr=0.1)
    sg = SparseGrad(np.array([1]), np.ones((1, 3), np.float32))
    for grads, where in (([sg, np.ones(5, np.float32)], r"grads\[1\] is dense"),
                         ([np.ones((4, 3), np.float32), None], r"grads\[0\] is dense")):
        with pytest.raises(TypeError, match=f"SparseAdam does not support dense gradients \\({where}\\), "
                                            "please consider Adam instead"):
            opt.step(grads)
    assert np.all(p == 1) and np.all(q == 1) and opt.state == {}
    flat = fo.FlatParams([np.ones((4, 3), np.float32)])
    opt2 = fo.SparseAdam(flat)
    with pytest.raises(TypeError, match="FlatParams gradients are dense"):
        opt2.step()
    assert np.all(flat.params[0] == 1) and opt2.state == {}
    # sparse rows of a FlatParams view are fine
    assert opt2.step([SparseGrad(np.array([2]), np.ones((1, 3), np.float32))]) is True
    assert np.all(flat.params[0][2] < 1) and np.all(flat.params[0][[0, 1, 3]] == 1)


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(eps=0.0), "eps"), (dict(eps=-1.0), "eps"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(maximize=1), "maximize"), (dict(lr=float("nan")), "lr"),
])
def test_bad_hyperparameters_are_refused(torch, kwargs, name):
    p = np.ones((3, 2), np.float32)
    with pytest.raises((ValueError, TypeError), match=name):
        fo.SparseAdam([p], **kwargs).step([SparseGrad(np.array([0]), np.ones((1, 2), np.float32))])
    assert np.all(p == 1)
    if name != "maximize":        # torch refuses the same values (it takes any maximize)
        with pytest.raises(ValueError):
            torch.optim.SparseAdam([torch.zeros(3, 2)], **kwargs)


def test_signature_and_defaults_are_torchs(torch):
    import inspect
    mine = inspect.signature(fo.SparseAdam).parameters
    theirs = inspect.signature(torch.optim.SparseAdam).parameters
    assert [n for n in theirs] == [n for n in mine][:len(theirs)]
    for n in ("lr", "betas", "eps", "maximize"):
        assert mine[n].default == theirs[n].default and mine[n].kind == theirs[n].kind, n
    assert SPEC.column_names == SLOTS and not SPEC.sparse.dense


def test_weight_decay_is_not_a_sparse_adam_hyperparameter():
    with pytest.raises(TypeError, match="weight_decay"):
        fo.SparseAdam([np.ones((2, 2))], weight_decay=0.1)


# -- (d) state dicts with torch.optim.SparseAdam -------------------------------------------------
def _to_torch(sd, torch):
    out = {"param_groups": [dict(g) for g in sd["param_groups"]], "state": {}}
    for pid, st in sd["state"].items():
        out["state"][pid] = {k: (int(v) if k == "step" else torch.from_numpy(np.array(v)))
                             for k, v in st.items()}
    return out


def _to_numpy(sd):
    out = {"param_groups": [dict(g) for g in sd["param_groups"]], "state": {}}
    for pid, st in sd["state"].items():
        out["state"][pid] = {k: (v if k == "step" else v.numpy().copy()) for k, v in st.items()}
    return out


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dicts_interchange_with_torch(torch, dtype, direction):
    rng = np.random.default_rng(9)
    shapes = [(12, 3), (1, 2)]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    batches = [[_batch(rng, s, dtype, step) for s in shapes] for step in range(1, 31)]
    hp = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6)
    a = [x.copy() for x in init]
    t = [torch.tensor(x.copy()) for x in init]
    f_opt = fo.SparseAdam(a, **hp)
    t_opt = torch.optim.SparseAdam(t, **hp)

    def step_both(batch):
        f_opt.step([SparseGrad(i, v) for i, v in batch])
        for tt, (i, v), s in zip(t, batch, shapes):
            tt.grad = _torch_grad(i, v, s)
        t_opt.step()

    for batch in batches[:15]:
        if direction == "torch->fastopt":
            for tt, (i, v), s in zip(t, batch, shapes):
                tt.grad = _torch_grad(i, v, s)
            t_opt.step()
        else:
            f_opt.step([SparseGrad(i, v) for i, v in batch])
    if direction == "torch->fastopt":
        sd = _to_numpy(t_opt.state_dict())
        assert isinstance(sd["state"][0]["step"], int)       # torch's step: a Python int
        for x, tt in zip(a, t):
            x[...] = tt.numpy()
        f_opt.load_state_dict(sd)
        assert int(f_opt.state[0]["step"]) == 15
    else:
        sd = f_opt.state_dict()
        assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
        assert sorted(sd["param_groups"][0]) == sorted(t_opt.state_dict()["param_groups"][0])
        for x, tt in zip(a, t):
            tt.data.copy_(torch.from_numpy(x))
        t_opt.load_state_dict(_to_torch(sd, torch))
        assert t_opt.state[t[0]]["step"] == 15
    for batch in batches[15:]:
        step_both(batch)
    for x, tt in zip(a, t):
        scale = float(np.max(np.abs(tt.numpy())))
        _assert_close([x], [tt.numpy()], scale, dtype, f"param after the handoff ({direction})")
    for name in SLOTS:
        for i, tt in enumerate(t):
            want = t_opt.state[tt][name].numpy()
            _assert_close([f_opt.state[i][name]], [want], float(np.max(np.abs(want))) or 1.0, dtype, name)
