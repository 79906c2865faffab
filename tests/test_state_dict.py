"""State dicts in torch's layout: equal to torch's, loadable both ways, and checkpoints.

A fastopt state dict matches torch's key for key and value for value; torch's state
dict (tensors turned into NumPy arrays) loads into fastopt and the two continue alike;
fastopt's (arrays turned into tensors) loads into torch and the two continue alike;
``fo.save``/``fo.load`` round trips of every optimizer on every backend are in
test_database.py, bad state dicts in test_bad_input.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt._state import TORCH_ONLY_KEYS

from cases import (ALL_CASES, DTYPES, Grads, assert_close, case_params, grid_params, init_params,
                   sd_to_numpy, sd_to_torch, torch_params, torch_step)

SHAPES = [(3,), (2, 4), (0,), (1,)]


def _grads_with_gaps(dtype, seed, n_steps):
    """Gradient lists for ``n_steps`` steps; param 3 gets None for the first two steps
    (so step counts differ between params)."""
    src = Grads(SHAPES, dtype, seed)
    out = []
    for k in range(n_steps):
        views = list(src.next()[1])
        if k < 2:
            views[3] = None
        out.append(views)
    return out


def _assert_sd_close(mine, theirs, dtype, what):
    """State dicts equal in structure; arrays within RTOL; steps and hyperparameters equal."""
    assert sorted(mine["state"]) == sorted(theirs["state"]), f"{what}: params with state differ"
    for pid, st in theirs["state"].items():
        ms = mine["state"][pid]
        assert sorted(ms) == sorted(st), f"{what}: state[{pid}] keys {sorted(ms)} != {sorted(st)}"
        for key, value in st.items():
            if key == "step":
                assert float(ms[key]) == float(value), f"{what}: state[{pid}]['step']"
                assert np.asarray(ms[key]).dtype == np.float32
            elif np.ndim(value) == 0:      # a per-param scalar kept as torch keeps it
                assert np.asarray(ms[key]).dtype == np.asarray(value).dtype, f"{what}: {key} dtype"
                assert_close([ms[key]], [value], np.asarray(value).dtype, f"{what}: state[{pid}][{key!r}]")
            else:
                assert_close([ms[key]], [value], dtype, f"{what}: state[{pid}][{key!r}]")
    assert len(mine["param_groups"]) == len(theirs["param_groups"])
    for gi, (mg, tg) in enumerate(zip(mine["param_groups"], theirs["param_groups"])):
        assert set(mg) == set(tg) - TORCH_ONLY_KEYS, f"{what}: group {gi} keys"
        for key in mg:
            assert mg[key] == tg[key], f"{what}: group {gi} {key}: {mg[key]!r} != {tg[key]!r}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,row", grid_params())
def test_state_dict_matches_torch(case, row, dtype):
    pytest.importorskip("torch")
    hp = case.hp(row)
    init = init_params(SHAPES, dtype, 1)
    params = [a.copy() for a in init]
    opt = case.fo_cls(params, **hp)
    tp = torch_params(init)
    topt = case.torch_cls()(tp, **hp)
    for grads in _grads_with_gaps(dtype, 2, 5):
        opt.step(grads)
        torch_step(topt, tp, grads)
    mine = opt.state_dict()
    _assert_sd_close(mine, sd_to_numpy(topt.state_dict()), dtype, "state_dict")
    # Copies, not live views: changing the dict leaves the optimizer alone.
    before = opt.state_dict()
    for st in mine["state"].values():
        for v in st.values():
            v[...] = 7
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for key, v in st.items():
            assert np.array_equal(v, after["state"][pid][key])


@pytest.mark.parametrize("case,row", grid_params())
def test_torch_state_dict_loads_and_continues(case, row):
    """torch runs 5 steps; its state dict as NumPy loads into fastopt; 5 more steps each."""
    pytest.importorskip("torch")
    dtype = np.float32
    hp = case.hp(row)
    grads = _grads_with_gaps(dtype, 3, 10)
    tp = torch_params(init_params(SHAPES, dtype, 4))
    topt = case.torch_cls()(tp, **hp)
    for g in grads[:5]:
        torch_step(topt, tp, g)
    params = [t.numpy().copy() for t in tp]
    opt = case.fo_cls(params, **{k: v for k, v in case.base.items()})   # other hyperparameters
    opt.load_state_dict(sd_to_numpy(topt.state_dict()))
    for key, value in hp.items():
        assert opt.param_groups[0][key] == value, f"{key} was not loaded"
    _assert_sd_close(opt.state_dict(), sd_to_numpy(topt.state_dict()), dtype, "loaded")
    for g in grads[5:]:
        opt.step(g)
        torch_step(topt, tp, g)
    assert_close(params, [t.numpy() for t in tp], dtype, "params after loading torch's state")
    _assert_sd_close(opt.state_dict(), sd_to_numpy(topt.state_dict()), dtype, "continued")


@pytest.mark.parametrize("case,row", grid_params())
def test_fastopt_state_dict_loads_into_torch(case, row):
    """fastopt runs 5 steps; its state dict as tensors loads into torch; 5 more steps each."""
    pytest.importorskip("torch")
    dtype = np.float64
    hp = case.hp(row)
    grads = _grads_with_gaps(dtype, 5, 10)
    params = init_params(SHAPES, dtype, 6)
    opt = case.fo_cls(params, **hp)
    for g in grads[:5]:
        opt.step(g)
    tp = torch_params(params)
    topt = case.torch_cls()(tp, **case.base)
    sd = sd_to_torch(opt.state_dict())
    topt.load_state_dict(sd)
    # torch's load casts every state tensor but 'step' to the param's dtype, so per-param
    # float32 scalars (NAdam's mu_product) become float64: torch's own save/load changes
    # its numerics that way. Put them back to the dtype a running torch optimizer uses.
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if key != "step" and value.ndim == 0:
                topt.state[tp[pid]][key] = value.clone()
    for g in grads[5:]:
        opt.step(g)
        torch_step(topt, tp, g)
    assert_close(params, [t.numpy() for t in tp], dtype, "torch params after loading fastopt's state")
    _assert_sd_close(opt.state_dict(), sd_to_numpy(topt.state_dict()), dtype, "continued")


def _exact_sd_equal(a, b):
    assert sorted(a["state"]) == sorted(b["state"])
    for pid, st in a["state"].items():
        assert sorted(st) == sorted(b["state"][pid])
        for key, v in st.items():
            w = b["state"][pid][key]
            assert np.asarray(v).dtype == np.asarray(w).dtype and np.shape(v) == np.shape(w)
            assert np.asarray(v).tobytes() == np.asarray(w).tobytes(), f"state[{pid}][{key!r}]"
    assert a["param_groups"] == b["param_groups"]


@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_load_copies_its_input(case):
    """Changing a state dict after loading it does not reach the optimizer."""
    params = init_params(SHAPES, np.float32, 9)
    opt = case.fo_cls(params, **case.hp())
    src = Grads(SHAPES, np.float32, 10)
    opt.step(src.next()[1])
    sd = opt.state_dict()
    other = case.fo_cls([p.copy() for p in params], **case.hp())
    other.load_state_dict(sd)
    for st in sd["state"].values():
        for v in st.values():
            v[...] = 5
    sd["param_groups"][0]["lr"] = 123.0
    _exact_sd_equal(other.state_dict(), opt.state_dict())


@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_state_dict_before_any_step(case):
    params = init_params(SHAPES, np.float32, 11)
    opt = case.fo_cls(params, **case.hp())
    sd = opt.state_dict()
    assert sd["state"] == {}
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    opt.load_state_dict(sd)            # an empty state loads, and the next step is step 1
    fresh = case.fo_cls([p.copy() for p in params], **case.hp())
    g = Grads(SHAPES, np.float32, 12).next()[1]
    opt.step(g)
    fresh.step(g)
    for a, b in zip(params, fresh.param_groups[0]["params"]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", case_params())
def test_torch_state_dict_before_any_step_loads(case):
    """torch.optim.Adagrad's state exists from construction (step 0, sum = initial
    value); others' is empty. Either loads, and the next step is everyone's first."""
    pytest.importorskip("torch")
    dtype = np.float64
    hp = case.hp()
    tp = torch_params(init_params(SHAPES, dtype, 13))
    topt = case.torch_cls()(tp, **hp)
    params = [t.numpy().copy() for t in tp]
    opt = case.fo_cls(params, **case.base)
    opt.load_state_dict(sd_to_numpy(topt.state_dict()))
    for g in _grads_with_gaps(dtype, 14, 4):
        opt.step(g)
        torch_step(topt, tp, g)
    assert_close(params, [t.numpy() for t in tp], dtype, "params")
    _assert_sd_close(opt.state_dict(), sd_to_numpy(topt.state_dict()), dtype, "after steps")


def test_state_is_a_mapping_over_params_with_state():
    """``opt.state``: the params that have state, looked up one at a time (live arrays,
    'step' a copy), a KeyError for the others, and dict-like everywhere else."""
    params = [np.zeros(3, np.float32), np.zeros(2, np.float32), np.zeros(4, np.float32)]
    opt = fo.Adam(params, lr=0.1)
    assert opt.state == {} and len(opt.state) == 0 and 0 not in opt.state
    opt.step([np.ones(3, np.float32), None, np.ones(4, np.float32)])
    state = opt.state
    assert list(state) == [0, 2] and len(state) == 2 and 1 not in state and 5 not in state
    assert set(state[2]) == {"exp_avg", "exp_avg_sq", "step"} and state[2]["step"] == 1
    for missing in (1, 3, -1, "0"):
        with pytest.raises(KeyError):
            state[missing]
    live = state[0]["exp_avg"]
    opt.step([np.ones(3, np.float32), None, None])
    assert np.array_equal(live, opt.state[0]["exp_avg"]) and state[0]["step"] == 2
    assert dict(state).keys() == {0, 2} and state.get(1) is None
