"""FlatParams: one buffer per role, per-tensor views, state arenas, one pass per step;
and the cached chunk table of list mode (the same engine)."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import _backend
from fastopt.flat import arena_of
from fastopt.kernels import cpu

from cases import assert_close, case_params

SHAPES = [(0,), (3, 4), (1,), (0, 2), (70001,), (5,), (0,)]


def _arrays(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


@pytest.fixture
def tables(monkeypatch):
    """Records the ChunkTable of every CPU run (to see how many rows a step streams)."""
    seen: list = []
    run = _backend._CpuBackend.run

    def spy(self, element, table, *args, **kwargs):
        seen.append(table)
        return run(self, element, table, *args, **kwargs)

    monkeypatch.setattr(_backend._CpuBackend, "run", spy)
    return seen


def test_views_share_the_buffers():
    arrays = _arrays()
    flat = fo.FlatParams(arrays)
    assert len(flat) == len(SHAPES) and flat.numel == sum(a.size for a in arrays)
    assert flat.data.shape == (flat.numel,) and flat.grad.shape == (flat.numel,)
    assert flat.data.dtype == np.float32 and flat.dtype == np.float32
    assert list(flat.offsets) == list(np.concatenate([[0], np.cumsum([a.size for a in arrays])]))
    for i, (a, p, g) in enumerate(zip(arrays, flat.params, flat.grads)):
        assert p.shape == a.shape and g.shape == a.shape
        assert np.array_equal(p, a)
        assert not np.any(g)
        assert p.flags.c_contiguous and p.flags.writeable
        assert p.size == 0 or np.shares_memory(p, flat.data)
        assert g.size == 0 or np.shares_memory(g, flat.grad)
        assert a.size == 0 or not np.shares_memory(p, a)    # a copy of the input
        assert flat.index_of(p) is not None
        assert arena_of(p) is flat
    flat.params[1][...] = 7.0
    assert np.all(flat.data[flat.offsets[1]:flat.offsets[2]] == 7.0)
    flat.grads[4][...] = 1.0
    flat.zero_grad()
    assert not np.any(flat.grad)
    assert "7 tensors" in repr(flat)


def test_foreign_arrays_are_not_views():
    flat = fo.FlatParams(_arrays())
    other = np.zeros((3, 4), np.float32)
    assert flat.index_of(other) is None
    assert arena_of(other) is None
    assert arena_of(flat.params[1][1:]) is None      # a slice of a view is not one of them


def test_new_buffer_and_views_of():
    flat = fo.FlatParams(_arrays())
    buf = flat.new_buffer(0.25)
    assert buf.shape == flat.data.shape and buf.dtype == flat.dtype and np.all(buf == 0.25)
    views = flat.views_of(buf)
    assert [v.shape for v in views] == [p.shape for p in flat.params]
    assert all(v.size == 0 or np.shares_memory(v, buf) for v in views)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_argument_converts(dtype):
    arrays = [np.arange(3, dtype=np.float32), np.arange(2, dtype=np.float64)]
    flat = fo.FlatParams(arrays, dtype=dtype)
    assert flat.data.dtype == dtype and flat.grad.dtype == dtype
    assert np.array_equal(flat.params[1], [0, 1])


@pytest.mark.parametrize("arrays,exc,pattern", [
    ([], ValueError, "empty"),
    ([np.zeros(2, np.float32), np.zeros(2, np.float64)], TypeError, "several dtypes"),
    ([np.zeros(2, np.int32)], TypeError, "int32"),
    ([np.zeros(2, np.complex64)], TypeError, "complex64"),
], ids=["empty", "mixed_dtypes", "int32", "complex64"])
def test_bad_flatparams(arrays, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fo.FlatParams(arrays)


@pytest.mark.parametrize("case", case_params())
def test_step_is_one_pass_over_one_row(case, tables):
    """FlatParams mode: state lives in one arena per slot, and a step streams one merged
    row (however many tensors), reading flat.grads."""
    flat = fo.FlatParams(_arrays())
    opt = case.fo_cls(flat, backend="cpu", **case.hp())
    flat.grad[...] = 0.5
    assert opt.step() is True
    assert len(tables) == 1 and tables[0].table.shape[0] == 1
    assert tables[0].n_elements == flat.numel
    st = opt.state
    for name in st[1]:
        if np.ndim(st[1][name]) == 0:         # 'step' and per-tensor scalars
            continue
        bases = {id(st[i][name].base) for i in range(len(SHAPES))}
        assert len(bases) == 1, f"{name} is not one arena"
        assert st[1][name].base.size == flat.numel
    # The same arrays again: the cached table is reused.
    opt.step()
    assert tables[1] is tables[0]


def test_list_mode_table_is_cached_and_retargeted(tables):
    """List mode: the chunk table is built on the first step, reused while the arrays
    are the same objects, and re-targeted (not rebuilt from the params) for new grads."""
    params = _arrays()
    opt = fo.Adam(params, backend="cpu")
    grads = [np.ones_like(p) for p in params]
    opt.step(grads)
    opt.step(grads)
    assert tables[1] is tables[0]
    opt.step([np.ones_like(p) for p in params])
    assert tables[2] is not tables[0]
    assert np.array_equal(tables[2].fixed, tables[0].fixed)     # params and state columns kept
    assert tables[2].table.shape[0] == sum(1 for p in params if p.size)


def test_list_and_flat_share_compiled_drivers():
    """A FlatParams step uses the driver list mode compiled (per element and slot mask)."""
    params = [np.ones(10, np.float32), np.ones(3, np.float32)]
    fo.RMSprop(params, backend="cpu", centered=True).step([np.ones(10, np.float32), np.ones(3, np.float32)])
    before = dict(cpu._DRIVERS)
    flat = fo.FlatParams([np.ones(10, np.float32), np.ones(3, np.float32)])
    flat.grad[...] = 1.0
    fo.RMSprop(flat, backend="cpu", centered=True).step()
    assert cpu._DRIVERS.keys() == before.keys()


def test_views_passed_as_a_list_use_the_arena(tables):
    """An optimizer given flat.params (a list of views) still finds the FlatParams."""
    flat = fo.FlatParams(_arrays())
    opt = fo.Adam(list(flat.params), backend="cpu")
    flat.grad[...] = 1.0
    opt.step()
    assert tables[-1].table.shape[0] == 1
    assert opt.state[1]["exp_avg"].base is opt.state[4]["exp_avg"].base


@pytest.mark.parametrize("case", case_params())
def test_flat_groups_share_arenas_and_match_separate_optimizers(case):
    """Two groups over one FlatParams equal two optimizers over the same tensors."""
    init = _arrays(np.float64, 3)
    flat = fo.FlatParams(init)
    hp_a, hp_b = dict(lr=2 * case.base["lr"]), case.hp()
    opt = case.fo_cls([{"params": flat.params[:4], **hp_a}, {"params": flat.params[4:], **hp_b}])
    a = [x.copy() for x in init[:4]]
    b = [x.copy() for x in init[4:]]
    opt_a, opt_b = case.fo_cls(a, **hp_a), case.fo_cls(b, **hp_b)
    rng = np.random.default_rng(4)
    for _ in range(5):
        flat.grad[...] = rng.standard_normal(flat.numel)
        opt.step()
        opt_a.step([g.copy() for g in flat.grads[:4]])
        opt_b.step([g.copy() for g in flat.grads[4:]])
    for x, y in zip(flat.params, a + b):
        assert x.tobytes() == y.tobytes()
    st, sa, sb = opt.state, opt_a.state, opt_b.state
    for i in range(len(SHAPES)):
        other = sa.get(i) if i < 4 else sb.get(i - 4)
        assert sorted(st.get(i, {})) == sorted(other or {})
        for k, v in st.get(i, {}).items():
            assert np.asarray(v).tobytes() == np.asarray(other[k]).tobytes(), f"state[{i}][{k!r}]"


def test_explicit_grads_on_flat_params_and_zero_grad():
    """A FlatParams optimizer also takes an explicit grads list (None skips a tensor);
    opt.zero_grad() clears the FlatParams' grad buffer."""
    init = _arrays(np.float64, 5)
    flat = fo.FlatParams(init)
    opt = fo.SGD(flat, lr=0.5, momentum=0.9)
    ref = [a.copy() for a in init]
    ref_opt = fo.SGD(ref, lr=0.5, momentum=0.9, backend="numpy")
    grads = [np.full(s, 1.0) for s in SHAPES]
    grads[1] = None
    for _ in range(3):
        opt.step(grads)
        ref_opt.step(grads)
    assert_close(list(flat.params), ref, np.float64, "explicit grads")
    assert np.array_equal(flat.params[1], init[1])
    flat.grad[...] = 3.0
    opt.zero_grad()
    assert not np.any(flat.grad)


def test_all_empty_flatparams_steps():
    flat = fo.FlatParams([np.zeros(0, np.float32), np.zeros((2, 0), np.float32)])
    opt = fo.Adam(flat)
    assert opt.step() is True
    assert flat.numel == 0
    assert int(opt.state[0]["step"]) == 1


def test_two_flatparams_in_one_optimizer():
    """Params from two FlatParams (of two dtypes): one bucket and one arena each."""
    f32 = fo.FlatParams([np.ones(5, np.float32), np.ones(3, np.float32)])
    f64 = fo.FlatParams([np.ones(4), np.ones(2)])
    opt = fo.Adam(list(f32.params) + list(f64.params), lr=0.1)
    f32.grad[...] = 1.0
    f64.grad[...] = -1.0
    opt.step()
    assert np.allclose(f32.data, 0.9, rtol=1e-6) and np.allclose(f64.data, 1.1, rtol=1e-12)
    st = opt.state
    assert st[0]["exp_avg"].base is st[1]["exp_avg"].base
    assert st[2]["exp_avg"].base is st[3]["exp_avg"].base
    assert st[0]["exp_avg"].base is not st[2]["exp_avg"].base


def test_adagrad_groups_with_different_initial_accumulators():
    """Regression: a group's state in a shared arena starts at that group's
    initial_accumulator_value, not the value of the group that created the arena."""
    flat = fo.FlatParams([np.ones(3), np.ones(2)])
    opt = fo.Adagrad([{"params": flat.params[:1], "initial_accumulator_value": 0.0},
                      {"params": flat.params[1:], "initial_accumulator_value": 2.0}], lr=1.0)
    flat.grad[...] = 1.0
    opt.step()
    assert np.array_equal(opt.state[0]["sum"], [1.0] * 3)
    assert np.array_equal(opt.state[1]["sum"], [3.0] * 2)
