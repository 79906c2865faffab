"""Muon and MuonWithAuxAdam against torch.optim.Muon (and torch.optim.AdamW), the NumPy
reference, and bad input.

Oracles and tolerances:

(a) torch.optim.Muon with its Newton-Schulz (NS) run in the param's dtype: torch's own
    ``_zeropower_via_newtonschulz`` starts with ``grad.bfloat16()``; the fixture
    ``torch_ns_in_param_dtype`` makes ``Tensor.bfloat16`` return a copy in the same dtype
    for the test's duration, so every other line of torch's step (its lerps, transposition
    rule, norm clamp, addmm iteration, lr adjustment, weight decay) runs as shipped. Then
    the two differ by rounding only: the momentum buffers (same lerp forms; torch may fuse
    a multiply-add) by a few ulp of the gradients' scale, and the params by NS's rounding
    (BLAS blocking orders differ, fastopt computes ``A A`` as ``A A^T`` and ``a X + B X`` as
    ``(B + a I) X``), which enters each step through ``lr * ratio * O``. The bound is
    ``steps * (lr * ratio * 64 ulp + 4 ulp * max|p|)``: 64 ulp of NS's unit-scale output
    per step (measured: about 3 float32 ulp per step, 1e-15 in float64 over 100 steps)
    plus the params' own rounding. A wrong lerp form, Nesterov blend, ratio, transposition
    or decay order moves a param by about ``lr`` per step: 1e3-1e9 times these bounds.
(b) torch.optim.Muon as shipped (NS in bfloat16): torch's params are reset to fastopt's
    before every step, so a step's difference is ``lr * ratio * (O_fastopt - O_torch)`` for
    the same input. bfloat16 keeps 8 significant bits (rounding 2^-9 = 2e-3 relative), and
    NS's quintic multiplies a small singular value by up to a = 3.4 per iteration, so the
    rounding of the small singular directions grows: measured (this test's rows, 110
    steps) ||O - O_torch||_F / ||O_torch||_F up to 9.6% (an 8x8 matrix), median 2-3%.
    Bounds: 20% per step, 6% median. A wrong ratio (2x for 24x6), a Nesterov blend for
    a plain one or a lost momentum is 50% or more.
(c) The NumPy reference (kernels/reference_muon.py, the "numpy" backend, per matrix,
    transposed as torch) against the fused driver: (a)'s bound.
(d) Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``; skipped otherwise): the "cuda"
    backend's fused momentum and update kernels, with Newton-Schulz through the same
    batched code on the array module of the params (NumPy there, as the simulator's
    device arrays are NumPy arrays; CuPy's matmul on a GPU is not exercised here), against
    torch with (a)'s bound. The simulator runs a step in about a second, so these runs
    are 10 steps long.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import muon as kmuon
from fastopt.kernels import reference_muon

from cases import needs, optional_module

torch = optional_module("torch")
needs_torch = needs(torch, "torch.optim.Muon is the oracle")

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
BACKENDS = ["cpu", "numpy"]
DTYPES = [np.float32, np.float64]
ULP = {np.float32: float(np.finfo(np.float32).eps), np.float64: float(np.finfo(np.float64).eps)}
STEPS = 110

SHAPE_SETS = {
    "square": [(8, 8), (8, 8), (16, 16)],
    "tall-wide": [(24, 6), (6, 24), (17, 5), (5, 17)],
    "vectors": [(1, 9), (9, 1), (1, 1), (1, 2)],
    "odd": [(33, 17), (7, 31), (3, 3), (17, 33)],
    "empty": [(0, 4), (4, 4), (1, 3)],      # (torch raises ZeroDivisionError for (m, 0))
    "chunk-edge": [(257, 260), (7, 5)],       # 66820 elements: more than one 65536-element chunk
}
HYPERS = {
    "defaults": dict(lr=0.02),
    "no-nesterov": dict(lr=0.02, nesterov=False),
    "match-rms": dict(lr=0.01, adjust_lr_fn="match_rms_adamw", weight_decay=0.05),
    "original-wd": dict(lr=0.03, adjust_lr_fn="original", weight_decay=0.3),
    # momentum >= 0.5: the buffer's lerp takes its first form, Nesterov's its second
    "momentum-0.6-3steps": dict(lr=0.02, momentum=0.6, ns_steps=3),
    # momentum < 0.5: the other forms of both lerps; ns_steps even
    "momentum-0.3-4steps-no-wd": dict(lr=0.02, momentum=0.3, ns_steps=4, weight_decay=0.0),
    "ns0-coefficients": dict(lr=0.01, ns_steps=0),
    "coefficients": dict(lr=0.02, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=7, eps=1e-3),
}


def _grads(rng, shapes, dtype, step):
    # scales differ per tensor and step (the NS normalisation and eps clamp matter)
    return [np.asarray(rng.standard_normal(s) * (0.5 + (k + step) % 3), dtype=dtype)
            for k, s in enumerate(shapes)]


def _ratio_max(shapes, hyper):
    return max([kmuon.lr_ratio(s, hyper.get("adjust_lr_fn")) for s in shapes if 0 not in s] + [1.0])


def _bound(shapes, hyper, dtype, steps, pmax):
    lr = hyper["lr"]
    return steps * (lr * _ratio_max(shapes, hyper) * 64 * ULP[dtype] + 4 * ULP[dtype] * pmax)


@pytest.fixture
def torch_ns_in_param_dtype(monkeypatch):
    """torch's NS in the param's dtype: ``Tensor.bfloat16`` returns a same-dtype copy."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())


def _torch_params(params):
    return [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]


def _set_torch_grads(tparams, grads):
    for t, g in zip(tparams, grads):
        t.grad = torch.tensor(g)


def _compare_with_torch(shapes, dtype, hyper, backend, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = _torch_params(params)
    opt = fo.Muon(params, backend=backend, **hyper)
    topt = torch.optim.Muon(tparams, **hyper)
    for step in range(steps):
        grads = _grads(rng, shapes, dtype, step)       # new arrays every step
        opt.step(grads)
        _set_torch_grads(tparams, grads)
        topt.step()
    pmax = max([float(np.abs(p).max()) for p in params if p.size] + [1.0])
    bound = _bound(shapes, hyper, dtype, steps, pmax)
    for k, (p, t) in enumerate(zip(params, tparams)):
        err = float(np.abs(p - t.detach().numpy()).max()) if p.size else 0.0
        assert err <= bound, (k, p.shape, err, bound)
        buf, tbuf = opt.state[k]["momentum_buffer"], topt.state[t]["momentum_buffer"].numpy()
        gmax = 3.5 * 5                                   # |g| < 5 sigma at scale 3.5
        assert np.abs(buf - tbuf).max(initial=0.0) <= 8 * ULP[dtype] * gmax
        assert set(opt.state[k]) == set(topt.state[t]) == {"momentum_buffer"}
    return params


# -- (a) against torch.optim.Muon with NS in the param's dtype -----------------------------------
@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
def test_matches_torch_over_hyperparameters(torch_ns_in_param_dtype, hyper, dtype, backend):
    _compare_with_torch(SHAPE_SETS["square"] + SHAPE_SETS["tall-wide"], dtype, HYPERS[hyper], backend)


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_matches_torch_over_shapes(torch_ns_in_param_dtype, shapes, dtype, backend):
    steps = 30 if shapes == "chunk-edge" else STEPS
    _compare_with_torch(SHAPE_SETS[shapes], dtype, dict(lr=0.02, weight_decay=0.05), backend, steps)


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_many_small_matrices_of_mixed_shapes(torch_ns_in_param_dtype, dtype, backend):
    rng = np.random.default_rng(7)
    kinds = [(4, 4), (3, 8), (8, 3), (1, 6), (6, 1), (5, 5), (2, 9)]
    shapes = [kinds[i] for i in rng.integers(0, len(kinds), 300)]
    _compare_with_torch(shapes, dtype, dict(lr=0.01, adjust_lr_fn="match_rms_adamw"), backend,
                        steps=100, seed=3)


@needs_torch
def test_hyperparameter_edits_between_steps_match_torch(torch_ns_in_param_dtype):
    """lr, momentum, nesterov, ns_steps (parity too) and adjust_lr_fn changed mid-run, in
    two groups; the same edits on torch."""
    rng = np.random.default_rng(1)
    shapes = [(6, 4), (4, 6), (5, 5)]
    params = [rng.standard_normal(s) for s in shapes]
    tparams = _torch_params(params)
    groups = lambda ps: [dict(params=ps[:2], lr=0.02), dict(params=ps[2:], lr=0.01, momentum=0.9)]  # noqa: E731
    opt, topt = fo.Muon(groups(params)), torch.optim.Muon(groups(tparams))
    edits = {20: dict(lr=0.005), 40: dict(ns_steps=4), 60: dict(nesterov=False, momentum=0.4),
             80: dict(adjust_lr_fn="match_rms_adamw", ns_steps=1)}
    for step in range(100):
        for gi, edit in ((step % 2, edits.get(step, {})),):
            for o in (opt, topt):
                o.param_groups[gi].update(edit)
        grads = _grads(rng, shapes, np.float64, step)
        opt.step(grads)
        _set_torch_grads(tparams, grads)
        topt.step()
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=0, atol=1e-12)


# -- (b) against torch.optim.Muon as shipped (NS in bfloat16) -------------------------------------
@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", ["defaults", "no-nesterov", "match-rms", "momentum-0.3-4steps-no-wd"])
def test_matches_torch_bfloat16_newton_schulz_within_its_rounding(hyper, dtype):
    hyper = HYPERS[hyper]
    shapes = SHAPE_SETS["square"] + SHAPE_SETS["tall-wide"] + [(1, 9), (9, 1)]
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = _torch_params(params)
    opt, topt = fo.Muon(params, **hyper), torch.optim.Muon(tparams, **hyper)
    lr = hyper["lr"]
    rels = []
    for step in range(STEPS):
        with torch.no_grad():
            for p, t in zip(params, tparams):
                t.copy_(torch.from_numpy(p))
        before = [p.copy() for p in params]
        grads = _grads(rng, shapes, dtype, step)
        opt.step(grads)
        _set_torch_grads(tparams, grads)
        topt.step()
        decay = 1 - lr * hyper.get("weight_decay", 0.1)
        for s, p, p0, t in zip(shapes, params, before, tparams):
            scale = lr * kmuon.lr_ratio(s, hyper.get("adjust_lr_fn"))
            o = (p0 * decay - p) / scale                       # fastopt's O
            o_torch = (p0 * decay - t.detach().numpy()) / scale
            rels.append(float(np.linalg.norm(o - o_torch) / np.linalg.norm(o_torch)))
    assert max(rels) <= 0.2, max(rels)
    assert np.median(rels) <= 0.06, np.median(rels)
    assert max(rels) > 1e-3          # it is bfloat16 (else the oracle was patched)


# -- (c) the reference and the drivers ----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_reference_is_the_numpy_backend_and_agrees_with_the_driver(dtype):
    rng = np.random.default_rng(11)
    shapes = SHAPE_SETS["odd"] + SHAPE_SETS["vectors"]
    hyper = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    base = [rng.standard_normal(s).astype(dtype) for s in shapes]
    runs = {b: [p.copy() for p in base] for b in ("cpu", "numpy")}
    ref = [p.copy() for p in base]
    bufs = [np.zeros_like(p) for p in base]
    opts = {b: fo.Muon(ps, backend=b, **hyper) for b, ps in runs.items()}
    for step in range(STEPS):
        grads = _grads(rng, shapes, dtype, step)
        for o in opts.values():
            o.step(grads)
        reference_muon.muon(ref, grads, bufs, **hyper)
    bound = _bound(shapes, hyper, dtype, STEPS, 4.0)
    for a, b, r in zip(runs["cpu"], runs["numpy"], ref):
        assert np.array_equal(b, r)                  # the numpy backend is the reference
        assert np.abs(a - r).max() <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_matrices_are_left_as_they_are(backend):
    """A (0, n) or (m, 0) param has nothing to update (torch.optim.Muon divides by its zero
    column count for (m, 0) and raises ZeroDivisionError); its buffer is empty state."""
    params = [np.ones((3, 0)), np.ones((0, 2)), np.ones((2, 2))]
    opt = fo.Muon(params, lr=0.1, backend=backend)
    opt.step([np.ones((3, 0)), np.ones((0, 2)), np.eye(2)])
    assert opt.state[0]["momentum_buffer"].shape == (3, 0)
    assert not np.array_equal(params[2], np.ones((2, 2)))


def test_reference_newton_schulz_orthogonalises():
    """The reference's NS maps singular values into (0.5, 1.5) (the quintic's promise),
    for a tall and a wide matrix: an independent check of the oracle."""
    rng = np.random.default_rng(2)
    for shape in ((40, 12), (12, 40)):
        u = rng.standard_normal(shape) @ np.diag(np.geomspace(1, 50, shape[1]))
        o = reference_muon.zeropower(u, (kmuon.DEFAULT_A, kmuon.DEFAULT_B, kmuon.DEFAULT_C), 5, 1e-7)
        sv = np.linalg.svd(o, compute_uv=False)
        assert o.shape == shape and 0.5 < sv.min() and sv.max() < 1.5, sv


# -- state dicts ----------------------------------------------------------------------------------
def _torch_sd(sd):
    """A fastopt state dict with torch tensors (what torch.optim's load expects)."""
    return {"state": {i: {k: torch.tensor(v) for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _numpy_sd(sd):
    return {"state": {i: {k: v.numpy() for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


@needs_torch
@pytest.mark.parametrize("direction", ["fastopt->torch", "torch->fastopt"])
def test_state_dicts_load_both_ways_and_continue(torch_ns_in_param_dtype, direction, tmp_path):
    rng = np.random.default_rng(4)
    shapes = [(6, 4), (4, 6), (3, 3)]
    hyper = dict(lr=0.02, weight_decay=0.05, momentum=0.9, ns_steps=4, adjust_lr_fn="match_rms_adamw")
    params = [rng.standard_normal(s) for s in shapes]
    tparams = _torch_params(params)
    opt, topt = fo.Muon(params, **hyper), torch.optim.Muon(tparams, **hyper)
    for step in range(50):
        grads = _grads(rng, shapes, np.float64, step)
        opt.step(grads)
        _set_torch_grads(tparams, grads)
        topt.step()
    # fresh optimizers over copies of the params, loaded from the other side
    p2 = [p.copy() for p in params]
    t2 = _torch_params([t.detach().numpy() for t in tparams])
    o2, to2 = fo.Muon(p2), torch.optim.Muon(t2)
    if direction == "fastopt->torch":
        fo.save(tmp_path / "muon.npz", opt.state_dict())
        sd = fo.load(tmp_path / "muon.npz")
        to2.load_state_dict(_torch_sd(sd))
        o2.load_state_dict(sd)
    else:
        sd = _numpy_sd(topt.state_dict())
        o2.load_state_dict(sd)
        # (torch's state_dict holds references: a load would share topt's buffers)
        to2.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert o2.param_groups[0]["ns_steps"] == 4 and to2.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    for step in range(50, 110):
        grads = _grads(rng, shapes, np.float64, step)
        for o in (opt, o2):
            o.step(grads)
        for o, ps in ((topt, tparams), (to2, t2)):
            _set_torch_grads(ps, grads)
            o.step()
    for a, b, c, d in zip(params, p2, tparams, t2):
        # the fresh fastopt (b) and torch (d) optimizers continue together; the one loaded
        # from its own kind's state dict continues that run exactly
        np.testing.assert_allclose(b, d.detach().numpy(), rtol=0, atol=1e-12)
        if direction == "fastopt->torch":
            assert np.array_equal(a, b)
        else:
            assert np.array_equal(c.detach().numpy(), d.detach().numpy())
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@needs_torch
def test_state_dict_layout_is_torchs():
    params = [np.ones((3, 2)), np.ones((2, 2))]
    opt = fo.Muon(params, lr=0.1)
    assert opt.state_dict()["state"] == {}
    opt.step([np.ones((3, 2)), None])
    sd = opt.state_dict()
    tp = _torch_params(params)
    topt = torch.optim.Muon(tp, lr=0.1)
    tp[0].grad = torch.ones(3, 2, dtype=torch.float64)
    topt.step()
    tsd = topt.state_dict()
    assert set(sd["state"]) == set(tsd["state"]) == {0}
    assert set(sd["state"][0]) == set(tsd["state"][0]) == {"momentum_buffer"}
    mine = {k: v for k, v in sd["param_groups"][0].items()}
    assert mine == tsd["param_groups"][0]


def test_state_dict_load_refuses_and_changes_nothing():
    params = [np.ones((3, 2))]
    opt = fo.Muon(params)
    opt.step([np.full((3, 2), 0.5)])
    before = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][0]["momentum_buffer"] = np.zeros((2, 3))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["param_groups"][0]["ns_steps"] = 100
    with pytest.raises(ValueError, match="ns_steps"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert np.array_equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])
    assert after["param_groups"] == before["param_groups"]


# -- the parts around the step ----------------------------------------------------------------------
def test_same_grad_arrays_written_in_place_and_flat_params_match_lists():
    rng = np.random.default_rng(9)
    shapes = [(5, 7), (7, 5), (5, 7)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    listed = [p.copy() for p in base]
    flat = fo.FlatParams([p.copy() for p in base])
    o1, o2 = fo.Muon(listed, lr=0.05), fo.Muon(flat, lr=0.05)
    fixed = [np.zeros(s, np.float32) for s in shapes]
    for step in range(20):
        grads = _grads(rng, shapes, np.float32, step)
        for f, g in zip(fixed, grads):
            f[...] = g
        o1.step(fixed)                              # the same arrays every step: cached tables
        for view, g in zip(flat.grads, grads):
            view[...] = g
        o2.step()
    for a, b in zip(listed, flat.params):
        assert np.array_equal(a, b)


def test_grad_scale_and_max_grad_norm_scale_the_gradients():
    rng = np.random.default_rng(3)
    shapes = [(6, 6), (4, 9)]
    base = [rng.standard_normal(s) for s in shapes]
    a, b, c = ([p.copy() for p in base] for _ in range(3))
    oa, ob = fo.Muon(a, lr=0.02, momentum=0.5), fo.Muon(b, lr=0.02, momentum=0.5)
    oc = fo.Muon(c, lr=0.02, momentum=0.5, max_grad_norm=1.0)
    bufs = [np.zeros_like(p) for p in base]
    ref = [p.copy() for p in base]
    for step in range(10):
        grads = _grads(rng, shapes, np.float64, step)
        oa.step(grads)
        ob.step([4.0 * g for g in grads], grad_scale=0.25)
        oc.step(grads)
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        reference_muon.muon(ref, grads, bufs, lr=0.02, momentum=0.5,
                            grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-13)
    for x, r in zip(c, ref):
        np.testing.assert_allclose(x, r, rtol=0, atol=1e-12)
    assert not np.allclose(a[0], c[0])               # the clip acted


def test_phase_times_split_the_step():
    opt = fo.Muon([np.ones((8, 8), np.float32)])
    opt.phase_times = {}
    opt.step([np.ones((8, 8), np.float32)])
    assert set(opt.phase_times) == {"momentum", "newton_schulz", "update"}
    assert all(t >= 0 for t in opt.phase_times.values())


@needs_torch
def test_defaults_and_signature_are_torchs():
    import inspect
    ref = inspect.signature(torch.optim.Muon).parameters
    mine = inspect.signature(fo.Muon).parameters
    assert [(n, p.default) for n, p in mine.items()][1:len(ref)] == \
        [(n, p.default) for n, p in ref.items()][1:]
    assert fo.Muon([np.ones((2, 2))]).param_groups[0]["ns_coefficients"] == (3.4445, -4.775, 2.0315)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_non_matrix_params_are_refused_with_a_clear_message(shape):
    with pytest.raises(ValueError, match=r"params'\]\[1\] has shape .*only supports 2-D"):
        fo.Muon([np.ones((2, 2)), np.ones(shape)])
    opt = fo.Muon([np.ones((2, 2))])
    opt.step([np.ones((2, 2))])
    before = opt.state_dict()
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [np.ones((3, 3)), np.ones(shape)]})
    assert len(opt.param_groups) == 1 and opt.state_dict()["param_groups"] == before["param_groups"]


def test_a_non_matrix_swapped_into_a_group_is_refused_before_anything_changes():
    p0, p1 = np.ones((3, 3)), np.ones((2, 2))
    opt = fo.Muon([dict(params=[p0]), dict(params=[p1])], lr=0.1)
    opt.param_groups[1]["params"][0] = np.ones(4)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] has shape \(4,\)"):
        opt.step([np.ones((3, 3)), np.ones(4)])
    assert np.array_equal(p0, np.ones((3, 3))) and len(opt.state) == 0


@pytest.mark.parametrize("name", ["ns_coefficients", "ns_steps", "adjust_lr_fn"])
def test_bad_hyperparameters_are_refused_naming_them(name):
    hyper = next(h for h in kmuon.SPEC.hypers if h.name == name)
    assert hyper.bad
    for value in hyper.bad:
        with pytest.raises((ValueError, TypeError), match=name):
            fo.Muon([np.ones((2, 2))], **{name: value})
    p = np.ones((2, 2))
    opt = fo.Muon([p])
    opt.param_groups[0][name] = hyper.bad[0]
    with pytest.raises((ValueError, TypeError), match=name):
        opt.step([np.ones((2, 2))])
    assert np.array_equal(p, np.ones((2, 2))) and len(opt.state) == 0


@pytest.mark.parametrize("kw,value", [("lr", -1.0), ("momentum", -0.1), ("weight_decay", -1.0),
                                      ("eps", float("nan")), ("nesterov", 1)])
def test_bad_numbers_are_refused(kw, value):
    with pytest.raises((ValueError, TypeError), match=kw):
        fo.Muon([np.ones((2, 2))], **{kw: value})


@pytest.mark.parametrize("option", [dict(master_weights=True), dict(kahan_sum=True),
                                    dict(stochastic_rounding=True), dict(state_format="int8")])
def test_unsupported_options_are_refused(option):
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        fo.Muon([np.ones((2, 2), np.float32)], **option)


# -- MuonWithAuxAdam ----------------------------------------------------------------------------
MUON_SHAPES = [(8, 8), (12, 5), (5, 12)]
ADAM_SHAPES = [(8,), (3, 5), (1,), (2, 3, 4), ()]


def _aux_pair(rng, dtype, amsgrad=False):
    mp = [rng.standard_normal(s).astype(dtype) for s in MUON_SHAPES]
    ap = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in ADAM_SHAPES]
    muon_hyper = dict(lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    adam_hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.05, amsgrad=amsgrad)
    groups = [dict(params=mp, use_muon=True, **muon_hyper), dict(params=ap, use_muon=False, **adam_hyper)]
    tm, ta = _torch_params(mp), _torch_params(ap)
    return (mp, ap, groups, tm, ta, torch.optim.Muon(tm, **muon_hyper),
            torch.optim.AdamW(ta, **adam_hyper))


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_muon_with_aux_adam_matches_the_torch_pair(torch_ns_in_param_dtype, amsgrad, dtype, backend):
    rng = np.random.default_rng(6)
    mp, ap, groups, tm, ta, tmuon, tadam = _aux_pair(rng, dtype, amsgrad)
    opt = fo.MuonWithAuxAdam(groups, backend=backend)
    for step in range(STEPS):
        grads = _grads(rng, MUON_SHAPES + ADAM_SHAPES, dtype, step)
        opt.step(grads)
        _set_torch_grads(tm + ta, grads)
        tmuon.step()
        tadam.step()
    bound = _bound(MUON_SHAPES, groups[0], dtype, STEPS, 4.0)
    for p, t in zip(mp, tm):
        assert np.abs(p - t.detach().numpy()).max() <= bound
    for p, t in zip(ap, ta):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=64 * ULP[dtype], atol=64 * ULP[dtype])


@needs_torch
def test_muon_with_aux_adam_one_state_dict_round_trips_and_matches_the_pair(torch_ns_in_param_dtype,
                                                                            tmp_path):
    rng = np.random.default_rng(8)
    mp, ap, groups, tm, ta, tmuon, tadam = _aux_pair(rng, np.float64)
    opt = fo.MuonWithAuxAdam(groups)
    for step in range(40):
        grads = _grads(rng, MUON_SHAPES + ADAM_SHAPES, np.float64, step)
        opt.step(grads)
        _set_torch_grads(tm + ta, grads)
        tmuon.step()
        tadam.step()
    sd = opt.state_dict()
    n_muon = len(MUON_SHAPES)
    # its one state dict is the two torch ones side by side
    assert [g["use_muon"] for g in sd["param_groups"]] == [True, False]
    for i in range(n_muon):
        assert set(sd["state"][i]) == {"momentum_buffer"}
    for i in range(n_muon, n_muon + len(ADAM_SHAPES)):
        assert set(sd["state"][i]) == {"exp_avg", "exp_avg_sq", "step"} and sd["state"][i]["step"] == 40
    tm_sd, ta_sd = tmuon.state_dict(), tadam.state_dict()
    for i in range(n_muon):
        np.testing.assert_allclose(sd["state"][i]["momentum_buffer"],
                                   tm_sd["state"][i]["momentum_buffer"].numpy(), rtol=0, atol=1e-14)
    for k in range(len(ADAM_SHAPES)):
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(sd["state"][n_muon + k][key], ta_sd["state"][k][key].numpy(),
                                       rtol=1e-14, atol=1e-15)
    # (1) round trip through a file into a fresh optimizer
    fo.save(tmp_path / "aux.npz", sd)
    copies = [p.copy() for p in mp], [p.copy() for p in ap]
    o2 = fo.MuonWithAuxAdam([dict(params=copies[0], use_muon=True), dict(params=copies[1], use_muon=False)])
    o2.load_state_dict(fo.load(tmp_path / "aux.npz"))
    # (2) the torch pair's two state dicts merged, loaded into a third
    merged = {"state": {**{i: {k: v.numpy() for k, v in st.items()} for i, st in tm_sd["state"].items()},
                        **{n_muon + i: {k: v.numpy() for k, v in st.items()} for i, st in ta_sd["state"].items()}},
              "param_groups": [{**tm_sd["param_groups"][0], "use_muon": True},
                               {**ta_sd["param_groups"][0], "use_muon": False,
                                "params": [n_muon + i for i in ta_sd["param_groups"][0]["params"]]}]}
    copies3 = [t.detach().numpy().copy() for t in tm], [t.detach().numpy().copy() for t in ta]
    o3 = fo.MuonWithAuxAdam([dict(params=copies3[0], use_muon=True), dict(params=copies3[1], use_muon=False)])
    o3.load_state_dict(merged)
    assert o3.param_groups[1]["betas"] == (0.9, 0.95) and o3.param_groups[0]["lr"] == 0.02
    for step in range(40, 110):
        grads = _grads(rng, MUON_SHAPES + ADAM_SHAPES, np.float64, step)
        for o in (opt, o2, o3):
            o.step(grads)
        _set_torch_grads(tm + ta, grads)
        tmuon.step()
        tadam.step()
    for a, b, c, t in zip(mp + ap, copies[0] + copies[1], copies3[0] + copies3[1], tm + ta):
        assert np.array_equal(a, b)
        np.testing.assert_allclose(c, t.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_muon_with_aux_adam_refuses_bad_groups_before_anything_changes():
    with pytest.raises(ValueError, match="use_muon"):
        fo.MuonWithAuxAdam([dict(params=[np.ones((2, 2))])])
    with pytest.raises(ValueError, match=r"has shape \(3,\).*2-D"):
        fo.MuonWithAuxAdam([dict(params=[np.ones((2, 2)), np.ones(3)], use_muon=True)])
    with pytest.raises(TypeError, match="betas"):
        fo.MuonWithAuxAdam([dict(params=[np.ones((2, 2))], use_muon=True, betas=(0.9, 0.95))])
    with pytest.raises(TypeError, match="ns_steps"):
        fo.MuonWithAuxAdam([dict(params=[np.ones(2)], use_muon=False, ns_steps=3)])
    with pytest.raises(TypeError, match="param-group dicts"):
        fo.MuonWithAuxAdam([np.ones((2, 2))])
    w, b = np.ones((2, 2)), np.ones(2)
    opt = fo.MuonWithAuxAdam([dict(params=[w], use_muon=True), dict(params=[b], use_muon=False)])
    opt.param_groups[1]["use_muon"] = True
    with pytest.raises(ValueError, match="use_muon"):
        opt.step([np.ones((2, 2)), np.ones(2)])
    assert np.array_equal(w, np.ones((2, 2))) and np.array_equal(b, np.ones(2)) and len(opt.state) == 0
    opt.param_groups[1]["use_muon"] = False
    opt.step([np.ones((2, 2)), np.ones(2)])
    sd = opt.state_dict()
    sd["param_groups"][0]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon"):
        opt.load_state_dict(sd)


# -- (d) the CUDA backend under the simulator -------------------------------------------------------
cuda_sim = pytest.mark.skipif(not SIM, reason="runs under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")


@needs_torch
@cuda_sim
@pytest.mark.cudasim
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("hyper", ["defaults", "no-nesterov", "momentum-0.3-4steps-no-wd",
                                   "ns0-coefficients"])
def test_cuda_backend_matches_torch(torch_ns_in_param_dtype, hyper, dtype):
    shapes = SHAPE_SETS["tall-wide"] + SHAPE_SETS["vectors"] + SHAPE_SETS["empty"][:2]
    _compare_with_torch(shapes, dtype, HYPERS[hyper], "cuda", steps=10)


@needs_torch
@cuda_sim
@pytest.mark.cudasim
def test_cuda_backend_many_small_matrices(torch_ns_in_param_dtype):
    rng = np.random.default_rng(7)
    kinds = [(4, 4), (3, 8), (8, 3), (1, 6), (6, 1)]
    shapes = [kinds[i] for i in rng.integers(0, len(kinds), 40)]
    _compare_with_torch(shapes, np.float32, dict(lr=0.01, adjust_lr_fn="match_rms_adamw"), "cuda",
                        steps=10, seed=3)


@needs_torch
@cuda_sim
@pytest.mark.cudasim
def test_cuda_backend_muon_with_aux_adam(torch_ns_in_param_dtype):
    rng = np.random.default_rng(6)
    mp, ap, groups, tm, ta, tmuon, tadam = _aux_pair(rng, np.float64)
    opt = fo.MuonWithAuxAdam(groups, backend="cuda")
    for step in range(10):
        grads = _grads(rng, MUON_SHAPES + ADAM_SHAPES, np.float64, step)
        opt.step(grads)
        _set_torch_grads(tm + ta, grads)
        tmuon.step()
        tadam.step()
    for p, t in zip(mp + ap, tm + ta):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-12, atol=1e-12)


# -- fastopt.torch and the benchmark --------------------------------------------------------------
@needs_torch
def test_fastopt_torch_muon_matches_torch_and_loads_its_state_dict(torch_ns_in_param_dtype):
    import fastopt.torch as ft
    rng = np.random.default_rng(12)
    init = [rng.standard_normal(s) for s in ((6, 4), (4, 6), (3, 3))]
    mine = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    ref = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    try:
        opt = ft.Muon(mine, lr=0.02, adjust_lr_fn="match_rms_adamw")
    except ValueError as err:
        if "only supports 2-D" in str(err):      # fastopt.torch builds a probe with a 1-D param
            pytest.skip("fastopt.torch probes its class with a 1-D param, which Muon refuses")
        raise
    topt = torch.optim.Muon(ref, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for step in range(30):
        for a, b in zip(mine, ref):
            g = torch.randn(a.shape, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fresh = ft.Muon([torch.nn.Parameter(torch.tensor(x)) for x in init])
    fresh.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert set(fresh.state_dict()["state"][0]) == {"momentum_buffer"}


@needs_torch  # the bench times torch.optim.Muon beside fastopt
def test_benchmark_record_and_table():
    from fastopt.benchmark import muon as bench
    assert bench.parse_matrices("2x3x4,1x5x5") == [(3, 4), (3, 4), (5, 5)]
    with pytest.raises(ValueError, match="COUNTxROWSxCOLS"):
        bench.parse_matrices("3x4")
    record = bench.run([(8, 8), (8, 8), (4, 12)], repeats=2, warmup=1, threads=1)
    assert record["params"] == 176 and record["threads"] == 1
    for who in ("fastopt_ms", "torch_ms"):
        assert record[who]["total"] > 0 and record[who]["newton_schulz"] > 0
    assert len(record["samples_ms"]["fastopt"]["total"]) == 2
    text = "\n".join(bench.lines(record))
    assert "fastopt.Muon" in text and "torch.optim.Muon" in text


def test_bench_takes_quick_matrices_where_torchs_bfloat16_matmul_is_slow():
    from fastopt.benchmark import muon as bench
    assert bench.matrices_for(False, slowdown=lambda: 1000.0) == (bench.QUICK_MATRICES, None)
    assert bench.matrices_for(True, slowdown=lambda: 1.5) == (bench.DEFAULT_MATRICES, None)
    matrices, note = bench.matrices_for(True, slowdown=lambda: 29.0)
    assert matrices == bench.QUICK_MATRICES and "29x" in note and bench.DEFAULT_MATRICES in note


@needs_torch
def test_bfloat16_slowdown_is_a_positive_ratio():
    from fastopt.benchmark import muon as bench
    assert bench.bfloat16_slowdown(64) > 0
