"""Lookahead's cached slow pass (fastopt/lookahead.py ``_SlowPass``) follows the arrays.

The slow pass's chunk tables are kept between slow steps while the same arrays take part.
Each test replaces an array the way a user or the inner optimizer does (the inner
``load_state_dict``, a param rebound in ``param_groups``, momentum buffers that appear
when momentum is switched on, ``add_param_group``, another choice of params) and checks
that the next slow update acts on the new arrays: a stale table would update the old
arrays and leave the new ones alone.

Values are dyadic (params 1, 4; gradients 0.5; lr 0.5; alpha 0.5), so every step is
exact in float32 and float64 and the expected values are written down by hand.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import _backend

MOMENTUM = "momentum_buffer"
BACKENDS = ["cpu", "numpy"]


def _grads(params, value=0.5):
    return [np.full(p.shape, value, p.dtype) for p in params]


def _momenta(look):
    return [st.get(MOMENTUM) for st in look.optimizer._state]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_reaches_the_buffers_an_inner_load_put_in(backend):
    params = [np.ones(5, np.float32), np.ones((2, 3), np.float32)]
    look = fo.Lookahead(fo.SGD(params, lr=0.5, momentum=0.5, backend=backend), k=2,
                        pullback_momentum="reset")
    for _ in range(3):                          # a slow pass at step 2, then momentum again
        look.step(_grads(params))
    before = _momenta(look)
    assert all(np.all(m == 0.5) for m in before)
    look.optimizer.load_state_dict(look.optimizer.state_dict())
    loaded = _momenta(look)
    assert all(m is not b for m, b in zip(loaded, before))      # the load made new arrays
    look.step(_grads(params))                   # step 4: the slow pass resets them
    assert all(np.all(m == 0) for m in loaded)
    assert all(np.all(b == 0.5) for b in before)                # the old ones are left alone


def test_pullback_reaches_the_buffers_an_inner_load_put_in():
    params = [np.ones(4), np.ones(3)]
    look = fo.Lookahead(fo.SGD(params, lr=0.5, momentum=0.5), k=2, alpha=0.5,
                        pullback_momentum="pullback")
    for _ in range(3):
        look.step(_grads(params))
    look.optimizer.load_state_dict(look.optimizer.state_dict())
    loaded = _momenta(look)
    look.step(_grads(params))
    # momentum: 0.5, 0.75 -> pulled to its slow copy 0: 0.375 (step 2), 0.6875 (step 3,
    # kept by the load), 0.84375 (step 4) -> pulled to 0.375: 0.609375, which both now hold
    for i, m in enumerate(loaded):
        np.testing.assert_array_equal(m, 0.609375)
        np.testing.assert_array_equal(look.state[i]["slow_momentum"], 0.609375)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_rebound_param_gets_the_slow_update(backend, dtype):
    a, b = np.ones(4, dtype), np.ones(3, dtype)
    look = fo.Lookahead(fo.SGD([a, b], lr=0.5, backend=backend), k=1, alpha=0.5)
    look.step(_grads([a, b]))                   # fast 0.75, slow 1 -> 0.875 (both)
    look.step(_grads([a, b]))                   # the cached pass: fast 0.625 -> 0.75
    np.testing.assert_array_equal(b, 0.75)
    c = np.full(3, 4.0, dtype)
    look.param_groups[0]["params"][1] = c
    look.step(_grads([a, c]))
    # c: fast 3.75, slow 0.75 (param 1's) -> 0.75 + 0.5 (3.75 - 0.75) = 2.25
    np.testing.assert_array_equal(c, 2.25)
    np.testing.assert_array_equal(look.state[1]["slow_params"], 2.25)
    np.testing.assert_array_equal(b, 0.75)       # the old array: untouched
    np.testing.assert_array_equal(a, 0.625)      # a: fast 0.5, slow 0.75


def test_momentum_switched_on_later_is_reset():
    params = [np.ones(4, np.float32), np.ones(2, np.float32)]
    look = fo.Lookahead(fo.SGD(params, lr=0.5, momentum=0.0), k=1, pullback_momentum="reset")
    look.step(_grads(params))                   # no momentum buffers: the pass has none
    assert all(m is None for m in _momenta(look))
    look.param_groups[0]["momentum"] = 0.5
    look.step(_grads(params))                   # buffers appear in this inner step
    momenta = _momenta(look)
    assert all(m is not None for m in momenta)
    assert all(np.all(m == 0) for m in momenta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_added_after_a_slow_pass_gets_its_own(backend):
    a, b = np.ones(3), np.full(2, 4.0)
    look = fo.Lookahead(fo.SGD([a], lr=0.5, backend=backend), k=1, alpha=0.5)
    look.step(_grads([a]))                      # a: 0.875
    look.add_param_group({"params": [b]})
    look.step(_grads([a, b]))
    np.testing.assert_array_equal(a, 0.75)      # fast 0.625, slow 0.875
    np.testing.assert_array_equal(b, 3.875)     # fast 3.75, slow 4
    np.testing.assert_array_equal(look.state[1]["slow_params"], 3.875)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_a_gradient_are_left_out_then_back(backend):
    a, b = np.ones(3, np.float32), np.ones(2, np.float32)
    look = fo.Lookahead(fo.SGD([a, b], lr=0.5, backend=backend), k=1, alpha=0.5)
    look.step(_grads([a, b]))                   # both: 0.875
    look.step([np.full(3, 0.5, np.float32), None])
    np.testing.assert_array_equal(a, 0.75)
    np.testing.assert_array_equal(b, 0.875)     # no gradient: no slow update
    look.step(_grads([a, b]))                   # the first choice again (its cached pass)
    np.testing.assert_array_equal(a, 0.625)     # fast 0.5, slow 0.75
    np.testing.assert_array_equal(b, 0.75)      # fast 0.625, slow 0.875


def test_flat_params_build_the_slow_tables_once(monkeypatch):
    driver = _backend.get("cpu")
    built = []
    original = type(driver.driver).table

    def counting(self, *args, **kwargs):
        built.append(args)
        return original(self, *args, **kwargs)

    flat = fo.FlatParams([np.ones(s, np.float32) for s in [(7,), (3, 3), (), (40,)]])
    for g in flat.grads:
        g[...] = 0.5
    look = fo.Lookahead(fo.AdamW(flat, lr=1e-2, backend="cpu"), k=2)
    look.step()
    monkeypatch.setattr(type(driver.driver), "table", counting)
    for _ in range(8):                           # four slow passes
        look.step()
    assert len(built) == 1
