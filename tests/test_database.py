"""The optimizer database crossed with the backends (issue 13, item 5).

Every optimizer spec with examples (``cases.ALL_CASES``: the torch-oracle ones and the
external-oracle ones, so a new optimizer gets all of this from its spec row) runs on
the backends "cpu", "numpy" (the independent reference) and "cuda" (under the CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``, or on a GPU; skipped with the reason otherwise):

(a) parity with the reference, every grid row, float32 and float64, over tensors that
    are empty, of one element, odd, over 65536 elements (a CPU chunk) and many small;
(b) list and FlatParams modes give the same bits;
(c) None gradients: the param keeps its value and state, the others step, and the step
    counts differ per param afterwards (each param as if stepped alone);
(d) None gradients with master weights (float16, bfloat16): issue 13's repro for every
    optimizer that takes master weights, "cpu" and "numpy" agreeing (LAMB and LARS
    refuse master weights with a clear error);
(e) state dict round trips (fo.save/fo.load, host state included): bit-equal to an
    uninterrupted run;
(f) bad hyperparameters (from each spec's hyperparameters and their checks) raise naming
    the hyperparameter and change nothing;
(g) the same bits for 1 and 2 Numba threads ("cpu").

The oracle here is the reference, so parity with torch, optax and pytorch-optimizer is
elsewhere (test_parity.py, test_state_dict.py, test_adan.py). Runs are short (a few
steps, small tensors): the rows compiled are the spec's grid rows and its full row, as
in the other tests, so a warm cache serves them.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:xdist tests/test_database.py   # the "cuda" rows too
"""
from __future__ import annotations

import re
import zlib

import numba
import numpy as np
import pytest

import fastopt as fo

from cases import (SIM, ALL_CASES, DTYPES, assert_close, backend_memory, bad_hyperparameters, case_params,
                   cuda_unavailable, grid_params, hyper_kind, init_params, need_backend)

BACKENDS = ["cpu", "numpy", "cuda"]
DTYPE_IDS = ["f32", "f64"]
CASE_PARAMS = case_params(ALL_CASES)
STEPS = 3


_cuda_unavailable, need, _memory = cuda_unavailable, need_backend, backend_memory


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _shapes(backend):
    """Empty, one element, odd 2-D, over one 65536-element CPU chunk, and many small
    ones. The simulator runs each GPU thread in Python: there, a tensor that crosses
    several of its (8 to 32 element) chunks stands in for the big one."""
    if backend == "cuda" and SIM:
        return [(0,), (1,), (3, 5), (70,)] + [(k % 4,) for k in range(6)]
    return [(0,), (1,), (3, 5), (65536 + 3,)] + [(k % 7,) for k in range(48)]


def _init(shapes, dtype, seed):
    init = init_params(shapes, dtype, seed)
    init[2][...] = 0        # a zero-initialised tensor (a bias): LAMB's and LARS's zero-norm rule
    return init


def _grads(shapes, dtype, seed, n):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(n)]


class Run:
    """One optimizer over copies of ``init`` on ``backend``, in list or FlatParams mode."""

    def __init__(self, case, hp, init, backend, mode="list", **options):
        self.put, self.host = _memory(backend)
        arrays = [self.put(np.array(a)) for a in init]
        self.flat = fo.FlatParams(arrays) if mode == "flat" else None
        self.params = self.flat.params if self.flat is not None else arrays
        self.opt = case.fo_cls(self.flat if self.flat is not None else arrays, backend=backend,
                               **options, **hp)

    def step(self, grads):
        if self.flat is not None and all(g is not None for g in grads):
            for dst, g in zip(self.flat.grads, grads):
                dst[...] = self.put(g)
            assert self.opt.step() is True
        else:
            assert self.opt.step([None if g is None else self.put(g) for g in grads]) is True

    def values(self):
        return [self.host(p) for p in self.params]

    def state(self):
        return state_of(self.opt, self.host)


def state_of(opt, host=np.array):
    """{param: {key: NumPy array}} of ``opt.state`` (``step`` and host state 0-d)."""
    return {i: {k: np.array(host(v) if getattr(v, "ndim", 0) else v) for k, v in st.items()}
            for i, st in opt.state.items()}


def _bits(arrays):
    return [(np.asarray(a).dtype.str, np.shape(a), np.asarray(a).tobytes()) for a in arrays]


def _state_bits(state):
    return {i: {k: _bits([v])[0] for k, v in st.items()} for i, st in state.items()}


def _assert_state_close(mine, ref, dtype, what):
    """Same params with state, same keys; step counts equal; arrays within RTOL."""
    assert sorted(mine) == sorted(ref), f"{what}: params with state {sorted(mine)} != {sorted(ref)}"
    for i in ref:
        assert sorted(mine[i]) == sorted(ref[i]), f"{what}: state[{i}] keys"
        for k, v in ref[i].items():
            if k == "step":
                assert float(mine[i][k]) == float(v), f"{what}: state[{i}]['step']"
            elif np.ndim(v) == 0:               # host state (NAdam's mu_product), float32
                assert_close([mine[i][k]], [v], np.float32, f"{what}: state[{i}][{k!r}]")
            else:
                assert_close([mine[i][k]], [v], dtype, f"{what}: state[{i}][{k!r}]")


def test_every_registered_optimizer_is_in_the_database():
    """A spec without examples would miss every test here: none may."""
    from fastopt.kernels.registry import SPECS
    # Sparse-only optimizers (SparseAdam: Sparse(dense=False)) refuse the dense gradients
    # every test here steps; tests/test_sparse_adam.py tests SparseAdam against torch.
    sparse_only = {s.name for s in SPECS if s.sparse is not None and not s.sparse.dense}
    assert sparse_only <= {"SparseAdam"}, f"sparse-only optimizers without tests: {sparse_only}"
    assert [s.name for s in SPECS if s.name not in sparse_only] == [c.spec.name for c in ALL_CASES]
    for c in ALL_CASES:
        assert c.full in c.grid and c.base.get("lr", 0) > 0, c.name
        kinds = {h.name: hyper_kind(h) for h in c.spec.hypers}
        assert "unknown" not in kinds.values(), f"{c.name}: a check the bad-value table lacks: {kinds}"


def _flags(case, hp):
    """The compile-time flags (bool fields) of the element's scalars at ``hp``, step 3."""
    spec = case.spec
    group = {h.name: h.default for h in spec.hypers}
    group.update(hp)
    spec.check_group(group, "")
    spec.fill_host_values(group, 3)
    scalars = spec.scalars(group, 3, np.float64)
    return {k: v for k, v in scalars._asdict().items() if isinstance(v, bool)}


def _grid_cases():
    return [pytest.param(c, id=c.name) for c in ALL_CASES]


@pytest.mark.parametrize("case", _grid_cases())
def test_grid_switches_every_flag_and_term(case):
    """The database's promise: every flag of the spec is on in some grid row and off in
    another, and so is every term a hyperparameter switches off at 0 (weight decay, ...:
    a zero that changes the element's compile-time flags)."""
    rows = [case.hp(r) for r in case.grid]
    for h in case.spec.settable:
        values = [r.get(h.name, h.default) for r in rows]
        kind = hyper_kind(h)
        if kind == "flag":
            assert set(values) == {True, False}, f"{h.name}: {values} over the grid"
        elif kind in ("real", "nonnegative", "unit"):
            on = next((v for v in values if v != 0), None)
            if on is not None and _flags(case, {**rows[0], h.name: 0.0}) != _flags(case, {**rows[0], h.name: on}):
                assert 0 in values and on is not None, f"{h.name} switches a term off at 0: {values} over the grid"


# -- (a) parity with the reference --------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,row", grid_params(ALL_CASES))
def test_parity_with_the_reference(case, row, dtype, backend):
    """Every grid row: params and every state array within RTOL of the "numpy" reference
    after each step, step counts and host state equal."""
    need(backend)
    hp = case.hp(row)
    shapes = _shapes(backend)
    seed = _seed(case.name, sorted(row.items()), np.dtype(dtype))
    init = _init(shapes, dtype, seed)
    run, ref = Run(case, hp, init, backend), Run(case, hp, init, "numpy")
    for k, grads in enumerate(_grads(shapes, dtype, seed + 1, STEPS)):
        run.step(grads)
        ref.step(grads)
        assert_close(run.values(), ref.values(), dtype, f"{backend} step {k + 1}: params")
        _assert_state_close(run.state(), ref.state(), dtype, f"{backend} step {k + 1}")
    moved = [i for i, (a, b) in enumerate(zip(run.values(), init)) if a.size and not np.array_equal(a, b)]
    assert 3 in moved and 2 in moved, f"params that moved: {moved}"


# -- (b) list and FlatParams modes -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_list_and_flat_params_give_the_same_bits(case, backend):
    need(backend)
    shapes = _shapes(backend)
    seed = _seed("modes", case.name)
    init = _init(shapes, np.float32, seed)
    runs = [Run(case, case.hp(), init, backend, mode) for mode in ("list", "flat")]
    for grads in _grads(shapes, np.float32, seed + 1, STEPS):
        for run in runs:
            run.step(grads)
    lst, flat = runs
    assert _bits(lst.values()) == _bits(flat.values()), "params differ between list and FlatParams mode"
    assert _state_bits(lst.state()) == _state_bits(flat.state()), "state differs between the modes"
    assert not np.array_equal(lst.values()[3], init[3])


# -- (c) None gradients ---------------------------------------------------------------------
# Param 0 steps every time; param 1 skips steps 2 and 3; param 2 starts at step 2; param 3
# skips step 3. Step counts afterwards: 4, 2, 3, 3.
NONE_SHAPES = [(5,), (3, 4), (7,), (6,)]
NONE_PATTERN = [(True, True, False, True), (True, False, True, True),
                (True, False, True, False), (True, True, True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_none_gradients_skip_their_param(case, backend):
    need(backend)
    hp = case.hp()
    seed = _seed("none", case.name)
    init = init_params(NONE_SHAPES, np.float32, seed)
    grads = [[g if on else None for g, on in zip(row, pattern)]
             for row, pattern in zip(_grads(NONE_SHAPES, np.float32, seed + 1, 4), NONE_PATTERN)]
    run = Run(case, hp, init, backend)
    for k, row in enumerate(grads, 1):
        before_p, before_s = _bits(run.values()), _state_bits(run.state())
        run.step(row)
        after_p, after_s = _bits(run.values()), _state_bits(run.state())
        for i, g in enumerate(row):
            if g is None:
                assert after_p[i] == before_p[i], f"step {k}: params[{i}] moved without a gradient"
                assert after_s.get(i) == before_s.get(i), f"step {k}: state[{i}] changed without a gradient"
            else:
                assert after_p[i] != before_p[i], f"step {k}: params[{i}] did not step"
    counts = [sum(p[i] for p in NONE_PATTERN) for i in range(len(NONE_SHAPES))]
    state = run.state()
    if case.fo_cls.has_step_state:
        assert [int(state[i]["step"]) for i in range(len(NONE_SHAPES))] == counts == [4, 2, 3, 3]
    # Each param as if it had been stepped alone with its own gradients, on the reference
    # (a None gradient included: a param without one is skipped, while a group-level
    # count such as schedule-free's k advances at every step, as in its package).
    for i, a in enumerate(init):
        alone = Run(case, hp, [a], "numpy")
        for row in grads:
            alone.step([row[i]])
        assert_close([run.values()[i]], alone.values(), np.float32, f"params[{i}] vs alone")
        _assert_state_close({0: state[i]}, alone.state(), np.float32, f"state[{i}] vs alone")


# -- (d) None gradients with master weights ---------------------------------------------------
def _low_dtypes():
    from fastopt.kernels.lowp import bfloat16_dtype
    bf16 = bfloat16_dtype()
    return [pytest.param(np.dtype(np.float16), id="float16"),
            pytest.param(bf16, id="bfloat16", marks=pytest.mark.skipif(
                bf16 is None, reason="bfloat16 needs ml_dtypes"))]


def _u(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("dtype", _low_dtypes())
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_issue_13_repro_for_every_optimizer(case, dtype):
    """``opt.step([g0, None]); opt.step([g0, g1])`` on 16-bit params with master weights
    (issue 13: on "cpu" param 1 was never written back and its master went non-finite;
    on "numpy" the 16-bit copies were not written back). On "cpu", "numpy" (and "cuda"
    where it runs here): every 16-bit param is its master rounded to nearest, the masters
    are within float32 RTOL of the same run on float32 params (on the reference) and of
    each other, and the step counts are 2, 1. A backend whose capabilities lack master
    weights refuses the step, naming them, before any change. The base row: its 16-bit
    drivers are the ones tests/test_master_weights*.py compile for most optimizers."""
    from fastopt import _backend
    hp = case.hp({})
    if case.spec.per_tensor is not None:
        p = np.zeros(3, dtype)
        with pytest.raises(NotImplementedError, match="master_weights"):
            case.fo_cls([p], master_weights=True, **hp)
        return
    rng = np.random.default_rng(_seed("mw", case.name))
    p16 = [rng.standard_normal(1000).astype(np.float32).astype(dtype) for _ in range(2)]
    g0, g1 = [rng.standard_normal(1000).astype(np.float32).astype(dtype) for _ in range(2)]
    f32 = Run(case, hp, [p.astype(np.float32) for p in p16], "numpy")
    for row in ([g0, None], [g0, g1]):
        f32.step([None if g is None else g.astype(np.float32) for g in row])
    masters = {}
    for backend in ["cpu", "numpy"] + ([] if _cuda_unavailable() else ["cuda"]):
        if _backend.MASTER_WEIGHTS not in _backend.CAPABILITIES[backend]:
            run = Run(case, hp, p16, backend, master_weights=True)
            with pytest.raises(NotImplementedError, match=f"master weights.*{backend}"):
                run.opt.step([run.put(g0), None])
            assert _bits(run.values()) == _bits(p16) and len(run.opt.state) == 0, backend
            continue
        run = Run(case, hp, p16, backend, master_weights=True)
        run.step([g0, None])
        run.step([g0, g1])
        state = run.state()
        masters[backend] = [state[i]["master_param"] for i in range(2)]
        for i, (w, m) in enumerate(zip(run.values(), masters[backend])):
            where = f"{backend} params[{i}]"
            assert w.dtype == dtype and m.dtype == np.float32, where
            assert np.isfinite(m).all(), f"{where}: non-finite master weights"
            np.testing.assert_array_equal(_u(w), _u(m.astype(dtype)), err_msg=f"{where}: not its master rounded")
            assert not np.array_equal(_u(w), _u(p16[i])), f"{where}: never written back"
        assert_close(masters[backend], f32.values(), np.float32, f"{backend} masters vs float32 run")
        if case.fo_cls.has_step_state:
            assert [int(state[i]["step"]) for i in range(2)] == [2, 1], backend
    assert {"cpu", "numpy"} <= set(masters)
    for backend, m in masters.items():
        assert_close(m, masters["numpy"], np.float32, f"masters: {backend} vs numpy")


# -- (e) state dict round trips ---------------------------------------------------------------
def _assert_sd_equal(a, b, what):
    assert sorted(a["state"]) == sorted(b["state"]), what
    for pid, st in a["state"].items():
        assert sorted(st) == sorted(b["state"][pid]), f"{what}: state[{pid}] keys"
        for key, v in st.items():
            assert _bits([v]) == _bits([b["state"][pid][key]]), f"{what}: state[{pid}][{key!r}]"
    assert a["param_groups"] == b["param_groups"], f"{what}: param_groups"


@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_round_trip_continues_bit_for_bit(case, backend, mode, tmp_path):
    """Mid-run (param 3 skipped the first two steps, so step counts and host state differ
    per param): fo.save, fo.load, load into a fresh optimizer over the same values; it
    continues exactly as the uninterrupted run."""
    need(backend)
    shapes = [(3,), (2, 4), (0,), (1,), (5,)]
    seed = _seed("sd", case.name)
    grads = _grads(shapes, np.float32, seed + 1, 7)
    for row in grads[:2]:
        row[3] = None
    a = Run(case, case.hp(), init_params(shapes, np.float32, seed), backend, mode)
    for row in grads[:4]:
        a.step(row)
    sd = a.opt.state_dict()
    for host in case.spec.hosts:        # host state is saved, and differs per param here
        assert sd["state"][0][host.name] != sd["state"][3][host.name], host.name
    fo.save(tmp_path / "ckpt.npz", sd)
    loaded = fo.load(tmp_path / "ckpt.npz")
    _assert_sd_equal(loaded, sd, "saved and loaded")
    b = Run(case, case.hp(), a.values(), backend, mode)
    b.opt.load_state_dict(loaded)
    _assert_sd_equal(b.opt.state_dict(), sd, "after load_state_dict")
    if mode == "flat":      # loaded state lives in the FlatParams' per-slot arenas
        st = b.opt.state
        for key in st[0]:
            if key != "step" and np.ndim(st[0][key]):
                assert st[0][key].base is st[1][key].base, key
                assert not np.shares_memory(st[0][key], st[1][key]), key
    for row in grads[4:]:
        a.step(row)
        b.step(row)
    assert _bits(a.values()) == _bits(b.values()), "params differ from the uninterrupted run"
    _assert_sd_equal(a.opt.state_dict(), b.opt.state_dict(), "state after continuing")


# -- (f) bad hyperparameters ------------------------------------------------------------------
def named(name):
    """A regex that finds ``name`` as a whole word (``lr`` but not inside ``lr_decay``)."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_hyperparameters_raise_and_change_nothing(case, backend):
    """Each hyperparameter of the spec, given a value its check must refuse (one per
    hyperparameter; tests/test_bad_input.py tries them all on the default backend): the
    constructor raises naming it; set into a group between steps, the step raises naming
    it and the group, and no byte changes; afterwards the optimizer steps like its twin."""
    need(backend)
    shapes = [(4,), (2, 3), (5,)]
    init = init_params(shapes, np.float32, 1)
    put, host = _memory(backend)
    grads = [[put(g) for g in row] for row in _grads(shapes, np.float32, 2, 3)]
    hp = case.hp({})

    def build():
        ps = [put(np.array(a)) for a in init]
        opt = case.fo_cls([{"params": ps[:1]}, {"params": ps[1:]}], backend=backend, **hp)
        opt.step(grads[0])
        return ps, opt

    def snapshot(ps, opt):
        return _bits(map(host, ps)), _state_bits(state_of(opt, host))

    (ps, opt), (twin_ps, twin) = build(), build()
    bad = bad_hyperparameters(case, first_only=True)
    assert {n for n, _, _ in bad} == {h.name for h in case.spec.hypers}
    for name, value, mention in bad:
        with pytest.raises((ValueError, TypeError), match=named(mention)):
            case.fo_cls([put(np.zeros(3))], backend=backend, **{**hp, name: value})
        before = snapshot(ps, opt)
        saved = opt.param_groups[1][name]
        opt.param_groups[1][name] = value
        with pytest.raises((ValueError, TypeError), match=named(mention)) as err:
            opt.step(grads[1])
        assert "param_groups[1]" in str(err.value)
        opt.param_groups[1][name] = saved
        assert snapshot(ps, opt) == before, f"{name}={value!r} changed the optimizer"
    for o in (opt, twin):
        o.step(grads[2])
    assert snapshot(ps, opt) == snapshot(twin_ps, twin), "no longer steps like its twin"


# -- (g) threads ---------------------------------------------------------------------------------
THREAD_SHAPES = [(2 * 65536 + 4099,), (33, 17), (), (0, 4), (5,), (65536,)]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("dtype,clip", [(np.float32, None), (np.float64, 0.5)], ids=["f32", "f64-clip"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_one_and_two_threads_give_the_same_bits(case, dtype, clip):
    """"cpu", tensors spanning several 65536-element chunks so the parallel loop splits,
    with and without fused clipping (a reduction): params, every state array and the
    global norm bit-identical for 1 and 2 Numba threads, in list and FlatParams mode."""
    seed = _seed("threads", case.name, np.dtype(dtype))
    init = init_params(THREAD_SHAPES, dtype, seed)
    grads = _grads(THREAD_SHAPES, dtype, seed + 1, STEPS)
    results = {}
    old = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            for mode in ("list", "flat"):
                run = Run(case, case.hp(), init, "cpu", mode, max_grad_norm=clip)
                for g in grads:
                    run.step(g)
                results[n, mode] = (_bits(run.values()), _state_bits(run.state()),
                                    repr(run.opt.last_grad_norm))
    finally:
        numba.set_num_threads(old)
    ref = results[1, "list"]
    for key, res in results.items():
        assert res == ref, f"{case.name}: {key} differs from (1 thread, list)"
    assert ref[0][0] != _bits(init[:1])[0], "the big param did not move"
    if clip is not None:
        assert float(ref[2]) > 0
