"""Optimizer-level options: callable learning rates (Keras-style schedules)."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import schedules


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_callable_lr_is_evaluated_at_each_applied_step(backend):
    decay = schedules.InverseTimeDecay(0.5, decay_steps=1, decay_rate=0.5)
    p = [np.zeros(4, np.float64)]
    opt = fo.SGD(p, lr=decay, backend=backend)
    expected = 0.0
    for t in range(6):
        opt.step([np.ones(4)])
        expected -= 0.5 / (1 + 0.5 * t)          # lr(t) = lr0 / (1 + rate * t / steps)
    np.testing.assert_allclose(p[0], expected, rtol=1e-15)
    assert opt.iterations == 6


def test_skipped_step_does_not_advance_the_schedule():
    seen = []
    p = [np.zeros(2, np.float32)]
    opt = fo.Adam(p, lr=lambda t: seen.append(t) or 0.1)
    opt.step([np.ones(2, np.float32)])
    assert opt.step([np.array([np.nan, 1], np.float32)], grad_scale=1.0) is False
    opt.step([np.ones(2, np.float32)])
    assert opt.iterations == 2 and seen[-1] == 1


def test_bad_schedule_value_raises_before_any_update():
    p = [np.ones(3, np.float32)]
    opt = fo.SGD(p, lr=lambda t: -1.0)
    with pytest.raises(ValueError, match="lr schedule at iteration 0"):
        opt.step([np.ones(3, np.float32)])
    assert np.all(p[0] == 1) and opt.iterations == 0


def test_iterations_round_trip_in_state_dict():
    p = [np.ones(3, np.float32)]
    opt = fo.Adam(p)
    for _ in range(3):
        opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    assert sd["iterations"] == 3
    other = fo.Adam([p[0].copy()])
    other.load_state_dict(sd)
    assert other.iterations == 3
