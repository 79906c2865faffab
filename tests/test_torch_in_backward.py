"""fastopt.torch's optimizer-in-backward (``in_backward=True``): each param is stepped by
a post-accumulate-grad hook as soon as backward has its gradient, and the gradient is
freed right after (torchtune's optimizer-in-backward).

Oracle: the same fastopt.torch optimizer stepped after backward (itself tested against
torch.optim elsewhere) and torch.optim directly: equal params after every step.
Exclusions, refused at construction: ``flat=True`` (one buffer for every gradient) and
``max_grad_norm=`` (global-norm clipping needs every gradient before any step).
Gradient accumulation is excluded by construction: every backward steps.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fastopt.torch is not tested")
import fastopt.torch as ft  # noqa: E402

nn = torch.nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 24)
        self.b = nn.Linear(24, 24)
        self.c = nn.Linear(24, 3)
        self.unused = nn.Linear(3, 3)        # reached only on odd steps

    def forward(self, x, use_all=False):
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return self.unused(y) if use_all else y


def _net():
    torch.manual_seed(0)
    return Net()


def _batch(s):
    g = torch.Generator().manual_seed(77 + s)
    return torch.randn(8, 10, generator=g), torch.randn(8, 3, generator=g)


def _groups(model):
    return [{"params": list(model.a.parameters()) + list(model.b.parameters())},
            {"params": list(model.c.parameters()) + list(model.unused.parameters()), "lr": 3e-3}]


CASES = [(ft.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
         (ft.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
         (ft.Adagrad, torch.optim.Adagrad, dict(lr=0.1))]


@pytest.mark.parametrize("fo_cls,torch_cls,kw", CASES, ids=[c[0].__name__ for c in CASES])
def test_in_backward_equals_stepping_after_backward(fo_cls, torch_cls, kw):
    """12 steps with two groups, a scheduler changing lr every step and a layer the loss
    reaches on odd steps only: params equal to the after-backward fastopt run (bit for bit)
    and to torch.optim's (float32 rounding); gradients are freed by backward itself."""
    models = [_net(), _net(), _net()]
    opts = [fo_cls(_groups(models[0]), in_backward=True, **kw), fo_cls(_groups(models[1]), **kw),
            torch_cls(_groups(models[2]), **kw)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s) for o in opts]
    for s in range(12):
        x, y = _batch(s)
        for k, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            nn.functional.mse_loss(m(x, use_all=s % 2 == 1), y).backward()
            if k == 0:
                assert all(p.grad is None for p in m.parameters()), "gradients freed in backward"
            o.step()
        for sch in scheds:
            sch.step()
        for a, b, c in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # the unused layer was stepped on odd steps only
    p0 = models[0].unused.weight
    if "step" in opts[0].state[p0]:
        assert int(opts[0].state[p0]["step"]) == 6 == int(opts[1].state[models[1].unused.weight]["step"])


def test_step_is_a_no_op_and_state_dict_is_shared():
    """With in_backward=True, opt.step() after backward steps nothing more (called twice
    here); the state dict loads into an optimizer that steps after backward, and training
    continues identically to an uninterrupted after-backward run."""
    m1, m2 = _net(), _net()
    o1 = ft.AdamW(m1.parameters(), lr=1e-2, in_backward=True)
    o2 = ft.AdamW(m2.parameters(), lr=1e-2)

    def train(m, o, steps, calls=1):
        for s in steps:
            x, y = _batch(s)
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            for _ in range(calls):
                o.step()

    train(m1, o1, range(3), calls=2)
    train(m2, o2, range(3))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    sd = o1.state_dict()
    assert int(sd["state"][0]["step"]) == 3
    o3 = ft.AdamW(m1.parameters(), lr=1e-2)
    o3.load_state_dict(sd)
    o1.remove_backward_hooks()
    train(m1, o3, range(3, 6))
    train(m2, o2, range(3, 6))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [(dict(flat=True), "flat=True"), (dict(max_grad_norm=1.0), "max_grad_norm"),
                                      (dict(in_backward="yes"), "in_backward must be a bool")])
def test_exclusions_are_refused_at_construction(kw, match):
    model = _net()
    options = {"in_backward": True, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        ft.AdamW(model.parameters(), lr=1e-3, **options)
    # no hook was left behind: a backward leaves the gradients in place
    nn.functional.mse_loss(model(*_batch(0)[:1]), _batch(0)[1]).backward()
    assert all(p.grad is not None for p in model.a.parameters())
