"""Adan: the NumPy reference against pytorch_optimizer.Adan, the element against the reference.

(a) ``reference.adan`` against ``pytorch_optimizer.Adan`` 4.1.0 (both of its code paths,
    per-param and foreach), 25 steps with a halved lr from step 13, over several shape
    sets and hyperparameter rows, float32 and float64. Skipped when torch or
    pytorch_optimizer is absent.
(b) ``adan_element`` run as plain Python, element by element, against the reference.
(c) ``adan_element`` compiled with ``numba.njit`` over arrays, against the reference.
(d) ``adan_element`` compiled as a CUDA device function (PTX only, no GPU needed).

Tolerance against the oracle: 4 ulp of the dtype (float32 4.8e-7, float64 8.9e-16)
times the run's scale of the quantity compared, the largest magnitude that quantity
(param, or one state column) has taken so far over all tensors of the run. Why not
element-wise: torch computes ``lerp`` and ``addcmul`` with fused multiply-adds, and its
float32 ``sqrt`` is not correctly rounded (16% of random inputs are 1 ulp off), so the
two differ by rounding steps of the *intermediate* values. ``exp_avg_diff`` is
``v + w (d - v)``, whose terms cancel: a one-rounding difference of ``w (d - v)`` is
then thousands of ulp of the small result (measured: up to 9e4 ulp element-wise after
30 steps, and 12 ulp norm-relative for a one-element tensor). Against the run's scale
the largest error measured was 1.34 ulp (3 seeds x 5 rows x 40 steps, both dtypes), so
4 ulp is tight: a wrong order of the weight decay, a skipped bias correction or a wrong
sign of the difference is orders of magnitude above it (the rows are chosen so that
``lr * weight_decay`` makes decoupled and proximal decay differ by far more than 4 ulp).

The element and the reference perform the same operations in the same order in the
same precision, so (b), (c) and the non-finite cases are compared bit for bit.
"""
from __future__ import annotations

import functools
import math
import os
import zlib

import numpy as np
import pytest

from fastopt.kernels import reference
from fastopt.kernels.adan import SPEC, AdanScalars, adan_element, adan_scalars

from cases import RunScales, assert_within_ulps

SLOTS = SPEC.column_names

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
ULPS = 4
STEPS = 25
LR_HALVED_AT = 13
DEFAULTS = dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                weight_decouple=False, maximize=False)

SHAPE_SETS = {
    "one": [(1,)],
    "odd": [(7,), (3, 5), (33, 31)],
    "mixed": [(1,), (2, 3, 4), (1023,), (1,)],
}
# lr * weight_decay = 5e-3: decoupled (p (1 - x)) and proximal (p / (1 + x)) decay differ
# by x^2 = 2.5e-5 per step, far above 4 float32 ulp.
HPARAMS = {
    "defaults": {},
    "proximal": dict(lr=1e-2, weight_decay=0.5),
    "decoupled": dict(lr=1e-2, weight_decay=0.5, weight_decouple=True),
    # 1 - beta >= 0.5 for beta1 and beta2: torch's lerp takes its second form
    "small-betas": dict(lr=3e-3, betas=(0.3, 0.4, 0.9), eps=1e-6, weight_decay=0.1,
                        weight_decouple=True),
    # 1 - beta == 0.5 exactly: torch's lerp takes its second form there too
    "half-betas": dict(lr=3e-3, betas=(0.5, 0.5, 0.9)),
    "maximize": dict(lr=1e-2, weight_decay=0.5, maximize=True),
}
ELEMENT_HPARAMS = {k: HPARAMS[k] for k in ("defaults", "decoupled", "small-betas", "half-betas",
                                           "maximize")}


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _hp(row) -> dict:
    return {**DEFAULTS, **row}


def _reference_kwargs(hp) -> dict:
    beta1, beta2, beta3 = hp["betas"]
    return dict(lr=hp["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=hp["eps"],
                weight_decay=hp["weight_decay"], weight_decouple=hp["weight_decouple"],
                maximize=hp["maximize"])


def _scalars(step, hp, dtype):
    return adan_scalars(hp, step, np.dtype(dtype).type)


class _Grads:
    """Gradients of magnitudes from 1e-3 to 10 (one per tensor and step), with exact zeros,
    and every fifth step the previous gradients again (a difference of exactly 0)."""

    def __init__(self, shapes, dtype, seed):
        self.shapes, self.dtype = shapes, dtype
        self.rng = np.random.default_rng(seed)
        self.last = None

    def next(self, step):
        if step % 5 == 0 and self.last is not None:
            return [g.copy() for g in self.last]
        grads = []
        for shape in self.shapes:
            g = self.rng.standard_normal(shape) * 10.0 ** self.rng.uniform(-3, 1)
            g[self.rng.random(shape) < 0.1] = 0.0
            grads.append(g.astype(self.dtype))
        self.last = grads
        return [g.copy() for g in grads]


def _init(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    states = [[np.zeros_like(p) for p in params] for _ in SLOTS]
    return params, states


_Scales = RunScales


def _assert_close(ours, theirs, scale, dtype, what):
    assert_within_ulps(ours, theirs, scale, dtype, what, ULPS)


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("torch", reason="torch is needed for the pytorch_optimizer oracle")
    po = pytest.importorskip("pytorch_optimizer",
                             reason="pytorch_optimizer (pip install pytorch-optimizer==4.1.0) "
                                    "is Adan's external oracle")
    return po.Adan


# -- (a) the reference against pytorch_optimizer.Adan ------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["per-param", "foreach"])
@pytest.mark.parametrize("row", list(HPARAMS))
@pytest.mark.parametrize("shapes", list(SHAPE_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_matches_oracle(oracle, dtype, shapes, row, foreach):
    import torch

    hp = _hp(HPARAMS[row])
    shape_list = SHAPE_SETS[shapes]
    seed = _seed(dtype.__name__, shapes, row)
    params, states = _init(shape_list, dtype, seed)
    init = [p.copy() for p in params]
    tparams = [torch.tensor(p.copy()) for p in params]
    # The oracle's maximize differs on step 1 (see test_oracle_maximize_first_step):
    # maximize means minimising -f, so the oracle gets the negated gradients instead.
    opt = oracle(tparams, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                 weight_decay=hp["weight_decay"], weight_decouple=hp["weight_decouple"],
                 maximize=False, foreach=foreach)
    kwargs = _reference_kwargs(hp)
    grads = _Grads(shape_list, dtype, seed + 1)
    scales = _Scales()
    for step in range(1, STEPS + 1):
        if step == LR_HALVED_AT:
            kwargs["lr"] *= 0.5
            opt.param_groups[0]["lr"] *= 0.5
        gs = grads.next(step)
        for t, g in zip(tparams, gs):
            # a fresh tensor each step: the oracle negates p.grad in place
            t.grad = torch.tensor(-g if hp["maximize"] else g.copy())
        opt.step()
        reference.adan(params, gs, *states, step=step, **kwargs)

        where = f"{row}, step {step}"
        theirs = [t.numpy() for t in tparams]
        _assert_close(params, theirs, scales.update("param", theirs), dtype, f"param ({where})")
        for name, ours in zip(SLOTS, states):
            theirs = [opt.state[t][name].numpy() for t in tparams]
            if name == "previous_grad":     # the negated gradient: no arithmetic, so exact
                for i, (a, b) in enumerate(zip(ours, theirs)):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}[{i}] ({where})")
            else:
                _assert_close(ours, theirs, scales.update(name, theirs), dtype, f"{name} ({where})")
    assert opt.param_groups[0]["step"] == STEPS
    # Guard against vacuous agreement: every tensor moved far beyond the tolerance.
    for p, p0 in zip(params, init):
        assert np.max(np.abs(p.astype(np.float64) - p0)) > 1e-4, "a param did not move"


def test_oracle_maximize_first_step(oracle):
    """Why the maximize row feeds the oracle negated gradients: pytorch_optimizer 4.1.0
    initialises previous_grad from the gradient before negating it, so with maximize its
    first difference is 2 * (-g), not 0. fastopt's maximize is exactly minimising -f."""
    import torch

    g = np.array([0.5, -2.0, 3.0])
    t = torch.zeros(3, dtype=torch.float64)
    opt = oracle([t], maximize=True, foreach=False)
    t.grad = torch.tensor(g)
    opt.step()
    beta2 = DEFAULTS["betas"][1]
    np.testing.assert_allclose(opt.state[t]["exp_avg_diff"].numpy(), (1 - beta2) * 2 * -g,
                               rtol=1e-15)

    params, states = _init([(3,)], np.float64, 0)
    params[0][:] = 0.0
    reference.adan(params, [g], *states, step=1, **_reference_kwargs(_hp(dict(maximize=True))))
    assert np.all(states[2][0] == 0.0), "fastopt's first difference must be 0"
    np.testing.assert_array_equal(states[3][0], g)     # the negated maximize gradient


# -- the equations by hand (no torch) ----------------------------------------------------
def test_reference_first_two_steps_by_hand():
    """Steps 1 and 2 from the paper's equations, written out in float64 closed form."""
    lr, eps, (b1, b2, b3) = 1e-2, 1e-8, DEFAULTS["betas"]
    p0, g1, g2 = np.array([0.7, -1.3, 0.0]), np.array([0.4, 2.0, -3.0]), np.array([1.0, -0.5, -3.0])
    params, states = _init([(3,)], np.float64, 0)
    params[0][:] = p0
    kwargs = _reference_kwargs(_hp(dict(lr=lr)))

    reference.adan(params, [g1], *states, step=1, **kwargs)
    # d_1 = 0, m_1 = (1 - b1) g1, n_1 = (1 - b3) g1^2: bias-corrected, |g1| in the denominator
    p1 = p0 - lr * g1 / (np.abs(g1) + eps)
    np.testing.assert_allclose(params[0], p1, rtol=1e-12)
    np.testing.assert_array_equal(states[2][0], 0.0)
    np.testing.assert_array_equal(states[3][0], -g1)

    reference.adan(params, [g2], *states, step=2, **kwargs)
    d = g2 - g1
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = (1 - b2) * d
    n = b3 * (1 - b3) * g1 ** 2 + (1 - b3) * (g2 + b2 * d) ** 2
    denom = np.sqrt(n / (1 - b3 ** 2)) + eps
    p2 = p1 - lr / (1 - b1 ** 2) * m / denom - lr * b2 / (1 - b2 ** 2) * v / denom
    for got, want, name in zip([params[0]] + [s[0] for s in states],
                               [p2, m, n, v, -g2], ("param",) + SLOTS):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)


def test_reference_keeps_float32():
    """No float64 promotion of float32 arrays, also with NumPy float64 hyperparameters."""
    params, states = _init([(5,)], np.float32, 1)
    grads = [np.linspace(-1, 1, 5, dtype=np.float32)]
    kwargs = {k: (np.float64(v) if isinstance(v, float) else v)
              for k, v in _reference_kwargs(_hp(dict(weight_decay=0.1))).items()}
    for step in (1, 2):
        reference.adan(params, grads, *states, step=step, **kwargs)
    assert params[0].dtype == np.float32 and all(s[0].dtype == np.float32 for s in states)
    # the same run with Python floats gives the same bits: nothing ran in float64
    params2, states2 = _init([(5,)], np.float32, 1)
    for step in (1, 2):
        reference.adan(params2, grads, *states2, step=step,
                       **_reference_kwargs(_hp(dict(weight_decay=0.1))))
    np.testing.assert_array_equal(params[0], params2[0])


# -- the host scalars --------------------------------------------------------------------
def test_scalars():
    from fastopt.kernels.specialize import flags_of

    h1 = _scalars(1, _hp(dict(weight_decay=0.5)), np.float32)
    h2 = _scalars(2, _hp(dict(weight_decay=0.5)), np.float32)
    assert isinstance(h1, AdanScalars)
    for name, value in h1._asdict().items():
        kind = bool if name in ("first", "decoupled", "proximal", "maximize",
                                "lerp1_from_end", "lerp2_from_end") else np.float32
        assert type(value) is kind, f"{name}: {type(value).__name__}"
    assert h1.first and not h2.first
    assert h1.proximal and not h1.decoupled
    d = _scalars(3, _hp(dict(weight_decay=0.5, weight_decouple=True)), float)
    assert d.decoupled and not d.proximal
    off = _scalars(3, _hp(dict(weight_decouple=True)), float)
    assert not off.decoupled and not off.proximal      # no decay at weight_decay 0
    assert d.neg_step_size == -1e-3 / (1 - 0.98 ** 3)
    assert d.neg_diff_step_size == -1e-3 * 0.92 / (1 - 0.92 ** 3)
    assert d.bias_correction3_sqrt == math.sqrt(1 - 0.99 ** 3)
    small = _scalars(1, _hp(HPARAMS["small-betas"]), float)
    assert small.lerp1_from_end and small.lerp2_from_end and not h1.lerp1_from_end
    # `first` changes after step 1: it must not be a compile-time flag of the drivers
    first_index = AdanScalars._fields.index("first")
    assert first_index not in [i for i, _ in flags_of(h1)]
    assert flags_of(h1) == flags_of(h2)


# -- (b), (c) the element against the reference ------------------------------------------
def _element_python(p, g, states, h):
    m, n, v, prev = states
    for i in range(p.size):
        out = adan_element(p[i], g[i], m[i], n[i], v[i], prev[i], h)
        for x in out:      # no silent promotion to float64 (or to a Python float)
            assert type(x) is type(p[i]), f"returned {type(x).__name__} for {type(p[i]).__name__}"
        p[i], m[i], n[i], v[i], prev[i] = out


@functools.lru_cache(maxsize=None)
def _element_njit():
    import numba

    from fastopt.kernels.codegen import cpu_function
    element = cpu_function(adan_element)         # its pieces bound, as a driver has it

    @numba.njit
    def run(p, g, m, n, v, prev, h):
        for i in range(p.size):
            p[i], m[i], n[i], v[i], prev[i] = element(p[i], g[i], m[i], n[i], v[i], prev[i], h)

    return element, run


def _element_njit_run(p, g, states, h):
    _element_njit()[1](p, g, *states, h)


def _compare_element(runner, dtype, row, steps, shapes=((1,), (5, 3), (9,))):
    hp = _hp(ELEMENT_HPARAMS[row])
    seed = _seed("element", dtype.__name__, row)
    ref_params, ref_states = _init(shapes, dtype, seed)
    # the element sees 1-D copies; the reference the shaped arrays
    el = [p.ravel().copy() for p in ref_params]
    el_states = [[s.ravel().copy() for s in col] for col in ref_states]
    grads = _Grads(shapes, dtype, seed + 1)
    kwargs = _reference_kwargs(hp)
    for step in range(1, steps + 1):
        gs = grads.next(step)
        reference.adan(ref_params, gs, *ref_states, step=step, **kwargs)
        h = _scalars(step, hp, dtype)
        for i, g in enumerate(gs):
            runner(el[i], g.ravel(), [col[i] for col in el_states], h)
        for i in range(len(shapes)):
            where = f"{row}, step {step}, tensor {i}"
            np.testing.assert_array_equal(el[i], ref_params[i].ravel(), err_msg=f"param ({where})")
            for name, col, ref_col in zip(SLOTS, el_states, ref_states):
                np.testing.assert_array_equal(col[i], ref_col[i].ravel(),
                                              err_msg=f"{name} ({where})")
    assert any(np.any(s != 0) for s in ref_states[2]), "exp_avg_diff never moved: vacuous test"


@pytest.mark.parametrize("row", list(ELEMENT_HPARAMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_python_matches_reference(dtype, row):
    _compare_element(_element_python, dtype, row, steps=12)


@pytest.mark.parametrize("row", list(ELEMENT_HPARAMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_njit_matches_reference(dtype, row):
    _compare_element(_element_njit_run, dtype, row, steps=STEPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_njit_math_type(dtype):
    """The compiled element stays in the storage dtype's math type (no float64 literals)."""
    from numba import types

    element, _ = _element_njit()
    h = _scalars(1, _hp({}), dtype)
    x = np.dtype(dtype).type(0.5)
    element(x, x, x, x, x, x, h)
    f = types.float32 if dtype is np.float32 else types.float64
    sig = [s for s in element.nopython_signatures if s.args[0] == f]
    assert sig and sig[0].return_type == types.UniTuple(f, 5), sig


# -- non-finite values ---------------------------------------------------------------------
def _nonfinite_grads(dtype):
    """inf, -inf and NaN on step 1 and on a later step, next to finite elements."""
    base = np.array([0.5, -1.0, 2.0, 0.0, 3.0, -0.25, 1.5, -0.75], dtype=dtype)
    specials = np.array([np.inf, -np.inf, np.nan], dtype=dtype)
    out = []
    for step in range(1, 5):
        g = base * dtype(step)
        if step == 1:
            g[:3] = specials
        if step == 3:
            g[3:6] = specials
        out.append(g)
    return out


@pytest.mark.parametrize("row", ["defaults", "small-betas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_element_matches_reference(dtype, row):
    hp = _hp(ELEMENT_HPARAMS[row])
    ref_params, ref_states = _init([(8,)], dtype, 3)
    el, el_states = ref_params[0].copy(), [col[0].copy() for col in ref_states]
    with np.errstate(all="ignore"):
        for step, g in enumerate(_nonfinite_grads(dtype), start=1):
            reference.adan(ref_params, [g], *ref_states, step=step, **_reference_kwargs(hp))
            _element_njit_run(el, g, el_states, _scalars(step, hp, dtype))
            # assert_array_equal treats NaN as equal to NaN and checks inf signs
            np.testing.assert_array_equal(el, ref_params[0], err_msg=f"param, step {step}")
            for name, a, b in zip(SLOTS, el_states, ref_states):
                np.testing.assert_array_equal(a, b[0], err_msg=f"{name}, step {step}")
    assert np.isnan(ref_params[0][:6]).all() and np.isfinite(ref_params[0][6:]).all(), ref_params[0]


@pytest.mark.parametrize("row", ["defaults", "small-betas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_reference_matches_oracle(oracle, dtype, row):
    import torch

    hp = _hp(ELEMENT_HPARAMS[row])
    params, states = _init([(8,)], dtype, 3)
    t = torch.tensor(params[0].copy())
    opt = oracle([t], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                 weight_decay=hp["weight_decay"], weight_decouple=hp["weight_decouple"],
                 foreach=False)
    scales = _Scales()
    with np.errstate(all="ignore"):
        for step, g in enumerate(_nonfinite_grads(dtype), start=1):
            t.grad = torch.tensor(g.copy())
            opt.step()
            reference.adan(params, [g], *states, step=step, **_reference_kwargs(hp))
            pairs = [("param", params[0], t.numpy())]
            pairs += [(name, s[0], opt.state[t][name].numpy()) for name, s in zip(SLOTS, states)]
            for name, a, b in pairs:
                what = f"{name}, step {step}"
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b),
                                              err_msg=f"{what}: NaN masks")
                np.testing.assert_array_equal(np.isinf(a) * np.sign(a), np.isinf(b) * np.sign(b),
                                              err_msg=f"{what}: inf masks")
                fin = np.isfinite(b)
                _assert_close([a[fin]], [b[fin]], scales.update(name, [b[fin]]), dtype, what)


# -- (d) the element as a CUDA device function -------------------------------------------
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="the CUDA simulator compiles nothing")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_element_compiles_as_cudadevice_function(dtype, monkeypatch):
    """PTX for a device function needs NVVM, not a GPU; float32 math emits no f64 op."""
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    import types as pytypes
    import numba.cuda.dispatcher
    if not hasattr(numba.cuda.dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda asks for the device elsewhere")
    # A device function called from another (the element's pieces, kernels/pieces.py)
    # asks the current device for its compute capability; there is none here.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: pytypes.SimpleNamespace(compute_capability=(8, 0)))
    from numba import typeof, types
    try:
        from numba.cuda.cudadrv import nvvm
        have_nvvm = nvvm.is_available()
    except Exception:  # pragma: no cover - depends on the CUDA toolkit
        have_nvvm = False
    if not have_nvvm:
        pytest.skip("NVVM (the CUDA toolkit's libnvvm) is not available")
    f = types.float32 if dtype is np.float32 else types.float64
    h = _scalars(1, _hp({}), dtype)
    from fastopt.kernels.cuda import device_function
    element = device_function(adan_element).py_func    # its pieces bound to their device forms
    ptx, ret = cuda.compile_ptx(element, (f,) * 6 + (typeof(h),), device=True, cc=(8, 0))
    assert ret == types.UniTuple(f, 5), ret
    assert "sqrt" in ptx
    if dtype is np.float32:
        assert ".f64" not in ptx, "float32 math promoted to float64"


# -- (e) the classes made from the spec against the oracle --------------------------------
@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("row", ["defaults", "proximal", "decoupled", "small-betas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_optimizer_matches_oracle(oracle, dtype, row, backend, flat):
    """fastopt.Adan (list and FlatParams, fused driver and reference) over 25 steps with the
    lr halved at step 13, against pytorch_optimizer.Adan, at the reference's tolerance."""
    import torch

    import fastopt as fo

    hp = _hp(HPARAMS[row])
    shape_list = SHAPE_SETS["mixed"]
    seed = _seed("class", dtype.__name__, row)
    params, _ = _init(shape_list, dtype, seed)
    tparams = [torch.tensor(p.copy()) for p in params]
    oracle_opt = oracle(tparams, **{k: hp[k] for k in ("lr", "betas", "eps", "weight_decay",
                                                        "weight_decouple")}, foreach=False)
    if flat:
        holder = fo.FlatParams(params)
        params = holder.params
    opt = fo.Adan(params, backend=backend, **hp)
    grads = _Grads(shape_list, dtype, seed + 1)
    scales = _Scales()
    for step in range(1, STEPS + 1):
        if step == LR_HALVED_AT:
            opt.param_groups[0]["lr"] *= 0.5
            oracle_opt.param_groups[0]["lr"] *= 0.5
        gs = grads.next(step)
        for t, g in zip(tparams, gs):
            t.grad = torch.tensor(g.copy())
        oracle_opt.step()
        if flat:
            for view, g in zip(holder.grads, gs):
                view[...] = g
            opt.step()
        else:
            opt.step(gs)
        theirs = [t.numpy() for t in tparams]
        _assert_close(list(params), theirs, scales.update("param", theirs), dtype,
                      f"param ({row}, step {step})")
        for name in SLOTS:
            theirs = [oracle_opt.state[t][name].numpy() for t in tparams]
            _assert_close([opt.state[i][name] for i in range(len(tparams))], theirs,
                          scales.update(name, theirs), dtype, f"{name} ({row}, step {step})")
    assert all(int(opt.state[i]["step"]) == STEPS for i in range(len(tparams)))


def test_torch_class_matches_oracle(oracle):
    """fastopt.torch.Adan steps torch CPU tensors as pytorch_optimizer.Adan does."""
    import torch

    import fastopt.torch as fot

    shape_list = SHAPE_SETS["odd"]
    params, _ = _init(shape_list, np.float32, 7)
    ours = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    theirs = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    hp = dict(lr=1e-2, weight_decay=0.5)
    opt_ours, opt_theirs = fot.Adan(ours, **hp), oracle(theirs, foreach=False, **hp)
    grads = _Grads(shape_list, np.float32, 8)
    scales = _Scales()
    for step in range(1, 11):
        gs = grads.next(step)
        for a, b, g in zip(ours, theirs, gs):
            a.grad, b.grad = torch.tensor(g.copy()), torch.tensor(g.copy())
        opt_ours.step()
        opt_theirs.step()
        want = [b.detach().numpy() for b in theirs]
        _assert_close([a.detach().numpy() for a in ours], want, scales.update("param", want),
                      np.float32, f"param (step {step})")
    assert set(SLOTS) <= set(opt_ours.state[ours[0]])
