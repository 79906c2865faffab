"""param_groups edited between steps: every edit is seen by the next step (the step
re-validates a group only when one of its values changed since the last check)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt as fo


def _opt(**hp):
    p = [np.ones(1000, np.float32), np.ones(7, np.float32)]
    return p, fo.Adam(p, **{"lr": 1e-2, **hp})


def _grads():
    return [np.full(1000, 0.5, np.float32), np.full(7, 0.5, np.float32)]


@pytest.mark.parametrize("key, bad", [("lr", -1.0), ("lr", math.nan), ("betas", (1.5, 0.9)),
                                      ("eps", -1.0), ("amsgrad", "yes"), ("amsgrad", 0), ("maximize", 1),
                                      ("weight_decay", math.inf)])
def test_a_bad_edit_after_good_steps_is_refused_and_changes_nothing(key, bad):
    params, opt = _opt()
    for _ in range(2):
        opt.step(_grads())
    before = [p.copy() for p in params]
    state = {k: np.copy(v) for k, v in opt.state[0].items()}
    opt.param_groups[0][key] = bad
    with pytest.raises((ValueError, TypeError), match=key):
        opt.step(_grads())
    assert all(np.array_equal(a, b) for a, b in zip(params, before))
    assert all(np.array_equal(np.asarray(v), state[k]) for k, v in opt.state[0].items())


def test_edits_take_effect_at_the_next_step():
    params, opt = _opt()
    ref_params, ref = _opt()
    opt.step(_grads())
    ref.step(_grads())
    opt.param_groups[0]["lr"] = 0.5              # a new value: checked and used
    ref.param_groups[0]["lr"] = 0.5
    opt.param_groups[0]["amsgrad"] = True        # a new state column from now on
    ref.param_groups[0]["amsgrad"] = True
    opt.step(_grads())
    ref.step(_grads())
    assert "max_exp_avg_sq" in opt.state[0]
    assert all(np.array_equal(a, b) for a, b in zip(params, ref_params))
    moved = params[0].copy()
    opt.param_groups[0]["lr"] = 0.0
    opt.step(_grads())
    assert np.array_equal(params[0], moved)     # lr 0: nothing moves


def test_a_replaced_group_dict_is_checked():
    params, opt = _opt()
    opt.step(_grads())
    group = dict(opt.param_groups[0])
    group["lr"] = -3.0
    opt.param_groups[0] = group
    with pytest.raises(ValueError, match="lr"):
        opt.step(_grads())
