"""fastopt.torch under ``torch.compile``: ``step()`` (and ``zero_grad``, ``state_dict``,
``load_state_dict``) are opaque to Dynamo, a graph break as a custom kernel should be, so
``torch.compile(opt.step)`` and a compiled forward + backward + step run the fused kernel
eagerly and equal the eager run bit for bit; an lr a scheduler changes at every step is
read on the host inside the step and causes no recompile.

Compiled with Dynamo's "eager" and "aot_eager" backends (graph capture and AOT autograd,
no C++ compiler: seconds, not minutes, on the CI machine), and with a counting backend
that records every graph Dynamo hands over.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fastopt.torch is not tested")
import fastopt.torch as ft  # noqa: E402

STEPS = 20


class Counting:
    """A Dynamo backend that counts the graphs compiled (a recompile is one more)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(9, 12, generator=g), torch.randn(9, 3, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _eager_run(cls, kwargs, flat, schedule=False):
    model = _model()
    opt = cls(model.parameters(), flat=flat, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if schedule else None
    for s in range(STEPS):
        x, y = _data(s)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return _params(model), opt.state_dict()


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CLASSES = [(ft.AdamW, dict(lr=1e-2, weight_decay=0.1)), (ft.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
           (ft.Adagrad, dict(lr=0.1))]


@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
@pytest.mark.parametrize("cls,kwargs", CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_compiled_step_equals_eager(cls, kwargs, flat):
    """``torch.compile(opt.step)``: 20 steps equal to the eager optimizer's, bit for bit."""
    want, want_sd = _eager_run(cls, kwargs, flat)
    model = _model()
    opt = cls(model.parameters(), flat=flat, **kwargs)
    step = torch.compile(opt.step, backend="eager")
    for s in range(STEPS):
        x, y = _data(s)
        opt.zero_grad()
        _loss(model, x, y).backward()
        step()
    _assert_same(_params(model), want)
    got_sd = opt.state_dict()["state"][0]
    assert got_sd.keys() == want_sd["state"][0].keys()
    for key, value in want_sd["state"][0].items():
        assert torch.equal(torch.as_tensor(got_sd[key]), torch.as_tensor(value)), key


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
def test_compiled_train_step_equals_eager_without_recompiles(flat, backend):
    """A compiled forward + backward + ``opt.step()`` + ``opt.zero_grad()``, with a
    scheduler changing lr at every step: the params after 20 steps equal the eager run's
    (the same kernel runs in both; with "aot_eager" the compiled backward may round
    differently, so there to float32 rounding), and Dynamo compiles no graph after the
    first step."""
    want, _ = _eager_run(ft.AdamW, dict(lr=1e-2, weight_decay=0.1), flat, schedule=True)
    model = _model()
    opt = ft.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, flat=flat)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    counting = Counting()
    compiled = torch.compile(backend=counting) if backend == "eager" else torch.compile(backend=backend)

    @compiled
    def train_step(x, y):
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    opt.zero_grad()
    after_first = None
    for s in range(STEPS):
        train_step(*_data(s))
        sched.step()
        if s == 0:
            after_first = counting.graphs
    got = _params(model)
    if backend == "eager":
        _assert_same(got, want)
        assert after_first > 0
        assert counting.graphs == after_first, \
            f"{counting.graphs - after_first} graph(s) compiled after the first step (recompiles)"
    else:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + STEPS))


def test_no_recompile_when_lr_changes():
    """``torch.compile(opt.step)`` with Dynamo's recompilation turned into an error: lr
    changed before every call (a float, then a tensor lr) compiles nothing new."""
    model = _model()
    opt = ft.Adam(model.parameters(), lr=1e-3)
    counting = Counting()
    step = torch.compile(opt.step, backend=counting)
    x, y = _data(0)
    for s in range(6):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.param_groups[0]["lr"] = 1e-3 * (s + 1)
        with torch._dynamo.config.patch(error_on_recompile=s > 0):
            step()
    assert counting.graphs <= 1
    assert int(opt.state_dict()["state"][0]["step"]) == 6


def test_state_dict_round_trip_inside_compiled_function():
    """state_dict() and load_state_dict() called from compiled code run eagerly too."""
    model = _model()
    opt = ft.AdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        opt.zero_grad()
        _loss(model, *_data(s)).backward()
        opt.step()

    @torch.compile(backend="eager")
    def save_and_load():
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        return sd

    sd = save_and_load()
    assert int(sd["state"][0]["step"]) == 3
    torch.testing.assert_close(sd["state"][0]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"])
