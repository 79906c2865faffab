"""The rest of the family: Adamax, NAdam, RAdam, Adadelta (torch parity) and Lion, LAMB,
LARS (optax's equations: the NumPy reference plus hand-derived steps).

Every run feeds identical gradients to fastopt's CPU driver over a list of arrays, the
same over a FlatParams, the NumPy reference (``backend="numpy"``) and, for the
torch-named optimizers, torch.optim (single-tensor path). List and FlatParams must agree
bit for bit; everything else within 1e-6 (float32) / 1e-12 (float64), norm-relative per
tensor (``cases.rel_err``).
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest

import fastopt as fo
from cases import assert_close
from fastopt.family import LAMB, LARS, Adadelta, Adamax, Lion, NAdam, RAdam

STEPS = 200
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
# Empty, single element, 2-D, odd; the last crosses a 65536-element chunk boundary.
SHAPES = [(0,), (1,), (3, 5), (4099,)]
BIG_SHAPES = [(1,), (70001,)]

# (class, torch name or None, base hyperparameters, grid rows): every flag on and off.
FAMILY = {
    "adamax": (Adamax, "Adamax", dict(lr=0.01), [
        {}, dict(weight_decay=0.1, maximize=True), dict(betas=(0.5, 0.9), eps=1e-3)]),
    "nadam": (NAdam, "NAdam", dict(lr=0.01), [
        {}, dict(weight_decay=0.1),
        dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        dict(momentum_decay=0.1, betas=(0.8, 0.99), eps=1e-6)]),
    "radam": (RAdam, "RAdam", dict(lr=0.01), [
        {}, dict(weight_decay=0.1, maximize=True),
        dict(weight_decay=0.1, decoupled_weight_decay=True), dict(betas=(0.9, 0.9), eps=1e-6)]),
    "adadelta": (Adadelta, "Adadelta", dict(lr=0.5), [
        {}, dict(weight_decay=0.1, maximize=True), dict(rho=0.5, eps=1e-4, lr=1.0)]),
    "lion": (Lion, None, dict(lr=1e-3), [
        {}, dict(weight_decay=0.0, maximize=True), dict(betas=(0.5, 0.9), weight_decay=0.1)]),
    "lamb": (LAMB, None, dict(lr=1e-2), [
        {}, dict(weight_decay=0.01), dict(eps_root=1e-8, betas=(0.8, 0.99), weight_decay=0.1)]),
    "lars": (LARS, None, dict(lr=1.0), [
        {}, dict(nesterov=True, weight_decay=1e-2),
        dict(momentum=0.0, eps=1e-3, trust_coefficient=1e-2)]),
}


def _rows(names):
    return [pytest.param(n, row, id=f"{n}-{k}") for n in names for k, row in enumerate(FAMILY[n][3])]


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _init(shapes, dtype, seed, zero_first=False):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if zero_first:          # a zero-initialised tensor (a bias): LAMB/LARS's zero-norm rule
        init[1][...] = 0
    return init


def _train(name, row, dtype, shapes, steps, seed, with_torch):
    """Run list, FlatParams, reference (and torch) side by side; return them at the end."""
    cls, torch_name, base, _ = FAMILY[name]
    hp = {**base, **row}
    init = _init(shapes, dtype, seed, zero_first=torch_name is None)
    lst = [a.copy() for a in init]
    ref = [a.copy() for a in init]
    flat = fo.FlatParams(init)
    opts = {"list": cls(lst, backend="cpu", **hp), "flat": cls(flat, backend="cpu", **hp),
            "numpy": cls(ref, backend="numpy", **hp)}
    tp = topt = None
    if with_torch:
        import torch
        tp = [torch.from_numpy(a.copy()) for a in init]
        topt = getattr(torch.optim, torch_name)(tp, foreach=False, **hp)
    rng = np.random.default_rng(seed + 1)
    for k in range(steps):
        if k == steps // 2:                       # lr changed between steps, as a scheduler does
            for o in list(opts.values()) + ([topt] if topt else []):
                o.param_groups[0]["lr"] *= 0.5
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opts["list"].step(grads)
        for fg, g in zip(flat.grads, grads):
            fg[...] = g
        opts["flat"].step()
        opts["numpy"].step(grads)
        if topt is not None:
            for t, g in zip(tp, grads):
                t.grad = torch.from_numpy(g.copy())
            topt.step()
    return init, lst, flat, ref, opts, tp, topt


def _check_run(name, init, lst, flat, ref, opts, tp, topt, dtype):
    slots = FAMILY[name][0].slot_names
    for a, b in zip(lst, flat.params):
        assert np.array_equal(a, b), "list and FlatParams modes differ"
    assert any(a.size and not np.array_equal(a, i) for a, i in zip(lst, init)), "nothing moved"
    assert_close(lst, ref, dtype, "params vs reference")
    state, ref_state = opts["list"].state, opts["numpy"].state
    for s in slots:
        mine = [state[i][s] for i in range(len(lst)) if i in state]
        theirs = [ref_state[i][s] for i in range(len(ref)) if i in ref_state]
        assert_close(mine, theirs, dtype, f"{s} vs reference")
    if topt is not None:
        tparams = [t.numpy() for t in tp]
        assert_close(lst, tparams, dtype, "params vs torch")
        assert_close(ref, tparams, dtype, "reference vs torch")
        for s in slots:
            mine = [state[i][s] for i in range(len(lst)) if i in state]
            theirs = [topt.state[t][s].numpy() for t in tp if t in topt.state]
            assert_close(mine, theirs, dtype, f"{s} vs torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,row", _rows(["adamax", "nadam", "radam", "adadelta"]))
def test_torch_parity_grid(name, row, dtype):
    """200 steps of every grid row: list, FlatParams, reference and torch.optim agree."""
    pytest.importorskip("torch")
    run = _train(name, row, dtype, SHAPES, STEPS, _seed(name, row, np.dtype(dtype)), True)
    _check_run(name, *run, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,row", _rows(["lion", "lamb", "lars"]))
def test_optax_family_matches_reference(name, row, dtype):
    """200 steps of every grid row: list and FlatParams bit-equal, within RTOL of the reference."""
    run = _train(name, row, dtype, SHAPES, STEPS, _seed(name, row, np.dtype(dtype)), False)
    _check_run(name, *run, dtype)


@pytest.mark.parametrize("name", list(FAMILY))
def test_chunk_boundaries(name):
    """A 70001-element tensor (two chunks in list mode, merged with another in FlatParams
    mode), every flag of the last grid row on, 50 steps."""
    with_torch = FAMILY[name][1] is not None
    if with_torch:
        pytest.importorskip("torch")
    row = FAMILY[name][3][-1]
    run = _train(name, row, np.float32, BIG_SHAPES, 50, _seed("big", name), with_torch)
    _check_run(name, *run, np.float32)


@pytest.mark.parametrize("name", list(FAMILY))
def test_thousands_of_small_tensors(name):
    """1500 tensors of 0 to 36 elements (LAMB and LARS: 1500 rows of per-tensor norms and
    trust ratios), every flag of the last grid row on, 12 steps."""
    with_torch = FAMILY[name][1] is not None
    if with_torch:
        pytest.importorskip("torch")
    shapes = [(k * 7 % 37,) for k in range(1500)]
    row = FAMILY[name][3][-1]
    run = _train(name, row, np.float32, shapes, 12, _seed("many", name), with_torch)
    _check_run(name, *run, np.float32)


# -- hand-derived steps from the published formulas ------------------------------------------
def test_lion_two_steps_by_hand():
    """optax.lion: c = (1-b1) g + b1 m; p -= lr (sign(c) + wd p); m = (1-b2) g + b2 m."""
    lr, b1, b2, wd = 0.1, 0.9, 0.99, 0.01
    p = np.array([1.0, -2.0, 0.5, 3.0])
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    g1 = np.array([0.5, -1.0, 0.0, -4.0])
    opt.step([g1])
    # m = 0: sign(0.1 g1) = sign(g1), and sign(0) = 0 for the third element.
    p1 = np.array([1.0 - 0.1 * (1 + 0.01 * 1.0), -2.0 - 0.1 * (-1 + 0.01 * -2.0),
                   0.5 - 0.1 * (0 + 0.01 * 0.5), 3.0 - 0.1 * (-1 + 0.01 * 3.0)])
    np.testing.assert_allclose(p, p1, rtol=1e-14)
    m1 = 0.01 * g1
    np.testing.assert_allclose(opt.state[0]["exp_avg"], m1, rtol=1e-14)
    g2 = np.array([-0.01, 0.001, 1.0, 3.0])
    opt.step([g2])
    # c = 0.1 g2 + 0.9 m1 = [-0.001+0.0045, 0.0001-0.009, 0.1+0, 0.3-0.036]
    sign2 = np.array([1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(p, p1 - 0.1 * (sign2 + 0.01 * p1), rtol=1e-14)
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
@pytest.mark.parametrize("name", ["lamb", "lars", "nadam"])
def test_max_grad_norm_is_fused_like_the_reference(name):
    """max_grad_norm scales the gradients inside the step; the per-tensor norm pass of
    LAMB and LARS sees the scaled gradients too."""
    cls, _, base, rows = FAMILY[name]
    hp = {**base, **rows[-1], "max_grad_norm": 0.5}
    init = _init(SHAPES, np.float32, _seed("clip", name), zero_first=True)
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = cls(a, backend="cpu", **hp), cls(b, backend="numpy", **hp)
    rng = np.random.default_rng(1)
    for _ in range(20):
        grads = [10 * rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        oa.step(grads)
        ob.step(grads)
    assert oa.last_grad_norm > 0.5
    assert_close(a, b, np.float32, "clipped cpu vs reference")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the simulator is a device")
def test_lamb_and_lars_on_cuda_without_a_device_raise_before_any_change():
    # With a device (or the simulator) they run: tests/test_family_cudasim.py.
    for cls in (LAMB, LARS):
        p = np.zeros(3)
        opt = cls([p], backend="cuda")
        with pytest.raises(fo.BackendUnavailableError):
            opt.step([np.ones(3)])
        assert np.all(p == 0) and opt.state == {}


def test_per_tensor_driver_rejects_merged_tables():
    from fastopt.kernels import cpu, per_tensor
    from fastopt.kernels.lars import lars_element, lars_scalars
    p, g, t = np.zeros(4), np.ones(4), np.zeros(4)
    table = cpu.ChunkTable([p], [g], ([t], None, None))
    with pytest.raises(ValueError, match="merge=False"):
        per_tensor.run(lars_element, table, lars_scalars(0.1, 0.9, 0.0, False, np.float64), [1.0],
                       mode="slot2")


# -- bad hyperparameters name the parameter ---------------------------------------------------
BAD = [
    (Adamax, dict(lr=-1.0), "lr"), (Adamax, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (Adamax, dict(eps=-1e-8), "eps"), (Adamax, dict(weight_decay=-0.1), "weight_decay"),
    (Adamax, dict(maximize=1), "maximize"),
    (NAdam, dict(momentum_decay=-1e-3), "momentum_decay"), (NAdam, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (NAdam, dict(decoupled_weight_decay="yes"), "decoupled_weight_decay"),
    (RAdam, dict(lr=math.nan), "lr"), (RAdam, dict(decoupled_weight_decay=None), "decoupled_weight_decay"),
    (Adadelta, dict(rho=1.5), "rho"), (Adadelta, dict(eps=-1.0), "eps"),
    (Lion, dict(betas=(0.9,)), "betas"), (Lion, dict(weight_decay=-1.0), "weight_decay"),
    (LAMB, dict(eps_root=-1.0), "eps_root"), (LAMB, dict(lr=math.inf), "lr"),
    (LARS, dict(trust_coefficient=-1.0), "trust_coefficient"), (LARS, dict(momentum=-0.5), "momentum"),
    (LARS, dict(nesterov=0), "nesterov"), (LARS, dict(eps=-1.0), "eps"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD, ids=[f"{c.__name__}-{n}" for c, _, n in BAD])
def test_bad_hyperparameters_name_the_parameter(cls, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cls([np.zeros(3)], **kwargs)


def test_bad_hyperparameter_set_later_raises_before_any_change():
    p = np.ones(3)
    opt = Adadelta([p])
    opt.param_groups[0]["rho"] = -0.5
    with pytest.raises(ValueError, match="rho"):
        opt.step([np.ones(3)])
    assert np.array_equal(p, np.ones(3)) and not opt.state
