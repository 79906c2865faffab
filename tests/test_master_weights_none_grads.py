"""Master weights when params of one bucket have different step counts (issue 13).

A None gradient skips its param, so params of one group (and dtype) can reach a step with
different step counts; the step then runs one pass per step count over part of the
bucket. That part must keep the bucket's model (the 16-bit params and their float32
masters) exactly as a whole bucket does. The oracle is the same run on float32 params
without master weights: the masters equal it to the bit on the "cpu" backend (list and
FlatParams), and the 16-bit params are their masters rounded.
"""
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels.lowp import bfloat16_dtype
from fastopt.optimizer import Optimizer

F16 = np.dtype(np.float16)
BF16 = bfloat16_dtype()
needs_bf16 = pytest.mark.skipif(BF16 is None, reason="bfloat16 needs ml_dtypes")
BACKENDS = ["cpu", "numpy"]

# Every optimizer that accepts master_weights, with hyperparameters that give it state.
OPTIMIZERS = [
    (fo.SGD, dict(lr=0.05, momentum=0.9)),
    (fo.Adagrad, dict(lr=0.05)),
    (fo.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (fo.Adam, dict(lr=0.01)),
    (fo.AdamW, dict(lr=0.01, amsgrad=True)),
    (fo.Adamax, dict(lr=0.01)),
    (fo.NAdam, dict(lr=0.01)),
    (fo.RAdam, dict(lr=0.01)),
    (fo.Adadelta, dict(lr=1.0)),
    (fo.Lion, dict(lr=1e-3)),
    (fo.Adan, dict(lr=0.01)),
    (fo.Rprop, dict(lr=0.01)),
    (fo.ASGD, dict(lr=0.01, t0=2.0)),
    (fo.AdEMAMix, dict(lr=0.01, t_alpha_beta3=10)),
    (fo.AdamWScheduleFree, dict(lr=0.01, warmup_steps=2)),
    (fo.SGDScheduleFree, dict(lr=0.05, momentum=0.9)),
]
# refuse master_weights at construction (no 16-bit pass)
REFUSING = {fo.LAMB, fo.LARS, fo.Adafactor, fo.Muon, fo.MuonWithAuxAdam, fo.SparseAdam}

# Param 0 gets a gradient every step, param 1 every other step, param 2 only late; the
# last two steps have the same pattern (a cached plan re-targeted at new gradients) while
# the step counts still differ. Param 1 spans two chunks of the CPU driver (CHUNK).
SHAPES = [(257,), (70_001,), (3, 5)]
PATTERN = [(True, True, False), (True, False, False), (True, True, False),
           (True, False, True), (True, True, True), (True, True, True)]


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _master(opt, i):
    return np.asarray(opt.state[i]["master_param"])


def _assert_model_is_rounded_master(w, master, stochastic, where):
    assert master.dtype == np.float32, where
    assert np.isfinite(master).all(), f"{where}: non-finite master weights"
    if not stochastic:
        # round to nearest even
        np.testing.assert_array_equal(_bits(w), _bits(master.astype(w.dtype)), err_msg=where)
        return
    # stochastic bfloat16: the master truncated to 16 bits, or the next value away from zero
    m = _bits(master).astype(np.int64)
    low, up = m >> 16, (m >> 16) + ((m & 0xFFFF) != 0)
    got = _bits(w).astype(np.int64)
    assert np.all((got == low) | (got == up)), f"{where}: not a rounding of the master"


def _close(a, b, where):
    """Within float32 rounding (the reference is separate NumPy code)."""
    assert np.linalg.norm(a - b) <= 1e-6 * max(np.linalg.norm(b), 1e-30), where


def _grads(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32).astype(dtype) if on else None
             for s, on in zip(SHAPES, row)] for row in PATTERN]


def _run(cls, kw, params, grad_rows, backend, cast=None, **options):
    opt = cls(params, backend=backend, **options, **kw)
    for row in grad_rows:
        opt.step([None if g is None else (g if cast is None else g.astype(cast)) for g in row])
    return opt


def _check_against_float32(cls, kw, dtype, backend, stochastic=False, flat=False):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]
    rows = _grads(dtype)
    options = dict(master_weights=True, stochastic_rounding=stochastic, seed=3)
    if flat:
        fp = fo.FlatParams([p.copy() for p in init])
        low = fp.params
        opt = cls(fp, backend=backend, **options, **kw)
        for row in rows:
            # explicit grads: None entries skip their param (the FlatParams' own grads unused)
            opt.step([None if g is None else g.copy() for g in row])
    else:
        low = [p.copy() for p in init]
        opt = _run(cls, kw, low, rows, backend, **options)
    oracle = [p.astype(np.float32) for p in init]
    _run(cls, kw, oracle, rows, backend, cast=np.float32)
    reference = [p.astype(np.float32) for p in init]
    _run(cls, kw, reference, rows, "numpy", cast=np.float32)
    counts = np.sum(PATTERN, axis=0)
    for i, (w, o, r) in enumerate(zip(low, oracle, reference)):
        where = f"{cls.__name__} {dtype} {backend} flat={flat} params[{i}]"
        if opt.has_step_state:        # SGD and Lion keep no step count
            assert float(opt.state[i]["step"]) == counts[i], where
        master = _master(opt, i)
        _assert_model_is_rounded_master(w, master, stochastic, where)
        if backend == "cpu":
            np.testing.assert_array_equal(_bits(master), _bits(o), err_msg=where)
        _close(master, r, where)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,stochastic", [
    (F16, False),
    pytest.param(BF16, False, marks=needs_bf16),
    pytest.param(BF16, True, marks=needs_bf16),
], ids=["float16", "bfloat16", "bfloat16-stochastic"])
def test_issue_13_repro(dtype, stochastic, backend):
    rng = np.random.default_rng(0)
    p16 = [rng.standard_normal(1000).astype(np.float32).astype(dtype) for _ in range(2)]
    g0, g1 = [rng.standard_normal(1000).astype(np.float32).astype(dtype) for _ in range(2)]
    p32 = [p.astype(np.float32) for p in p16]
    ref = [p.astype(np.float32) for p in p16]
    opt = fo.Adam(p16, lr=1e-2, master_weights=True, stochastic_rounding=stochastic, backend=backend)
    o32 = fo.Adam(p32, lr=1e-2, backend=backend)
    oref = fo.Adam(ref, lr=1e-2, backend="numpy")
    for o, cast in ((opt, None), (o32, np.float32), (oref, np.float32)):
        o.step([g0 if cast is None else g0.astype(cast), None])
        o.step([g0 if cast is None else g0.astype(cast), g1 if cast is None else g1.astype(cast)])
    for i in range(2):
        where = f"{dtype} {backend} params[{i}]"
        master = _master(opt, i)
        _assert_model_is_rounded_master(p16[i], master, stochastic, where)
        if backend == "cpu":
            np.testing.assert_array_equal(_bits(master), _bits(p32[i]), err_msg=where)
        _close(master, ref[i], where)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_none_grads_with_master_weights_float16(cls, kw, backend):
    _check_against_float32(cls, kw, F16, backend)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_none_grads_with_master_weights_flat_params(cls, kw):
    _check_against_float32(cls, kw, F16, "cpu", flat=True)


@needs_bf16
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("cls,kw", [OPTIMIZERS[0], OPTIMIZERS[4], OPTIMIZERS[6]],
                         ids=["SGD", "AdamW", "NAdam"])
def test_none_grads_with_master_weights_bfloat16(cls, kw, stochastic, backend):
    _check_against_float32(cls, kw, BF16, backend, stochastic=stochastic)
    if backend == "cpu":
        _check_against_float32(cls, kw, BF16, backend, stochastic=stochastic, flat=True)


def test_the_table_covers_every_optimizer_that_accepts_master_weights():
    accepting = set()
    for name in fo.__all__:
        cls = getattr(fo, name)
        if inspect.isclass(cls) and issubclass(cls, Optimizer) and cls is not Optimizer:
            try:
                cls([np.zeros(3, F16)], master_weights=True)
            except NotImplementedError:
                assert cls in REFUSING, name
                continue
            accepting.add(cls)
    assert accepting == {c for c, _ in OPTIMIZERS}
    for cls in REFUSING:
        with pytest.raises(NotImplementedError, match="master_weights"):
            cls([np.zeros(3, F16)], master_weights=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_counts_differing_from_a_loaded_state_dict(backend):
    """Step counts that differ without any None gradient in this run (a checkpoint)."""
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(300).astype(np.float32).astype(F16) for _ in range(3)]
    rows = [[rng.standard_normal(300).astype(np.float32).astype(F16) for _ in range(3)]
            for _ in range(3)]
    src = fo.Adam([p.copy() for p in init], lr=0.01, master_weights=True, backend=backend)
    src.step([rows[0][0], None, None])
    src.step([rows[1][0], rows[1][1], None])
    src32 = fo.Adam([p.astype(np.float32) for p in init], lr=0.01, backend=backend)
    src32.step([rows[0][0].astype(np.float32), None, None])
    src32.step([rows[1][0].astype(np.float32), rows[1][1].astype(np.float32), None])
    low = [p.copy() for p in src.param_groups[0]["params"]]
    opt = fo.Adam(low, lr=0.01, master_weights=True, backend=backend)
    opt.load_state_dict(src.state_dict())
    opt.step(rows[2])
    src32.step([g.astype(np.float32) for g in rows[2]])
    for i in range(3):
        master = _master(opt, i)
        _assert_model_is_rounded_master(low[i], master, False, f"params[{i}]")
        o = src32.param_groups[0]["params"][i]
        if backend == "cpu":
            np.testing.assert_array_equal(_bits(master), _bits(o))
        _close(master, o, f"params[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grads_with_master_weights_are_refused_before_any_change(backend):
    ps = [np.ones((4, 3), F16), np.ones(5, F16)]
    opt = fo.SGD(ps, lr=0.1, master_weights=True, backend=backend)
    before = [p.copy() for p in ps]
    with pytest.raises(NotImplementedError, match="master weights"):
        opt.step([fo.SparseGrad(np.array([1]), np.ones((1, 3), F16)), np.ones(5, F16)])
    for a, b in zip(before, ps):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert len(opt.state) == 0 and opt.iterations == 0


def test_cuda_master_weights_with_none_grads_match_the_cpu():
    """The issue's repro on the CUDA driver (under the simulator): float16 params with
    master weights, a None gradient on the first step, so the bucket splits by step
    count; and the same after loading a state dict with differing step counts. The
    params, masters and state equal the CPU driver's bit for bit (the same element, the
    same float32 math, round to nearest even)."""
    script = textwrap.dedent("""
        import numpy as np, fastopt as fo
        rng = np.random.default_rng(0)
        init = [rng.standard_normal(100).astype(np.float16) for _ in range(2)]
        g = [rng.standard_normal(100).astype(np.float16) for _ in range(2)]
        src = fo.Adam([p.copy() for p in init], lr=1e-2, master_weights=True, backend="numpy")
        src.step([g[0], None])
        for load in (False, True):
            runs = {}
            for backend in ("cpu", "cuda"):
                ps = [p.copy() for p in init]
                opt = fo.Adam(ps, lr=1e-2, master_weights=True, backend=backend)
                if load:
                    opt.load_state_dict(src.state_dict())
                for grads in ([g[0], None], g, g):
                    opt.step(grads)
                runs[backend] = (ps, opt.state_dict())
            (pc, sc), (pg, sg) = runs["cpu"], runs["cuda"]
            for a, b, p0 in zip(pc, pg, init):
                assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
                assert not np.array_equal(a, p0), "a param was never written back"
            for i, st in sc["state"].items():
                for k, v in st.items():
                    assert np.array_equal(v, sg["state"][i][k]), (load, i, k)
                    assert np.all(np.isfinite(v)), (load, i, k)
        print("ok")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout + out.stderr)[-3000:]


def test_cuda_sparse_rows_match_the_cpu():
    """SparseGrad steps through the CUDA driver's row kernel (under the simulator) for every
    optimizer that takes them: the same params and state as the CPU driver's."""
    script = textwrap.dedent("""
        import numpy as np, fastopt as fo
        rng = np.random.default_rng(1)
        init = rng.standard_normal((9, 4)).astype(np.float32)
        grads = [fo.SparseGrad(np.array(ix), rng.standard_normal((len(ix), 4)).astype(np.float32))
                 for ix in ([1, 5], [5, 0, 8], [2])]
        for cls, hp in ((fo.SGD, dict(lr=0.1, momentum=0.9)), (fo.Adagrad, dict(lr=0.1)),
                        (fo.Adam, dict(lr=0.1))):
            runs = {}
            for backend in ("cpu", "cuda"):
                p = init.copy()
                opt = cls([p], backend=backend, **hp)
                for g in grads:
                    opt.step([g])
                runs[backend] = (p, opt.state_dict())
            (pc, sc), (pg, sg) = runs["cpu"], runs["cuda"]
            assert np.array_equal(pc, pg), cls.__name__
            assert not np.array_equal(pc[1], init[1]) and np.array_equal(pc[3], init[3])
            for k, v in sc["state"][0].items():
                assert np.array_equal(v, sg["state"][0][k]), (cls.__name__, k)
        print("ok")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout + out.stderr)[-3000:]
