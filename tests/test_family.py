"""Optimizer-specific behaviour: hand-derived steps from the published formulas (optax's
Lion, LAMB, LARS; RAdam's threshold), NAdam's per-param ``mu_product`` against torch,
fused clipping before the per-tensor passes, and the per-tensor driver's rules.

The grid parity runs of these optimizers (list, FlatParams, reference and, for the
torch-named ones, torch.optim; chunk boundaries; thousands of small tensors) are those
of every optimizer: tests/test_parity.py and tests/test_database.py over ``cases.ALL_CASES``;
their bad hyperparameters are tests/test_bad_input.py's.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import fastopt as fo
from cases import ALL_CASES, assert_close, case_params, group_of
from fastopt import LAMB, LARS, Lion, NAdam, RAdam

# Empty, single element, 2-D, odd.
SHAPES = [(0,), (1,), (3, 5), (4099,)]


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _init(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    init[1][...] = 0        # a zero-initialised tensor (a bias): LAMB/LARS's zero-norm rule
    return init


# -- hand-derived steps from the published formulas ------------------------------------------
@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_lion_two_steps_by_hand(wd):
    """optax.lion: c = (1-b1) g + b1 m; p -= lr (sign(c) + wd p); m = (1-b2) g + b2 m.
    With weight_decay=0 the decay term is off (a flag of the element)."""
    lr, b1, b2 = 0.1, 0.9, 0.99
    p = np.array([1.0, -2.0, 0.5, 3.0])
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    g1 = np.array([0.5, -1.0, 0.0, -4.0])
    opt.step([g1])
    # m = 0: sign(0.1 g1) = sign(g1), and sign(0) = 0 for the third element.
    p1 = np.array([1.0 - 0.1 * (1 + wd * 1.0), -2.0 - 0.1 * (-1 + wd * -2.0),
                   0.5 - 0.1 * (0 + wd * 0.5), 3.0 - 0.1 * (-1 + wd * 3.0)])
    np.testing.assert_allclose(p, p1, rtol=1e-14)
    m1 = 0.01 * g1
    np.testing.assert_allclose(opt.state[0]["exp_avg"], m1, rtol=1e-14)
    g2 = np.array([-0.01, 0.001, 1.0, 3.0])
    opt.step([g2])
    # c = 0.1 g2 + 0.9 m1 = [-0.001+0.0045, 0.0001-0.009, 0.1+0, 0.3-0.036]
    sign2 = np.array([1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(p, p1 - 0.1 * (sign2 + wd * p1), rtol=1e-14)
    np.testing.assert_allclose(opt.state[0]["exp_avg"], 0.01 * g2 + 0.99 * m1, rtol=1e-14)


def test_lion_optax_docstring_example():
    """optax.lion's docstring: lr 0.003 on sum(x^2) from [1, 2, 3] prints
    1.40E+01, 1.39E+01, 1.39E+01, 1.39E+01, 1.38E+01 (default weight_decay 1e-3)."""
    x = np.array([1.0, 2.0, 3.0], np.float32)
    opt = Lion([x], lr=0.003)
    printed = []
    for _ in range(5):
        opt.step([2 * x])
        printed.append(f"{float(np.sum(x * x)):.2E}")
    assert printed == ["1.40E+01", "1.39E+01", "1.39E+01", "1.39E+01", "1.38E+01"]


def test_lamb_first_step_by_hand():
    """optax.lamb, step 1: m_hat = g, v_hat = g^2, u = g / (|g| + eps) + wd p,
    p -= lr ||p|| / ||u|| u per tensor; a zero param tensor takes ratio 1."""
    lr, eps, wd = 0.1, 1e-6, 0.1
    p = np.array([3.0, 4.0])
    z = np.zeros(2)
    g = np.array([1.0, -2.0])
    opt = LAMB([p, z], lr=lr, eps=eps, weight_decay=wd)
    opt.step([g, g])
    u = np.array([1.0 / (1.0 + eps) + 0.3, -2.0 / (2.0 + eps) + 0.4])
    np.testing.assert_allclose(p, np.array([3.0, 4.0]) - lr * (5.0 / np.linalg.norm(u)) * u, rtol=1e-13)
    np.testing.assert_allclose(z, -lr * np.array([1.0 / (1.0 + eps), -2.0 / (2.0 + eps)]), rtol=1e-13)


def test_lars_two_steps_by_hand():
    """optax.lars: ratio = tc ||p|| / ||g||; s = -lr ratio g; trace t = s + mu t;
    p += t (or s + mu t with Nesterov)."""
    for nesterov in (False, True):
        p = np.array([3.0, 4.0])
        opt = LARS([p], lr=2.0, momentum=0.9, trust_coefficient=1e-3, nesterov=nesterov)
        g1 = np.array([0.6, 0.8])                     # ||g1|| = 1, ||p|| = 5: ratio 5e-3
        opt.step([g1])
        s1 = -2.0 * 5e-3 * g1
        p1 = np.array([3.0, 4.0]) + (s1 + 0.9 * s1 if nesterov else s1)
        np.testing.assert_allclose(p, p1, rtol=1e-14)
        g2 = np.array([0.0, 2.0])
        opt.step([g2])
        s2 = -2.0 * (1e-3 * np.linalg.norm(p1) / 2.0) * g2
        t2 = s2 + 0.9 * s1
        np.testing.assert_allclose(opt.state[0]["trace"], t2, rtol=1e-14)
        np.testing.assert_allclose(p, p1 + (s2 + 0.9 * t2 if nesterov else t2), rtol=1e-14)


def test_radam_switches_to_rectified_steps_at_torch_threshold():
    """rho_t > 5 first holds at step 6 for beta2 = 0.999: steps 1-5 are plain momentum."""
    from fastopt.kernels.radam import rectification
    assert [rectification(t, 0.999)[0] for t in range(1, 8)] == [False] * 5 + [True] * 2
    p = np.zeros(3)
    opt = RAdam([p], lr=0.1)
    opt.step([np.array([1.0, -2.0, 0.0])])
    np.testing.assert_allclose(p, -0.1 * np.array([1.0, -2.0, 0.0]), rtol=1e-14)


# -- NAdam's per-parameter mu_product ---------------------------------------------------------
def test_nadam_mu_product_state_dict_matches_torch_and_resumes(tmp_path):
    """mu_product is torch's float32 running product; a torch state dict loads and the
    run continues exactly as torch's does (also when beta1 changes between steps)."""
    torch = pytest.importorskip("torch")
    from cases import sd_to_numpy
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(7), rng.standard_normal((2, 3))]
    tp = [torch.from_numpy(a.copy()) for a in init]
    topt = torch.optim.NAdam(tp, lr=0.01, foreach=False)
    mine = [a.copy() for a in init]
    opt = NAdam(mine, lr=0.01)
    for k in range(12):
        beta1 = 0.9 if k < 6 else 0.8                # a momentum schedule (OneCycleLR does this)
        topt.param_groups[0]["betas"] = (beta1, 0.999)
        opt.param_groups[0]["betas"] = (beta1, 0.999)
        grads = [rng.standard_normal(a.shape) for a in init]
        for t, g in zip(tp, grads):
            t.grad = torch.from_numpy(g.copy())
        topt.step()
        opt.step(grads)
    tsd = sd_to_numpy(topt.state_dict())
    sd = opt.state_dict()
    for i in range(2):
        assert sd["state"][i]["mu_product"].dtype == np.float32
        assert sd["state"][i]["mu_product"] == tsd["state"][i]["mu_product"]
        assert opt.state[i]["mu_product"] == tsd["state"][i]["mu_product"]
    # Resume from torch's state dict in a fresh optimizer; continue both.
    resumed = [t.numpy().copy() for t in tp]
    opt2 = NAdam(resumed, lr=0.01)
    opt2.load_state_dict(tsd)
    for _ in range(5):
        grads = [rng.standard_normal(a.shape) for a in init]
        for t, g in zip(tp, grads):
            t.grad = torch.from_numpy(g.copy())
        topt.step()
        opt2.step(grads)
    assert_close(resumed, [t.numpy() for t in tp], np.float64, "resumed vs torch")
    # fastopt's own checkpoint keeps mu_product (a 0-d float32 array) too.
    fo.save(tmp_path / "nadam.npz", opt2.state_dict())
    opt3 = NAdam([a.copy() for a in resumed], lr=0.01)
    opt3.load_state_dict(fo.load(tmp_path / "nadam.npz"))
    assert opt3.state[1]["mu_product"] == opt2.state[1]["mu_product"]
    bad = sd_to_numpy(topt.state_dict())
    bad["state"][0]["mu_product"] = np.array([1.0, 2.0], np.float32)
    with pytest.raises(ValueError, match="mu_product"):
        opt2.load_state_dict(bad)


# -- fused global-norm clipping and the per-tensor passes --------------------------------------
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_max_grad_norm_is_fused_like_the_reference(case):
    """max_grad_norm scales the gradients inside the step; the per-tensor norm pass of
    LAMB and LARS sees the scaled gradients too, and NAdam's host state is untouched by it."""
    hp = {**case.hp(), "max_grad_norm": 0.5}
    init = _init(SHAPES, np.float32, _seed("clip", case.name))
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = case.fo_cls(a, backend="cpu", **hp), case.fo_cls(b, backend="numpy", **hp)
    rng = np.random.default_rng(1)
    for _ in range(20):
        grads = [10 * rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        oa.step(grads)
        ob.step(grads)
    assert oa.last_grad_norm > 0.5
    assert oa.last_grad_norm == pytest.approx(ob.last_grad_norm, rel=1e-6)
    assert_close(a, b, np.float32, "clipped cpu vs reference")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the simulator is a device")
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_cuda_without_a_device_raises_before_any_change(case):
    # With a device (or the simulator) they run: tests/test_database.py, test_family_cudasim.py.
    p = np.zeros(3)
    opt = case.fo_cls([p], backend="cuda", **case.hp())
    with pytest.raises(fo.BackendUnavailableError):
        opt.step([np.ones(3)])
    assert np.all(p == 0) and opt.state == {}


def test_per_tensor_driver_rejects_merged_tables():
    from fastopt.kernels import cpu, per_tensor
    from fastopt.kernels.lars import SPEC, lars_element, lars_scalars
    p, g, t = np.zeros(4), np.ones(4), np.zeros(4)
    table = cpu.ChunkTable([p], [g], ([t], None, None))
    h = lars_scalars(group_of(SPEC, lr=0.1, momentum=0.9), 1, np.float64)
    with pytest.raises(ValueError, match="merge=False"):
        per_tensor.run(lars_element, table, h, [1.0], mode="slot2")
