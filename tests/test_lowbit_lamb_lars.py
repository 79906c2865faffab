"""LAMB and LARS with int8 (blockwise 8-bit) state: the CPU driver's blockwise reduction
and step against the NumPy reference (kernels/reference_lowbit.py: decode, the float32
reference, an independent quantizer), thread-count determinism and state dicts.

int8 LAMB's first pass stores nothing and its step recomputes the moments (fastopt/_passes.py):
the trust ratio is taken over the float32 moments the update applies, as the reference
does, so the codes are compared for equality, not for a share of them.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

import fastopt as fo
from cases import ALL_BY_NAME, case_params, on_one_and_all_threads, rel_err, rms, step_on
from fastopt import lowbit
from fastopt.kernels import blockwise, cpu, lars, per_tensor, threads
from fastopt.kernels import reference_lowbit as ref
from fastopt.kernels.layout import INT8_SIGNED, NATIVE, Layout

CASES = [ALL_BY_NAME["lamb"], ALL_BY_NAME["lars"]]
# Sizes: empty, under min_8bit_size (float32 state), not a multiple of the block (256),
# 2-D, more than one chunk (65536) and not a multiple of it.
SIZES = [(0,), (300,), (5001,), (70, 71), (66000,)]
STEPS = 120
# Params after STEPS steps, relative to the run's scale (cases.rel_err): the driver and the
# reference differ by the order of their bias corrections (multiply by a reciprocal, or
# divide) and of their norms' sums, about an ulp of an update per step.
PARAM_TOL = 1e-5


def _params(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in sizes]


def _grads(sizes, step, seed=1):
    rng = np.random.default_rng(seed * 1000 + step)
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32) for s in sizes]


def _run(case, backend, sizes, steps, hp, fmt="int8", grad_scale=None):
    params = _params(sizes)
    opt = case.fo_cls(params, **hp, backend=backend, state_format=fmt)
    for t in range(1, steps + 1):
        grads = _grads(sizes, t)
        if grad_scale is not None:
            grads = [g * np.float32(grad_scale) for g in grads]
        opt.step(grads, grad_scale=grad_scale)
    return opt, params


def _assert_state_equal(sd_a, sd_b, codes_only=False):
    assert sd_a.keys() == sd_b.keys()
    for i in sd_a:
        assert sd_a[i].keys() == sd_b[i].keys()
        for key, a in sd_a[i].items():
            b = sd_b[i][key]
            a, b = np.atleast_1d(a), np.atleast_1d(b)
            assert a.dtype == b.dtype and a.shape == b.shape, f"state[{i}][{key}]"
            if not codes_only or a.dtype == np.uint8:
                assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"state[{i}][{key}]"


@pytest.mark.parametrize("row", ["base", "full"])
@pytest.mark.parametrize("case", case_params(CASES))
def test_int8_matches_reference_over_many_steps(case, row):
    hp = case.hp({}) if row == "base" else case.hp()
    opt_c, p_c = _run(case, "cpu", SIZES, STEPS, hp)
    opt_n, p_n = _run(case, "numpy", SIZES, STEPS, hp)
    scale = rms(p_n)
    for i, (a, b) in enumerate(zip(p_c, p_n)):
        assert rel_err(a, b, scale) < PARAM_TOL, f"params[{i}] {a.shape}"
    sd_c, sd_n = opt_c.state_dict()["state"], opt_n.state_dict()["state"]
    _assert_state_equal(sd_c, sd_n, codes_only=True)
    for i, p in enumerate(p_c):
        for name in case.slot_names:
            if name not in sd_c.get(i, {}):
                continue
            kept = sd_c[i][name]
            if p.size >= 4096:
                assert kept.dtype == np.uint8 and kept.shape == p.shape
                assert sd_c[i][name + "_absmax"].shape == (-(-p.size // 256),)
                np.testing.assert_allclose(sd_c[i][name + "_absmax"], sd_n[i][name + "_absmax"],
                                           rtol=1e-5, atol=0)
            else:
                assert kept.dtype == np.float32 and name + "_absmax" not in sd_c[i]
                assert rel_err(kept, sd_n[i][name], rms([sd_n[i][name]])) < PARAM_TOL


@pytest.mark.parametrize("case", case_params(CASES))
def test_grad_scale_is_applied_once(case):
    """The reduction applies the gradient scale itself and the step's driver does too:
    both must see the same scaled gradient (a power of two: exact)."""
    runs = [_run(case, backend, [(5001,), (300,)], 4, case.hp(), grad_scale=4.0)
            for backend in ("cpu", "numpy")]
    (opt_c, p_c), (opt_n, p_n) = runs
    for a, b in zip(p_c, p_n):
        assert rel_err(a, b, rms(p_n)) < PARAM_TOL
    _assert_state_equal(opt_c.state_dict()["state"], opt_n.state_dict()["state"], codes_only=True)


@pytest.mark.parametrize("case", case_params(CASES))
def test_thread_count_does_not_change_a_bit(case):
    sizes = [(200_000,), (5001,), (300,)]

    def run():
        opt, params = _run(case, "cpu", sizes, 5, case.hp())
        return params, opt.state_dict()["state"]

    (p1, s1), (p2, s2) = on_one_and_all_threads(run)
    for a, b in zip(p1, p2):
        assert np.array_equal(a, b)
    _assert_state_equal(s1, s2)


@pytest.mark.parametrize("case", case_params(CASES))
def test_state_dict_round_trips_through_a_file(tmp_path, case):
    sizes = [(5001,), (300,)]
    opt, params = _run(case, "cpu", sizes, 3, case.hp())
    sd = opt.state_dict()
    assert sd["state_format"]["format"] == "int8"
    fo.save(tmp_path / "opt.npz", sd)
    other = case.fo_cls([p.copy() for p in params], **case.hp(), state_format="int8")
    other.load_state_dict(fo.load(tmp_path / "opt.npz"))
    _assert_state_equal(sd["state"], other.state_dict()["state"])
    grads = _grads(sizes, 9)
    opt.step(grads)
    other.step(grads)
    for a, b in zip(params, other.param_groups[0]["params"]):
        assert np.array_equal(a, b)
    _assert_state_equal(opt.state_dict()["state"], other.state_dict()["state"])


def test_float32_state_loads_into_int8_lamb_quantized():
    case = ALL_BY_NAME["lamb"]
    sizes = [(5001,), (300,)]
    opt32, params = _run(case, "cpu", sizes, 3, case.hp(), fmt="float32")
    sd32 = opt32.state_dict()
    loaded = {}
    for backend in ("cpu", "numpy"):
        opt8 = fo.LAMB([p.copy() for p in params], **case.hp(), backend=backend, state_format="int8")
        opt8.load_state_dict(sd32)
        loaded[backend] = opt8
    st = loaded["cpu"].state[0]
    for name, kind in (("exp_avg", blockwise.SIGNED), ("exp_avg_sq", blockwise.UNSIGNED)):
        # the independent quantizer of the reference gives the same codes and absmax
        codes, absmax = ref.quantize(sd32["state"][0][name], blockwise.dynamic_map(kind), 256)
        assert st[name].dtype == np.uint8 and np.array_equal(st[name], codes), name
        assert np.array_equal(st[name + "_absmax"], absmax), name
    assert loaded["cpu"].state[1]["exp_avg"].dtype == np.float32        # 300 < min_8bit_size
    assert np.array_equal(loaded["cpu"].state[1]["exp_avg"], sd32["state"][1]["exp_avg"])
    grads = _grads(sizes, 7)
    for opt8 in loaded.values():
        opt8.step(grads)
    p_c, p_n = (o.param_groups[0]["params"] for o in (loaded["cpu"], loaded["numpy"]))
    for a, b in zip(p_c, p_n):
        assert rel_err(a, b, rms(p_n)) < PARAM_TOL
    _assert_state_equal(loaded["cpu"].state_dict()["state"], loaded["numpy"].state_dict()["state"],
                        codes_only=True)


@pytest.mark.parametrize("case", case_params(CASES))
def test_flat_params_equal_lists_bit_for_bit(case):
    """A FlatParams arena: the per-tensor table still has one row per tensor, each with
    its absmax arrays (state over an arena is its own compact buffer)."""
    runs = []
    for flat in (False, True):
        params = _params(SIZES)
        arena = fo.FlatParams(params) if flat else None
        if flat:
            params = list(arena.params)
        opt = case.fo_cls(params, **case.hp(), state_format="int8")
        for t in range(1, 4):
            step_on(opt, _grads(SIZES, t), arena)
        runs.append((params, opt.state_dict()["state"]))
    (pl, sl), (pf, sf) = runs
    for a, b in zip(pl, pf):
        assert np.array_equal(a, b)
    _assert_state_equal(sl, sf)


def test_params_skipping_steps_match_the_reference():
    """None gradients: LAMB's bucket is split by step count, each part with its absmax
    arrays (and its own bias corrections)."""
    case = ALL_BY_NAME["lamb"]
    sizes = [(5001,), (4096,), (300,)]
    runs = []
    for backend in ("cpu", "numpy"):
        params = _params(sizes)
        opt = case.fo_cls(params, **case.hp(), backend=backend, state_format="int8")
        for t in range(1, 8):
            grads = _grads(sizes, t)
            if t % 3 == 0:
                grads[0] = None
            opt.step(grads)
        runs.append((params, opt.state_dict()["state"]))
    (pc, sc), (pn, sn) = runs
    assert int(sc[0]["step"]) == 5 and int(sc[1]["step"]) == 7
    for a, b in zip(pc, pn):
        assert rel_err(a, b, rms(pn)) < PARAM_TOL
    _assert_state_equal(sc, sn, codes_only=True)


def test_functional_lamb_with_int8_codes_equals_the_class():
    """fo.functional.lamb over uint8 codes and their absmax: the same passes as the class."""
    case = ALL_BY_NAME["lamb"]
    sizes = [(5001,)]
    opt, params = _run(case, "cpu", sizes, 3, case.hp())
    p = _params(sizes)
    m, am = lowbit.encode(np.zeros(sizes[0], np.float32), "int8-signed", 256)
    v, av = lowbit.encode(np.zeros(sizes[0], np.float32), "int8-unsigned", 256)
    hp = case.functional_kwargs(case.hp())
    for t in range(1, 4):
        fo.functional.lamb(p, _grads(sizes, t), [m], [v], step=t, **hp,
                           absmax={"exp_avgs": [am], "exp_avg_sqs": [av]})
    st = opt.state[0]
    assert np.array_equal(p[0], params[0])
    for codes, absmax, name in ((m, am, "exp_avg"), (v, av, "exp_avg_sq")):
        assert np.array_equal(codes, st[name]) and np.array_equal(absmax, st[name + "_absmax"])


def test_keras_clipnorm_with_int8_state():
    """Keras's clipnorm is a per-tensor pass too (a reduction of the gradients, then the
    step): over int8 state its reduction decodes the columns it does not use."""
    from fastopt import keras as fk
    sizes = [(5001,), (300,)]
    runs = {}
    for backend in ("cpu", "numpy"):
        params = _params(sizes)
        opt = fk.Adam(learning_rate=1e-2, clipnorm=0.5, state_format="int8", backend=backend)
        for t in range(1, 6):
            opt.apply(_grads(sizes, t), params)
        runs[backend] = params
    for a, b in zip(runs["cpu"], runs["numpy"]):
        assert rel_err(a, b, rms(runs["numpy"])) < PARAM_TOL


# -- the blockwise reduction driver --------------------------------------------------------------
def _blockwise_table(sizes, block=256):
    """A merge=False table over params, grads and a signed int8 trace (LARS's columns)."""
    params, grads = _params(sizes), _grads(sizes, 1)
    traces = [g * np.float32(0.1) for g in _grads(sizes, 2)]
    qmap = blockwise.dynamic_map(blockwise.SIGNED)
    coded = [ref.quantize(t, qmap, block) for t in traces]
    codes, scales = [c for c, _ in coded], [a for _, a in coded]
    table = per_tensor.table(params, grads, (codes, None, None), formats=(INT8_SIGNED, NATIVE, NATIVE),
                             scales=(scales, None, None), block=block)
    decoded = [ref.dequantize(c, a, qmap, block) for c, a in coded]
    return table, params, grads, codes, scales, decoded


def _trace_squares(p, g, t, unused, unused2, h):
    """(p^2, t^2) of one element in float64: a reducer that reads the blockwise column."""
    x, y = p * h.wide, t * h.wide
    return x * x, y * y


@pytest.mark.parametrize("block", [64, 256])
def test_reduction_decodes_blockwise_columns(block):
    sizes = [(5001,), (66000,), (257,)]
    table, params, grads, codes, scales, decoded = _blockwise_table(sizes, block)
    before = [c.copy() for c in codes], [a.copy() for a in scales]
    scalars = lars.lars_scalars(dict(lr=1.0, momentum=0.9, weight_decay=0.0, nesterov=False), 1,
                                np.float32)
    sums = per_tensor.row_sums(_trace_squares, table, scalars)
    expected = np.array([[np.sum(p.astype(np.float64) ** 2), np.sum(t.astype(np.float64) ** 2)]
                         for p, t in zip(params, decoded)])
    # float64 squares of float32 values, summed in float64: only the order differs
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=0)
    # read-only: codes and absmax untouched
    for c, c0 in zip(codes, before[0]):
        assert np.array_equal(c, c0)
    for a, a0 in zip(scales, before[1]):
        assert np.array_equal(a, a0)


def test_reduction_refuses_to_store_a_blockwise_column():
    table, *_ = _blockwise_table([(5001,)])
    scalars = lars.lars_scalars(dict(lr=1.0, momentum=0.9, weight_decay=0.0, nesterov=False), 1,
                                np.float32)
    with pytest.raises(ValueError, match="blockwise"):
        cpu.reduce_chunks(lars.lars_norms, table, scalars, writes=(False, True, False, False))


def test_int8_state_columns_of_lamb():
    """LAMB int8: a signed map for exp_avg, the unsigned one for exp_avg_sq."""
    opt, _ = _run(ALL_BY_NAME["lamb"], "cpu", [(5001,)], 1, ALL_BY_NAME["lamb"].hp())
    sd = opt.state_dict()["state"][0]
    assert np.array_equal(sd["exp_avg_qmap"], blockwise.dynamic_map(blockwise.SIGNED))
    assert np.array_equal(sd["exp_avg_sq_qmap"], blockwise.dynamic_map(blockwise.UNSIGNED))
    v = lowbit.decode(sd["exp_avg_sq"], sd["exp_avg_sq_absmax"], 256,
                      blockwise.dynamic_map(blockwise.UNSIGNED))
    assert np.all(v >= 0) and np.any(v > 0)


# -- the blockwise step with a read-only column ----------------------------------------------
class _Half(NamedTuple):
    half: float


def _minus_half_trace(p, g, t, h):
    """p - t/2, the trace read-only."""
    return p - h.half * t, t


def test_step_decodes_a_read_only_blockwise_column_without_encoding_it():
    """Layout.of refuses a read-only blockwise column (the CUDA step re-encodes every one
    it reads); the CPU step's generator decodes it only: codes and absmax stay as they are."""
    sizes = [(5001,), (66000,)]
    _, params, _, codes, scales, _ = _blockwise_table(sizes)
    # codes away from the map's ends (+-1): re-encoding them would change every absmax
    rng = np.random.default_rng(5)
    for c in codes:
        c[...] = rng.integers(32, 224, c.shape)
    qmap = blockwise.dynamic_map(blockwise.SIGNED)
    decoded = [ref.dequantize(c, a, qmap, 256) for c, a in zip(codes, scales)]
    table = cpu.ChunkTable(params, _grads(sizes, 3), ([c for c in codes],), merge=False,
                           formats=(INT8_SIGNED,), scales=([a for a in scales],), block=256)
    before = [p.copy() for p in params], [c.copy() for c in codes], [a.copy() for a in scales]
    layout = Layout.of((True,), (True,), (INT8_SIGNED,), block=256)._replace(writes=(False,))
    step = cpu.driver(_minus_half_trace, layout, ())
    threads.launch(step, table.table, table.chunks, table.like, np.uint16(0), _Half(np.float32(0.5)),
                   np.float32(1.0), None, np.uint32(0))
    for p, p0, t in zip(params, before[0], decoded):
        assert np.array_equal(p, p0 - np.float32(0.5) * t)
    for c, c0 in zip(codes, before[1]):
        assert np.array_equal(c, c0)
    for a, a0 in zip(scales, before[2]):
        assert np.array_equal(a, a0)
