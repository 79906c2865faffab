"""The CPU driver's own contracts: flags as compile-time constants (kernels/specialize.py),
write masks, the blocked reduction (kernels/cpu.py). The CUDA driver's counterparts are in
tests/test_cuda_sim.py."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from fastopt.kernels import adam, cpu, lamb, reference, roof
from fastopt.kernels.specialize import flags_of

from cases import group_of, rel_err


class _Scalars(NamedTuple):
    scale: float
    negate: bool
    offset: float
    square: bool


def _flagged(p, g, s0, s1, s2, h):
    """An element with two flags: each combination computes something else."""
    x = -g if h.negate else g
    if h.square:
        x = x * x
    return p + h.scale * x + h.offset, s0 + x, s1, s2


def _flagged_reducer(p, g, s0, s1, s2, h):
    x = -g if h.negate else g
    if h.square:
        x = x * x
    return x, p * p


def _arrays(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(3)]


def test_flags_of_lists_the_bool_fields_only():
    h = _Scalars(np.float32(1), True, np.float32(0), False)
    assert tuple(flags_of(h)) == ((1, True), (3, False))
    assert flags_of(h).fields == h._fields          # part of the driver's cache name
    assert tuple(flags_of(roof.roof_scalars(np.float32))) == ()
    assert flags_of((np.float32(1), True)) == ((1, True),)          # plain tuples too,
    assert flags_of((False, np.float32(1), np.float32(2))) == ((0, False),)  # each its own
    h = adam.adam_scalars(group_of(adam.SPEC, weight_decay=0.1, amsgrad=True), 3, np.float32)
    flags = dict(flags_of(h))
    assert {h._fields[i] for i in flags} == {"l2", "decoupled", "amsgrad", "maximize", "lerp_from_end"}
    assert all(flags[i] == h[i] for i in flags)


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("square", [False, True])
def test_each_flag_combination_computes_its_own_branch(negate, square):
    """Flags are frozen per compiled driver: every combination gives its own result, even
    in one process where the other combinations were compiled first."""
    p, g, m = _arrays(70_001)
    p0, m0 = p.copy(), m.copy()
    h = _Scalars(np.float32(0.5), negate, np.float32(0.25), square)
    table = cpu.ChunkTable([p], [g], ([m], None, None))
    for other in [(not negate, square), (negate, not square)]:
        q = p0.copy()
        cpu.run(_flagged, cpu.ChunkTable([q], [g], (None, None, None)),
                h._replace(negate=other[0], square=other[1]))
    cpu.run(_flagged, table, h)
    x = -g if negate else g
    if square:
        x = x * x
    np.testing.assert_array_equal(p, p0 + np.float32(0.5) * x + np.float32(0.25))
    np.testing.assert_array_equal(m, m0 + x)


def test_flag_change_between_steps_of_one_optimizer():
    """maximize flipped between two steps of the same Adam: the second step follows it."""
    import fastopt as fo
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n).astype(np.float32) for n in (5, 100_000)]
    mirror = [x.copy() for x in params]
    opt = fo.Adam(params, lr=0.01)
    ref = fo.Adam(mirror, lr=0.01, backend="numpy")
    for maximize in (False, True, False):
        opt.param_groups[0]["maximize"] = maximize
        ref.param_groups[0]["maximize"] = maximize
        grads = [rng.standard_normal(x.shape).astype(np.float32) for x in params]
        opt.step(grads)
        ref.step(grads)
        for a, b in zip(params, mirror):
            assert rel_err(a, b) <= 1e-6


def test_write_mask_keeps_read_only_slots_unchanged():
    p, g, m = _arrays(1000)
    v = np.abs(_arrays(1000, seed=1)[0])
    p0, m0, v0 = p.copy(), m.copy(), v.copy()
    h = lamb.lamb_scalars(group_of(lamb.SPEC, lr=0.1, weight_decay=0.0), 2, np.float32)
    table = cpu.ChunkTable([p], [g], ([m], [v], None), merge=False)
    ratio = np.full(1, 0.5, np.float32)
    cpu.run(lamb.lamb_element, table, h, row_values=ratio, row_mode="slot2",
            writes=lamb.STEP_WRITES)
    np.testing.assert_array_equal(m, m0)
    np.testing.assert_array_equal(v, v0)
    u = (m0 * h.inv_bias_correction1) / (np.sqrt(v0 * h.inv_bias_correction2) + h.eps)
    np.testing.assert_array_equal(p, p0 - h.lr * (u * ratio[0]))


@pytest.mark.parametrize("n", [1, 1023, 1025, 65_537, 200_003])
def test_reduction_that_writes_state(n):
    """LAMB's first pass: the moments written equal the reference's, the sums are the
    squared norms of p and of the update, all within float32 rounding."""
    p, g, m = _arrays(n, seed=n)
    v = np.abs(_arrays(n, seed=n + 1)[0])
    p0 = p.copy()
    rm, rv, rp = m.copy(), v.copy(), p.copy()
    h = lamb.lamb_scalars(group_of(lamb.SPEC, lr=0.1, weight_decay=0.01), 3, np.float32)
    table = cpu.ChunkTable([p], [g], ([m], [v], None), merge=False)
    parts = cpu.reduce_chunks(lamb.lamb_moments, table, h, writes=lamb.MOMENTS_WRITES)
    np.testing.assert_array_equal(p, p0)                       # p is not written
    # the reference's moments after one step at t=3 from the same state
    reference.lamb([rp], [g], [rm], [rv], step=3, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6,
                   eps_root=0.0, weight_decay=0.01)
    assert rel_err(m, rm) <= 1e-6 and rel_err(v, rv) <= 1e-6
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    u = (m64 / (1 - 0.9 ** 3)) / (np.sqrt(v64 / (1 - 0.999 ** 3)) + 1e-6) + 0.01 * p0
    sums = parts.sum(axis=0)
    assert sums[0] == pytest.approx(float(np.sum(p0.astype(np.float64) ** 2)), rel=1e-6)
    assert sums[1] == pytest.approx(float(np.sum(u * u)), rel=1e-6)


def test_reduction_writes_must_name_present_slots():
    p, g, m = _arrays(10)
    table = cpu.ChunkTable([p], [g], ([m], None, None))
    h = lamb.lamb_scalars(group_of(lamb.SPEC, lr=0.1), 1, np.float32)
    with pytest.raises(ValueError, match="absent"):
        cpu.reduce_chunks(lamb.lamb_moments, table, h, writes=lamb.MOMENTS_WRITES)


@pytest.mark.parametrize("n", [0, 1, 31, 1024, 1025, 3 * 65_536 + 7])
@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_blocked_reduction_sums_and_maxima(n, flags):
    """float32 block sums added in float64: within 1e-6 of exact float64 sums; maxima exact."""
    p, g, _ = _arrays(n, seed=7)
    table = cpu.ChunkTable([p], [g], (None, None, None))
    h = _Scalars(np.float32(1), flags[0], np.float32(0), flags[1])
    parts = cpu.reduce_chunks(_flagged_reducer, table, h)
    x = (-g if flags[0] else g).astype(np.float64)
    if flags[1]:
        x = (x.astype(np.float32) * x.astype(np.float32)).astype(np.float64)
    sums = parts.sum(axis=0)
    scale = max(float(np.sum(np.abs(x))), 1e-30)
    assert abs(sums[0] - float(np.sum(x))) <= 1e-6 * scale
    assert sums[1] == pytest.approx(float(np.sum(p.astype(np.float64) ** 2)), rel=1e-6, abs=1e-30)
    if n:
        parts = cpu.reduce_chunks(_flagged_reducer, table, h, maximum=True)
        assert parts[:, 0].max() == max(float(np.max(x)), 0.0)
        assert parts[:, 1].max() == float(np.max(p.astype(np.float32) ** 2))


def _all_cases():
    from reliability_cases import ALL_CASES
    return [pytest.param(c, row, id=f"{c.name}-{i}") for c in ALL_CASES
            for i, row in enumerate(c.grid)]


@pytest.mark.parametrize("case,row", _all_cases())
def test_no_driver_is_compiled_after_the_first_step(case, row):
    """The flags a driver is specialised on stay the same from step to step (the ones
    that change, SGD's first step and RAdam's rectification, are run-time values): a
    training run compiles or loads its drivers on step 1 only."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(np.float32) for n in (3, 700)]
    opt = case.fo_cls(params, **case.hp(row))
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(8)]
    opt.step(grads[0])
    compiled = set(cpu._DRIVERS)
    for g in grads[1:]:
        opt.step(g)
    assert set(cpu._DRIVERS) == compiled


# ------------------------------------------------------------- generated, cached drivers
_WARM_SCRIPT = '''
import json, sys
from typing import NamedTuple
import numpy as np, ml_dtypes
from fastopt.kernels import cpu, lamb

class H(NamedTuple):
    a: float
    flip: bool

def five(p, g, s0, s1, s2, s3, s4, h):
    x = -g if h.flip else g
    return p - h.a * x, s0 + x, s1 * h.a, s2 + s0, s3 - x, s4

def none(p, g, h):
    return (p - h.a * g,)

def reduce_five(p, g, s0, s1, s2, s3, s4, h):
    return p * g, g * g, p + g, s0 + g, s1, s2, s3, s4

rng = np.random.default_rng(0)
bf = np.dtype(ml_dtypes.bfloat16)
h = H(np.float32(0.5), True)
arr = lambda n, d=np.float32: rng.standard_normal(n).astype(d)
sizes = [3, 70001, 25]
ps, gs = [arr(n) for n in sizes], [arr(n) for n in sizes]
slots = ([arr(n) for n in sizes], [arr(n, np.float16) for n in sizes], None,
         [arr(n, bf) for n in sizes], [arr(n) for n in sizes])
table = cpu.ChunkTable(ps, gs, slots, merge=False)
cpu.run(five, table, h, writes=(True, True, False, True, True))
cpu.run(five, table, h, row_values=np.ones(3, np.float32), row_mode="slot4")
cpu.reduce_chunks(reduce_five, table, h, writes=(True, True, False, False, False, False))
cpu.run(none, cpu.ChunkTable(ps, gs, ()), h)
masters = [arr(n) for n in sizes]
cpu.run(none, cpu.ChunkTable(masters, [g.astype(bf) for g in gs], (), model=[m.astype(bf) for m in masters]),
        h, seed=3, stochastic=True)
cpu.run_rows(five, arr((40, 3)).reshape(40, 3), np.array([1, 5]), arr((2, 3)).reshape(2, 3),
             [arr(120).reshape(40, 3)] * 5, h)
misses = sum(sum(fn.stats.cache_misses.values()) for fn in cpu._DRIVERS.values())
hits = sum(sum(fn.stats.cache_hits.values()) for fn in cpu._DRIVERS.values())
print(json.dumps(dict(drivers=len(cpu._DRIVERS), misses=misses, hits=hits,
                      checksum=float(sum(float(p.sum()) for p in ps + masters)))))
'''


def test_warm_process_compiles_no_generated_driver(tmp_path):
    """Every kind of generated driver (K = 5 and K = 0 columns, 16-bit columns, write
    masks, a per-row slot, a reduction that writes, master weights with stochastic
    rounding, sparse rows) is cached on disk: a second process loads all of them and
    compiles none, and the generated modules are not rewritten (their modification
    time is part of Numba's cache key)."""
    import json
    import os
    import subprocess
    import sys
    # Imported as a module, not run as __main__: cloudpickle stores __main__'s scalars
    # class by value in Numba's index, and a new process never finds that key again.
    (tmp_path / "warm_drivers.py").write_text(_WARM_SCRIPT)
    cache = tmp_path / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    runs, stamps = [], []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", "import warm_drivers"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        stamps.append({p.name: p.stat().st_mtime_ns for p in cache.rglob("fastopt_driver_*.py")})
    assert runs[0]["drivers"] == 6 and runs[0]["misses"] == 6
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == 6
    assert runs[1]["checksum"] == runs[0]["checksum"]
    assert len(stamps[0]) == 6 and stamps[1] == stamps[0]


def test_driver_and_reducer_take_a_layout_or_a_slot_mask():
    from fastopt.kernels.layout import Layout
    h = _Scalars(np.float32(1), False, np.float32(0), False)
    flags = flags_of(h)
    assert cpu.driver(_flagged, (True, False, False), flags) is cpu.driver(
        _flagged, Layout.of((True, False, False)), flags)
    p, g, m = _arrays(100)
    p0, m0 = p.copy(), m.copy()
    table = cpu.ChunkTable([p], [g], ([m], None, None))
    cpu.driver(_flagged, table.layout(), flags)(table.table, table.chunks, table.like,
                                                np.uint16(0), h, np.float32(1), None, np.uint32(0))
    np.testing.assert_array_equal(p, p0 + g)
    np.testing.assert_array_equal(m, m0 + g)
    out = np.zeros((1, 2))
    cpu.reducer(_flagged_reducer, table.layout((False,) * 3, load_absent=True), False, flags)(
        table.table, table.chunks, table.like, np.uint16(0), h, out)
    assert out[0, 1] == pytest.approx(float(np.sum(p.astype(np.float64) ** 2)), rel=1e-6)


_REORDERED_ELEMENT = '''
def element(p, g, s0, s1, s2, h):
    if h.negate:
        g = -g
    return p * h.a + g * h.b, s0, s1, s2
'''
_REORDERED_SCRIPT = '''
import json
import numpy as np
from fastopt.kernels import cpu
from reordered_element import Scalars, element
p, g = np.ones(5, np.float32), np.full(5, 10.0, np.float32)
h = Scalars(**{"a": np.float32(2.0), "b": np.float32(3.0), "negate": False})
cpu.run(element, cpu.ChunkTable([p], [g], (None, None, None)), h)
print(json.dumps(p.tolist()))
'''


def test_a_reordered_scalars_class_never_loads_the_old_driver(tmp_path):
    """A scalars class whose fields are reordered (same class name, same field types) gets
    its own driver: Numba's disk cache alone would load the one compiled for the old
    order, which reads ``a`` where ``b`` now is (Keras's scalars classes were reordered
    once, and 4 of 8 optimizers then read stale drivers from a warm cache)."""
    import json
    import os
    import subprocess
    import sys
    (tmp_path / "reordered.py").write_text(_REORDERED_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    for order in ("a: float\n    b: float", "b: float\n    a: float"):
        # The class lives in a module (a class of __main__ is keyed by value, not by name).
        (tmp_path / "reordered_element.py").write_text(
            "from typing import NamedTuple\n\n\nclass Scalars(NamedTuple):\n"
            f"    {order}\n    negate: bool\n" + _REORDERED_ELEMENT)
        out = subprocess.run([sys.executable, "reordered.py"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [2.0 * 1 + 3.0 * 10] * 5, order
