"""Parity: fastopt's CPU kernels against the NumPy reference and torch.optim, long runs.

Every optimizer of the database (``cases.ALL_CASES``, from the specs). Every run feeds
identical random gradients to fastopt's CPU driver over a list of arrays, the same over
a FlatParams, fastopt's NumPy reference (``backend="numpy"``) and, for the optimizers
whose oracle is torch.optim, torch's default implementation. List and FlatParams modes
must agree bit for bit (same element function, same scalars); both must agree with the
reference and with torch within 1e-6 (float32) / 1e-12 (float64), norm-relative per
tensor (see ``cases.rel_err``). The reference is checked against torch as well, so an
oracle bug cannot pass silently. (Optax's Lion, LAMB and LARS: the reference here, and
hand-derived steps in test_family.py.) The short runs of every backend are in
test_database.py.

torch is an optional oracle here: without it these tests still compare against the
reference (CI installs torch, so they run with it there). Tests that need torch itself
use ``pytest.importorskip``.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels.cpu import CHUNK

from cases import (ALL_CASES, DTYPES, Grads, assert_close, case_params, compare_impls, grid_params,
                   init_params, make_impls)

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:  # pragma: no cover - CI installs torch
    HAVE_TORCH = False

STEPS = 200
DTYPE_IDS = ["f32", "f64"]
# 0 elements (two kinds), 1 element, odd sizes (15 and 1023 elements, 2-D).
SMALL_SHAPES = [(0,), (1,), (3, 5), (2, 0, 3), (33, 31)]
# Not multiples of the 65536-element chunk: chunk boundaries fall inside tensors, and in
# FlatParams mode (one merged row) at other places than in list mode.
CHUNK_SHAPES = [(65537,), (7,), (3 * 65536 + 5,)]


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _torch(case) -> bool:
    """Whether torch.optim is this case's oracle (and installed)."""
    return HAVE_TORCH and case.in_torch


def _moved(params, init):
    """A guard against vacuous parity: training changed the (non-empty) params."""
    assert any(p.size and not np.array_equal(p, a) for p, a in zip(params, init)), "no param moved"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,row", grid_params(ALL_CASES))
def test_grid_matches_reference_and_torch(case, row, dtype):
    """200 steps of every grid row; the learning rate is halved between steps halfway.
    One tensor starts at zero (a bias; LAMB's and LARS's zero-norm rule)."""
    hp = case.hp(row)
    seed = _seed(case.name, sorted(row.items()), np.dtype(dtype))
    init = init_params(SMALL_SHAPES, dtype, seed)
    init[2][...] = 0
    impls = make_impls(case, init, hp, with_torch=_torch(case))
    grads = Grads(SMALL_SHAPES, dtype, seed + 1, fresh=True)
    check_at = {1, 2, STEPS // 2, STEPS // 2 + 1, STEPS}
    for k in range(1, STEPS + 1):
        if k == STEPS // 2 + 1:          # lr changed between steps, as a scheduler does
            for impl in impls:
                impl.set_lr(0.5)
        flat_grad, views = grads.next()
        for impl in impls:
            impl.step(flat_grad, views)
        if k in check_at:
            compare_impls(impls, dtype, f"step {k}", case.slot_names)
    _moved(impls[1].params, init)
    assert impls[1].opt.param_groups[0]["lr"] == hp["lr"] * 0.5


def _chunk_sample(offsets, rng, n_random=2048):
    """Flat indices around every chunk boundary (of the merged FlatParams row and of each
    tensor in list mode), around every tensor edge, and a random sample."""
    total = int(offsets[-1])
    marks = [int(o) for o in offsets]
    marks += list(range(0, total, CHUNK))
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        marks += list(range(int(lo), int(hi), CHUNK))
    near = np.add.outer(np.asarray(marks), np.arange(-3, 3)).ravel()
    idx = np.concatenate([near, rng.integers(0, total, n_random)])
    return np.unique(idx[(idx >= 0) & (idx < total)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_chunk_boundaries(case, dtype):
    """Tensors of 65537, 7 and 3*65536+5 elements: 200 steps, every flag of the case on.

    fastopt steps the full tensors (list mode and FlatParams mode, compared in full,
    bit for bit). For element-wise math the oracles (reference and torch) step only a
    gathered sample of the elements: every element within 3 of a chunk boundary or a
    tensor edge plus 2048 random ones. That is where chunking can go wrong, and it keeps
    the oracles from dominating the suite's time. An optimizer with a per-tensor pass
    (LAMB, LARS: a trust ratio from each tensor's norms) is compared in full.
    """
    seed = _seed("chunk", case.name, np.dtype(dtype))
    init = init_params(CHUNK_SHAPES, dtype, seed)
    hp = case.hp()
    grads = Grads(CHUNK_SHAPES, dtype, seed + 1, fresh=False, pool=True)
    sampled = case.spec.per_tensor is None
    if sampled:
        idx = _chunk_sample(grads.offsets, np.random.default_rng(seed + 2))
    else:
        idx = np.arange(grads.total)
    lst = [a.copy() for a in init]
    opt_list = case.fo_cls(lst, backend="cpu", **hp)
    flat = fo.FlatParams(init)
    opt_flat = case.fo_cls(flat, backend="cpu", **hp)
    # The oracles' tensors: the sample as one tensor, or copies of the full tensors.
    start = [flat.data[idx].copy()] if sampled else [a.copy() for a in init]
    ref = [a.copy() for a in start]
    oracles = {"reference": (ref, case.fo_cls(ref, backend="numpy", **hp))}
    if _torch(case):
        import torch
        tps = [torch.from_numpy(a.copy()) for a in start]
        oracles["torch"] = ([t.numpy() for t in tps], case.torch_cls()(tps, **hp))
    for _ in range(STEPS):
        flat_grad, views = grads.next()
        opt_list.step(views)
        flat.grad[...] = flat_grad
        opt_flat.step()
        g_oracle = [flat_grad[idx]] if sampled else [v.copy() for v in views]
        oracles["reference"][1].step(g_oracle)
        if _torch(case):
            for t, g in zip(tps, g_oracle):
                t.grad = torch.from_numpy(g)
            oracles["torch"][1].step()
    for a, b in zip(lst, flat.params):
        assert np.array_equal(a, b), "list and FlatParams mode differ"
    # Per tensor: the (sampled) elements of that tensor.
    owner = np.searchsorted(grads.offsets, idx, side="right") - 1
    parts = [np.flatnonzero(owner == t) for t in range(len(CHUNK_SHAPES))]

    def gather(arrays):
        """The compared elements of each tensor, from per-tensor arrays (or one sample)."""
        whole = np.concatenate([np.ravel(a) for a in arrays])
        return [whole[k] for k in parts] if len(arrays) == 1 and sampled else \
            [np.ravel(a) for a in arrays]

    mine_p = np.concatenate([a.ravel() for a in lst])[idx]
    st_list = opt_list.state
    for oracle, (params, opt) in oracles.items():
        assert_close([mine_p[k] for k in parts], gather(params), dtype, f"params vs {oracle}")
        if oracle == "reference":
            ost = [opt.state[t] for t in range(len(params))]
        else:
            ost = [{k: v.numpy() for k, v in opt.state[t].items()} for t in tps]
        for name in case.slot_names:
            if name not in ost[0]:
                assert name not in st_list[0]
                continue
            mine = np.concatenate([st_list[t][name].ravel() for t in range(len(lst))])[idx]
            assert_close([mine[k] for k in parts], gather([o[name] for o in ost]), dtype,
                         f"{name} vs {oracle}")
    _moved(lst, init)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_many_small_tensors(case, dtype):
    """2000 tensors of 0..47 elements, list mode and FlatParams mode, 200 steps.

    For element-wise math every tensor of the group has the same step count, so the
    oracles (reference and torch) run on ONE tensor holding the concatenation: the test
    is about fastopt's handling of 2000 tensors, and 2000 separate torch/NumPy tensors
    would cost seconds per run. Results are split back per tensor to compare. An
    optimizer with a per-tensor pass (LAMB, LARS: 2000 rows of per-tensor norms and trust
    ratios) needs the separate tensors: its oracles take them, for 12 steps.
    """
    rng = np.random.default_rng(_seed("many", case.name))
    sizes = rng.integers(0, 48, size=2000)
    shapes = [(int(n) // 4, 4) if k % 3 == 0 else (int(n),) for k, n in enumerate(sizes)]
    hp = case.hp()
    joined = case.spec.per_tensor is None
    steps = STEPS if joined else 12
    init = init_params(shapes, dtype, _seed("many-init", case.name))
    lst = [a.copy() for a in init]
    opt_list = case.fo_cls(lst, backend="cpu", **hp)
    flat = fo.FlatParams(init)
    opt_flat = case.fo_cls(flat, backend="cpu", **hp)
    start = [np.concatenate([a.ravel() for a in init])] if joined else [a.copy() for a in init]
    ref = [a.copy() for a in start]
    opt_ref = case.fo_cls(ref, backend="numpy", **hp)
    if _torch(case):
        import torch
        tps = [torch.from_numpy(a.copy()) for a in start]
        opt_torch = case.torch_cls()(tps, **hp)
    grads = Grads(shapes, dtype, _seed("many-grads", case.name), fresh=False, pool=True)
    for _ in range(steps):
        flat_grad, views = grads.next()
        opt_list.step(views)
        flat.grad[...] = flat_grad
        opt_flat.step()
        g_oracle = [flat_grad] if joined else [v.copy() for v in views]
        opt_ref.step(g_oracle)
        if _torch(case):
            for t, g in zip(tps, g_oracle):
                t.grad = torch.from_numpy(g)
            opt_torch.step()

    def split(arrays):
        if not joined:
            return list(arrays)
        a = arrays[0]
        return [a[lo:hi].reshape(s) for lo, hi, s in zip(grads.offsets[:-1], grads.offsets[1:], shapes)]

    ref_state = opt_ref.state
    oracles = {"reference": (ref, [ref_state[t] if t in ref_state else {} for t in range(len(ref))])}
    if _torch(case):
        oracles["torch"] = ([t.numpy() for t in tps],
                            [{k: v.numpy() for k, v in opt_torch.state[t].items()} for t in tps])
    for a, b in zip(lst, flat.params):
        assert np.array_equal(a, b), "list and FlatParams mode differ"
    mine = opt_list.state          # a property that builds a dict: read it once
    for oracle, (p, st) in oracles.items():
        assert_close(lst, split(p), dtype, f"params vs {oracle}")
        for name in case.slot_names:
            if name in st[0]:
                assert_close([mine[i][name] for i in range(len(lst))], split([o[name] for o in st]),
                             dtype, f"{name} vs {oracle}")
            else:
                assert name not in mine[0]
    assert int(mine[1999].get("step", steps)) == steps
    _moved(lst, init)


@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_param_groups_with_different_hyperparameters(case):
    """Two groups, one at the case's defaults, one with every flag on, in list mode and
    FlatParams mode (groups of FlatParams views share one arena per state slot)."""
    dtype = np.float32
    shapes = [(3,), (0,), (4, 5), (1,), (257,)]
    init = init_params(shapes, dtype, _seed("groups", case.name))
    lr = case.base["lr"]
    groups = [(slice(0, 2), dict(lr=2 * lr)), (slice(2, 5), case.hp())]
    impls = make_impls(case, init, groups=groups, with_torch=_torch(case))
    if _torch(case) and "initial_accumulator_value" in impls[1].opt.defaults:
        # torch.optim.Adagrad fills every param's sum with the constructor's
        # initial_accumulator_value, ignoring a group's own value; fastopt uses the
        # group's. Give torch the per-group start so it stays the oracle for the rest.
        topt = impls[-1].opt
        for group in topt.param_groups:
            for t in group["params"]:
                topt.state[t]["sum"].fill_(group["initial_accumulator_value"])
    assert fo.flat.arena_of(impls[2].params[0]) is not None
    grads = Grads(shapes, dtype, _seed("groups-grads", case.name))
    for k in range(1, STEPS + 1):
        if k == 50:
            for impl in impls:
                impl.opt.param_groups[1]["lr"] *= 0.25
        flat_grad, views = grads.next()
        for impl in impls:
            impl.step(flat_grad, views)
        if k in (1, 50, STEPS):
            compare_impls(impls, dtype, f"step {k}", case.slot_names)
    _moved(impls[1].params, init)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_none_grads_skip_params(case, dtype):
    """None grads skip their param: unchanged, and its step count does not advance.

    Param 1 skips every third step, param 2 starts at step 6 (so one group holds
    several step counts), param 3 never gets a gradient (no state, unchanged even with
    weight decay on).
    """
    shapes = [(5,), (3, 3), (7,), (4,)]
    n_steps = 30
    init = init_params(shapes, dtype, _seed("none", case.name))
    impls = make_impls(case, init, case.hp(), with_torch=_torch(case))
    grads = Grads(shapes, dtype, _seed("none-grads", case.name))
    expected = [0, 0, 0, 0]
    for k in range(1, n_steps + 1):
        flat_grad, views = grads.next()
        views = list(views)
        if k % 3 == 1:
            views[1] = None
        if k < 6:
            views[2] = None
        views[3] = None
        for i, g in enumerate(views):
            expected[i] += g is not None
        for impl in impls:
            impl.step(flat_grad, views)
        if k in (1, 6, 7, n_steps):
            compare_impls(impls, dtype, f"step {k}", case.slot_names)
    for impl in impls[:3]:
        assert np.array_equal(impl.params[3], init[3]), f"{impl.name}: a param without grads moved"
        assert 3 not in impl.opt.state, f"{impl.name}: a param without grads got state"
        if case.fo_cls.has_step_state:
            assert impl.steps()[:3] == expected[:3]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the reference on NaN
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,row", grid_params(ALL_CASES))
def test_nonfinite_grads_propagate_like_torch(case, row, dtype):
    """NaN, +inf and -inf in one step's gradients: no skipping, the same NaN/inf masks
    as torch (and the reference) in params and state for the following steps, finite
    parts within RTOL."""
    shapes = [(6,), (2, 3), (5,)]
    init = init_params(shapes, dtype, _seed("nan", case.name, sorted(row.items())))
    impls = make_impls(case, init, case.hp(row), with_torch=_torch(case))
    grads = Grads(shapes, dtype, _seed("nan-grads", case.name))
    for k in range(1, 9):
        flat_grad, views = grads.next()
        if k == 3:
            views[0][1] = np.nan
            views[0][2] = np.inf
            views[1][0, 0] = -np.inf
        for impl in impls:
            impl.step(flat_grad, views)
        if k == 3:      # it reached params or state (Rprop's sign steps keep params finite)
            reached = [impls[1].params[0], *map(np.asarray, impls[1].opt.state.get(0, {}).values())]
            assert not all(np.all(np.isfinite(a)) for a in reached), "the NaN gradient was skipped"
        if k >= 3:
            compare_impls(impls, dtype, f"step {k}", case.slot_names, nonfinite=True)
    assert np.all(np.isfinite(impls[1].params[2])), "NaN leaked into a clean tensor"
