"""Sparse row updates (SparseGrad) against torch's sparse SGD / Adagrad / SparseAdam,
the dense equivalent, and the NumPy reference."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import SparseGrad

R, D = 64, 5

CASES = {
    "sgd": (lambda ps, b: fo.SGD(ps, lr=0.1, backend=b), "SGD", dict(lr=0.1)),
    "sgd-momentum": (lambda ps, b: fo.SGD(ps, lr=0.1, momentum=0.9, backend=b), "SGD",
                     dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-maximize": (lambda ps, b: fo.SGD(ps, lr=0.05, momentum=0.8, nesterov=True,
                                                   maximize=True, backend=b), "SGD",
                              dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
    "adagrad": (lambda ps, b: fo.Adagrad(ps, lr=0.1, lr_decay=0.01, backend=b), "Adagrad",
                dict(lr=0.1, lr_decay=0.01)),
    "adam": (lambda ps, b: fo.Adam(ps, lr=0.01, backend=b), "SparseAdam", dict(lr=0.01)),
    "adam-maximize": (lambda ps, b: fo.Adam(ps, lr=0.01, betas=(0.8, 0.9), maximize=True, backend=b),
                      "SparseAdam", dict(lr=0.01, betas=(0.8, 0.9), maximize=True)),
}


def _rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _batches(rng, steps, dtype):
    for _ in range(steps):
        # duplicates on purpose: they must be summed first
        idx = rng.integers(0, R, size=20)
        yield idx, rng.standard_normal((20, D)).astype(dtype)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_matches_torch_and_reference(name, dtype):
    torch = pytest.importorskip("torch")
    make, torch_name, torch_kw = CASES[name]
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((R, D)).astype(dtype)
    p_cpu, p_ref = p0.copy(), p0.copy()
    t = torch.tensor(p0.copy(), requires_grad=True)
    opt_cpu, opt_ref = make([p_cpu], "cpu"), make([p_ref], "numpy")
    opt_t = getattr(torch.optim, torch_name)([t], **torch_kw)
    for idx, rows in _batches(rng, 30, dtype):
        opt_cpu.step([SparseGrad(idx, rows)])
        opt_ref.step([SparseGrad(idx, rows)])
        t.grad = torch.sparse_coo_tensor(torch.tensor(idx)[None], torch.tensor(rows), (R, D))
        opt_t.step()
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert _rel(p_cpu, t.detach().numpy()) < tol
    assert _rel(p_ref, t.detach().numpy()) < tol
    assert _rel(p_cpu, p_ref) < tol


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "adagrad"])
def test_sparse_equals_dense_step(name):
    """Where semantics agree, a sparse step equals the dense step with zero rows elsewhere."""
    make = CASES[name][0]
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((R, D)).astype(np.float64)
    ps, pd = p0.copy(), p0.copy()
    opt_s, opt_d = make([ps], "cpu"), make([pd], "cpu")
    for idx, rows in _batches(rng, 15, np.float64):
        dense = np.zeros_like(p0)
        np.add.at(dense, idx, rows)
        opt_s.step([SparseGrad(idx, rows)])
        opt_d.step([dense])
    assert _rel(ps, pd) < 1e-12


def test_sparse_only_touches_present_rows_for_adam():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((R, D)).astype(np.float32)
    before = p.copy()
    opt = fo.Adam([p], lr=0.1)
    opt.step([SparseGrad(np.array([3, 7, 3]), np.ones((3, D), np.float32))])
    changed = np.flatnonzero(np.any(p != before, axis=1))
    assert changed.tolist() == [3, 7]
    assert np.all(opt.state[0]["exp_avg"][[0, 1, 2, 4, 5, 6]] == 0)


def test_sparse_mixed_with_dense_grads():
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((R, D)).astype(np.float32)
    w = rng.standard_normal(10).astype(np.float32)
    opt = fo.Adagrad([emb, w], lr=0.1)
    w_ref = w.copy()
    ref = fo.Adagrad([w_ref], lr=0.1, backend="numpy")
    for _ in range(5):
        g = rng.standard_normal(10).astype(np.float32)
        opt.step([SparseGrad(np.array([1, 2]), np.ones((2, D), np.float32)), g])
        ref.step([g])
    assert _rel(w, w_ref) < 1e-6


@pytest.mark.parametrize("bad,match", [
    (lambda: SparseGrad(np.array([0, R]), np.ones((2, D), np.float32)), r"grads\[0\]\.indices"),
    (lambda: SparseGrad(np.array([0, 1]), np.ones((2, D + 1), np.float32)), r"grads\[0\]\.rows has shape"),
    (lambda: SparseGrad(np.array([0, 1]), np.ones((2, D), np.float64)), r"grads\[0\]\.rows has dtype"),
    (lambda: SparseGrad(np.array([0.0, 1.0]), np.ones((2, D), np.float32)), r"1-D integer"),
])
def test_bad_sparse_grad_changes_nothing(bad, match):
    p = np.ones((R, D), np.float32)
    opt = fo.Adam([p], lr=0.1)
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        opt.step([bad()])
    assert np.all(p == 1) and opt.state == {}


def test_sparse_rejected_where_torch_rejects():
    p = np.ones((R, D), np.float32)
    with pytest.raises(ValueError, match="weight_decay"):
        fo.Adam([p], weight_decay=0.1).step([SparseGrad(np.array([0]), np.ones((1, D), np.float32))])
    with pytest.raises(ValueError, match="amsgrad"):
        fo.Adam([p], amsgrad=True).step([SparseGrad(np.array([0]), np.ones((1, D), np.float32))])
    with pytest.raises(TypeError, match="sparse"):
        fo.RMSprop([p]).step([SparseGrad(np.array([0]), np.ones((1, D), np.float32))])
    assert np.all(p == 1)
