"""The learning-rate range test on minibatch linear regression, where the answer is known:
plain SGD diverges above 2 / lambda_max of the Hessian X^T X / n."""
import math

import numpy as np
import pytest

import fastopt as fo
from fastopt.lr_finder import LRRangeResult, lr_range_test


class _Regression:
    def __init__(self, seed=0, n=4096, d=20):
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, d)).astype(np.float32)
        self.y = self.X @ rng.standard_normal(d).astype(np.float32) + 0.5 * rng.standard_normal(n).astype(np.float32)
        self.batches = np.random.default_rng(seed + 1)
        self.lr_max = 2.0 / np.linalg.eigvalsh(self.X.T @ self.X / n).max()
        self.calls = 0

    def loss_and_grads(self, w, out=None):
        self.calls += 1
        idx = self.batches.integers(0, len(self.y), 64)
        r = self.X[idx] @ w - self.y[idx]
        g = self.X[idx].T @ r / len(idx)
        if out is not None:
            out[...] = g
            return 0.5 * float(np.mean(r * r)), None
        return 0.5 * float(np.mean(r * r)), [g]


def test_suggestion_in_sensible_range_and_state_restored():
    prob = _Regression()
    w = np.zeros(20, np.float32)
    opt = fo.SGD([w], lr=0.01, momentum=0.9)
    # Some real training first, so there is momentum state to restore.
    for _ in range(3):
        opt.step(prob.loss_and_grads(w)[1])
    w_before, sd_before = w.copy(), opt.state_dict()
    res = lr_range_test(lambda: prob.loss_and_grads(w), opt, start_lr=1e-5, end_lr=10, num_steps=100)
    assert isinstance(res, LRRangeResult)
    assert res.diverged and res.lrs[-1] < 10 and len(res.lrs) < 100
    # Momentum 0.9 multiplies the effective step by 1 / (1 - 0.9) = 10.
    assert 2e-3 < res.suggested_lr < (1 - 0.9) * prob.lr_max
    assert res.suggested_lr < res.min_loss_lr
    assert np.all(np.diff(res.lrs) > 0)
    np.testing.assert_allclose(res.lrs[:3], 1e-5 * 10 ** (6 * np.arange(3) / 99))
    # Restored: params bit for bit, state dict, lr.
    assert w.tobytes() == w_before.tobytes()
    sd = opt.state_dict()
    assert sd["param_groups"] == sd_before["param_groups"]
    assert sd["state"].keys() == sd_before["state"].keys()
    for i in sd["state"]:
        for k in sd["state"][i]:
            assert np.asarray(sd["state"][i][k]).tobytes() == np.asarray(sd_before["state"][i][k]).tobytes()
    assert opt.param_groups[0]["lr"] == 0.01


def test_plain_sgd_stops_near_the_stability_limit():
    prob = _Regression(seed=3)
    w = np.zeros(20, np.float32)
    opt = fo.SGD([w], lr=0.1)
    res = lr_range_test(lambda: prob.loss_and_grads(w), opt, start_lr=1e-4, end_lr=100, num_steps=120)
    assert res.diverged
    assert prob.lr_max < res.lrs[-1] < 4 * prob.lr_max      # stopped just past the limit
    assert 2e-2 < res.suggested_lr < prob.lr_max / 4         # well inside it
    assert np.all(w == 0)


def test_flat_params_adam_and_smoothing_formula(tmp_path):
    prob = _Regression(seed=5)
    flat = fo.FlatParams([np.zeros(20, np.float32)])
    opt = fo.Adam(flat, lr=1e-3)
    res = lr_range_test(lambda: prob.loss_and_grads(flat.params[0], out=flat.grads[0]), opt,
                        start_lr=1e-5, end_lr=1.0, num_steps=40, beta=0.9, plot=tmp_path / "lr.png")
    # Bias-corrected EMA of the recorded losses, recomputed here.
    avg, want = 0.0, []
    for i, loss in enumerate(res.losses):
        avg = 0.9 * avg + 0.1 * loss
        want.append(avg / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(res.smoothed, want, rtol=1e-12)
    assert res.smoothed[0] == res.losses[0]
    assert np.all(flat.data == 0) and opt.state == {}
    png = (tmp_path / "lr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and res.plot_path == str(tmp_path / "lr.png")


def test_restores_after_an_exception_and_nonfinite_loss_stops():
    w = np.ones(3, np.float32)
    opt = fo.SGD([w], lr=0.5)
    calls = []

    def boom():
        calls.append(1)
        if len(calls) == 5:
            raise KeyError("data loader failed")
        return 1.0, [np.ones(3, np.float32)]

    with pytest.raises(KeyError):
        lr_range_test(boom, opt, num_steps=10)
    assert np.all(w == 1) and opt.param_groups[0]["lr"] == 0.5

    losses = iter([3.0, 2.0, math.nan, 1.0])
    res = lr_range_test(lambda: (next(losses), [np.ones(3, np.float32)]), opt, num_steps=4)
    assert res.diverged and len(res.losses) == 2 and res.suggested_lr is None
    assert np.all(w == 1)


@pytest.mark.parametrize("kw,err", [
    (dict(start_lr=0.0), ValueError),
    (dict(start_lr=1.0, end_lr=0.5), ValueError),
    (dict(num_steps=1), ValueError),
    (dict(beta=1.0), ValueError),
    (dict(diverge_threshold=1.0), ValueError),
    (dict(skip_start=-1), ValueError),
])
def test_bad_arguments(kw, err):
    w = np.ones(3, np.float32)
    opt = fo.SGD([w], lr=0.5)
    with pytest.raises(err):
        lr_range_test(lambda: (1.0, [np.ones(3, np.float32)]), opt, **kw)
    with pytest.raises(TypeError):
        lr_range_test("not callable", opt)
