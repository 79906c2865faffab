"""fastopt.schedules: torch parity (lr, momentum, state dicts), resume, Keras decays, bad input."""
import copy
import math
import random
import warnings

import numpy as np
import pytest

from fastopt import schedules as S

STEPS = 1000
RESUME_AT = 400


class FakeOptimizer:
    """The duck type the schedulers drive: ``param_groups``, a list of plain dicts."""

    def __init__(self, groups):
        self.param_groups = [dict(g) for g in groups]


class WarmupThenDecay:
    """A callable object with state, which LambdaLR saves in its state dict (as torch does)."""

    def __init__(self, warmup, rate):
        self.warmup = warmup
        self.rate = rate

    def __call__(self, epoch):
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        return self.rate ** (epoch - self.warmup)


def _tri_wave(x):
    return 1.0 / (1.0 + 0.01 * x)


# (id, optimizer kind, group lrs, factory(M, opt)); M is fastopt.schedules or
# torch.optim.lr_scheduler, so one factory builds both sides of a comparison.
CASES = [
    ("LambdaLR-pow", "sgd", [0.1, 0.02], lambda M, o: M.LambdaLR(o, lambda e: 0.95 ** e)),
    ("LambdaLR-list", "adam", [0.1, 0.02], lambda M, o: M.LambdaLR(
        o, [lambda e: 1 / (1 + e), WarmupThenDecay(50, 0.997)])),
    ("MultiplicativeLR-const", "sgd", [0.1, 0.02], lambda M, o: M.MultiplicativeLR(
        o, lambda e: 0.99)),
    ("MultiplicativeLR-every10", "adam", [0.1], lambda M, o: M.MultiplicativeLR(
        o, lambda e: 0.95 if e % 10 == 0 else 1.0)),
    ("StepLR-1", "sgd", [0.1, 0.02], lambda M, o: M.StepLR(o, 1, 0.99)),
    ("StepLR-7", "sgd", [0.1], lambda M, o: M.StepLR(o, step_size=7, gamma=0.5)),
    ("StepLR-100", "adam", [0.1, 0.3], lambda M, o: M.StepLR(o, 100)),
    ("MultiStepLR", "sgd", [0.1, 0.02], lambda M, o: M.MultiStepLR(o, [30, 80, 80, 500], 0.5)),
    ("MultiStepLR-zero", "sgd", [0.1], lambda M, o: M.MultiStepLR(o, [0, 5, 999], gamma=0.9)),
    ("ConstantLR-default", "sgd", [0.1, 0.02], lambda M, o: M.ConstantLR(o)),
    ("ConstantLR-100", "adam", [0.1], lambda M, o: M.ConstantLR(o, factor=0.5, total_iters=100)),
    ("ConstantLR-one", "sgd", [0.1], lambda M, o: M.ConstantLR(o, factor=1.0, total_iters=3)),
    ("LinearLR-default", "sgd", [0.1, 0.02], lambda M, o: M.LinearLR(o)),
    ("LinearLR-warmup", "adam", [0.1], lambda M, o: M.LinearLR(o, 0.05, 1.0, 40)),
    ("LinearLR-down", "sgd", [0.1], lambda M, o: M.LinearLR(o, 1.0, 0.1, 500)),
    ("LinearLR-999", "sgd", [0.1, 0.5], lambda M, o: M.LinearLR(o, 0.25, 0.75, 999)),
    ("ExponentialLR-0.99", "sgd", [0.1, 0.02], lambda M, o: M.ExponentialLR(o, 0.99)),
    ("ExponentialLR-up", "adam", [0.1], lambda M, o: M.ExponentialLR(o, gamma=1.001)),
    ("PolynomialLR-default", "sgd", [0.1], lambda M, o: M.PolynomialLR(o)),
    ("PolynomialLR-500", "sgd", [0.1, 0.02], lambda M, o: M.PolynomialLR(o, 500, 2.0)),
    ("PolynomialLR-1000", "adam", [0.1], lambda M, o: M.PolynomialLR(o, 1000, 0.9)),
    ("CosineAnnealingLR-10", "sgd", [0.1, 0.02], lambda M, o: M.CosineAnnealingLR(o, 10)),
    ("CosineAnnealingLR-100", "adam", [0.1], lambda M, o: M.CosineAnnealingLR(o, 100, 1e-4)),
    ("CosineAnnealingLR-1000", "sgd", [0.1], lambda M, o: M.CosineAnnealingLR(
        o, T_max=1000, eta_min=0.001)),
    ("CosineAnnealingLR-float", "sgd", [0.1], lambda M, o: M.CosineAnnealingLR(o, 37.5, 0.01)),
    ("CAWR-10", "sgd", [0.1, 0.02], lambda M, o: M.CosineAnnealingWarmRestarts(o, 10)),
    ("CAWR-5x2", "adam", [0.1], lambda M, o: M.CosineAnnealingWarmRestarts(o, 5, 2, 1e-4)),
    ("CAWR-50x3", "sgd", [0.1], lambda M, o: M.CosineAnnealingWarmRestarts(
        o, T_0=50, T_mult=3, eta_min=0.001)),
    ("CyclicLR-tri", "sgd", [0.1, 0.02], lambda M, o: M.CyclicLR(o, 0.001, 0.1, 20)),
    ("CyclicLR-tri-adam", "adam", [0.1], lambda M, o: M.CyclicLR(
        o, [0.001], [0.1], step_size_up=25, base_momentum=0.85, max_momentum=0.95)),
    ("CyclicLR-tri2", "sgd", [0.1], lambda M, o: M.CyclicLR(
        o, 0.01, 0.1, 10, 30, mode="triangular2")),
    ("CyclicLR-exp", "adam", [0.1, 0.02], lambda M, o: M.CyclicLR(
        o, [0.001, 0.002], [0.1, 0.05], 15, mode="exp_range", gamma=0.995)),
    ("CyclicLR-custom", "sgd", [0.1], lambda M, o: M.CyclicLR(
        o, 0.01, 0.1, 33, 17, scale_fn=_tri_wave, scale_mode="iterations")),
    ("CyclicLR-nomom", "sgd", [0.1], lambda M, o: M.CyclicLR(
        o, 0.01, 0.1, 40, cycle_momentum=False)),
    ("OneCycleLR-cos", "sgd", [0.1, 0.02], lambda M, o: M.OneCycleLR(o, 0.5, total_steps=1000)),
    ("OneCycleLR-linear", "adam", [0.1], lambda M, o: M.OneCycleLR(
        o, 0.01, total_steps=1200, anneal_strategy="linear", pct_start=0.25)),
    ("OneCycleLR-3phase", "sgd", [0.1], lambda M, o: M.OneCycleLR(
        o, 0.1, epochs=10, steps_per_epoch=100, three_phase=True, div_factor=10.0,
        final_div_factor=100.0)),
    ("OneCycleLR-3phase-adam", "adam", [0.1, 0.02], lambda M, o: M.OneCycleLR(
        o, [0.1, 0.05], total_steps=1001, three_phase=True, anneal_strategy="linear",
        base_momentum=[0.8, 0.7], max_momentum=0.9)),
    ("OneCycleLR-nomom", "sgd", [0.1], lambda M, o: M.OneCycleLR(
        o, 0.3, total_steps=1000, cycle_momentum=False, pct_start=0.1)),
    ("SequentialLR-warmup-cos", "sgd", [0.1, 0.02], lambda M, o: M.SequentialLR(
        o, [M.LinearLR(o, 0.1, total_iters=10), M.CosineAnnealingLR(o, T_max=990)], [10])),
    ("SequentialLR-const-exp", "adam", [0.1], lambda M, o: M.SequentialLR(
        o, schedulers=[M.ConstantLR(o, 0.1, 20), M.ExponentialLR(o, 0.99)], milestones=[20])),
    ("SequentialLR-three", "sgd", [0.1], lambda M, o: M.SequentialLR(
        o, [M.StepLR(o, 30, 0.5), M.MultiplicativeLR(o, lambda e: 0.999),
            M.PolynomialLR(o, 300, 2.0)], [100, 400])),
    ("SequentialLR-cawr", "sgd", [0.1], lambda M, o: M.SequentialLR(
        o, [M.LinearLR(o, 0.5, total_iters=5), M.CosineAnnealingWarmRestarts(o, 30, 2)], [5])),
    ("ChainedScheduler", "sgd", [0.1, 0.02], lambda M, o: M.ChainedScheduler(
        [M.ConstantLR(o, 0.1, 20), M.ExponentialLR(o, 0.99)])),
    ("ChainedScheduler-three", "adam", [0.1], lambda M, o: M.ChainedScheduler(
        [M.LinearLR(o, 0.2, total_iters=50), M.StepLR(o, 100, 0.5),
         M.CosineAnnealingLR(o, 250)], optimizer=o)),
]
IDS = [c[0] for c in CASES]


def _torch_optimizer(torch, kind, lrs):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    return torch.optim.Adam(groups, lr=lrs[0], betas=(0.9, 0.999))


def _fake_groups(kind, lrs):
    if kind == "sgd":
        return [{"lr": lr, "momentum": 0.9} for lr in lrs]
    return [{"lr": lr, "betas": (0.9, 0.999)} for lr in lrs]


def _row(sched, opt):
    """What a step changes: each group's lr and momentum / betas, and get_last_lr()."""
    row = []
    for g in opt.param_groups:
        row.append(g["lr"])
        if "momentum" in g:
            row.append(g["momentum"])
        if "betas" in g:
            row.extend(g["betas"])
    return row + list(sched.get_last_lr())


def _run(sched, opt, steps):
    rows = []
    for _ in range(steps):
        sched.step()
        rows.append(_row(sched, opt))
    return rows


def _run_strict(sched, opt, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our schedulers warn only on misuse
        return _run(sched, opt, steps)


def _restore_groups(opt, saved):
    """What an optimizer's load_state_dict does to the groups' hyperparameters."""
    for group, values in zip(opt.param_groups, saved, strict=True):
        group.clear()
        group.update(copy.deepcopy(values))


def _assert_plain(obj, path="state"):
    assert not callable(obj), f"{path} is callable"
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{path}[{i}]")


def _same_keys(ours, theirs):
    assert set(ours) == set(theirs)
    for a, b in zip(ours.get("_schedulers", ()), theirs.get("_schedulers", ()), strict=True):
        _same_keys(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler as T

    _, kind, lrs, make = case
    topt = _torch_optimizer(torch, kind, lrs)
    fake = FakeOptimizer(_fake_groups(kind, lrs))
    initial_groups = copy.deepcopy(fake.param_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "optimizer.step() not called" warnings
        tsched = make(T, topt)
        want = [_row(tsched, topt)] + _run(tsched, topt, RESUME_AT)
        torch_state = copy.deepcopy(tsched.state_dict())
        torch_groups = copy.deepcopy(topt.param_groups)
        want += _run(tsched, topt, STEPS - RESUME_AT)

    sched = make(S, fake)
    got = [_row(sched, fake)] + _run_strict(sched, fake, STEPS)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12, atol=0)
    _same_keys(sched.state_dict(), tsched.state_dict())

    # a state dict saved by torch resumes our scheduler on the same sequence
    fake2 = FakeOptimizer(initial_groups)
    sched2 = make(S, fake2)
    for group, saved in zip(fake2.param_groups, torch_groups, strict=True):
        group.update({k: saved[k] for k in group})  # optimizer.load_state_dict(...)
    sched2.load_state_dict(torch_state)
    got2 = _run_strict(sched2, fake2, STEPS - RESUME_AT)
    np.testing.assert_allclose(np.array(got2), np.array(want[RESUME_AT + 1:]), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_from_state_dict(case):
    _, kind, lrs, make = case
    opt = FakeOptimizer(_fake_groups(kind, lrs))
    sched = make(S, opt)
    full = _run_strict(sched, opt, STEPS)

    opt1 = FakeOptimizer(_fake_groups(kind, lrs))
    sched1 = make(S, opt1)
    first = _run_strict(sched1, opt1, RESUME_AT)
    state = sched1.state_dict()
    saved_groups = copy.deepcopy(opt1.param_groups)
    _assert_plain(state)
    _run(sched1, opt1, 3)  # the saved state must not alias the live scheduler

    opt2 = FakeOptimizer(_fake_groups(kind, lrs))
    sched2 = make(S, opt2)
    _restore_groups(opt2, saved_groups)  # optimizer.load_state_dict(...)
    sched2.load_state_dict(copy.deepcopy(state))
    rest = _run_strict(sched2, opt2, STEPS - RESUME_AT)
    assert first + rest == full


LAST_EPOCH_CASES = [
    ("StepLR", lambda M, o, le: M.StepLR(o, 7, 0.5, last_epoch=le)),
    ("MultiStepLR", lambda M, o, le: M.MultiStepLR(o, [10, 20, 60], 0.5, last_epoch=le)),
    ("ConstantLR", lambda M, o, le: M.ConstantLR(o, 0.5, 30, last_epoch=le)),
    ("LinearLR", lambda M, o, le: M.LinearLR(o, 0.1, 1.0, 40, last_epoch=le)),
    ("ExponentialLR", lambda M, o, le: M.ExponentialLR(o, 0.98, last_epoch=le)),
    ("PolynomialLR", lambda M, o, le: M.PolynomialLR(o, 100, 2.0, last_epoch=le)),
    ("CosineAnnealingLR", lambda M, o, le: M.CosineAnnealingLR(o, 50, 0.001, last_epoch=le)),
    ("CAWR", lambda M, o, le: M.CosineAnnealingWarmRestarts(o, 10, 2, last_epoch=le)),
    ("LambdaLR", lambda M, o, le: M.LambdaLR(o, lambda e: 0.97 ** e, last_epoch=le)),
    ("MultiplicativeLR", lambda M, o, le: M.MultiplicativeLR(o, lambda e: 0.97, last_epoch=le)),
    ("CyclicLR", lambda M, o, le: M.CyclicLR(o, 0.01, 0.1, 12, last_epoch=le)),
    ("OneCycleLR", lambda M, o, le: M.OneCycleLR(o, 0.1, 300, last_epoch=le)),
]


@pytest.mark.parametrize("name,make", LAST_EPOCH_CASES, ids=[c[0] for c in LAST_EPOCH_CASES])
def test_constructed_with_last_epoch_matches_torch(name, make):
    """A scheduler built with last_epoch >= 0 resumes from the groups' initial_lr, like torch's."""
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler as T

    extra = {"initial_lr": 0.1, "max_lr": 0.1, "min_lr": 4e-7, "max_momentum": 0.95,
             "base_momentum": 0.85}
    topt = _torch_optimizer(torch, "sgd", [0.05, 0.03])
    for g in topt.param_groups:
        g.update(extra)
    fake = FakeOptimizer([{**g, **extra} for g in _fake_groups("sgd", [0.05, 0.03])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tsched = make(T, topt, 15)
        want = [_row(tsched, topt)] + _run(tsched, topt, 200)
    sched = make(S, fake, 15)
    got = [_row(sched, fake)] + _run_strict(sched, fake, 200)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12, atol=0)


EPOCH_ARG_CASES = [
    ("StepLR", lambda M, o: M.StepLR(o, 7, 0.5)),
    ("MultiStepLR", lambda M, o: M.MultiStepLR(o, [10, 20, 20, 60], 0.5)),
    ("ConstantLR", lambda M, o: M.ConstantLR(o, 0.5, 30)),
    ("LinearLR", lambda M, o: M.LinearLR(o, 0.1, 1.0, 40)),
    ("ExponentialLR", lambda M, o: M.ExponentialLR(o, 0.98)),
    ("PolynomialLR", lambda M, o: M.PolynomialLR(o, 100, 2.0)),
    ("CosineAnnealingLR", lambda M, o: M.CosineAnnealingLR(o, 50, 0.001)),
    ("CAWR-1", lambda M, o: M.CosineAnnealingWarmRestarts(o, 10)),
    ("CAWR-2", lambda M, o: M.CosineAnnealingWarmRestarts(o, 10, 2, 0.001)),
]


@pytest.mark.parametrize("name,make", EPOCH_ARG_CASES, ids=[c[0] for c in EPOCH_ARG_CASES])
def test_step_with_epoch_matches_torch(name, make):
    """The deprecated step(epoch): closed forms, and CAWR's documented fractional epochs."""
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler as T

    epochs = [3, 0, 17, 17, 250, 9, 45, 101, 100, 63]
    if name.startswith("CAWR"):
        epochs += [e + i / 7 for e in range(0, 80, 3) for i in range(7)]
    topt = _torch_optimizer(torch, "sgd", [0.1, 0.02])
    fake = FakeOptimizer(_fake_groups("sgd", [0.1, 0.02]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tsched, sched = make(T, topt), make(S, fake)
        for epoch in epochs:
            tsched.step(epoch)
            sched.step(epoch)
            np.testing.assert_allclose(_row(sched, fake), _row(tsched, topt), rtol=1e-12, atol=0)


def test_lambda_state_saves_callable_objects_only():
    opt = FakeOptimizer([{"lr": 0.1}, {"lr": 0.2}])
    sched = S.LambdaLR(opt, [lambda e: 1.0, WarmupThenDecay(5, 0.9)])
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None, {"warmup": 5, "rate": 0.9}]
    other = S.LambdaLR(FakeOptimizer([{"lr": 0.1}, {"lr": 0.2}]),
                       [lambda e: 1.0, WarmupThenDecay(50, 0.5)])
    other.load_state_dict(state)
    assert vars(other.lr_lambdas[1]) == {"warmup": 5, "rate": 0.9}


def _plateau_metrics():
    rng = random.Random(1234)
    metrics = [1.0 / (1 + i) for i in range(40)]
    metrics += [0.025 * (1 + 0.05 * rng.random()) for _ in range(160)]
    metrics += [0.025 - 1e-4 * i for i in range(50)]  # slow, sub-threshold progress
    metrics += [0.02 + 0.01 * math.sin(i / 3.0) for i in range(150)]
    return metrics


PLATEAU_CASES = [
    dict(),
    dict(mode="min", factor=0.5, patience=3, threshold=1e-3, cooldown=2),
    dict(mode="min", factor=0.5, patience=0, threshold=1e-4, threshold_mode="abs",
         min_lr=[0.001, 0.0005]),
    dict(mode="max", factor=0.3, patience=5, cooldown=5, min_lr=1e-3, eps=1e-6),
    dict(mode="max", factor=0.7, patience=2, threshold=0.01, threshold_mode="abs"),
]


@pytest.mark.parametrize("kwargs", PLATEAU_CASES, ids=[str(k) for k in PLATEAU_CASES])
def test_reduce_lr_on_plateau_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler as T

    sign = -1.0 if kwargs.get("mode") == "max" else 1.0
    metrics = [sign * m for m in _plateau_metrics()]
    topt = _torch_optimizer(torch, "sgd", [0.1, 0.05])
    fake = FakeOptimizer(_fake_groups("sgd", [0.1, 0.05]))
    tsched, sched = T.ReduceLROnPlateau(topt, **kwargs), S.ReduceLROnPlateau(fake, **kwargs)
    for i, m in enumerate(metrics):
        tsched.step(m)
        sched.step(m)
        assert [g["lr"] for g in fake.param_groups] == [g["lr"] for g in topt.param_groups], i
        assert sched.get_last_lr() == tsched.get_last_lr()
        assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter, sched.last_epoch) == (
            tsched.best, tsched.num_bad_epochs, tsched.cooldown_counter, tsched.last_epoch)
        if i == 200:  # torch's state dict resumes ours
            resumed_opt = FakeOptimizer([{"lr": g["lr"], "momentum": 0.9}
                                         for g in fake.param_groups])
            resumed = S.ReduceLROnPlateau(resumed_opt, **kwargs)
            resumed.load_state_dict(copy.deepcopy(tsched.state_dict()))
            _same_keys(sched.state_dict(), tsched.state_dict())
    assert min(g["lr"] for g in fake.param_groups) < 0.1 * 0.9  # the script did reduce
    for m in metrics[201:]:
        resumed.step(m)
    assert resumed.get_last_lr() == sched.get_last_lr()
    assert resumed.state_dict() == sched.state_dict()


# ---------------------------------------------------------------- Keras-style decays

def test_inverse_time_decay():
    f = S.InverseTimeDecay(0.1, decay_steps=1.0, decay_rate=0.5)  # the Keras doc example
    for t, want in [(0, 0.1), (1, 0.1 / 1.5), (2, 0.05), (3, 0.04), (18, 0.01)]:
        assert f(t) == pytest.approx(want, rel=1e-12)
    g = S.InverseTimeDecay(2.0, decay_steps=10, decay_rate=3.0, staircase=True)
    for t in range(0, 45, 7):
        assert g(t) == pytest.approx(2.0 / (1.0 + 3.0 * (t // 10)), rel=1e-12)
    assert S.InverseTimeDecay(2.0, 10, 3.0)(15) == pytest.approx(2.0 / 5.5, rel=1e-12)


def test_exponential_decay():
    f = S.ExponentialDecay(0.1, decay_steps=100000, decay_rate=0.96, staircase=True)
    assert f(0) == f(99999) == pytest.approx(0.1, rel=1e-12)
    assert f(100000) == pytest.approx(0.096, rel=1e-12)
    assert f(250000) == pytest.approx(0.1 * 0.96 * 0.96, rel=1e-12)
    g = S.ExponentialDecay(1e-2, decay_steps=10000, decay_rate=0.9)
    assert g(5000) == pytest.approx(1e-2 * math.sqrt(0.9), rel=1e-12)
    assert g(20000) == pytest.approx(1e-2 * 0.81, rel=1e-12)
    assert g(2500) == pytest.approx(1e-2 * 0.9 ** 0.25, rel=1e-12)


def test_piecewise_constant_decay():
    f = S.PiecewiseConstantDecay([100000, 110000], [1.0, 0.5, 0.1])  # the Keras doc example
    for t, want in [(0, 1.0), (100000, 1.0), (100001, 0.5), (110000, 0.5), (110001, 0.1),
                    (10 ** 9, 0.1)]:
        assert f(t) == want
    assert S.PiecewiseConstantDecay([], [0.3])(12) == 0.3


def test_piecewise_constant_decay_negative_step_gives_the_first_value():
    """Keras compares any step with the boundaries: step <= boundaries[0] is values[0]."""
    f = S.PiecewiseConstantDecay([0, 10], [1.0, 0.5, 0.1])
    assert f(-1) == f(-1e9) == f(0) == 1.0 and f(1) == 0.5
    g = S.PiecewiseConstantDecay([-5, 0], [0.3, 0.2, 0.1])
    assert [g(t) for t in (-7, -5, -4.5, 0, 0.5)] == [0.3, 0.3, 0.2, 0.2, 0.1]
    with pytest.raises(ValueError, match="step"):
        f(float("nan"))


def _polynomial(init, decay_steps, end, power, cycle, steps):
    """Keras's PolynomialDecay formula (its docstring), vectorised in NumPy."""
    t = np.asarray(steps, dtype=np.float64)
    if cycle:
        d = decay_steps * np.where(t == 0, 1.0, np.ceil(t / decay_steps))
    else:
        d, t = np.full_like(t, decay_steps), np.minimum(t, decay_steps)
    return (init - end) * (1 - t / d) ** power + end


@pytest.mark.parametrize("power,cycle", [(1.0, False), (0.5, False), (2.0, True), (0.5, True)])
def test_polynomial_decay(power, cycle):
    steps = [0, 1, 7, 49, 50, 51, 99, 100, 101, 149, 150, 151, 1000]
    f = S.PolynomialDecay(0.1, 50, end_learning_rate=0.01, power=power, cycle=cycle)
    np.testing.assert_allclose([f(t) for t in steps], _polynomial(0.1, 50, 0.01, power, cycle, steps),
                               rtol=1e-13)
    # anchors read off the formula: the start, the end of the first decay, and after it
    assert f(0) == pytest.approx(0.1) and f(50) == pytest.approx(0.01)
    if cycle:      # restarts: at 51 the decay spans 100 steps, at 101 it spans 150
        assert f(51) == pytest.approx(0.09 * (1 - 51 / 100) ** power + 0.01)
        assert f(101) == pytest.approx(0.09 * (1 - 101 / 150) ** power + 0.01)
    else:
        assert f(51) == f(1000) == pytest.approx(0.01)
    assert S.PolynomialDecay(1.0, 10)(5) == pytest.approx(0.5 * (1 - 0.0001) + 0.0001)   # Keras defaults


def _cosine_restarts(init, first, t_mul, m_mul, alpha, steps):
    """Keras 3's CosineDecayRestarts.__call__, step by step in NumPy."""
    f = np.asarray(steps, dtype=np.float64) / first
    if t_mul == 1.0:
        i = np.floor(f)
        c = f - i
    else:
        i = np.floor(np.log(1.0 - f * (1.0 - t_mul)) / np.log(t_mul))
        c = (f - (1.0 - t_mul ** i) / (1.0 - t_mul)) / t_mul ** i
    return init * ((1 - alpha) * 0.5 * m_mul ** i * (1 + np.cos(np.pi * c)) + alpha)


@pytest.mark.parametrize("t_mul,m_mul,alpha", [(2.0, 1.0, 0.0), (2.0, 0.5, 0.1), (1.0, 0.8, 0.0),
                                               (1.5, 0.9, 0.05)])
def test_cosine_decay_restarts(t_mul, m_mul, alpha):
    steps = [0, 1, 5, 9, 10, 11, 17, 29, 30, 31, 55, 69, 70, 71, 300]
    f = S.CosineDecayRestarts(0.2, 10, t_mul=t_mul, m_mul=m_mul, alpha=alpha)
    np.testing.assert_allclose([f(t) for t in steps],
                               _cosine_restarts(0.2, 10, t_mul, m_mul, alpha, steps), rtol=1e-12)
    # anchors: the start, mid first period, and each restart at m_mul^i times the lr
    assert f(0) == pytest.approx(0.2)
    assert f(5) == pytest.approx(0.2 * ((1 - alpha) * 0.5 + alpha))
    restarts = [10, 30, 70] if t_mul == 2.0 else [10, 20, 30] if t_mul == 1.0 else []
    for k, start in enumerate(restarts, start=1):
        assert f(start) == pytest.approx(0.2 * ((1 - alpha) * m_mul ** k + alpha))


def test_cosine_decay_restarts_shrinking_periods_end_in_nan_as_keras():
    f = S.CosineDecayRestarts(1.0, 10, t_mul=0.5)           # periods 10, 5, 2.5, ... (sum 20)
    assert f(10) == pytest.approx(1.0) and f(15) == pytest.approx(1.0)
    assert math.isnan(f(20)) and math.isnan(f(25))


def test_keras_schedules_drive_a_keras_optimizer():
    from fastopt import keras as fk
    w = np.zeros(1)
    opt = fk.SGD(learning_rate=S.PolynomialDecay(1.0, 4, end_learning_rate=0.0, power=2.0))
    for _ in range(5):
        opt.apply([np.ones(1)], [w])
    # lrs at iterations 0..4: (1 - t/4)^2 -> 1, 0.5625, 0.25, 0.0625, 0
    np.testing.assert_allclose(w, [-(1 + 0.5625 + 0.25 + 0.0625)], rtol=1e-15)


def test_cosine_decay():
    f = S.CosineDecay(0.1, decay_steps=1000)
    for t, want in [(0, 0.1), (250, 0.1 * (1 + math.sqrt(0.5)) / 2), (500, 0.05), (1000, 0.0),
                    (5000, 0.0)]:
        assert f(t) == pytest.approx(want, rel=1e-12, abs=1e-15)
    g = S.CosineDecay(0.1, decay_steps=1000, alpha=0.1)
    assert g(500) == pytest.approx(0.1 * (0.9 * 0.5 + 0.1), rel=1e-12)
    assert g(1000) == g(3000) == pytest.approx(0.01, rel=1e-12)
    # Keras doc example with warmup: 0 -> 0.1 over 1000 steps, then cosine over 1000
    w = S.CosineDecay(0.0, 1000, warmup_target=0.1, warmup_steps=1000)
    for t, want in [(0, 0.0), (250, 0.025), (500, 0.05), (1000, 0.1), (1500, 0.05),
                    (2000, 0.0), (9000, 0.0)]:
        assert w(t) == pytest.approx(want, rel=1e-12, abs=1e-15)
    v = S.CosineDecay(0.01, 100, alpha=0.2, warmup_target=0.05, warmup_steps=10)
    assert v(5) == pytest.approx(0.01 + 0.04 * 0.5, rel=1e-12)
    assert v(60) == pytest.approx(0.05 * (0.8 * 0.5 + 0.2), rel=1e-12)


@pytest.mark.parametrize("schedule", [
    S.InverseTimeDecay(0.1, 7, 0.5, staircase=True),
    S.ExponentialDecay(0.1, 7, 0.5),
    S.PiecewiseConstantDecay([10, 20], [0.3, 0.2, 0.1]),
    S.CosineDecay(0.1, 100, alpha=0.05, warmup_target=0.2, warmup_steps=10),
    S.PolynomialDecay(0.1, 30, end_learning_rate=0.02, power=0.5, cycle=True),
    S.CosineDecayRestarts(0.1, 20, t_mul=1.5, m_mul=0.7, alpha=0.01),
], ids=lambda s: type(s).__name__)
def test_keras_config_round_trip(schedule):
    config = schedule.get_config()
    clone = type(schedule).from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone, S.LearningRateSchedule)
    assert [clone(t) for t in range(0, 130, 3)] == [schedule(t) for t in range(0, 130, 3)]
    assert isinstance(schedule(np.int64(5)), float)


# ---------------------------------------------------------------- bad input

def _opt(n=1, **extra):
    return FakeOptimizer([{"lr": 0.1, **extra} for _ in range(n)])


def _sequential(milestones):
    opt = _opt()
    return S.SequentialLR(opt, [S.StepLR(opt, 3)], milestones)


BAD = [
    ("step_size", lambda: S.StepLR(_opt(), 0)),
    ("step_size", lambda: S.StepLR(_opt(), 2.5)),
    ("gamma", lambda: S.StepLR(_opt(), 3, gamma=-0.1)),
    ("last_epoch", lambda: S.StepLR(_opt(), 3, last_epoch=-2)),
    ("last_epoch", lambda: S.StepLR(_opt(), 3, last_epoch=5)),  # no initial_lr to resume from
    ("milestones", lambda: S.MultiStepLR(_opt(), [3, -1])),
    ("milestones", lambda: S.MultiStepLR(_opt(), 30)),
    ("factor", lambda: S.ConstantLR(_opt(), factor=0.0)),
    ("total_iters", lambda: S.ConstantLR(_opt(), total_iters=0)),
    ("start_factor", lambda: S.LinearLR(_opt(), start_factor=0.0)),
    ("end_factor", lambda: S.LinearLR(_opt(), end_factor=1.5)),
    ("gamma", lambda: S.ExponentialLR(_opt(), gamma=float("nan"))),
    ("power", lambda: S.PolynomialLR(_opt(), power=-1.0)),
    ("T_max", lambda: S.CosineAnnealingLR(_opt(), T_max=0)),
    ("T_0", lambda: S.CosineAnnealingWarmRestarts(_opt(), T_0=0)),
    ("T_mult", lambda: S.CosineAnnealingWarmRestarts(_opt(), 10, T_mult=1.5)),
    ("lr_lambda", lambda: S.LambdaLR(_opt(2), [lambda e: 1.0])),
    ("base_lr", lambda: S.CyclicLR(_opt(2, momentum=0.9), [0.1], 1.0)),
    ("mode", lambda: S.CyclicLR(_opt(momentum=0.9), 0.01, 0.1, mode="sawtooth")),
    ("step_size_up", lambda: S.CyclicLR(_opt(momentum=0.9), 0.01, 0.1, step_size_up=0)),
    ("scale_mode", lambda: S.CyclicLR(_opt(momentum=0.9), 0.01, 0.1, scale_mode="epoch")),
    ("cycle_momentum", lambda: S.CyclicLR(_opt(), 0.01, 0.1)),
    ("total_steps", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1)),
    ("total_steps", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, total_steps=0)),
    ("steps_per_epoch", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, epochs=3,
                                             steps_per_epoch=-1)),
    ("pct_start", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, 100, pct_start=1.5)),
    ("pct_start", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, 10, pct_start=0.1)),
    ("anneal_strategy", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, 100,
                                             anneal_strategy="quad")),
    ("div_factor", lambda: S.OneCycleLR(_opt(momentum=0.9), 0.1, 100, div_factor=0)),
    ("max_lr", lambda: S.OneCycleLR(_opt(2, momentum=0.9), [0.1, 0.2, 0.3], 100)),
    ("milestones", lambda: _sequential([5])),
    ("schedulers", lambda: S.SequentialLR(_opt(), [], [])),
    ("schedulers[0]", lambda: S.ChainedScheduler([S.ReduceLROnPlateau(_opt())])),
    ("factor", lambda: S.ReduceLROnPlateau(_opt(), factor=1.0)),
    ("mode", lambda: S.ReduceLROnPlateau(_opt(), mode="avg")),
    ("threshold_mode", lambda: S.ReduceLROnPlateau(_opt(), threshold_mode="pct")),
    ("patience", lambda: S.ReduceLROnPlateau(_opt(), patience=-1)),
    ("cooldown", lambda: S.ReduceLROnPlateau(_opt(), cooldown=1.5)),
    ("min_lr", lambda: S.ReduceLROnPlateau(_opt(2), min_lr=[0.0])),
    ("decay_steps", lambda: S.ExponentialDecay(0.1, 0, 0.9)),
    ("decay_steps", lambda: S.InverseTimeDecay(0.1, -5, 0.9)),
    ("decay_rate", lambda: S.ExponentialDecay(0.1, 10, 0.0)),
    ("values", lambda: S.PiecewiseConstantDecay([10, 20], [0.1, 0.01])),
    ("boundaries", lambda: S.PiecewiseConstantDecay([20, 10], [0.1, 0.01, 0.001])),
    ("alpha", lambda: S.CosineDecay(0.1, 100, alpha=2.0)),
    ("warmup_steps", lambda: S.CosineDecay(0.1, 100, warmup_target=0.2, warmup_steps=-1)),
    ("step", lambda: S.ExponentialDecay(0.1, 10, 0.9)(-1)),
    ("decay_steps", lambda: S.PolynomialDecay(0.1, 0)),
    ("power", lambda: S.PolynomialDecay(0.1, 10, power=-1.0)),
    ("end_learning_rate", lambda: S.PolynomialDecay(0.1, 10, end_learning_rate=float("nan"))),
    ("first_decay_steps", lambda: S.CosineDecayRestarts(0.1, 0)),
    ("t_mul", lambda: S.CosineDecayRestarts(0.1, 10, t_mul=0.0)),
    ("m_mul", lambda: S.CosineDecayRestarts(0.1, 10, m_mul=-0.5)),
    ("alpha", lambda: S.CosineDecayRestarts(0.1, 10, alpha=1.5)),
]


@pytest.mark.parametrize("param,build", BAD, ids=[f"{i}-{p}" for i, (p, _) in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_the_parameter(param, build):
    with pytest.raises(ValueError, match=param.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_bad_optimizer_and_overrun():
    with pytest.raises(TypeError, match="param_groups"):
        S.StepLR(object(), 3)
    with pytest.raises(ValueError, match="lr"):
        S.StepLR(FakeOptimizer([{"lr": S.ExponentialDecay(0.1, 10, 0.9)}]), 3)
    with pytest.raises(TypeError, match="lr_lambda"):
        S.LambdaLR(_opt(), 0.5)
    sched = S.OneCycleLR(_opt(momentum=0.9), 0.1, total_steps=20)
    for _ in range(20):
        sched.step()
    with pytest.raises(ValueError, match="total_steps"):
        sched.step()


def test_message_format():
    with pytest.raises(ValueError) as info:
        S.StepLR(_opt(), 0)
    assert str(info.value) == "StepLR: step_size must be a positive integer, got 0"
