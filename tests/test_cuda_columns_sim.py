"""The CUDA driver generated from a description of its columns, under the CUDA simulator.

Driver level (``kernels/cuda.py``, ``kernels/cuda_codegen.py``, ``kernels/cuda_formats.py``):
any number K of state columns, 16-bit state columns, master weights (float16,
bfloat16, stochastic rounding), sparse rows, compile-time flags and reductions, each
against an oracle that applies the element function to NumPy float32 scalars with
NumPy / ml_dtypes conversions, and against the CPU driver where it has the feature.
The simulator computes with the same NumPy float32 scalar operations, so results are
compared bit for bit. ``tests/test_cuda_simulator.py`` runs this file with
``NUMBA_ENABLE_CUDASIM=1``; a plain run skips it.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_cuda_columns_sim.py
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import pytest

from cases import group_of

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim,
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.float32
SHAPES = [(0,), (1,), (37,), (5, 3), (70,)]         # empty, single, odd, 2-D, over a chunk (32)
MANY = [(1 + k % 3,) for k in range(40)]            # many small tensors


def backend():
    from fastopt import _backend
    return _backend.get("cuda")


def driver():
    from fastopt.kernels import cuda
    return cuda


# -- elements with K = 0 .. 5 state columns ---------------------------------------------------
class Probe(NamedTuple):
    lr: float
    decay: float


H = Probe(F32(0.125), F32(0.75))


def elem0(p, g, h):
    return (p - h.lr * g,)


def elem1(p, g, s0, h):
    s0 = h.decay * s0 + g
    return p - h.lr * s0, s0


def elem3(p, g, s0, s1, s2, h):
    s0 = h.decay * s0 + g
    s1 = s1 + g * g
    s2 = s2 - g
    return p - h.lr * (s0 + s1 + s2), s0, s1, s2


def elem5(p, g, s0, s1, s2, s3, s4, h):
    s0 = h.decay * s0 + g
    s1 = s1 + g * g
    s2 = s2 if s2 >= abs(g) else abs(g)
    s3 = s3 - g
    s4 = s4 * h.decay
    return p - h.lr * ((((s0 + s1) + s2) + s3) + s4), s0, s1, s2, s3, s4


ELEMENTS = {0: elem0, 1: elem1, 3: elem3, 5: elem5}


# -- the oracle: the element on NumPy float32 scalars, columns converted by NumPy/ml_dtypes -------
def widen(a, fmt):
    if fmt == "native":
        return a
    if a.dtype == np.uint16:        # bfloat16 patterns
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def narrow(x, like, fmt):
    if fmt == "native":
        return np.asarray(x, dtype=like.dtype)
    target = BF16 if fmt == "bfloat16" else np.float16
    out = np.asarray(x, dtype=np.float32).astype(target)
    return out.view(np.uint16) if like.dtype == np.uint16 else out


def oracle(element, params, grads, slots, h, formats=None, grad_scale=1.0, writes=None):
    """New params and state (lists of arrays) after one step of ``element``."""
    n_slots = len(slots)
    formats = formats or ("native",) * n_slots
    writes = writes or tuple(s is not None for s in slots)
    new_p, new_s = [], [None if s is None else [] for s in slots]
    for i, (p, g) in enumerate(zip(params, grads)):
        p_out = p.copy().reshape(-1)
        cols = [None if s is None else widen(s[i].reshape(-1), formats[k]) for k, s in enumerate(slots)]
        outs = [None if s is None else np.empty(p.size, p.dtype) for s in slots]
        for e in range(p.size):
            ge = g.reshape(-1)[e] * p.dtype.type(grad_scale)
            args = [ge if c is None else c[e] for c in cols]
            res = element(p_out[e], ge, *args, h)
            p_out[e] = res[0]
            for k in range(n_slots):
                if outs[k] is not None:
                    outs[k][e] = res[1 + k]
        new_p.append(p_out.reshape(p.shape))
        for k, s in enumerate(slots):
            if s is not None:
                stored = narrow(outs[k], s[i], formats[k]) if writes[k] else s[i].reshape(-1)
                new_s[k].append(stored.reshape(p.shape))
    return new_p, new_s


def make(shapes, n_slots, present=None, formats=None, seed=0, dtype=F32):
    """params, grads and K state columns (None where absent) of the given formats."""
    rng = np.random.default_rng(seed)
    present = present or (True,) * n_slots
    formats = formats or ("native",) * n_slots
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    slots = []
    for k in range(n_slots):
        if not present[k]:
            slots.append(None)
            continue
        values = [rng.uniform(0.5, 2.0, s).astype(np.float32) for s in shapes]
        slots.append([narrow(v, np.zeros(0, dtype if formats[k] == "native" else _storage(formats[k], k)),
                             formats[k]) for v in values])
    return params, grads, slots


def _storage(fmt, k):
    # bfloat16 columns alternate between ml_dtypes arrays and raw uint16 patterns
    if fmt == "bfloat16":
        return BF16 if k % 2 == 0 else np.dtype(np.uint16)
    return np.dtype(np.float16)


def copy(arrays):
    return [None if a is None else [x.copy() for x in a] if isinstance(a, list) else a.copy()
            for a in arrays]


def bits(a):
    """Comparable bits of any float array (16-bit ones as their patterns)."""
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def assert_same(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (x, y) in enumerate(zip(actual, expected)):
        assert x.dtype == y.dtype or x.dtype.itemsize == y.dtype.itemsize == 2, f"{what}[{i}] dtype"
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=f"{what}[{i}]")


def arena(arrays):
    """The arrays as back-to-back views of one buffer (a FlatParams arena)."""
    buf = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, F32)
    views, at = [], 0
    for a in arrays:
        views.append(buf[at:at + a.size].reshape(a.shape))
        at += a.size
    return views


# -- the device conversions ------------------------------------------------------------------------
def test_float16_conversions_match_numpy():
    from fastopt.kernels import cuda_formats as f
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.array([f.half_to_float(b) for b in every], dtype=np.float32)
    expected = every.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(widened[finite].view(np.uint32), expected[finite].view(np.uint32))
    assert np.all(np.isnan(widened[~finite]))
    rng = np.random.default_rng(0)
    samples = np.concatenate([
        rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        # near float16's limits: subnormals, the smallest normal, the largest finite, ties
        rng.uniform(-7e-5, 7e-5, 3000).astype(np.float32),
        np.float32([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25,
                    3 * 2.0 ** -26, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf])])
    narrowed = np.array([f.float_to_half(x) for x in samples], dtype=np.uint16)
    with np.errstate(over="ignore"):
        expected = samples.astype(np.float16).view(np.uint16)
    nan = np.isnan(samples)
    np.testing.assert_array_equal(narrowed[~nan], expected[~nan])
    assert np.all(np.isnan(narrowed[nan].view(np.float16)))


def test_bfloat16_conversions_match_ml_dtypes_and_the_cpu_rounding():
    from fastopt.kernels import cuda_formats as f
    from fastopt.kernels import lowp
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.array([f.bfloat16_to_float(b) for b in every], dtype=np.float32)
    np.testing.assert_array_equal(widened.view(np.uint32), every.view(BF16).astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(1)
    samples = np.concatenate([
        rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.float32([0.0, -0.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.3895314e38, -3.4028235e38,
                    np.inf, -np.inf, 1e-40])])
    narrowed = np.array([f.float_to_bfloat16(x, -1) for x in samples], dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        expected = samples.astype(BF16).view(np.uint16)
    nan = np.isnan(samples)
    np.testing.assert_array_equal(narrowed[~nan], expected[~nan])
    assert np.all(np.isnan(narrowed[nan].view(BF16).astype(np.float32)))
    # stochastic rounding: the CPU's bits (kernels/lowp.py) for the same seed and position
    seed, positions = 12345, rng.integers(0, 1 << 40, samples.size)
    ours = np.array([f.float_to_bfloat16(x, f.stochastic_noise(seed, int(q)))
                     for x, q in zip(samples, positions)], dtype=np.uint16)
    cpu = np.array([lowp.round_to_bits(x, lowp.BFLOAT16_STOCHASTIC, seed, int(q))
                    for x, q in zip(samples, positions)], dtype=np.uint16)
    np.testing.assert_array_equal(ours[~nan], cpu[~nan])
    # it rounds down or up to a neighbour, and not always the same way
    finite = np.isfinite(samples) & (np.abs(samples) < 3e38)
    down = (samples.view(np.uint32) >> 16).astype(np.uint16)
    assert np.all((ours[finite] == down[finite]) | (ours[finite] == down[finite] + 1))
    assert 0.2 < np.mean(ours[finite] != expected[finite]) < 0.8


# -- K state columns ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_slots", [0, 1, 3, 5])
@pytest.mark.parametrize("mode", ["list", "arena", "many"])
def test_any_number_of_state_columns(n_slots, mode):
    be = backend()
    element = ELEMENTS[n_slots]
    shapes = MANY if mode == "many" else SHAPES
    params, grads, slots = make(shapes, n_slots, seed=n_slots)
    want_p, want_s = oracle(element, params, grads, slots, H, grad_scale=0.5)
    if mode == "arena":
        params, grads = arena(params), arena(grads)
        slots = [arena(s) for s in slots]
    table = be.table(params, grads, slots)
    assert table.n_slots == n_slots and table.n_elements == sum(int(np.prod(s)) for s in shapes)
    assert table.table.shape[1] == 3 + n_slots             # (n, p, g, s0 .. s{K-1})
    if mode == "arena":
        assert table.table.shape[0] == 1                # back-to-back views: one row
    before = be.launches
    be.run(element, table, H, grad_scale=0.5)
    assert be.launches == before + 1
    assert_same(params, want_p, "params")
    for k in range(n_slots):
        assert_same(slots[k], want_s[k], f"state {k}")


@pytest.mark.parametrize("n_slots,present", [(3, (True, False, True)), (5, (False, True, True, False, True)),
                                             (1, (False,))])
def test_absent_columns_get_the_gradient_and_are_never_written(n_slots, present):
    be = backend()
    element = ELEMENTS[n_slots]
    params, grads, slots = make(SHAPES, n_slots, present, seed=3)
    want_p, want_s = oracle(element, params, grads, slots, H)
    grads_before = copy(grads)
    be.run(element, be.table(params, grads, slots), H)
    assert_same(params, want_p, "params")
    for k in range(n_slots):
        if present[k]:
            assert_same(slots[k], want_s[k], f"state {k}")
    assert_same(grads, grads_before, "grads")


def test_k3_matches_the_cpu_driver_with_write_masks_and_scales():
    from fastopt.kernels import adam, cpu
    be = backend()
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01, weight_decay=0.1, amsgrad=True,
                                     decoupled_weight_decay=True), 3, F32)
    params, grads, slots = make(SHAPES, 3, seed=4)
    cp, cg, cs = copy(params), copy(grads), copy(slots)
    for writes in (None, (True, False, True)):
        be.run(adam.adam_element, be.table(params, grads, slots), h, grad_scale=0.25, writes=writes)
        cpu.run(adam.adam_element, cpu.ChunkTable(cp, cg, cs), h, 0.25, writes=writes)
        assert_same(params, cp, "params")
        for k in range(3):
            assert_same(slots[k], cs[k], f"state {k}")


def test_float64_params():
    be = backend()
    params, grads, slots = make(SHAPES, 5, seed=5, dtype=np.float64)
    h = Probe(np.float64(0.125), np.float64(0.75))
    want_p, want_s = oracle(elem5, params, grads, slots, h)
    be.run(elem5, be.table(params, grads, slots), h)
    assert_same(params, want_p, "params")
    for k in range(5):
        assert_same(slots[k], want_s[k], f"state {k}")


@pytest.mark.parametrize("row_mode", ["grad", "slot4", "slot"])
def test_row_values_as_gradient_factor_or_any_state_argument(row_mode):
    """One value per row of a merge=False table: a gradient factor ("grad"), or state
    argument k, read-only ("slot4"; "slot" alone is "slot2", LAMB's and LARS's)."""
    be = backend()
    shapes = [(5,), (0,), (1,), (37,)]
    slot = {"grad": None, "slot4": 4, "slot": 2}[row_mode]
    present = tuple(k != slot for k in range(5))
    params, grads, slots = make(shapes, 5, present, seed=19)
    per_tensor = {0: 0.5, 2: -2.0, 3: 3.0}                       # the non-empty tensors
    want = {}
    for i, v in per_tensor.items():
        if row_mode == "grad":
            columns, scale = [[s[i]] for s in slots], v
        else:       # the row's value fills the absent column, which is never stored
            columns, scale = [[np.full(shapes[i], v, F32)] if s is None else [s[i]] for s in slots], 1.0
        want[i] = oracle(elem5, [params[i]], [grads[i]], columns, H, grad_scale=scale)
    table = be.table(params, grads, slots, merge=False)
    values = np.array(list(per_tensor.values()), F32)
    be.run(elem5, table, H, row_values=be.row_array(table, values), row_mode=row_mode)
    for i, (want_p, want_s) in want.items():
        np.testing.assert_array_equal(params[i], want_p[0], err_msg=f"params[{i}]")
        for k in range(5):
            if present[k]:
                np.testing.assert_array_equal(slots[k][i], want_s[k][0], err_msg=f"state {k} of {i}")


# -- 16-bit state columns ---------------------------------------------------------------------------
FORMAT_ROWS = [
    (1, ("bfloat16",)),
    (1, ("float16",)),
    (3, ("float16", "native", "bfloat16")),
    (5, ("bfloat16", "bfloat16", "float16", "native", "bfloat16")),
]


@pytest.mark.parametrize("n_slots,formats", FORMAT_ROWS, ids=["-".join(r[1]) for r in FORMAT_ROWS])
@pytest.mark.parametrize("mode", ["list", "arena"])
def test_16_bit_state_columns(n_slots, formats, mode):
    """Loaded into float32 math, stored rounded to nearest even; formats read from the
    dtypes (float16, ml_dtypes bfloat16), or given for uint16 columns of patterns."""
    be = backend()
    element = ELEMENTS[n_slots]
    params, grads, slots = make(SHAPES, n_slots, formats=formats, seed=6)
    want_p, want_s = oracle(element, params, grads, slots, H, formats)
    if mode == "arena":
        params, grads = arena(params), arena(grads)
        slots = [arena(s) for s in slots]
    patterns = any(a.dtype == np.uint16 for s in slots for a in s)
    table = be.table(params, grads, slots, formats=formats if patterns else None)
    assert table.formats == formats
    be.run(element, table, H)
    assert_same(params, want_p, "params")
    for k in range(n_slots):
        assert_same(slots[k], want_s[k], f"state {k} ({formats[k]})")
        before = make(SHAPES, n_slots, formats=formats, seed=6)[2][k]
        assert not np.array_equal(np.concatenate([bits(a).ravel() for a in slots[k]]),
                                  np.concatenate([bits(b).ravel() for b in before])), f"state {k} unchanged"


@pytest.mark.parametrize("pair", [False, True], ids=["singles", "pairs"])
def test_one_or_two_elements_per_thread(monkeypatch, pair):
    """PAIR (compile time): each thread loads two elements before the math; the second
    stores only inside its chunk (odd sizes, a grid smaller than the chunks)."""
    from fastopt.kernels.layout import Layout
    d = driver()
    monkeypatch.setattr(d, "PAIR", pair)
    monkeypatch.setattr(d, "MAX_GRID", 2)
    be = backend()
    formats = ("float16", "native", "bfloat16")
    params, grads, slots = make(SHAPES, 3, formats=formats, seed=18)
    want_p, want_s = oracle(elem3, params, grads, slots, H, formats)
    table = be.table(params, grads, slots)
    be.run(elem3, table, H)
    assert_same(params, want_p, "params")
    for k in range(3):
        assert_same(slots[k], want_s[k], f"state {k}")
    kernel = d.step_kernel(elem3, Layout.of((True,) * 3, formats=formats), H)
    assert d._step_kernel_for(elem3, table, H, None, 0, 0, False) is kernel    # the one launched
    with open(kernel.fastopt_source) as f:
        assert ("if second:" in f.read()) == pair


def test_explicit_formats_and_mismatches():
    be = backend()
    p = [np.ones(5, F32)]
    g = [np.ones(5, F32)]
    halves = [np.full(5, 1.5, np.float16).view(np.uint16)]
    table = be.table(p, g, (halves,), formats=("float16",))
    assert table.formats == ("float16",)
    be.run(elem1, table, H)
    np.testing.assert_array_equal(halves[0].view(np.float16), np.float16(0.75 * 1.5 + 1))
    with pytest.raises(TypeError, match="give its format"):
        be.table(p, g, (halves,))                                   # float16 or bfloat16 bits?
    with pytest.raises(TypeError, match="float16"):
        be.table(p, g, ([np.ones(5, BF16)],), formats=("float16",))
    with pytest.raises(TypeError, match="float64"):
        be.table(p, g, ([np.ones(5, np.float64)],))
    with pytest.raises(ValueError, match="one per state position"):
        be.table(p, g, ([np.ones(5, F32)],), formats=("native", "native"))
    with pytest.raises(ValueError, match="unknown storage format"):
        be.table(p, g, ([np.ones(5, F32)],), formats=("int8",))
    with pytest.raises(ValueError, match="elements"):
        be.table(p, g, ([np.ones(4, F32)],))
    with pytest.raises(ValueError, match="one entry per state column"):
        be.run(elem1, be.table(p, g, ([np.ones(5, F32)],)), H, writes=(True, True, True))


# -- master weights ------------------------------------------------------------------------------------
def _master_case(model_dtype, shapes, seed=7):
    rng = np.random.default_rng(seed)
    master = [rng.standard_normal(s).astype(F32) for s in shapes]
    model = [m.astype(model_dtype) for m in master]
    grads = [rng.standard_normal(s).astype(model_dtype) for s in shapes]
    slots = [[np.zeros(s, F32) for s in shapes], [np.zeros(s, F32) for s in shapes], None]
    return master, model, grads, slots


@pytest.mark.parametrize("model_dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shapes", [SHAPES, MANY], ids=["shapes", "many"])
def test_master_weights_match_the_cpu_driver(model_dtype, shapes):
    """float32 masters, 16-bit gradients, the model copy rounded to nearest even: bit-equal
    with the CPU driver's master path, over three steps."""
    from fastopt.kernels import adam, cpu
    be = backend()
    master, model, grads, slots = _master_case(model_dtype, shapes)
    cm, cw, cg, cs = copy(master), copy(model), copy(grads), copy(slots)
    table = be.table(master, grads, slots, model=model)
    ctable = cpu.ChunkTable(cm, cg, cs, model=cw)
    assert table.model == ("float16" if model_dtype == np.float16 else "bfloat16")
    assert table.table.shape[1] == 3 + 3 + 1               # (n, p, g, s0, s1, s2, w)
    for step in (1, 2, 3):
        h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01), step, F32)
        before = be.launches
        be.run(adam.adam_element, table, h, grad_scale=0.5)
        assert be.launches == before + 1
        cpu.run(adam.adam_element, ctable, h, 0.5)
    assert_same(master, cm, "master")
    assert_same(model, cw, "model copy")
    for k in range(2):
        assert_same(slots[k], cs[k], f"state {k}")
    moved = [a for a, b in zip(model, _master_case(model_dtype, shapes)[1]) if not np.array_equal(bits(a), bits(b))]
    assert len(moved) == sum(1 for s in shapes if np.prod(s))
    for w, m in zip(model, master):                 # the copy is the rounded master
        np.testing.assert_array_equal(bits(w), bits(m.astype(model_dtype)))


def test_master_weights_with_uint16_patterns_and_16_bit_state():
    """bfloat16 model and gradients as uint16 patterns; a bfloat16 state column too."""
    be = backend()
    master, model, grads, _ = _master_case(BF16, SHAPES, seed=8)
    state = [np.full(s, 0.5, F32).astype(BF16) for s in SHAPES]
    want_p, want_s = oracle(elem1, master, [g.astype(F32) for g in grads], [state], H, ("bfloat16",))
    model16 = [w.view(np.uint16) for w in model]
    be.run(elem1, be.table(master, [g.view(np.uint16) for g in grads], [state], model=model16), H)
    assert_same(master, want_p, "master")
    assert_same(state, want_s[0], "state")
    assert_same(model, [m.astype(BF16) for m in want_p], "model copy")


def test_stochastic_rounding_of_the_model_copy():
    """bfloat16 copies rounded with random bits from the seed and the element's position,
    counted as the CPU driver counts them: its bits whatever the CUDA chunking, in list
    and arena mode; a neighbour of the exact value; another draw for another seed."""
    from fastopt.kernels import adam, cpu
    be = backend()
    d = driver()
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01), 1, F32)
    shapes = [(3,), (0,), (40,), (2, 5), (70,)]
    draws = []
    for chunk, seed, mode in ((32, 5, "list"), (8, 5, "list"), (16, 5, "arena"), (32, 6, "list")):
        master, model, grads, slots = _master_case(BF16, shapes, seed=9)
        cm, cw, cg, cs = copy(master), copy(model), copy(grads), copy(slots)
        if mode == "arena":
            master, model, grads = arena(master), arena(model), arena(grads)
            slots = [arena(slots[0]), arena(slots[1]), None]
        old = d.CHUNK_MIN, d.CHUNK_MAX
        d.CHUNK_MIN = d.CHUNK_MAX = chunk
        try:
            table = be.table(master, grads, slots, model=model)
            be.run(adam.adam_element, table, h, seed=seed, stochastic=True)
        finally:
            d.CHUNK_MIN, d.CHUNK_MAX = old
        assert table.n_chunks >= sum(-(-int(np.prod(s)) // chunk) for s in shapes) // 2
        if mode == "arena":
            ctable = cpu.ChunkTable(arena(cm), arena(cg), (arena(cs[0]), arena(cs[1]), None), model=arena(cw))
            cw = [x.reshape(-1) for x in ctable.refs[3]]
        else:
            ctable = cpu.ChunkTable(cm, cg, cs, model=cw)
        cpu.run(adam.adam_element, ctable, h, seed=seed, stochastic=True)
        flat = np.concatenate([w.view(np.uint16).reshape(-1) for w in model])
        np.testing.assert_array_equal(flat, np.concatenate([w.view(np.uint16).reshape(-1) for w in cw]),
                                      err_msg=f"{mode}, chunks of {chunk}: model copy vs the CPU driver")
        exact = np.concatenate([m.reshape(-1) for m in master])
        down = (exact.view(np.uint32) >> 16).astype(np.uint16)
        assert np.all((flat == down) | (flat == down + 1))
        draws.append(flat)
    assert np.any(draws[0] != np.concatenate([m.reshape(-1) for m in master]).astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(draws[0], draws[1])      # CUDA chunking changes nothing
    assert np.any(draws[0] != draws[3])
    # float16 copies ignore `stochastic` (as the CPU driver): nearest even
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01), 1, F32)
    master, model, grads, slots = _master_case(np.float16, [(37,)], seed=11)
    be.run(adam.adam_element, be.table(master, grads, slots, model=model), h, seed=5, stochastic=True)
    np.testing.assert_array_equal(bits(model[0]), bits(master[0].astype(np.float16)))


def test_master_weights_with_per_row_values():
    """Row values scale each tensor's 16-bit gradients in a master-weight step."""
    be = backend()
    master, model, grads, _ = _master_case(np.float16, [(5,), (0,), (9,)], seed=12)
    state = [np.zeros(s, F32) for s in [(5,), (0,), (9,)]]
    values = np.array([2.0, 0.5], F32)
    want_p = [m - H.lr * (g.astype(F32) * v) for m, g, v in zip(
        [master[0], master[2]], [grads[0], grads[2]], values)]
    table = be.table(master, grads, [state], model=model, merge=False)
    be.run(elem1, table, H, row_values=be.row_array(table, values), row_mode="grad")
    assert_same([master[0], master[2]], want_p, "master")
    assert_same([model[0], model[2]], [m.astype(np.float16) for m in want_p], "model copy")


def test_master_weight_tables_are_checked():
    be = backend()
    master, model, grads, slots = _master_case(BF16, [(4,)])
    with pytest.raises(TypeError, match="master weights are float32"):
        be.table([m.astype(np.float64) for m in master], grads, slots, model=model)
    with pytest.raises(TypeError, match="gradient 0"):
        be.table(master, [g.astype(F32) for g in grads], slots, model=model)
    with pytest.raises(TypeError, match="model="):
        be.table(master, grads, slots)
    with pytest.raises(TypeError, match="model copy"):
        be.table(master, grads, slots, model=[m.copy() for m in master])


# -- sparse rows ---------------------------------------------------------------------------------------
class DeviceLike:
    """A host array seen through ``__cuda_array_interface__``, as the driver sees device
    arrays (under the simulator a device address is a host address)."""

    def __init__(self, a):
        self.a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "strides": None,
                                         "data": (a.__array_interface__["data"][0], False), "version": 3}


@pytest.mark.parametrize("index_on", ["host", "device"])
def test_sparse_rows_match_the_cpu_driver(index_on):
    from fastopt.kernels import adam, cpu
    be = backend()
    rng = np.random.default_rng(13)
    h = adam.adam_scalars(group_of(adam.SPEC, lr=0.01, amsgrad=True), 2, F32)
    param = rng.standard_normal((9, 2, 3)).astype(F32)
    slots = [rng.uniform(0, 1, (9, 2, 3)).astype(F32) for _ in range(3)]
    index = np.array([7, 0, 4, 8], np.int64)
    rows = rng.standard_normal((4, 2, 3)).astype(F32)
    cp, cs = param.copy(), copy(slots)
    untouched = [1, 2, 3, 5, 6]
    before = be.launches
    be.run_rows(adam.adam_element, param, index if index_on == "host" else DeviceLike(index), rows,
                slots, h, grad_scale=0.5)
    assert be.launches == before + 1
    cpu.run_rows(adam.adam_element, cp, index, rows, cs, h, 0.5)
    np.testing.assert_array_equal(param, cp)
    for a, b in zip(slots, cs):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(param[index], rng.standard_normal(0)) and np.all(param[untouched] == cp[untouched])


@pytest.mark.parametrize("n_slots", [0, 1, 5])
def test_sparse_rows_any_columns_and_formats(n_slots):
    be = backend()
    rng = np.random.default_rng(14 + n_slots)
    param = rng.standard_normal((6, 5)).astype(F32)
    formats = ("bfloat16", "native", "float16", "native", "bfloat16")[:n_slots]
    present = (True, False, True, True, True)[:n_slots]
    slots = [None if not present[k] else narrow(rng.uniform(0.5, 2, (6, 5)).astype(F32),
                                                np.zeros(0, _storage(f, k) if f != "native" else F32), f)
             for k, f in enumerate(formats)]
    index = np.array([3, 5, 0], np.int32)
    rows = rng.standard_normal((3, 5)).astype(F32)
    # the oracle: a dense step over the chosen rows only
    p_rows = [param[index].copy()]
    s_rows = [None if s is None else [s[index].copy()] for s in slots]
    want_p, want_s = oracle(ELEMENTS[n_slots], p_rows, [rows], s_rows, H, formats, grad_scale=2.0)
    old_p, old_s = param.copy(), copy(slots)
    be.run_rows(ELEMENTS[n_slots], param, index, rows, slots, H, grad_scale=2.0)
    np.testing.assert_array_equal(param[index], want_p[0])
    np.testing.assert_array_equal(np.delete(param, index, 0), np.delete(old_p, index, 0))
    for k, s in enumerate(slots):
        if s is not None:
            np.testing.assert_array_equal(bits(s[index]), bits(want_s[k][0]))
            np.testing.assert_array_equal(bits(np.delete(s, index, 0)), bits(np.delete(old_s[k], index, 0)))


def test_sparse_rows_without_rows_launch_nothing_and_bad_rows_raise():
    be = backend()
    param = np.ones((4, 3), F32)
    before = be.launches
    be.run_rows(elem1, param, np.zeros(0, np.int64), np.zeros((0, 3), F32), [np.zeros((4, 3), F32)], H)
    assert be.launches == before and np.all(param == 1)
    with pytest.raises(ValueError, match="rows must be"):
        be.run_rows(elem1, param, np.array([1, 2]), np.ones((3, 3), F32), [None], H)
    with pytest.raises(ValueError, match="integer"):
        be.run_rows(elem1, param, np.array([1.0]), np.ones((1, 3), F32), [None], H)


# -- compile-time flags ---------------------------------------------------------------------------------
class Flags(NamedTuple):
    one: float
    a: bool
    b: bool
    r: bool

    RUNTIME_FLAGS = ("r",)


def flagged(p, g, s0, h):
    if h.a:
        p = p + h.one
    if h.b:
        p = p + 10 * h.one
    if h.r:
        p = p + 100 * h.one
    return p, s0


def test_each_flag_setting_computes_its_branch():
    """Bool fields are constants of the generated kernel (one kernel per setting of the
    compile-time ones), RUNTIME_FLAGS fields stay arguments (one kernel for both values)."""
    import itertools
    d = driver()
    be = backend()
    for a, b, r in itertools.product((False, True), repeat=3):
        h = Flags(F32(1), a, b, r)
        p = [np.zeros(9, F32)]
        be.run(flagged, be.table(p, [np.zeros(9, F32)], (None,)), h)
        np.testing.assert_array_equal(p[0], F32(a + 10 * b + 100 * r), err_msg=f"a={a} b={b} r={r}")
    kernels = {k: v for k, v in d._KERNELS.items() if k[1] is flagged}
    assert sorted(tuple(k[3]) for k in kernels) == [((1, a), (2, b)) for a in (False, True) for b in (False, True)]
    for key, kernel in kernels.items():
        with open(kernel.fastopt_source) as f:
            text = f.read()
        a, b = key[3][0][1], key[3][1][1]
        assert f"hc = Scalars(h[0], {a}, {b}, h[3])" in text
    # a plain tuple of scalars is frozen the same way, whatever its length
    p = [np.zeros(3, F32)]
    table = be.table(p, [np.ones(3, F32)], (None,))
    be.run(plain, table, (F32(2), False))
    np.testing.assert_array_equal(p[0], F32(-2))
    be.run(plain, table, (F32(2), False, F32(5)))
    np.testing.assert_array_equal(p[0], F32(-2 - 2 + 5))
    be.run(plain, table, (F32(2), True, F32(5)))
    np.testing.assert_array_equal(p[0], F32(-2 - 2 + 5 + 2 + 5))


def plain(p, g, s0, h):
    p = p + (h[0] if h[1] else -h[0])
    if len(h) > 2:
        p = p + h[2] * g
    return p, s0


# -- reductions ---------------------------------------------------------------------------------------
def sumsq0(p, g, h):
    return g * g, p * p


def absmax_writes(p, g, s0, s1, s2, h):
    s0 = s0 + g
    s2 = s2 * h.decay
    return abs(g), abs(s0), p * h.decay, s0, s1, s2


def test_reductions_any_columns_sum_max_and_writes():
    be = backend()
    params, grads, _ = make(SHAPES, 0, seed=15)
    table = be.table(params, grads, ())
    parts = be.reduce_chunks(sumsq0, table, H)
    assert parts.shape == (table.n_chunks, 2) and parts.dtype == np.float64
    assert parts[:, 0].sum() == pytest.approx(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads), rel=1e-6)
    assert parts[:, 1].sum() == pytest.approx(sum(float(np.sum(p.astype(np.float64) ** 2)) for p in params), rel=1e-6)

    formats = ("bfloat16", "native", "float16")
    params, grads, slots = make(SHAPES, 3, formats=formats, seed=16)
    old_s1 = copy(slots[1])
    want = [(abs(g.astype(np.float64)).max() if g.size else 0.0) for g in grads]
    s0_new = [narrow(widen(s, "bfloat16") + g, s, "bfloat16") for s, g in zip(slots[0], grads)]
    s2_new = [narrow(widen(s, "float16") * H.decay, s, "float16") for s in slots[2]]
    p_new = [p * H.decay for p in params]
    table = be.table(params, grads, slots, merge=False)
    before = be.launches
    parts = be.reduce_chunks(absmax_writes, table, H, maximum=True, writes=(True, True, False, True))
    assert be.launches == before + 1
    per_row = np.maximum.reduceat(parts, table.starts, axis=0)
    assert list(per_row[:, 0]) == [w for w, g in zip(want, grads) if g.size]
    assert_same(params, p_new, "params")
    assert_same(slots[0], s0_new, "state 0")
    assert_same(slots[1], old_s1, "state 1 (not written)")
    assert_same(slots[2], s2_new, "state 2")
    with pytest.raises(ValueError, match="absent"):
        be.reduce_chunks(absmax_writes, be.table(params, grads, (None, None, None)), H,
                         writes=(False, True, False, False))
    for wrong in ((False, True), (False,) * 5):
        with pytest.raises(ValueError, match="4 entries"):
            be.reduce_chunks(absmax_writes, table, H, writes=wrong)


def test_reduction_over_master_weights_reads_widened_gradients():
    be = backend()
    master, model, grads, slots = _master_case(BF16, SHAPES, seed=17)
    parts = be.reduce_chunks(lambda p, g, s0, s1, s2, h: (g * g, p * p), be.table(master, grads, slots, model=model), H)
    assert parts[:, 0].sum() == pytest.approx(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads), rel=1e-6)
    assert parts[:, 1].sum() == pytest.approx(sum(float(np.sum(m.astype(np.float64) ** 2)) for m in master), rel=1e-6)


# -- generated sources ----------------------------------------------------------------------------------
def test_generated_source_text_and_its_file():
    """The text says what the layout says; the kernel runs from a file named by the
    text's hash that holds exactly that text (kernels.codegen.load, shared with the CPU)."""
    import hashlib

    from fastopt.kernels import cuda_codegen
    from fastopt.kernels.layout import Layout
    from fastopt.kernels.specialize import flags_of
    d = driver()
    h = Flags(F32(1), True, False, True)
    layout = Layout.of((True, False, True), formats=("bfloat16", "native", "float16"),
                       model="bfloat16-stochastic")
    assert tuple(flags_of(h)) == ((1, True), (2, False))
    gen = cuda_codegen.generate(cuda_codegen.STEP, elem3, layout, flags_of(h), h)
    assert "float_to_bfloat16(out[0], stochastic_noise(seed, at + i))" in gen.text
    assert "bfloat16_to_float(g_span[k_g])" in gen.text
    assert "float_to_half(out[3])" in gen.text and "half_to_float(s2_span[k_s2])" in gen.text
    assert "s1 = g" in gen.text and "s1_span" not in gen.text.split("):", 1)[1]
    assert "hc = Scalars(h[0], True, False, h[3])" in gen.text
    with pytest.raises(ValueError, match="sparse rows"):
        cuda_codegen.generate(cuda_codegen.ROWS, elem3, layout)
    kernel = d.step_kernel(elem3, layout, h)
    with open(kernel.fastopt_source) as f:
        assert f.read() == gen.text
    assert hashlib.sha256(gen.text.encode()).hexdigest()[:24] in os.path.basename(kernel.fastopt_source)
    mtime = os.stat(kernel.fastopt_source).st_mtime_ns
    again = d._compile(elem3, gen)                      # compiled again: the file is kept
    assert again is not kernel and again.fastopt_source == kernel.fastopt_source
    assert os.stat(kernel.fastopt_source).st_mtime_ns == mtime


def test_one_generator_for_every_kernel():
    """The driver's kernels all come from the generator's files (no hand-written kernel)."""
    d = driver()
    be = backend()
    p = [np.ones(3, F32)]
    be.run(elem1, be.table(p, [np.ones(3, F32)], ([np.zeros(3, F32)],)), H)
    be.reduce_chunks(sumsq0, be.table(p, p, ()), H)
    be.run_rows(elem1, np.ones((2, 2), F32), np.array([1]), np.ones((1, 2), F32), [None], H)
    kinds = {key[0] for key in d._KERNELS}
    assert kinds == {"step", "reduce", "rows"}
    for kernel in d._KERNELS.values():
        with open(kernel.fastopt_source) as f:
            assert f.read().startswith('"""Generated by fastopt.kernels.cuda_codegen')


# -- against the CPU driver generated from the same contract -----------------------------------------
def _cpu_has_columns():
    import inspect

    from fastopt.kernels import cpu
    return "formats" in inspect.signature(cpu.ChunkTable).parameters


needs_cpu_columns = pytest.mark.skipif(SIM and not _cpu_has_columns(),
                                       reason="kernels/cpu.py takes no formats= yet (not generated from a Layout)")
CPU_ROWS = [
    (0, (), None),
    (1, ("bfloat16",), None),
    (5, ("bfloat16", "native", "float16", "native", "bfloat16"), None),
    (1, ("float16",), np.float16),
    (5, ("native", "bfloat16", "native", "float16", "native"), BF16),
    (0, (), "stochastic"),
]


@needs_cpu_columns
@pytest.mark.parametrize("n_slots,formats,model", CPU_ROWS,
                         ids=[f"K{k}-{'-'.join(f) or 'none'}-{getattr(m, '__name__', m)}" for k, f, m in CPU_ROWS])
def test_matches_the_cpu_driver_for_any_columns(n_slots, formats, model):
    """The same element, columns, formats and model through both drivers: the same bits
    (params or masters, state, model copies; stochastic rounding included)."""
    from fastopt.kernels import cpu
    be = backend()
    shapes = SHAPES + MANY[:7]
    present = tuple(k != 1 for k in range(n_slots)) if n_slots == 5 else (True,) * n_slots
    params, grads, slots = make(shapes, n_slots, present, formats=formats, seed=30 + n_slots)
    options, model_arrays = {}, None
    if model is not None:
        low = BF16 if model == "stochastic" else np.dtype(model)
        model_arrays = [p.astype(low) for p in params]
        grads = [g.astype(low) for g in grads]
        options = {"seed": 11, "stochastic": model == "stochastic"}
    explicit = formats if any(a.dtype == np.uint16 for s in slots if s is not None for a in s) else None
    cuda_side = (params, grads, slots, model_arrays)
    cpu_side = tuple(copy(x) if x is not None else None for x in cuda_side)
    writes = (True, True, False, True, False)[:n_slots] if n_slots == 5 else None
    for side, run in ((cuda_side, be), (cpu_side, None)):
        p, g, s, w = side
        if run is None:
            cpu.run(ELEMENTS[n_slots], cpu.ChunkTable(p, g, s, model=w, formats=explicit), H,
                    grad_scale=0.5, writes=writes, **options)
        else:
            be.run(ELEMENTS[n_slots], be.table(p, g, s, model=w, formats=explicit), H, grad_scale=0.5,
                   writes=writes, **options)
    assert_same(cuda_side[0], cpu_side[0], "params")
    for k in range(n_slots):
        if present[k]:
            assert_same(cuda_side[2][k], cpu_side[2][k], f"state {k}")
    if model is not None:
        assert_same(cuda_side[3], cpu_side[3], "model copy")


@needs_cpu_columns
def test_reductions_and_sparse_rows_match_the_cpu_driver_for_any_columns():
    from fastopt.kernels import cpu
    be = backend()
    formats = ("bfloat16", "native", "float16")
    params, grads, slots = make(SHAPES, 3, formats=formats, seed=40)
    c_params, c_grads, c_slots = copy(params), copy(grads), copy(slots)
    writes = (True, True, False, True)
    table = be.table(params, grads, slots, merge=False)
    ctable = cpu.ChunkTable(c_params, c_grads, c_slots, merge=False)
    ours = np.add.reduceat(be.reduce_chunks(absmax_writes, table, H, writes=writes), table.starts)
    theirs = np.add.reduceat(cpu.reduce_chunks(absmax_writes, ctable, H, writes=writes), ctable.starts)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)     # the CPU sums float32 blocks
    assert_same(params, c_params, "params")
    for k in range(3):
        assert_same(slots[k], c_slots[k], f"state {k}")

    rng = np.random.default_rng(41)
    param = rng.standard_normal((7, 4)).astype(F32)
    states = [narrow(rng.uniform(0.5, 2, (7, 4)).astype(F32), np.zeros(0, BF16), "bfloat16"), None,
              rng.uniform(0.5, 2, (7, 4)).astype(F32), None,
              narrow(rng.uniform(0.5, 2, (7, 4)).astype(F32), np.zeros(0, np.float16), "float16")]
    index, rows = np.array([6, 2, 3]), rng.standard_normal((3, 4)).astype(F32)
    c_param, c_states = param.copy(), copy(states)
    be.run_rows(elem5, param, index, rows, states, H, grad_scale=0.5)
    cpu.run_rows(elem5, c_param, index, rows, c_states, H, 0.5)
    np.testing.assert_array_equal(param, c_param)
    for a, b in zip(states, c_states):
        if a is not None:
            np.testing.assert_array_equal(bits(a), bits(b))
