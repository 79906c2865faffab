"""The CUDA backend against the NumPy reference: under the CUDA simulator, or on a GPU.

``tests/test_cuda_simulator.py`` runs this file in its own process with
``NUMBA_ENABLE_CUDASIM=1``: the
kernels run on the CPU with NumPy arrays standing in for device memory (small shapes,
tiny blocks and chunks, so every chunk and block boundary is crossed). On a machine
with a GPU (``bench/gpu_check.sh``) the same tests run for real on CuPy arrays, plus
the GPU-only tests at the end (streams, asynchrony, no per-step allocation, torch
tensors). In a plain run with neither, the CUDA tests skip; the import-isolation tests
run everywhere but under the simulator (where they would repeat the plain run's).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt as fo
from cases import CASES, RTOL, case_params, grid_params, group_of, rel_err

pytestmark = pytest.mark.cudasim

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _gpu_present() -> tuple[bool, str]:
    # Look for the driver before importing numba.cuda: a CPU-only run never loads it.
    if SIM:
        return False, "simulator"
    if not os.environ.get("FASTOPT_REQUIRE_GPU") and not any(
            os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia")):
        return False, "no NVIDIA device files"
    try:
        import cupy  # noqa: F401  (device FlatParams and test arrays)
        from numba import cuda
        return bool(cuda.is_available()), "numba.cuda.is_available()"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


GPU, _WHY = _gpu_present()
if os.environ.get("FASTOPT_REQUIRE_GPU") == "1" and not GPU:
    # bench/gpu_check.sh sets this: a GPU run that silently skipped everything would lie.
    raise RuntimeError(f"FASTOPT_REQUIRE_GPU=1 but no usable GPU: {_WHY}")
needs_cuda = pytest.mark.skipif(
    not (SIM or GPU), reason="no GPU: these run under the CUDA simulator in tests/test_cuda_simulator.py")
gpu_only = pytest.mark.skipif(not GPU, reason="needs a real GPU")

SHAPES = [(0,), (1,), (5, 3), (37,)]          # empty, single, 2-D, odd: chunk edges everywhere
STEPS = 3


def dev(a):
    """A device copy of host array ``a`` (a NumPy copy under the simulator)."""
    if SIM:
        return np.array(a, copy=True)
    import cupy
    return cupy.asarray(a)


def host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    import cupy
    return cupy.asnumpy(a)


def backend():
    from fastopt import _backend
    return _backend.get("cuda")


def _state(opt, n, names):
    st = opt.state
    return {name: [host(st[i][name]) if i in st and name in st[i] else None for i in range(n)]
            for name in names if name is not None}


def _run_three_ways(case, hp, dtype, shapes=SHAPES, steps=STEPS, seed=0):
    """numpy reference, CUDA list mode (fresh grads each step) and CUDA FlatParams mode."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [a.copy() for a in init]
    lst = [dev(a) for a in init]
    flat = fo.FlatParams([dev(a) for a in init])
    o_ref = case.fo_cls(ref, backend="numpy", **hp)
    o_lst = case.fo_cls(lst, backend="cuda", **hp)
    o_flat = case.fo_cls(flat, backend="cuda", **hp)
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        o_ref.step(grads)
        d_grads = [dev(g) for g in grads]
        o_lst.step(d_grads)
        for g, fg in zip(d_grads, flat.grads):
            fg[...] = g
        o_flat.step()
        for g, d in zip(grads, d_grads):     # the kernel never writes the gradients
            np.testing.assert_array_equal(host(d), g)
    names = case.slot_names
    return ((ref, _state(o_ref, len(init), names)),
            ([host(p) for p in lst], _state(o_lst, len(init), names)),
            ([host(p) for p in flat.params], _state(o_flat, len(init), names)))


def _check(case, result, dtype):
    (ref, ref_st), (lst, lst_st), (flat, flat_st) = result
    tol = RTOL[np.dtype(dtype)]
    for what, r, a, b in [("params", ref, lst, flat)] + [
            (k, ref_st[k], lst_st[k], flat_st[k]) for k in ref_st]:
        for i, (x, y, z) in enumerate(zip(r, a, b)):
            assert (x is None) == (y is None) == (z is None), f"{case.name}: {what}[{i}] presence"
            if x is None:
                continue
            assert y.dtype == np.dtype(dtype) and z.dtype == np.dtype(dtype)
            # One kernel, one element function: list and FlatParams mode agree to the bit.
            np.testing.assert_array_equal(y, z, err_msg=f"{case.name}: {what}[{i}] list vs flat")
            err = rel_err(y, x)
            assert err <= tol, f"{case.name}: {what}[{i}] relative error {err:.3g} > {tol:g}"


@needs_cuda
@pytest.mark.parametrize("case,row", grid_params())
def test_every_flag_combination_float32(case, row):
    hp = case.hp(row)
    _check(case, _run_three_ways(case, hp, np.float32), np.float32)


@needs_cuda
@pytest.mark.parametrize("case", case_params())
def test_full_row_float64(case):
    _check(case, _run_three_ways(case, case.hp(), np.float64), np.float64)


@needs_cuda
@pytest.mark.parametrize("case", case_params())
def test_functional_api(case):
    """fo.functional.<name>(..., backend="cuda") over caller-owned device state."""
    if not hasattr(fo.functional, case.name):
        pytest.skip(f"fastopt.functional has no {case.name} yet")
    hp = case.hp()
    kw = case.functional_kwargs(hp)
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    active = case.fo_cls._active_slots({**_defaults(case), **hp})[:len(case.slot_names)]
    ref = [a.copy() for a in init]
    d = [dev(a) for a in init]
    ref_slots = [None if n is None else [np.full(s, case.initial_state(hp, n), np.float32) for s in SHAPES]
                 for n in active]
    d_slots = [None if s is None else [dev(a) for a in s] for s in ref_slots]
    for step in (1, 2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        case.functional(ref, grads, *ref_slots, step=step, backend="numpy", **kw)
        case.functional(d, [dev(g) for g in grads], *d_slots, step=step, backend="cuda", **kw)
    for i, (a, b) in enumerate(zip(d, ref)):
        assert rel_err(host(a), b) <= RTOL[np.dtype(np.float32)], f"params[{i}]"
    for s_d, s_r in zip(d_slots, ref_slots):
        for a, b in zip(s_d or (), s_r or ()):
            assert rel_err(host(a), b) <= RTOL[np.dtype(np.float32)]


def _defaults(case):
    import inspect
    sig = inspect.signature(case.fo_cls.__init__)
    return {k: v.default for k, v in sig.parameters.items()
            if v.default is not inspect.Parameter.empty and k not in ("backend", "max_grad_norm")}


@needs_cuda
def test_one_launch_per_step_per_dtype_group():
    be = backend()
    rng = np.random.default_rng(5)
    shapes = [(3,), (40,), (2, 7), (0,), (9,)] * 4
    # list mode: 20 separate arrays, one dtype -> one launch
    params = [dev(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    opt = fo.Adam(params, lr=0.01, backend="cuda")
    grads = [dev(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    for _ in range(3):
        before = be.launches
        opt.step(grads)
        assert be.launches - before == 1
    # FlatParams: one arena -> one launch
    flat = fo.FlatParams([dev(rng.standard_normal(s).astype(np.float32)) for s in shapes])
    flat.grad[...] = 1
    opt = fo.AdamW(flat, lr=0.01, amsgrad=True, backend="cuda")
    for _ in range(3):
        before = be.launches
        opt.step()
        assert be.launches - before == 1
    # two dtypes in one group -> two launches
    mixed = [dev(rng.standard_normal(s).astype(np.float32 if k % 2 else np.float64))
             for k, s in enumerate(shapes)]
    opt = fo.RMSprop(mixed, lr=0.01, momentum=0.5, centered=True, backend="cuda")
    mgrads = [dev(rng.standard_normal(s).astype(np.dtype(host(p).dtype))) for s, p in zip(shapes, mixed)]
    for _ in range(2):
        before = be.launches
        opt.step(mgrads)
        assert be.launches - before == 2


@needs_cuda
def test_flatparams_arena_is_one_row_and_chunks_cover_every_element():
    be = backend()
    rng = np.random.default_rng(6)
    flat = fo.FlatParams([dev(rng.standard_normal(s).astype(np.float32)) for s in [(50,), (0,), (33,), (7, 3)]])
    state = [dev(np.zeros(flat.numel, np.float32))]
    table = be.table([flat.data], [flat.grad], (state, None, None))
    assert table.table.shape[0] == 1 and table.n_elements == flat.numel
    views = be.table(flat.params, flat.grads, (None, None, None))
    assert views.table.shape[0] == 1                    # back-to-back views merge into one row
    rows, lo, hi = views.chunks.T
    assert lo[0] == 0 and hi[-1] == flat.numel and np.all(lo[1:] == hi[:-1]) and np.all(rows == 0)
    from fastopt.kernels import cuda as driver
    assert np.all(hi - lo <= driver.CHUNK_MAX)


@needs_cuda
def test_grad_scale_multiplies_gradients_as_read():
    from fastopt.kernels import adam
    be = backend()
    rng = np.random.default_rng(7)
    init = rng.standard_normal(90).astype(np.float32)
    g = rng.standard_normal(90).astype(np.float32)
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01), 1, np.float32)
    outs = []
    for grad, scale in ((g * np.float32(4.0), 0.25), (g, 1.0)):
        p, m, v, gd = dev(init), dev(np.zeros(90, np.float32)), dev(np.zeros(90, np.float32)), dev(grad)
        be.run(adam.adam_element, be.table([p], [gd], ([m], [v], None)), h, grad_scale=scale)
        outs.append((host(p), host(m), host(v)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)              # 4 * 0.25 is exact in float32


@needs_cuda
def test_table_cache_reuses_device_tables_for_the_same_arrays():
    be = backend()
    p = [dev(np.ones(10, np.float32)), dev(np.ones(4, np.float32))]
    g = [dev(np.ones(10, np.float32)), dev(np.ones(4, np.float32))]
    t1 = be.table(p, g, (None, None, None))
    t2 = be.table(p, g, (None, None, None))
    assert t1.args[-1] is t2.args[-1]                    # same device chunk table, no upload
    g2 = [dev(np.ones(10, np.float32)), dev(np.ones(4, np.float32))]
    t3 = t1.with_grads(g2)
    assert t3.args[-1] is not t1.args[-1]
    assert t3.refs[1] is g2


@needs_cuda
def test_reduce_chunks_sum_and_max():
    be = backend()
    rng = np.random.default_rng(8)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(100,), (1,), (0,), (33,)]]
    d = [dev(a) for a in arrays]
    table = be.table(d, d, (None, None, None))
    parts = be.reduce_chunks(_sumsq, table, _NoScalars(), maximum=False)
    assert parts.shape == (table.n_chunks, 2) and parts.dtype == np.float64
    expected = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)
    assert parts[:, 0].sum() == pytest.approx(expected, rel=1e-12)
    assert np.all(parts[:, 1] == 0)
    # per-row partials combine into per-tensor sums (merge=False keeps one row per tensor)
    table = be.table(d, d, (None, None, None), merge=False)
    parts = be.reduce_chunks(_sumsq, table, _NoScalars())
    starts = np.flatnonzero(np.r_[True, np.diff(table.chunks[:, 0]) != 0])
    per_row = np.add.reduceat(parts[:, 0], starts)
    nonempty = [a for a in arrays if a.size]
    assert per_row == pytest.approx([float(np.sum(a.astype(np.float64) ** 2)) for a in nonempty], rel=1e-12)
    parts = be.reduce_chunks(_maxabs, be.table(d, d, (None, None, None)), _NoScalars(), maximum=True)
    assert parts[:, 0].max() == max(float(np.abs(a).max()) for a in nonempty)


from typing import NamedTuple  # noqa: E402


class _NoScalars(NamedTuple):
    unused: float = 0.0
    # float64 1: ``g * one`` widens a float32 g (``float(g)`` stays float32 on the GPU).
    one: float = np.float64(1.0)


def _sumsq(p, g, s0, s1, s2, h):
    x = g * h.one
    return x * x, 0.0


def _maxabs(p, g, s0, s1, s2, h):
    return abs(float(g)), 0.0


@needs_cuda
def test_write_masks_match_the_cpu_driver():
    """LAMB's two passes through the CUDA driver: the reduction writes the moments (and
    nothing else), the step writes the param only; both equal the CPU driver's."""
    from fastopt.kernels import cpu, lamb
    be = backend()
    rng = np.random.default_rng(9)
    n = 77
    p, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = rng.uniform(0.5, 1.5, n).astype(np.float32)
    h = lamb.lamb_scalars(group_of(lamb.SPEC, lr=0.1, weight_decay=0.01), 3, np.float32)
    cpu_arrays = [x.copy() for x in (p, g, m, v)]
    cp, cg, cm, cv = cpu_arrays
    ctable = cpu.ChunkTable([cp], [cg], ([cm], [cv], None), merge=False)
    dp, dg, dm, dv = (dev(x) for x in (p, g, m, v))
    dtable = be.table([dp], [dg], ([dm], [dv], None), merge=False)
    cparts = cpu.reduce_chunks(lamb.lamb_moments, ctable, h, writes=lamb.MOMENTS_WRITES)
    dparts = be.reduce_chunks(lamb.lamb_moments, dtable, h, writes=lamb.MOMENTS_WRITES)
    np.testing.assert_array_equal(host(dp), p)                   # p not written
    np.testing.assert_array_equal(host(dg), g)
    assert rel_err(host(dm), cm) <= 1e-6 and rel_err(host(dv), cv) <= 1e-6
    assert not np.array_equal(cm, m)
    np.testing.assert_allclose(dparts.sum(axis=0), cparts.sum(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="absent"):
        be.reduce_chunks(lamb.lamb_moments, be.table([dp], [dg], ([dm], None, None)), h,
                         writes=lamb.MOMENTS_WRITES)
    m1, v1 = host(dm).copy(), host(dv).copy()
    ratio = np.full(1, 0.5, np.float32)
    cpu.run(lamb.lamb_element, ctable, h, row_values=ratio, row_mode="slot2", writes=lamb.STEP_WRITES)
    be.run(lamb.lamb_element, dtable, h, row_values=be.row_array(dtable, ratio), row_mode="slot2",
           writes=lamb.STEP_WRITES)
    np.testing.assert_array_equal(host(dm), m1)                  # moments read-only
    np.testing.assert_array_equal(host(dv), v1)
    assert rel_err(host(dp), cp) <= 1e-6 and not np.array_equal(cp, p)


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _as_patterns(a):
    """A device copy of 16-bit host array ``a`` (CuPy has no bfloat16: its uint16 bits)."""
    return dev(a.view(np.uint16) if a.dtype == _bf16() else a)


@needs_cuda
@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_master_weights_through_the_driver(low):
    """float32 masters, 16-bit gradients and model copies on the device: the masters as
    the CPU driver's, each copy the master rounded (nearest even, or a stochastic
    neighbour for bfloat16)."""
    from fastopt.kernels import adam, cpu
    be = backend()
    low = np.dtype(np.float16) if low == "float16" else _bf16()
    rng = np.random.default_rng(12)
    shapes = [(70,), (1,), (3, 5)]
    masters = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(low) for s in shapes]
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                      1, np.float32)
    for stochastic in ((False, True) if low == _bf16() else (False,)):
        cm = [m.copy() for m in masters]
        cs = ([np.zeros(s, np.float32) for s in shapes], [np.zeros(s, np.float32) for s in shapes], None)
        cpu.run(adam.adam_element, cpu.ChunkTable(cm, grads, cs, model=[m.astype(low) for m in cm]), h)
        dm = [dev(m) for m in masters]
        dw = [_as_patterns(m.astype(low)) for m in masters]
        ds = ([dev(np.zeros(s, np.float32)) for s in shapes], [dev(np.zeros(s, np.float32)) for s in shapes], None)
        table = be.table(dm, [_as_patterns(g) for g in grads], ds, model=dw)
        be.run(adam.adam_element, table, h, seed=3, stochastic=stochastic)
        for i, (m, w) in enumerate(zip(dm, dw)):
            assert rel_err(host(m), cm[i]) <= 1e-6, f"master {i}"
            got = host(w).view(np.uint16)
            nearest = host(m).astype(low).view(np.uint16)
            if stochastic:
                down = (host(m).view(np.uint32) >> 16).astype(np.uint16)
                assert np.all((got == down) | (got == down + 1)), f"model copy {i}"
            else:
                np.testing.assert_array_equal(got, nearest, err_msg=f"model copy {i}")


@needs_cuda
def test_sparse_rows_through_the_driver():
    from fastopt.kernels import adagrad, cpu
    be = backend()
    rng = np.random.default_rng(13)
    param = rng.standard_normal((50, 3)).astype(np.float32)
    state = rng.uniform(0, 1, (50, 3)).astype(np.float32)
    index = np.array([41, 0, 7, 49, 12])
    rows = rng.standard_normal((5, 3)).astype(np.float32)
    h = adagrad.adagrad_scalars(group_of(adagrad.SPEC, lr=0.1), 2, np.float32)
    cp, cs = param.copy(), state.copy()
    cpu.run_rows(adagrad.adagrad_element, cp, index, rows, (cs, None, None), h, 0.5)
    for index_on in (np.asarray, dev):          # a host index is copied over; a device one read
        dp, ds = dev(param), dev(state)
        before = be.launches
        be.run_rows(adagrad.adagrad_element, dp, index_on(index), dev(rows), (ds, None, None), h, 0.5)
        assert be.launches == before + 1
        assert rel_err(host(dp), cp) <= 1e-6 and rel_err(host(ds), cs) <= 1e-6
        untouched = np.setdiff1d(np.arange(50), index)
        np.testing.assert_array_equal(host(dp)[untouched], param[untouched])


@needs_cuda
@pytest.mark.parametrize("n_slots", [0, 1, 5])
def test_any_number_of_bfloat16_state_columns_through_the_driver(n_slots):
    """K state columns stored as bfloat16 bits (uint16 device arrays, format given)."""
    be = backend()
    rng = np.random.default_rng(14)
    shapes = [(40,), (0,), (3, 3)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    states = [[rng.uniform(0.5, 2, s).astype(_bf16()) for s in shapes] for _ in range(n_slots)]
    dp = [dev(p) for p in params]
    ds = [[_as_patterns(a) for a in col] for col in states]
    be.run(_decaying_sums[n_slots], be.table(dp, [dev(g) for g in grads], ds,
                                             formats=("bfloat16",) * n_slots), _Decay())
    for i, (p, g) in enumerate(zip(params, grads)):
        total = np.zeros_like(p)
        for k, col in enumerate(states):
            new = col[i].astype(np.float32) * np.float32(0.5) + g
            total += new
            got = host(ds[k][i]).view(_bf16()).astype(np.float32)
            np.testing.assert_allclose(got, new, rtol=2 ** -7, err_msg=f"state {k} of {i}")
        assert rel_err(host(dp[i]), p - np.float32(0.25) * (g + total)) <= 1e-2


class _Decay(NamedTuple):
    decay: float = np.float32(0.5)
    lr: float = np.float32(0.25)


def _sums0(p, g, h):
    return (p - h.lr * g,)


def _sums1(p, g, a, h):
    a = a * h.decay + g
    return p - h.lr * (g + a), a


def _sums5(p, g, a, b, c, d, e, h):
    a = a * h.decay + g
    b = b * h.decay + g
    c = c * h.decay + g
    d = d * h.decay + g
    e = e * h.decay + g
    return p - h.lr * (g + a + b + c + d + e), a, b, c, d, e


_decaying_sums = {0: _sums0, 1: _sums1, 5: _sums5}


@needs_cuda
def test_clip_grad_norm_on_cuda_matches_numpy():
    if not hasattr(fo, "clip_grad_norm"):
        pytest.skip("fastopt.clip_grad_norm not present")
    rng = np.random.default_rng(9)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    for norm_type in (2.0, 1.0, float("inf")):
        ref = [a.copy() for a in arrays]
        d = [dev(a) for a in arrays]
        n_ref = fo.clip_grad_norm(ref, 0.5, norm_type=norm_type, backend="numpy")
        n_dev = fo.clip_grad_norm(d, 0.5, norm_type=norm_type, backend="cuda")
        assert n_dev == pytest.approx(n_ref, rel=1e-6)
        for a, b in zip(d, ref):
            assert rel_err(host(a), b) <= 1e-6
    ref = [a.copy() for a in arrays]
    d = [dev(a) for a in arrays]
    fo.clip_grad_value(ref, 0.3, backend="numpy")
    fo.clip_grad_value(d, 0.3, backend="cuda")
    for a, b in zip(d, ref):
        np.testing.assert_array_equal(host(a), b)
    assert max(float(np.abs(b).max()) for b in ref if b.size) == pytest.approx(0.3)


# -- import isolation: runs everywhere -------------------------------------------------------
_ISOLATION = textwrap.dedent("""
    import sys
    import numpy as np
    import fastopt as fo
    p = [np.ones(5, np.float32), np.ones(3, np.float32)]
    fo.Adam(p, lr=0.1, backend="cpu").step([np.ones(5, np.float32), np.ones(3, np.float32)])
    flat = fo.FlatParams([np.ones(4, np.float32)])
    flat.grad[...] = 1
    fo.SGD(flat, lr=0.1, momentum=0.9).step()
    fo.functional.adam(p, [np.ones(5, np.float32), np.ones(3, np.float32)],
                       [np.zeros(5, np.float32), np.zeros(3, np.float32)],
                       [np.zeros(5, np.float32), np.zeros(3, np.float32)], step=1)
    bad = sorted(m for m in sys.modules
                 if m == "cupy" or m.startswith(("cupy.", "numba.cuda", "numba_cuda", "cuda.", "torch")))
    print("LOADED", bad)
    assert not bad, bad
""")


def _python(code, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


# Under the simulator (tests/test_cuda_simulator.py's child) these two would repeat the plain
# run's: their own child processes drop NUMBA_ENABLE_CUDASIM either way.
plain_run_only = pytest.mark.skipif(SIM, reason="the plain run runs it (its child drops NUMBA_ENABLE_CUDASIM)")


@plain_run_only
def test_cpu_use_never_imports_cuda_libraries():
    r = _python(_ISOLATION)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOADED []" in r.stdout


@plain_run_only
def test_missing_cuda_driver_raises_backend_unavailable_with_the_cause():
    code = textwrap.dedent("""
        import sys
        sys.modules["numba.cuda"] = None          # as if numba-cuda were not installed
        import numpy as np
        import fastopt as fo
        try:
            fo.Adam([np.ones(3, np.float32)], backend="cuda").step([np.ones(3, np.float32)])
        except fo.BackendUnavailableError as e:
            assert isinstance(e.__cause__, ImportError), repr(e.__cause__)
            assert "cuda" in str(e)
            print("OK", type(e.__cause__).__name__)
    """)
    r = _python(code)
    assert r.returncode == 0 and "OK " in r.stdout, r.stdout + r.stderr


# -- GPU only ----------------------------------------------------------------------------------
@gpu_only
def test_numpy_arrays_are_rejected_on_a_real_gpu():
    with pytest.raises((TypeError, fo.BackendUnavailableError)):
        fo.Adam([np.ones(3, np.float32)], backend="cuda").step([np.ones(3, np.float32)])


@gpu_only
def test_mixing_host_and_device_arrays_is_an_error():
    import cupy
    with pytest.raises(TypeError, match="host and device"):
        fo.Adam([cupy.ones(3, np.float32)], backend="cuda").step([np.ones(3, np.float32)])


@gpu_only
def test_auto_dispatch_picks_cuda_for_cupy_arrays():
    import cupy
    be = backend()
    p = [cupy.ones(1000, np.float32)]
    before = be.launches
    fo.Adam(p, lr=0.1).step([cupy.ones(1000, np.float32)])
    assert be.launches == before + 1
    assert float(p[0][0]) == pytest.approx(0.9, rel=1e-6)


@gpu_only
def test_no_allocation_per_step():
    import cupy
    pool = cupy.get_default_memory_pool()
    rng = np.random.default_rng(10)
    shapes = [(1000,), (37,), (64, 64)] * 10
    flat = fo.FlatParams([cupy.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes])
    flat.grad.fill(1)
    opt_flat = fo.Adam(flat, lr=1e-3)
    params = [cupy.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads = [cupy.ones(s, np.float32) for s in shapes]
    opt_list = fo.Adam(params, lr=1e-3, amsgrad=True)
    for _ in range(2):                       # warm up: state, tables, compilation
        opt_flat.step()
        opt_list.step(grads)
    cupy.cuda.Device().synchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(20):
        opt_flat.step()
        opt_list.step(grads)
    cupy.cuda.Device().synchronize()
    assert (pool.used_bytes(), pool.total_bytes()) == (used, total)


@gpu_only
def test_step_returns_before_the_kernel_finishes():
    import cupy
    n = 64 << 20
    flat = fo.FlatParams([cupy.zeros(n, np.float32)])
    flat.grad.fill(1)
    opt = fo.Adam(flat, lr=1e-3)
    opt.step()
    stream = cupy.cuda.get_current_stream()
    stream.synchronize()
    opt.step()
    pending = not stream.done               # about 0.7 ms of work was queued, not waited for
    stream.synchronize()
    assert pending


def _spin(stream_ptr, ms):
    """Occupy stream ``stream_ptr`` for about ``ms`` milliseconds with a sleeping kernel."""
    from numba import cuda

    @cuda.jit
    def sleeper(n):
        for _ in range(n):
            cuda.nanosleep(1000000)          # up to ~1 ms per call

    sleeper[1, 1, cuda.external_stream(stream_ptr)](ms)


@gpu_only
def test_launches_on_the_current_cupy_stream():
    import time

    import cupy
    p = [cupy.zeros(1000, np.float32)]
    g = [cupy.ones(1000, np.float32)]
    opt = fo.SGD(p, lr=1.0)
    opt.step(g)                              # compile and warm up
    cupy.cuda.Device().synchronize()
    s = cupy.cuda.Stream(non_blocking=True)
    reader = cupy.cuda.Stream(non_blocking=True)
    _spin(s.ptr, 300)
    with s:
        opt.step(g)                          # queued behind the sleeper on s
    time.sleep(0.05)
    early = cupy.asnumpy(p[0], stream=reader)
    s.synchronize()
    late = cupy.asnumpy(p[0])
    assert early[0] == -1.0, "the step ran before the work queued on the current stream"
    assert late[0] == -2.0


@gpu_only
def test_torch_cuda_tensors_through_the_driver():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from fastopt.kernels import adam
    be = backend()
    rng = np.random.default_rng(11)
    init = [rng.standard_normal(s).astype(np.float32) for s in [(100,), (3, 5)]]
    grads = [rng.standard_normal(a.shape).astype(np.float32) for a in init]
    ref = [a.copy() for a in init]
    m_ref = [np.zeros_like(a) for a in init]
    v_ref = [np.zeros_like(a) for a in init]
    from fastopt.kernels import reference
    reference.adam(ref, grads, m_ref, v_ref, step=1, lr=0.01)
    tp = [torch.tensor(a, device="cuda") for a in init]
    tg = [torch.tensor(g, device="cuda") for g in grads]
    tm = [torch.zeros_like(t) for t in tp]
    tv = [torch.zeros_like(t) for t in tp]
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01), 1, np.float32)
    be.run(adam.adam_element, be.table(tp, tg, (tm, tv, None)), h)
    torch.cuda.synchronize()
    for t, r in zip(tp, ref):
        assert rel_err(t.cpu().numpy(), r) <= 1e-6


@needs_cuda
@pytest.mark.parametrize("pair", [True, False], ids=["pairs", "singles"])
@pytest.mark.parametrize("max_grid", [1, 2])
def test_blocks_stride_over_chunks_when_the_grid_is_smaller(monkeypatch, max_grid, pair):
    """Blocks loop over several chunks; threads take one or two elements per iteration."""
    from fastopt.kernels import cuda as driver
    monkeypatch.setattr(driver, "MAX_GRID", max_grid)
    monkeypatch.setattr(driver, "PAIR", pair)
    case = next(c for c in CASES if c.name == "adam")
    _check(case, _run_three_ways(case, case.hp(), np.float32, shapes=[(70,), (3, 9), (1,)], seed=4),
           np.float32)
