"""AdEMAMix against its oracles: pytorch_optimizer.AdEMAMix 4.1.0 and bitsandbytes' AdEMAMix.

(a) ``reference_ademamix.ademamix`` against ``pytorch_optimizer.AdEMAMix`` (its per-param
    and foreach paths), 120 steps with the lr halved at step 61, over shape sets (0-d, one
    element, odd, many small) and hyperparameter rows (schedulers on and off, L2,
    decoupled and fixed decay, maximize, betas where torch's lerp takes its second form),
    float32 and float64.
(b) The element, as Python and compiled with ``numba.njit``, against the reference bit
    for bit (they perform the same operations in the same order), non-finite gradients
    included.
(c) ``fastopt.AdEMAMix`` (backends "cpu" and "numpy", list and FlatParams; "cuda" under
    the simulator) against the oracle over 120 steps; ``fastopt.torch.AdEMAMix`` too.
(d) The schedulers: alpha_t and beta3_t against the oracle's static methods.
(e) bitsandbytes 0.50's 32-bit AdEMAMix on the CPU (``weight_decouple=True``,
    ``t_alpha == t_beta3``): params and its stacked state ``state1 = [exp_avg,
    exp_avg_slow]``, ``state2 = exp_avg_sq`` within a few float32 roundings (its moments
    are ``b m + (1 - b) g``, torch's are ``lerp``).
(f) State dicts with pytorch_optimizer, both ways: pytorch_optimizer keeps ``step`` in the
    param group, fastopt (as torch.optim) in each param's state; fastopt's loader reads the
    group's step and ``fastopt.interop.to_pytorch_optimizer`` writes it (more in
    tests/test_interop_pytorch_optimizer.py); the arrays load unchanged.
(g) Low-bit state (bfloat16, int8) steps through the spec's columns.

Tolerance against pytorch_optimizer: 4 ulp of the dtype times the run's scale of the
quantity compared (the largest magnitude it has taken so far), as tests/test_adan.py
explains: torch's lerp, addcmul and float32 sqrt round differently from a plain
expression, by an ulp of the intermediate values. Measured here: at most ~1.5 ulp.
"""
from __future__ import annotations

import functools
import math
import os
import zlib

import numpy as np
import pytest

import fastopt as fo
from fastopt import interop
from fastopt.kernels.ademamix import (SPEC, ademamix_element, ademamix_scalars, schedule_alpha,
                                      schedule_beta3)
from fastopt.kernels.reference_ademamix import ademamix as reference

from cases import RunScales, assert_within_ulps

SLOTS = SPEC.column_names            # exp_avg, exp_avg_sq, exp_avg_slow
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
ULPS = 4
STEPS = 120
LR_HALVED_AT = 61
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=False,
                fixed_decay=False, alpha=5.0, t_alpha_beta3=None, eps=1e-8, maximize=False)

SHAPE_SETS = {
    "scalar": [()],
    "one": [(1,)],
    "odd": [(7,), (3, 5), (33, 31)],
    "mixed": [(), (1,), (2, 3, 4), (1023,)],
    "many-small": [(k % 5 + 1,) for k in range(300)],
}
HPARAMS = {
    "defaults": {},
    "schedule": dict(lr=1e-2, t_alpha_beta3=50),
    "l2": dict(lr=1e-2, weight_decay=0.5, t_alpha_beta3=30),
    "decoupled": dict(lr=1e-2, weight_decay=0.5, weight_decouple=True, alpha=8.0),
    "fixed-decay": dict(lr=1e-2, weight_decay=0.01, weight_decouple=True, fixed_decay=True,
                        t_alpha_beta3=200),
    # 1 - beta >= 0.5: torch's lerp takes its second form; beta3_t crosses 0.5 in warm-up
    "small-betas": dict(lr=3e-3, betas=(0.3, 0.5, 0.9), eps=1e-6, alpha=2.0, t_alpha_beta3=40),
    "maximize": dict(lr=1e-2, weight_decay=0.1, maximize=True, t_alpha_beta3=20),
}


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _hp(row) -> dict:
    return {**DEFAULTS, **row}


def _ref_kwargs(hp) -> dict:
    out = {k: v for k, v in hp.items() if k != "betas"}
    out.update(zip(("beta1", "beta2", "beta3"), hp["betas"]))
    return out


def _oracle_kwargs(hp) -> dict:
    return {k: v for k, v in hp.items() if k != "maximize"}


class _Grads:
    """Gradients of magnitudes 1e-3 to 10 (one per tensor and step), with exact zeros."""

    def __init__(self, shapes, dtype, seed):
        self.shapes, self.dtype = shapes, dtype
        self.rng = np.random.default_rng(seed)

    def next(self):
        out = []
        for shape in self.shapes:
            g = np.asarray(self.rng.standard_normal(shape) * 10.0 ** self.rng.uniform(-3, 1))
            g[self.rng.random(shape) < 0.1] = 0.0
            out.append(g.astype(self.dtype))
        return out


def _init(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s)).astype(dtype) for s in shapes]
    return params, [[np.zeros_like(p) for p in params] for _ in SLOTS]


_Scales = RunScales


def _assert_close(ours, theirs, scale, dtype, what, ulps=ULPS):
    assert_within_ulps(ours, theirs, scale, dtype, what, ulps)


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("torch", reason="torch is needed for the pytorch_optimizer oracle")
    po = pytest.importorskip("pytorch_optimizer",
                             reason="pytorch_optimizer (pip install pytorch-optimizer==4.1.0) is "
                                    "AdEMAMix's external oracle")
    return po.AdEMAMix


def _oracle_step(opt, tparams, gs, maximize):
    import torch
    for t, g in zip(tparams, gs):
        t.grad = torch.tensor(g.copy())      # a fresh tensor: the oracle negates p.grad in place
    opt.step()


# -- (a) the reference against pytorch_optimizer ----------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["per-param", "foreach"])
@pytest.mark.parametrize("row", list(HPARAMS))
@pytest.mark.parametrize("shapes", ["scalar", "odd", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_matches_oracle(oracle, dtype, shapes, row, foreach):
    import torch

    hp = _hp(HPARAMS[row])
    shape_list = SHAPE_SETS[shapes]
    seed = _seed(dtype.__name__, shapes, row)
    params, states = _init(shape_list, dtype, seed)
    init = [p.copy() for p in params]
    tparams = [torch.tensor(p.copy()) for p in params]
    opt = oracle(tparams, maximize=hp["maximize"], foreach=foreach, **_oracle_kwargs(hp))
    kwargs = _ref_kwargs(hp)
    grads = _Grads(shape_list, dtype, seed + 1)
    scales = _Scales()
    for step in range(1, STEPS + 1):
        if step == LR_HALVED_AT:
            kwargs["lr"] *= 0.5
            opt.param_groups[0]["lr"] *= 0.5
        gs = grads.next()
        _oracle_step(opt, tparams, gs, hp["maximize"])
        reference(params, gs, *states, step=step, **kwargs)
        where = f"{row}, step {step}"
        theirs = [t.numpy() for t in tparams]
        _assert_close(params, theirs, scales.update("param", theirs), dtype, f"param ({where})")
        for name, ours in zip(SLOTS, states):
            theirs = [opt.state[t][name].numpy() for t in tparams]
            _assert_close(ours, theirs, scales.update(name, theirs), dtype, f"{name} ({where})")
    assert opt.param_groups[0]["step"] == STEPS
    for p, p0 in zip(params, init):     # every tensor moved far beyond the tolerance
        assert np.max(np.abs(p.astype(np.float64) - p0)) > 1e-5, "a param did not move"


def test_reference_closed_form_two_steps():
    """Two steps written out by hand from the paper's Algorithm 1 (float64)."""
    b1, b2, b3, lr, eps, alpha, T = 0.9, 0.99, 0.999, 0.1, 1e-8, 3.0, 4
    p0, g1, g2 = np.array([0.5, -2.0]), np.array([1.0, -3.0]), np.array([-2.0, 0.25])
    params, states = [p0.copy()], [[np.zeros(2)] for _ in SLOTS]
    kw = dict(lr=lr, beta1=b1, beta2=b2, beta3=b3, eps=eps, alpha=alpha, t_alpha_beta3=T)
    reference(params, [g1], *states, step=1, **kw)
    b3_1 = min(math.exp(math.log(b1) * math.log(b3) / (0.75 * math.log(b3) + 0.25 * math.log(b1))), b3)
    m, nu, slow = (1 - b1) * g1, (1 - b2) * g1 ** 2, (1 - b3_1) * g1
    p1 = p0 - lr * (m / (1 - b1) + alpha / 4 * slow) / (np.sqrt(nu / (1 - b2)) + eps)
    np.testing.assert_allclose(params[0], p1, rtol=1e-13)
    reference(params, [g2], *states, step=2, **kw)
    b3_2 = min(math.exp(math.log(b1) * math.log(b3) / (0.5 * math.log(b3) + 0.5 * math.log(b1))), b3)
    m, nu, slow = b1 * m + (1 - b1) * g2, b2 * nu + (1 - b2) * g2 ** 2, b3_2 * slow + (1 - b3_2) * g2
    p2 = p1 - lr * (m / (1 - b1 ** 2) + alpha / 2 * slow) / (np.sqrt(nu / (1 - b2 ** 2)) + eps)
    for got, want, name in zip([params[0]] + [s[0] for s in states], [p2, m, nu, slow],
                               ("param",) + SLOTS):
        np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=name)


# -- (b) the element against the reference, bit for bit -----------------------------------
@functools.lru_cache(maxsize=None)
def _njit_runner():
    import numba

    from fastopt.kernels.codegen import cpu_function
    element = cpu_function(ademamix_element)

    @numba.njit
    def run(p, g, m, v, s, h):
        for i in range(p.size):
            p[i], m[i], v[i], s[i] = element(p[i], g[i], m[i], v[i], s[i], h)

    return run


def _python_runner(p, g, m, v, s, h):
    for i in range(p.size):
        out = ademamix_element(p[i], g[i], m[i], v[i], s[i], h)
        assert all(type(x) is type(p[i]) for x in out), [type(x) for x in out]
        p[i], m[i], v[i], s[i] = out


@pytest.mark.parametrize("runner", ["python", "njit"])
@pytest.mark.parametrize("row", ["defaults", "l2", "decoupled", "small-betas", "maximize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_matches_reference(dtype, row, runner):
    run = _python_runner if runner == "python" else _njit_runner()
    hp = _hp(HPARAMS[row])
    steps = 12 if runner == "python" else STEPS
    shapes = [(1,), (5, 3), (9,)]
    params, states = _init(shapes, dtype, _seed("el", row))
    el = [p.ravel().copy() for p in params]
    el_states = [[s.ravel().copy() for s in col] for col in states]
    grads = _Grads(shapes, dtype, 5)
    for step in range(1, steps + 1):
        gs = grads.next()
        reference(params, gs, *states, step=step, **_ref_kwargs(hp))
        h = ademamix_scalars(hp, step, np.dtype(dtype).type)
        for i, g in enumerate(gs):
            run(el[i], g.ravel(), *[col[i] for col in el_states], h)
        for i in range(len(shapes)):
            np.testing.assert_array_equal(el[i], params[i].ravel(), err_msg=f"param step {step}")
            for name, col, ref in zip(SLOTS, el_states, states):
                np.testing.assert_array_equal(col[i], ref[i].ravel(), err_msg=f"{name} step {step}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_element_matches_reference(dtype):
    hp = _hp(HPARAMS["small-betas"])
    params, states = _init([(8,)], dtype, 3)
    el, el_states = params[0].copy(), [c[0].copy() for c in states]
    base = np.array([0.5, -1.0, 2.0, 0.0, 3.0, -0.25, 1.5, -0.75], dtype=dtype)
    with np.errstate(all="ignore"):
        for step in range(1, 5):
            g = base * dtype(step)
            if step in (1, 3):
                g[3 * (step == 3):3 * (step == 3) + 3] = [np.inf, -np.inf, np.nan]
            reference(params, [g], *states, step=step, **_ref_kwargs(hp))
            _njit_runner()(el, g, *el_states, ademamix_scalars(hp, step, np.dtype(dtype).type))
            np.testing.assert_array_equal(el, params[0], err_msg=f"param, step {step}")
            for name, a, b in zip(SLOTS, el_states, states):
                np.testing.assert_array_equal(a, b[0], err_msg=f"{name}, step {step}")
    assert np.isnan(params[0][:6]).all() and np.isfinite(params[0][6:]).all(), params[0]


# -- (c) the classes against the oracle -------------------------------------------------
def _class_run(oracle, dtype, row, backend, mode, shapes="mixed", steps=STEPS):
    import torch

    hp = _hp(HPARAMS[row])
    shape_list = SHAPE_SETS[shapes]
    seed = _seed("class", dtype.__name__, row, shapes)
    params, _ = _init(shape_list, dtype, seed)
    tparams = [torch.tensor(p.copy()) for p in params]
    theirs_opt = oracle(tparams, maximize=hp["maximize"], foreach=False, **_oracle_kwargs(hp))
    holder = fo.FlatParams(params) if mode == "flat" else None
    live = holder.params if holder is not None else params
    opt = fo.AdEMAMix(holder if holder is not None else live, backend=backend, **hp)
    grads = _Grads(shape_list, dtype, seed + 1)
    scales = _Scales()
    for step in range(1, steps + 1):
        if step == LR_HALVED_AT:
            opt.param_groups[0]["lr"] *= 0.5
            theirs_opt.param_groups[0]["lr"] *= 0.5
        gs = grads.next()
        _oracle_step(theirs_opt, tparams, gs, hp["maximize"])
        if holder is not None:
            for view, g in zip(holder.grads, gs):
                view[...] = g
            assert opt.step() is True
        else:
            assert opt.step(gs) is True
        theirs = [t.numpy() for t in tparams]
        _assert_close([np.asarray(p) for p in live], theirs, scales.update("param", theirs), dtype,
                      f"param ({row}, step {step})")
        for name in SLOTS:
            theirs = [theirs_opt.state[t][name].numpy() for t in tparams]
            _assert_close([np.asarray(opt.state[i][name]) for i in range(len(tparams))], theirs,
                          scales.update(name, theirs), dtype, f"{name} ({row}, step {step})")
    assert all(int(opt.state[i]["step"]) == steps for i in range(len(tparams)))


@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("row", ["defaults", "l2", "decoupled", "fixed-decay", "small-betas", "maximize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimizer_matches_oracle(oracle, dtype, row, backend, mode):
    _class_run(oracle, dtype, row, backend, mode)


@pytest.mark.parametrize("shapes", ["one", "many-small", "odd"])
def test_optimizer_shapes_match_oracle(oracle, shapes):
    """One element, 300 tiny tensors and odd sizes, fused "cpu" driver, float32."""
    _class_run(oracle, np.float32, "schedule", "cpu", "list", shapes=shapes, steps=110)


def test_chunk_sized_tensor_matches_oracle(oracle):
    """A tensor over one CPU chunk (65536 + 3 elements) beside a small one."""
    SHAPE_SETS["chunk"] = [(65536 + 3,), (5,)]
    _class_run(oracle, np.float32, "l2", "cpu", "flat", shapes="chunk", steps=20)


@pytest.mark.skipif(not SIM, reason="the 'cuda' backend runs here under the CUDA simulator "
                                    "(NUMBA_ENABLE_CUDASIM=1)")
@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_simulator_matches_oracle(oracle, dtype, mode):
    _class_run(oracle, dtype, "small-betas", "cuda", mode, shapes="one", steps=105)
    _class_run(oracle, dtype, "l2", "cuda", mode, shapes="odd" if mode == "flat" else "one", steps=6)


def test_torch_class_matches_oracle(oracle):
    import torch

    import fastopt.torch as fot

    shape_list = SHAPE_SETS["odd"]
    params, _ = _init(shape_list, np.float32, 7)
    ours = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    theirs = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    hp = dict(lr=1e-2, weight_decay=0.5, t_alpha_beta3=20)
    opt_ours, opt_theirs = fot.AdEMAMix(ours, **hp), oracle(theirs, foreach=False, **hp)
    grads = _Grads(shape_list, np.float32, 8)
    scales = _Scales()
    for step in range(1, 31):
        gs = grads.next()
        for a, b, g in zip(ours, theirs, gs):
            a.grad, b.grad = torch.tensor(g.copy()), torch.tensor(g.copy())
        opt_ours.step()
        opt_theirs.step()
        want = [b.detach().numpy() for b in theirs]
        _assert_close([a.detach().numpy() for a in ours], want, scales.update("param", want),
                      np.float32, f"param (step {step})")
    assert set(SLOTS) <= set(opt_ours.state[ours[0]])


# -- (d) the schedulers --------------------------------------------------------------------
@pytest.mark.parametrize("betas", [(0.9, 0.9999), (0.3, 0.99), (0.5, 0.5), (0.99, 0.9)])
@pytest.mark.parametrize("T", [None, 1, 7, 1000])
def test_schedulers_match_oracle(oracle, betas, T):
    from fastopt.kernels import reference_ademamix as ra
    b1, b3 = betas
    for step in (1, 2, 3, 6, 7, 8, 500, 999, 1000, 1001, 5000):
        want_a = oracle.schedule_alpha(T, step, 5.0)
        want_b = oracle.schedule_beta3(T, step, b1, b3)
        assert schedule_alpha(5.0, step, T) == want_a == ra.alpha_at(step, 5.0, T)
        assert schedule_beta3(b1, b3, step, T) == want_b == ra.beta3_at(step, b1, b3, T)
    if T is not None:       # warm-up over: beta3 and alpha reached, and stay
        assert schedule_beta3(b1, b3, T, T) == pytest.approx(b3, rel=1e-12)
        assert schedule_alpha(5.0, T + 3, T) == 5.0


def test_scheduler_limits_at_zero_betas():
    """The oracle takes log(0) there and raises; the formula's limits are taken instead."""
    for step, T in ((1, 10), (5, 10), (20, 10)):
        want = min(0.99 ** (T / step), 0.99)
        assert schedule_beta3(0.0, 0.99, step, T) == pytest.approx(want, rel=1e-14)
        # approached from beta1 -> 0
        assert schedule_beta3(1e-300, 0.99, step, T) == pytest.approx(want, rel=1e-2)
    assert schedule_beta3(0.9, 0.0, 3, 10) == 0.0
    p = np.ones(4)
    opt = fo.AdEMAMix([p], lr=0.1, betas=(0.0, 0.9, 0.0), t_alpha_beta3=3)
    for _ in range(4):
        opt.step([np.full(4, 0.5)])
    assert np.all(np.isfinite(p)) and np.all(p < 1)


def test_scalars_follow_schedule():
    hp = _hp(dict(t_alpha_beta3=1000, betas=(0.3, 0.9, 0.99)))
    early, late = ademamix_scalars(hp, 1, float), ademamix_scalars(hp, 1000, float)
    assert early.alpha == 0.005 and late.alpha == 5.0
    assert early.lerp3_from_end and not late.lerp3_from_end    # 1 - beta3_t crosses 0.5
    from fastopt.kernels.specialize import flags_of
    assert flags_of(early) == flags_of(late), "a scheduled flag must not be compiled in"


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, 10.0])
def test_bad_t_alpha_beta3(bad):
    p = np.ones(3, np.float32)
    with pytest.raises((TypeError, ValueError), match="t_alpha_beta3"):
        fo.AdEMAMix([p], t_alpha_beta3=bad).step([np.ones(3, np.float32)])
    assert np.all(p == 1)
    fo.AdEMAMix([p], t_alpha_beta3=np.int64(7)).step([np.ones(3, np.float32)])   # NumPy ints are ints
    assert np.all(p < 1)


# -- (e) bitsandbytes --------------------------------------------------------------------------
@pytest.mark.parametrize("T", [None, 15])
def test_matches_bitsandbytes_32bit(T):
    """bnb.optim.AdEMAMix (32-bit state, CPU) is weight_decouple=True with t_alpha == t_beta3."""
    import warnings
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes>=0.50 is a second oracle")
    shapes = [(33, 7), (1,), (300,)]
    params, _ = _init(shapes, np.float32, 11)
    tparams = [torch.tensor(p.copy()) for p in params]
    theirs = bnb.optim.AdEMAMix(tparams, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=4.0,
                                t_alpha=T, t_beta3=T, weight_decay=0.1, optim_bits=32)
    ours = fo.AdEMAMix(params, lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=4.0, t_alpha_beta3=T,
                       weight_decay=0.1, weight_decouple=True)
    grads = _Grads(shapes, np.float32, 12)
    scales = _Scales()
    for step in range(1, 101):
        gs = grads.next()
        for t, g in zip(tparams, gs):
            t.grad = torch.tensor(g.copy())
        theirs.step()
        ours.step(gs)
        want = [t.numpy() for t in tparams]
        # lerp against mul + add: an ulp per step of each moment, carried on (measured: < 8 ulp)
        _assert_close(params, want, scales.update("param", want), np.float32, f"param {step}", ulps=32)
        for name, pick in (("exp_avg", lambda s: s["state1"][0]), ("exp_avg_slow", lambda s: s["state1"][1]),
                           ("exp_avg_sq", lambda s: s["state2"])):
            want = [pick(theirs.state[t]).numpy() for t in tparams]
            _assert_close([ours.state[i][name] for i in range(len(shapes))], want,
                          scales.update(name, want), np.float32, f"{name} {step}", ulps=32)


# -- (f) state dicts with pytorch_optimizer ----------------------------------------------------
@pytest.mark.parametrize("direction", ["po->fastopt", "fastopt->po"])
def test_state_dict_interchange(oracle, direction):
    import torch

    hp = dict(lr=1e-2, betas=(0.8, 0.99, 0.999), weight_decay=0.1, t_alpha_beta3=25, alpha=3.0)
    shapes = [(4, 3), (), (17,)]
    params, _ = _init(shapes, np.float64, 21)
    grads = _Grads(shapes, np.float64, 22)
    first = [grads.next() for _ in range(15)]
    then = [grads.next() for _ in range(20)]
    src_t = [torch.tensor(p.copy()) for p in params]
    src_f = [p.copy() for p in params]
    if direction == "po->fastopt":
        src = oracle(src_t, foreach=False, **hp)
        for gs in first:
            _oracle_step(src, src_t, gs, False)
        dst_params = [t.numpy().copy() for t in src_t]
        dst = fo.AdEMAMix(dst_params, **hp)
        dst.load_state_dict(interop.from_pytorch_optimizer(src.state_dict()))
        assert int(dst.state[0]["step"]) == 15
        for gs in then:
            _oracle_step(src, src_t, gs, False)
            dst.step(gs)
        ours, theirs = dst_params, [t.numpy() for t in src_t]
        st_ours, st_theirs = dst.state, {i: src.state[t] for i, t in enumerate(src_t)}
    else:
        src = fo.AdEMAMix(src_f, **hp)
        for gs in first:
            src.step(gs)
        dst_t = [torch.tensor(p.copy()) for p in src_f]
        dst = oracle(dst_t, foreach=False, **hp)
        dst.load_state_dict(interop.to_pytorch_optimizer(src.state_dict()))
        assert dst.param_groups[0]["step"] == 15
        for gs in then:
            src.step(gs)
            _oracle_step(dst, dst_t, gs, False)
        ours, theirs = src_f, [t.numpy() for t in dst_t]
        st_ours, st_theirs = src.state, {i: dst.state[t] for i, t in enumerate(dst_t)}
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for i in range(len(shapes)):
        for name in SLOTS:
            np.testing.assert_allclose(np.asarray(st_ours[i][name]), np.asarray(st_theirs[i][name]),
                                       rtol=1e-11, atol=1e-15, err_msg=name)


# -- (g) low-bit state ---------------------------------------------------------------------------
@pytest.mark.parametrize("state_format", ["bfloat16", "int8"])
def test_lowbit_state_steps(state_format):
    """The spec's three columns in bfloat16 / int8 (exp_avg_sq unsigned): the run stays near float32."""
    rng = np.random.default_rng(5)
    shapes = [(8192,), (300,)]
    p32 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    plow = [p.copy() for p in p32]
    a = fo.AdEMAMix(p32, lr=1e-3, t_alpha_beta3=20)
    b = fo.AdEMAMix(plow, lr=1e-3, t_alpha_beta3=20, state_format=state_format)
    start = [p.copy() for p in p32]
    for _ in range(30):
        gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        a.step(gs)
        b.step(gs)
    for x, y, s in zip(p32, plow, start):
        moved = np.linalg.norm(x - s)
        assert moved > 1e-3
        assert np.linalg.norm(x - y) < 0.05 * moved
    if state_format == "int8":
        assert b.state[0]["exp_avg_slow"].dtype == np.uint8 and "exp_avg_slow_absmax" in b.state[0]
        assert b.state[1]["exp_avg_slow"].dtype == np.float32        # under min_8bit_size
    sd = b.state_dict()
    c = fo.AdEMAMix([p.copy() for p in plow], lr=1e-3, t_alpha_beta3=20, state_format=state_format)
    c.load_state_dict(sd)
    for name in SLOTS:
        np.testing.assert_array_equal(np.asarray(c.state[0][name]), np.asarray(b.state[0][name]))
