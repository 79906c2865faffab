"""The CPU driver generated from a description of its columns (kernels/layout.py,
kernels/codegen.py): any number of state columns, 16-bit storage formats, master weights,
per-row values, write masks, sparse rows and reductions, each against NumPy computing the
same math in the same order (float32 without contraction: results are bit for bit)."""
from __future__ import annotations

import re
from typing import NamedTuple

import ml_dtypes
import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import adam, codegen, cpu
from fastopt.kernels.layout import Layout, parse_row_mode

from cases import group_of

BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK = cpu.CHUNK


class H(NamedTuple):
    a: float
    b: float
    flip: bool


def _h(dtype=np.float32, flip=False, a=0.25, b=0.75):
    cast = np.dtype(dtype).type
    return H(cast(a), cast(b), flip)


# -- elements of 0, 1 and 5 state columns, and a NumPy twin -----------------------
def elem0(p, g, h):
    x = -g if h.flip else g
    return (p - h.a * x,)


def elem1(p, g, m, h):
    m = h.b * m + g
    return p - h.a * m, m


def elem5(p, g, s0, s1, s2, s3, s4, h):
    x = -g if h.flip else g
    s0 = h.b * s0 + x
    s1 = s1 + x * x
    s2 = s2 - h.a * s0
    s3 = s3 * h.b + s1
    s4 = s4 if s4 >= s1 else s1
    p = p - h.a * (s0 + s2) + h.b * (s3 - s4)
    return p, s0, s1, s2, s3, s4


def np_elem5(p, g, s0, s1, s2, s3, s4, h):
    x = -g if h.flip else g
    s0 = h.b * s0 + x
    s1 = s1 + x * x
    s2 = s2 - h.a * s0
    s3 = s3 * h.b + s1
    s4 = np.where(s4 >= s1, s4, s1)
    p = p - h.a * (s0 + s2) + h.b * (s3 - s4)
    return p, s0, s1, s2, s3, s4


# elem0 and elem1 run on NumPy arrays as they are; elem5's select needs np.where.
ELEMENTS = {0: (elem0, elem0), 1: (elem1, elem1), 5: (elem5, np_elem5)}


def red0(p, g, h):
    return p * g, g * g


def red_three(p, g, s0, s1, s2, h):
    return g * g, s0


def red5(p, g, s0, s1, s2, s3, s4, h):
    """A reduction that may also store: (a, b, p, s0, ..., s4)."""
    s1 = s1 + g * h.a
    s3 = s3 * h.b
    return p * s1, g - s4, p + h.a * g, s0, s1, s2, s3, s4


def _arrays(n, count, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(count)]


def _case(sizes, present, seed=0, dtype=np.float32):
    """params, grads and state columns (None where absent) over tensors of ``sizes``."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
    slots = tuple([np.abs(rng.standard_normal(n)).astype(dtype) for n in sizes] if live else None
                  for live in present)
    return params, grads, slots


def _expected(np_elem, params, grads, slots, h, scale=1.0, writes=None, row_value=None):
    """The NumPy step: absent columns get the (scaled) gradient, read-only ones are kept."""
    out_p, out_s = [], [[] if s is not None else None for s in slots]
    writes = writes or (True,) * len(slots)
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g * p.dtype.type(scale)
        args = [s[i] if s is not None else g for s in slots]
        if row_value is not None:
            args[row_value[0]] = np.full_like(p, row_value[1][i])
        res = np_elem(p, g, *args, h)
        out_p.append(res[0])
        for k, s in enumerate(slots):
            if s is not None:
                out_s[k].append(res[1 + k] if writes[k] else s[i].copy())
    return out_p, out_s


def _assert_columns(params, slots, want_p, want_s):
    for i, p in enumerate(params):
        np.testing.assert_array_equal(p, want_p[i], err_msg=f"param {i}")
    for k, s in enumerate(slots):
        if s is not None:
            for i, a in enumerate(s):
                np.testing.assert_array_equal(a, want_s[k][i], err_msg=f"state {k} of tensor {i}")


SIZES = {"empty": [0], "one": [1], "odd": [7], "past-a-chunk": [CHUNK + 3],
         "several": [3 * CHUNK - 1, 5, 0, 2]}


# -- K state columns ------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_k_columns_match_numpy(k, sizes):
    elem, np_elem = ELEMENTS[k]
    present = [True] * k
    if k == 5:
        present[2] = False       # an absent column: the element gets the gradient in its place
    params, grads, slots = _case(sizes, present, seed=k)
    grads0 = [g.copy() for g in grads]
    for flip in (False, True):
        h = _h(flip=flip)
        want_p, want_s = _expected(np_elem, params, grads, slots, h, scale=0.5)
        cpu.run(elem, cpu.ChunkTable(params, grads, slots), h, grad_scale=0.5)
        _assert_columns(params, slots, want_p, want_s)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_array_equal(g, g0)


def test_k_of_table_is_the_number_of_slots_given():
    params, grads, slots = _case([10], [True] * 5)
    table = cpu.ChunkTable(params, grads, slots)
    assert table.has == (True,) * 5 and table.table.shape == (1, 3 + 5)
    table = cpu.ChunkTable(params, grads, ())
    assert table.has == () and table.table.shape == (1, 3)


def test_tables_differing_only_in_present_columns_share_a_driver():
    """A reduction loads absent columns from the gradient's address: a reducer that reads
    no state (Keras's per-tensor gradient norm) compiles once for every optimizer's table."""
    params, grads, _ = _case([10], [])
    keys, layouts = set(cpu._DRIVERS), set()
    for present in [(False,) * 3, (True, False, False), (True, True, False)]:
        _, _, slots = _case([10], present)
        table = cpu.ChunkTable(params, grads, slots)
        layouts.add(table.layout(writes=(False,) * 3, load_absent=True))
        got = cpu.reduce_chunks(red_three, table, _h()).sum(axis=0)
        assert got[0] == pytest.approx(float(np.sum(grads[0].astype(np.float64) ** 2)), rel=1e-6)
        first = grads[0] if slots[0] is None else slots[0][0]     # absent: the gradient
        assert got[1] == pytest.approx(float(np.sum(first.astype(np.float64))), rel=1e-6)
    assert len(layouts) == 1 and len(set(cpu._DRIVERS) - keys) == 1


def test_absent_and_read_only_columns_are_never_written():
    """A read-only column keeps its bits; an absent one is never stored: the gradient,
    whose address the table repeats in its place, is left unchanged."""
    params, grads, slots = _case([CHUNK + 11, 3], [True, False, True, True, False], seed=3)
    before = [[a.copy() for a in s] if s is not None else None for s in slots]
    grads0 = [g.copy() for g in grads]
    writes = (True, False, False, True, True)
    h = _h()
    want_p, want_s = _expected(np_elem5, params, grads, slots, h, writes=writes)
    cpu.run(elem5, cpu.ChunkTable(params, grads, slots), h, writes=writes)
    _assert_columns(params, slots, want_p, want_s)
    for k in (2,):
        for a, b in zip(slots[k], before[k]):
            np.testing.assert_array_equal(a, b)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_array_equal(g, g0)


def test_write_masks_have_one_entry_per_column():
    params, grads, slots = _case([10], [True] * 5)
    table = cpu.ChunkTable(params, grads, slots)
    with pytest.raises(ValueError, match="one entry per state column"):
        cpu.run(elem5, table, _h(), writes=(True, True, True))
    with pytest.raises(ValueError, match="6 entries"):
        cpu.reduce_chunks(red5, table, _h(), writes=(True,) * 5)


# -- 16-bit state columns ---------------------------------------------------------------
def elem_fmt(p, g, s0, s1, s2, h):
    s0 = s0 * h.b + g
    s1 = s1 * h.b + g * g
    s2 = s2 + g
    return p - h.a * g, s0, s1, s2


def _sixteen_bit_values(n, dtype, seed):
    """Values across the format's range: normal, subnormal, near overflow, ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(100)
    x[::7] = rng.uniform(-6e-6, 6e-6, x[::7].size)            # float16 subnormals
    x[3::11] = np.float32(65504) * rng.uniform(0.5, 1.0, x[3::11].size)  # overflow when scaled
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spelling", ["dtypes", "uint16 with formats"])
def test_16bit_state_columns_round_to_nearest_even(dtype, spelling):
    n = 3 * 1000 + 17
    rng = np.random.default_rng(11)
    p = rng.standard_normal(n).astype(dtype)
    g = (rng.standard_normal(n) * 3).astype(dtype)
    g[::7] = rng.uniform(-6e-6, 6e-6, g[::7].size)       # results in float16's subnormals
    s0 = _sixteen_bit_values(n, np.float16, 1)
    s1 = _sixteen_bit_values(n, BF16, 2)
    s2 = rng.standard_normal(n).astype(dtype)
    p0, s00, s10, s20 = p.copy(), s0.copy(), s1.copy(), s2.copy()
    h = _h(dtype, b=1.5)
    if spelling == "dtypes":
        table = cpu.ChunkTable([p], [g], ([s0], [s1], [s2]))
    else:
        table = cpu.ChunkTable([p], [g], ([s0.view(np.uint16)], [s1.view(np.uint16)], [s2]),
                               formats=("float16", "bfloat16", "native"))
    assert table.formats == ("float16", "bfloat16", "native")
    cpu.run(elem_fmt, table, h)
    # NumPy: widen exactly, compute in the math type, round to nearest even once
    # (from float64 math, through float32: the driver's documented double rounding).
    w0 = (s00.astype(np.float32).astype(dtype) * h.b + g).astype(np.float32)
    w1 = (s10.astype(np.float32).astype(dtype) * h.b + g * g).astype(np.float32)
    with np.errstate(over="ignore"):                # float16 overflow to infinity is tested
        np.testing.assert_array_equal(s0.view(np.uint16), w0.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(s1.view(np.uint16), w1.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(s2, s20 + g)
    np.testing.assert_array_equal(p, p0 - h.a * g)
    assert np.isinf(s0.astype(np.float32)).any() and ((s0.view(np.uint16) & 0x7C00) == 0).any()


def test_format_errors():
    p, g = _arrays(8, 2, 0)
    with pytest.raises(TypeError, match="give its format"):
        cpu.ChunkTable([p], [g], ([np.zeros(8, np.uint16)],))
    with pytest.raises(TypeError, match="cannot be float32"):
        cpu.ChunkTable([p], [g], ([p.copy()],), formats=("float16",))
    with pytest.raises(ValueError, match="unknown storage format"):
        cpu.ChunkTable([p], [g], ([p.copy()],), formats=("int8",))
    with pytest.raises(ValueError, match="one entry per state column"):
        cpu.ChunkTable([p], [g], ([p.copy()],), formats=("native", "native"))


def test_16bit_columns_in_a_five_column_step():
    sizes = [CHUNK + 5, 9, 1]
    params, grads, slots = _case(sizes, [True] * 5, seed=21)
    low = {1: np.float16, 3: BF16}
    slots = tuple([a.astype(low[k]) for a in s] if k in low else s for k, s in enumerate(slots))
    wide = tuple([a.astype(np.float32) for a in s] for s in slots)
    h = _h()
    want_p, want_s = _expected(np_elem5, params, grads, wide, h)
    cpu.run(elem5, cpu.ChunkTable(params, grads, slots), h)
    for k, dtype in low.items():
        want_s[k] = [a.astype(dtype) for a in want_s[k]]
    for i in range(len(sizes)):
        np.testing.assert_array_equal(params[i], want_p[i])
        for k in range(5):
            np.testing.assert_array_equal(slots[k][i].view(np.uint8), want_s[k][i].view(np.uint8))


# -- master weights ----------------------------------------------------------------------
@pytest.mark.parametrize("low", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_master_weights_with_five_columns(low):
    sizes = [CHUNK + 9, 4, 0, 33]
    masters, grads32, slots = _case(sizes, [True, True, False, True, True], seed=5)
    grads = [g.astype(low) for g in grads32]
    model = [m.astype(low) for m in masters]
    h = _h()
    want_p, want_s = _expected(np_elem5, masters, [g.astype(np.float32) for g in grads], slots,
                               h, scale=2.0)
    cpu.run(elem5, cpu.ChunkTable(masters, grads, slots, model=model), h, grad_scale=2.0)
    _assert_columns(masters, slots, want_p, want_s)
    for w, p in zip(model, want_p):
        np.testing.assert_array_equal(w.view(np.uint16), p.astype(low).view(np.uint16))


def test_master_weights_with_a_16bit_state_column():
    masters, grads32, (m,) = _case([1000, 3], [True], seed=6)
    grads = [g.astype(BF16) for g in grads32]
    m16 = [a.astype(BF16) for a in m]
    model = [p.astype(BF16) for p in masters]
    h = _h()
    want_p, want_m = _expected(elem1, masters, [g.astype(np.float32) for g in grads],
                               ([a.astype(np.float32) for a in m16],), h)
    cpu.run(elem1, cpu.ChunkTable(masters, grads, (m16,), model=model), h)
    for i in range(2):
        np.testing.assert_array_equal(masters[i], want_p[i])
        np.testing.assert_array_equal(m16[i].view(np.uint16), want_m[0][i].astype(BF16).view(np.uint16))
        np.testing.assert_array_equal(model[i].view(np.uint16), want_p[i].astype(BF16).view(np.uint16))


def test_stochastic_model_rounding_is_a_neighbour_and_seeded():
    n = 20_000
    masters, grads32, _ = _case([n], [], seed=8)
    grads = [g.astype(BF16) for g in grads32]
    models = []
    for seed in (1, 1, 2):
        p = [masters[0].copy()]
        model = [np.zeros(n, BF16)]
        cpu.run(elem0, cpu.ChunkTable(p, grads, (), model=model), _h(), seed=seed, stochastic=True)
        models.append(model[0].view(np.uint16).copy())
    # each one of the two bfloat16 neighbours of the master (truncated, or one up)
    truncated = (p[0].view(np.uint32) >> 16).astype(np.uint16)
    assert np.all((models[0] == truncated) | (models[0] == truncated + 1))
    assert np.array_equal(models[0], models[1]) and not np.array_equal(models[0], models[2])
    nearest = p[0].astype(BF16).view(np.uint16)
    assert 0.05 < np.mean(models[0] != nearest) < 0.95


# -- many tensors, merged runs ------------------------------------------------------------
def test_thousands_of_small_tensors():
    rng = np.random.default_rng(9)
    sizes = list(rng.integers(0, 40, 3000))
    params, grads, slots = _case(sizes, [True, False, True, True, True], seed=9)
    h = _h(flip=True)
    want_p, want_s = _expected(np_elem5, params, grads, slots, h)
    table = cpu.ChunkTable(params, grads, slots, merge=False)
    assert table.table.shape[0] == sum(1 for n in sizes if n)
    cpu.run(elem5, table, h)
    _assert_columns(params, slots, want_p, want_s)


@pytest.mark.parametrize("low_column", [False, True])
def test_flat_params_merge_into_one_run(low_column):
    shapes = [(3, 5), (CHUNK + 1,), (1,), (7, 7)]
    rng = np.random.default_rng(10)
    flat = fo.FlatParams([rng.standard_normal(s).astype(np.float32) for s in shapes])
    flat.grad[...] = rng.standard_normal(flat.grad.size)
    arenas = [np.abs(rng.standard_normal(flat.data.size)).astype(np.float32) for _ in range(4)]
    if low_column:
        arenas[1] = arenas[1].astype(np.float16)
    slots = tuple(flat.views_of(a) for a in arenas)
    slots = slots[:2] + (None,) + slots[2:]
    table = cpu.ChunkTable(flat.params, flat.grads, slots)
    assert table.table.shape[0] == 1 and table.n_elements == flat.data.size
    wide = tuple(None if k == 2 else [arenas[(0, 1, 2, 2, 3)[k]].astype(np.float32)]
                 for k in range(5))
    h = _h()
    want_p, want_s = _expected(np_elem5, [flat.data.copy()], [flat.grad.copy()], wide, h)
    cpu.run(elem5, table, h)
    np.testing.assert_array_equal(flat.data, want_p[0])
    for k, a in zip((0, 1, 3, 4), arenas):
        np.testing.assert_array_equal(a, want_s[k][0].astype(a.dtype))


# -- per-row values -------------------------------------------------------------------------
def test_per_row_values_with_five_columns():
    sizes = [CHUNK + 2, 6, 0, 40]
    params, grads, slots = _case(sizes, [True] * 5, seed=12)
    table = cpu.ChunkTable(params, grads, slots, merge=False)
    values = np.array([0.5, 2.0, 3.0], np.float32)          # one per non-empty tensor
    per_tensor = [0.5, 2.0, 1.0, 3.0]
    h = _h()
    # "grad": each row's gradients multiplied by its value
    snapshot = ([p.copy() for p in params], tuple([a.copy() for a in s] for s in slots))
    want_p, want_s = [], [[] for _ in range(5)]
    for i in range(len(sizes)):
        res = np_elem5(params[i], grads[i] * np.float32(per_tensor[i]), *[s[i] for s in slots], h)
        want_p.append(res[0])
        for k in range(5):
            want_s[k].append(res[1 + k])
    cpu.run(elem5, table, h, row_values=values, row_mode="grad")
    _assert_columns(params, slots, want_p, want_s)
    # "slot4": each row's value is the fifth state argument; that column is not touched
    params, slots = snapshot
    table = cpu.ChunkTable(params, grads, slots, merge=False)
    fifth = slots[4]
    kept = [a.copy() for a in fifth]
    rows = np.array([7.0, -1.0, 0.25], np.float32)
    want_p, want_s = _expected(np_elem5, params, grads, slots, h,
                               row_value=(4, [7.0, -1.0, 0.0, 0.25]))
    cpu.run(elem5, table, h, row_values=rows, row_mode="slot4")
    want_s[4] = kept
    _assert_columns(params, slots, want_p, want_s)


def test_row_modes():
    assert parse_row_mode(None) == (0, 0) and parse_row_mode("grad") == (1, 0)
    assert parse_row_mode("slot2") == (2, 2) and parse_row_mode("slot") == (2, 2)
    assert parse_row_mode("slot7") == (2, 7)
    with pytest.raises(ValueError, match="row_mode"):
        parse_row_mode("slots")
    params, grads, slots = _case([4], [True] * 3)
    with pytest.raises(ValueError, match="names no state position"):
        cpu.run(elem5, cpu.ChunkTable(params, grads, slots, merge=False), _h(),
                row_values=np.ones(1, np.float32), row_mode="slot4")


# -- sparse rows -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(50, 9), (20, 3, 4)])
def test_run_rows_with_five_columns(shape):
    rng = np.random.default_rng(13)
    p = rng.standard_normal(shape).astype(np.float32)
    slots = [np.abs(rng.standard_normal(shape)).astype(np.float32) for _ in range(5)]
    slots[1] = slots[1].astype(np.float16)
    slots[3] = None
    index = np.array([0, 7, 3, shape[0] - 1], np.int64)
    rows = rng.standard_normal((index.size,) + shape[1:]).astype(np.float32)
    p0 = p.copy()
    before = [None if s is None else s.copy() for s in slots]
    h = _h(flip=True)
    cpu.run_rows(elem5, p, index, rows, slots, h, grad_scale=0.5)
    untouched = np.setdiff1d(np.arange(shape[0]), index)
    np.testing.assert_array_equal(p[untouched], p0[untouched])
    for j, r in enumerate(index):
        g = rows[j] * np.float32(0.5)
        args = [g if s is None else s[r].astype(np.float32) for s in before]
        res = np_elem5(p0[r], g, *args, h)
        np.testing.assert_array_equal(p[r], res[0])
        for k, s in enumerate(slots):
            if s is not None:
                np.testing.assert_array_equal(s[r], res[1 + k].astype(s.dtype))
                np.testing.assert_array_equal(s[untouched], before[k][untouched])


# -- reductions -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 1025, 2 * CHUNK + 3])
def test_reductions_of_zero_and_five_columns(n):
    (p, g) = _arrays(n, 2, n)
    parts = cpu.reduce_chunks(red0, cpu.ChunkTable([p], [g], ()), _h())
    assert parts.shape == (-(-n // CHUNK), 2)
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    assert parts.sum(axis=0)[0] == pytest.approx(float(np.sum(p64 * g64)), rel=1e-5, abs=1e-3)
    assert parts.sum(axis=0)[1] == pytest.approx(float(np.sum(g64 * g64)), rel=1e-6, abs=1e-30)
    if n:
        top = cpu.reduce_chunks(red0, cpu.ChunkTable([p], [g], ()), _h(), maximum=True).max(axis=0)
        assert top[1] == float(np.max(g * g))
    params, grads, slots = _case([n], [True, True, False, True, True], seed=n)
    before = [None if s is None else s[0].copy() for s in slots]
    p0 = params[0].copy()
    h = _h()
    writes = (True, False, True, False, True, False)        # p, s1, s3
    parts = cpu.reduce_chunks(red5, cpu.ChunkTable(params, grads, slots), h, writes=writes)
    g = grads[0]
    s1 = before[1] + g * h.a
    s3 = before[3] * h.b
    np.testing.assert_array_equal(params[0], p0 + h.a * g)
    np.testing.assert_array_equal(slots[1][0], s1)
    np.testing.assert_array_equal(slots[3][0], s3)
    for k in (0, 4):
        np.testing.assert_array_equal(slots[k][0], before[k])
    want = float(np.sum(p0.astype(np.float64) * s1)), float(np.sum(g.astype(np.float64) - before[4]))
    scale = float(np.sum(np.abs(p0 * s1))) + float(np.sum(np.abs(g - before[4]))) + 1e-30
    assert abs(parts.sum(axis=0)[0] - want[0]) <= 1e-6 * scale
    assert abs(parts.sum(axis=0)[1] - want[1]) <= 1e-6 * scale


def test_reduction_writes_of_an_absent_column_are_refused():
    params, grads, slots = _case([5], [True, False, True, True, True])
    with pytest.raises(ValueError, match="absent"):
        cpu.reduce_chunks(red5, cpu.ChunkTable(params, grads, slots), _h(),
                          writes=(False, False, True, False, False, False))


# -- the generated source -------------------------------------------------------------------
def _uncached_ir(kind, element, layout, flags, args):
    """The LLVM IR of a freshly generated driver compiled without the disk cache
    (inspection is off for cached code)."""
    cached = codegen.build(kind, element, layout, flags, CHUNK, cpu.REDUCE_BLOCK)
    fresh = numba.njit(parallel=True)(cached.py_func)
    fresh(*args)
    return fresh.inspect_llvm(fresh.signatures[0])


@pytest.mark.parametrize("k", [0, 3, 5])
def test_float32_loops_stay_float32_and_vectorise(k):
    """The element loop is vectorised (LLVM vector types of float) and has no float64
    arithmetic: nothing promotes float32 math, whatever the number of columns."""
    n = 4096
    p, g = _arrays(n, 2, 0)
    slots = tuple([np.ones(n, np.float32)] for _ in range(k))
    table = cpu.ChunkTable([p], [g], slots)
    if k == 3:
        element = adam.adam_element
        h = adam.adam_scalars(group_of(adam.SPEC), 1, np.float32)
    else:
        element, h = ELEMENTS[k][0], _h()
    layout = table.layout()
    ir = _uncached_ir("step", element, layout, cpu.flags_of(h),
                      (table.table, table.chunks, table.like, np.uint16(0), h, np.float32(1),
                       None, np.uint32(0)))
    assert re.search(r"<(4|8|16) x float>", ir), "the element loop was not vectorised"
    assert not re.search(r"\bf(add|sub|mul|div)( \w+)* double\b", ir)


def test_layout_checks_and_tags():
    lay = Layout.of((True, False, True), (True, True, False), ("native", "native", "bfloat16"))
    assert lay.writes == (True, False, False)               # absent columns are never written
    assert lay.tag() == "w-r_nnb"
    with pytest.raises(ValueError, match="one entry per state position"):
        Layout.of((True,), formats=("native", "native"))
    with pytest.raises(ValueError, match="unknown model"):
        Layout.of((True,), model="int8")
    with pytest.raises(ValueError, match="absent state position"):
        Layout.of((True, True), row_mode=2, row_slot=1)


def test_generated_text_is_stable_and_names_its_columns():
    lay = Layout.of((True,) * 5, (True, False, True, False, True), ("native", "float16", "native",
                                                                    "bfloat16", "native"))
    name = codegen.driver_name("step", elem5, lay, ())
    text = codegen.step_source(name, lay, CHUNK)
    assert text == codegen.step_source(name, lay, CHUNK)
    assert "s1[i] =" not in text and "s3[i] =" not in text      # read-only columns
    assert "lowp.load(s1[i], 1, like)" in text and "lowp.load(s3[i], 2, like)" in text
    assert codegen.write_source(text) == codegen.write_source(text)
    absent = Layout.of((True, False, True))
    text = codegen.step_source("f", absent, CHUNK)
    assert "s1" not in text and "ELEMENT(p[i], gi, s0[i], gi, s2[i], hc)" in text
    assert "gi = g[i] * scale" in text
