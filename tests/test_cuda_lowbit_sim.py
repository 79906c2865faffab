"""Low-bit state on the CUDA driver, under the CUDA simulator, against the CPU driver.

Blockwise int8 columns (uint8 codes, one float32 absmax per block) and bfloat16 columns
(uint16 patterns with their format given, as the front end passes device arrays, or
ml_dtypes arrays): the CUDA step (kernels/cuda.py, kernels/cuda_codegen.py) and the CPU
step (kernels/cpu.py) from the same state and gradients must store the same codes,
absmax, bfloat16 patterns and params. The simulator computes with NumPy float32 scalars,
which round as the CPU driver's compiled float32 math does, so everything is compared
bit for bit (params too: 0 ulps apart here; on a GPU, contracted multiply-adds may put
params an ulp or two apart, and then rarely a state value on the other side of a code
boundary). ``tests/test_cuda_simulator.py`` runs the simulator files with
``NUMBA_ENABLE_CUDASIM=1``; a plain run skips this one.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_cuda_lowbit_sim.py

The simulator runs each CUDA thread as a Python thread and a blockwise step synchronises
its threads a few times per quantization block, so sizes are small and steps few.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from cases import group_of, step_on

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim, pytest.mark.usefixtures("quick_thread_switches"),
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.float32
SIGNED, UNSIGNED = "int8-signed", "int8-unsigned"
SIZES = [(0,), (1,), (300,), (1001,)]          # empty, one, a block and a bit, odd (4 blocks)


def backend():
    from fastopt import _backend
    return _backend.get("cuda")


def ulps(a, b) -> int:
    """The largest distance in float32 steps between ``a`` and ``b`` (arrays)."""
    def order(x):
        i = np.asarray(x, F32).reshape(-1).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int(np.max(np.abs(order(a) - order(b)), initial=0))


def as_bits(a):
    a = np.atleast_1d(np.asarray(a))
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


# -- the encoder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_device_encode_is_the_nearest_code_ties_to_the_lower(kind):
    """kernels/cuda_formats.encode with kernels/cuda_tables' tables, as the simulator
    runs it, against a brute-force search in float32 (what the CPU encoder is tested
    against in tests/test_lowbit.py)."""
    from fastopt.kernels import blockwise, cuda_formats as f, cuda_tables
    qmap, mid, lut = cuda_tables.encoder_host_tables(kind)
    q = blockwise.dynamic_map(kind)
    assert np.array_equal(qmap, q) and lut.dtype == np.uint32 and lut.size == 2048
    rng = np.random.default_rng(3)
    halves = (q[1:] + q[:-1]) / F32(2)
    x = np.concatenate([
        rng.uniform(-1, 1, 1500), 10.0 ** rng.uniform(-12, 0, 1500) * rng.choice([-1, 1], 1500),
        q, halves, np.nextafter(halves, F32(2)), np.nextafter(halves, F32(-2)), mid[:255],
        np.nextafter(mid[:255], F32(2)), [0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1.0000001]]).astype(F32)
    brute = np.abs(x[:, None] - q[None, :]).argmin(axis=1)
    codes = np.array([f.encode(v, lut, mid) for v in x])
    np.testing.assert_array_equal(codes, brute)
    assert f.magnitude_bits(F32(-2.0)) == np.float32(2.0).view(np.int32)
    assert f.magnitude_bits(F32(np.nan)) > f.magnitude_bits(F32(np.inf))    # NaN: the absmax
    assert f.inverse(F32(0.0)) == 0 and f.inverse(F32(4.0)) == F32(0.25)


# -- the driver against the CPU driver --------------------------------------------------------------
def _state(sizes, formats, block, seed):
    """params, state columns (None where absent) and scales, as both drivers take them;
    state 1 (a second moment in Adam and Adan) is never negative."""
    from fastopt import lowbit
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(F32) for s in sizes]
    slots, scales = [], []
    for k, fmt in enumerate(formats):
        if fmt is None:
            slots.append(None)
            scales.append(None)
            continue
        values = [(rng.standard_normal(s) * 0.1).astype(F32) for s in sizes]
        if fmt == UNSIGNED or k == 1:
            values = [np.abs(v) * F32(0.01) for v in values]
        if fmt in (SIGNED, UNSIGNED):
            pairs = [lowbit.encode(v, fmt, block) for v in values]
            slots.append([c for c, _ in pairs])
            scales.append([a for _, a in pairs])
        else:               # bfloat16 as the patterns device arrays hold
            slots.append([v.astype(BF16).view(np.uint16) for v in values])
            scales.append(None)
    return params, slots, scales


def _grads(sizes, step):
    rng = np.random.default_rng(1000 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 0)).astype(F32) for s in sizes]


def _copy(x):
    if isinstance(x, list):
        return [_copy(a) for a in x]
    return None if x is None else x.copy()


def _arena(arrays):
    """Back-to-back views of one buffer: a FlatParams arena, one row when whole blocks."""
    buf = np.concatenate([a.reshape(-1) for a in arrays])
    views, at = [], 0
    for a in arrays:
        views.append(buf[at:at + a.size].reshape(a.shape))
        at += a.size
    return views


def _step_both(element, scalars, sizes, formats, block, steps=2, arena=False, stochastic=None,
               **run):
    """Steps the CUDA and CPU drivers from the same state; asserts they agree to the bit."""
    from fastopt.kernels import cpu
    be = backend()
    params, slots, scales = _state(sizes, formats, block, seed=len(sizes))
    table_formats = tuple("native" if f is None else f for f in formats)
    sides = []
    for _ in range(2):
        p, s, a = _copy(params), [_copy(x) for x in slots], [_copy(x) for x in scales]
        if arena:
            p = _arena(p)
            s = [None if x is None else _arena(x) for x in s]
            a = [None if x is None else _arena(x) for x in a]
        sides.append((p, s, a))
    (cp, cs, ca), (hp, hs, hsc) = sides
    for t in range(1, steps + 1):
        g = _grads(sizes, t)
        cuda_table = be.table(cp, [x.copy() for x in g], cs, formats=table_formats, scales=ca,
                              block=block)
        before = be.launches
        be.run(element, cuda_table, scalars, **run)
        assert be.launches == before + (1 if cuda_table.n_chunks else 0)
        cpu_table = cpu.ChunkTable(hp, g, hs, formats=table_formats, scales=hsc, block=block)
        cpu.run(element, cpu_table, scalars, **run)
        if arena and any(f in (SIGNED, UNSIGNED) for f in formats):
            assert cuda_table.table.shape[0] == cpu_table.table.shape[0]
    for i in range(len(sizes)):
        assert ulps(cp[i], hp[i]) == 0, f"params[{i}]: {ulps(cp[i], hp[i])} ulps apart"
        for k, fmt in enumerate(formats):
            if fmt is None:
                continue
            np.testing.assert_array_equal(as_bits(cs[k][i]), as_bits(hs[k][i]),
                                          err_msg=f"state {k} ({fmt}) of tensor {i}")
            if fmt in (SIGNED, UNSIGNED):
                np.testing.assert_array_equal(as_bits(ca[k][i]), as_bits(hsc[k][i]),
                                              err_msg=f"absmax of state {k} of tensor {i}")
    # the steps did move the state
    for k, fmt in enumerate(formats):
        if fmt is not None and any(x.size > 1 for x in cs[k]):
            assert not all(np.array_equal(as_bits(x), as_bits(y)) for x, y in zip(cs[k], slots[k])
                           if x.size), f"state {k} unchanged"
    return cp, cs, ca


def _adam():
    from fastopt.kernels import adam
    return adam.adam_element, adam.adam_scalars(group_of(adam.SPEC, lr=0.01, weight_decay=0.01), 3, F32)


def _sgd():
    from fastopt.kernels import sgd
    return sgd.sgd_element, sgd.sgd_scalars(group_of(sgd.SPEC, lr=0.1, momentum=0.9, nesterov=True), 3, F32)


def _adan():
    from fastopt.kernels import adan
    return adan.adan_element, adan.adan_scalars(group_of(adan.SPEC, lr=0.01, weight_decay=0.02), 3, F32)


ROWS = [
    ("adam", _adam, (SIGNED, UNSIGNED, None)),
    ("adam", _adam, ("bfloat16", "bfloat16", None)),
    ("sgd", _sgd, (SIGNED, None, None)),
    ("sgd", _sgd, ("bfloat16", None, None)),
    ("adan", _adan, (SIGNED, UNSIGNED, SIGNED, "bfloat16")),     # int8 and bfloat16 together
]


@pytest.mark.parametrize("name,optimizer,formats", ROWS,
                         ids=[f"{r[0]}-{'-'.join(str(f) for f in r[2])}" for r in ROWS])
def test_steps_match_the_cpu_driver(name, optimizer, formats):
    """Sizes 0, 1, 300 and 1001 in list mode (one row each), blocks of 256, two steps."""
    element, scalars = optimizer()
    _step_both(element, scalars, SIZES, formats, 256)


def test_a_tensor_over_a_cpu_chunk():
    """66000 elements: more than one CPU chunk (65536), many CUDA chunks; one step."""
    element, scalars = _sgd()
    _step_both(element, scalars, [(66000,)], (SIGNED, None, None), 256, steps=1)


def test_merged_rows():
    """A FlatParams-style arena: tensors of whole blocks merge into one row (as on the
    CPU), a partial block ends a row."""
    element, scalars = _sgd()
    block = 16
    sizes = [(2 * block,), (block,), (3 * block + 5,), (40,)]
    _step_both(element, scalars, sizes, (SIGNED, None, None), block, arena=True)


# (block, threads, warp): blocks spanning two warps; several blocks per warp; several
# values per thread and two warps; two values per thread; one block over four warps.
GEOMETRIES = [(4, 4, 2), (4, 8, 8), (16, 4, 2), (16, 8, 4), (16, 16, 4)]


@pytest.mark.parametrize("block,threads,warp", GEOMETRIES,
                         ids=[f"block{b}-threads{t}-warp{w}" for b, t, w in GEOMETRIES])
def test_thread_block_geometries(monkeypatch, block, threads, warp):
    """Quantization blocks smaller than a warp (several per warp), spanning warps (their
    maxima combined in shared memory) or larger than the thread block (several values
    per thread): the same codes."""
    from fastopt.kernels import cuda as driver
    monkeypatch.setattr(driver, "BLOCK", threads)
    monkeypatch.setattr(driver, "WARP", warp)
    monkeypatch.setattr(driver, "MAX_GRID", 2)          # blocks stride over chunks
    element, scalars = _sgd()
    _step_both(element, scalars, [(1,), (37,), (70,)], (SIGNED, None, None), block, steps=1)


def test_master_weights_with_int8_state_and_stochastic_rounding():
    """Float32 master weights, bfloat16 model copy and gradients, int8 state: the model
    copy rounded stochastically draws the CPU's random bits (the same positions)."""
    from fastopt.kernels import cpu
    element, scalars = _adam()
    be = backend()
    sizes = [(1,), (300,), (1000,)]
    block = 64
    params, slots, scales = _state(sizes, (SIGNED, UNSIGNED, None), block, seed=7)
    formats = (SIGNED, UNSIGNED, "native")
    model = [p.astype(BF16).view(np.uint16) for p in params]
    results = []
    for make, run in ((be.table, be.run), (cpu.ChunkTable, cpu.run)):
        p, s, a, w = _copy(params), [_copy(x) for x in slots], [_copy(x) for x in scales], _copy(model)
        for t in range(1, 3):
            g = [x.astype(BF16).view(np.uint16) for x in _grads(sizes, t)]
            if make is cpu.ChunkTable:          # the CPU reads 16-bit arrays by their dtype
                g, wm = [x.view(BF16) for x in g], [x.view(BF16) for x in w]
            else:
                wm = w
            table = make(p, g, s, model=wm, formats=formats, scales=a, block=block)
            run(element, table, scalars, seed=11 + t, stochastic=True)
        results.append((p, s, a, w))
    (cp, cs, ca, cw), (hp, hs, ha, hw) = results
    for i in range(len(sizes)):
        assert ulps(cp[i], hp[i]) == 0, f"master weights {i}"
        np.testing.assert_array_equal(cw[i], hw[i], err_msg=f"model copy {i}")
        for k in (0, 1):
            np.testing.assert_array_equal(cs[k][i], hs[k][i], err_msg=f"codes {k} of {i}")
            np.testing.assert_array_equal(as_bits(ca[k][i]), as_bits(ha[k][i]), err_msg=f"absmax {k} of {i}")
    assert not all(np.array_equal(x, m) for x, m in zip(cw, model) if x.size > 1)


def test_nan_becomes_the_absmax_as_on_the_cpu():
    from fastopt.kernels import cpu
    element, scalars = _sgd()
    be = backend()
    params, slots, scales = _state([(40,)], (SIGNED, None, None), 16, seed=9)
    g = _grads([(40,)], 1)[0]
    g[20] = np.nan
    out = []
    for make, run in ((be.table, be.run), (cpu.ChunkTable, cpu.run)):
        p, s, a = _copy(params), [_copy(x) for x in slots], [_copy(x) for x in scales]
        run(element, make(p, [g.copy()], s, formats=(SIGNED, "native", "native"), scales=a, block=16),
            scalars)
        out.append((p, s, a))
    (cp, cs, ca), (hp, hs, ha) = out
    assert np.isnan(ca[0][0][1]) and np.isnan(ha[0][0][1])      # block 1 holds element 20
    np.testing.assert_array_equal(ca[0][0][[0, 2]], ha[0][0][[0, 2]])
    np.testing.assert_array_equal(cs[0][0][np.r_[0:16, 32:40]], hs[0][0][np.r_[0:16, 32:40]])
    np.testing.assert_array_equal(np.isnan(cp[0]), np.isnan(hp[0]))


# -- the front end -------------------------------------------------------------------------------------
def _front(cls, hp, fmt, backend_name, flat=False, sizes=SIZES, steps=2):
    import fastopt as fo
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(F32) for s in sizes]
    arena = fo.FlatParams(init) if flat else None
    params = list(arena.params) if flat else init
    opt = cls(params, backend=backend_name, state_format=fmt, min_8bit_size=0, **hp)
    for t in range(1, steps + 1):
        step_on(opt, _grads(sizes, t), arena)
    return params, opt


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
def test_front_end_on_cuda_matches_cpu(fmt, flat):
    """``state_format`` on backend "cuda": the front end's tables (formats, scales, block)
    through CudaBackend.table, state allocated by the optimizer; every state array and
    param equal to the CPU backend's."""
    import fastopt as fo
    from fastopt import _backend
    assert _backend.LOWBIT_STATE in _backend.CAPABILITIES["cuda"]
    hp = dict(lr=0.01, weight_decay=0.01)       # _adam()'s: the same compiled CPU drivers
    sizes = [(0,), (1,), (300,), (700,)]
    (pc, oc), (ph, oh) = (_front(fo.Adam, hp, fmt, b, flat, sizes) for b in ("cuda", "cpu"))
    for i, (a, b) in enumerate(zip(pc, ph)):
        assert ulps(a, b) == 0, f"params[{i}]"
    assert oc.state.keys() == oh.state.keys()
    for i in oc.state:
        assert oc.state[i].keys() == oh.state[i].keys()
        for key, a in oc.state[i].items():
            b = oh.state[i][key]
            assert np.asarray(a).dtype == np.asarray(b).dtype, key
            np.testing.assert_array_equal(as_bits(a), as_bits(b), err_msg=f"state[{i}][{key!r}]")
    if fmt == "int8":
        assert oc.state[3]["exp_avg"].dtype == np.uint8 and oc.state[3]["exp_avg_sq_absmax"].size == 3


# -- what the driver refuses --------------------------------------------------------------------------
def test_bad_blockwise_tables():
    from fastopt.kernels import adam
    be = backend()
    params, slots, scales = _state([(40,)], (SIGNED, None, None), 16, seed=1)
    g = _grads([(40,)], 1)
    fm = (SIGNED, "native", "native")
    with pytest.raises(ValueError, match="needs scales"):
        be.table(params, g, slots, formats=fm, block=16)
    with pytest.raises(ValueError, match="divisor"):
        be.table(params, g, slots, formats=fm, scales=scales, block=24)
    with pytest.raises(ValueError, match="must be 5 float32"):      # absmax of blocks of 16
        be.table(params, g, slots, formats=fm, scales=scales, block=8)
    with pytest.raises(TypeError, match="uint8"):
        be.table(params, g, ([np.zeros(40, np.uint16)], None, None), formats=fm, scales=scales, block=16)
    with pytest.raises(TypeError, match="float32 params"):
        be.table([p.astype(np.float64) for p in params], [x.astype(np.float64) for x in g], slots,
                 formats=fm, scales=scales, block=16)
    table = be.table(params, g, slots, formats=fm, scales=scales, block=16)
    assert table.block == 16 and table.scales is scales
    with pytest.raises(ValueError, match="read without being written"):
        be.run(adam.adam_element, table, _adam()[1], writes=(False, False, False))
    with pytest.raises(ValueError, match="stores none"):      # reductions decode, read-only
        be.reduce_chunks(adam.adam_element, table, _adam()[1], writes=(False, True, False, False))
    with pytest.raises(ValueError, match="sparse rows"):
        be.run_rows(adam.adam_element, params[0].reshape(4, 10), np.array([1]), g[0][:10], slots,
                    _adam()[1], formats=fm)
    # without blockwise columns, scales and block are ignored (the front end passes them)
    plain = be.table(params, g, ([params[0].copy()], None, None), formats=("native",) * 3,
                     scales=(None, None, None), block=256)
    assert plain.block == 0
