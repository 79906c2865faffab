"""fastopt.torch for the optimizers beyond one fused step: schedule-free (``train()`` /
``eval()``, the group state the package keeps in its groups), SparseAdam and the other
sparse-capable optimizers with torch's sparse COO gradients (``nn.Embedding(sparse=True)``),
and the torch-side Lookahead. Oracles: the schedulefree package, torch.optim.SparseAdam /
Adagrad, pytorch_optimizer.Lookahead (optional test dependencies: skipped, saying so).
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fastopt.torch is not tested")
import fastopt.torch as ft  # noqa: E402

nn = torch.nn


def _pair(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 3))
    return m, copy.deepcopy(m)


def _batch(s):
    g = torch.Generator().manual_seed(40 + s)
    return torch.randn(12, 7, generator=g), torch.randn(12, 3, generator=g)


def _loss(m, s):
    x, y = _batch(s)
    return nn.functional.mse_loss(m(x), y)


def _max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


# -- schedule-free ------------------------------------------------------------------------------
SF = [("AdamWScheduleFree", dict(lr=5e-3, warmup_steps=3, weight_decay=0.01)),
      ("SGDScheduleFree", dict(lr=0.05, momentum=0.9, warmup_steps=2, weight_decay=1e-3))]


@pytest.mark.parametrize("name,kw", SF, ids=[n for n, _ in SF])
def test_schedule_free_train_eval_and_state_dicts_match_the_package(name, kw):
    schedulefree = pytest.importorskip("schedulefree", reason="schedulefree not installed")
    m1, m2 = _pair()
    o1 = getattr(schedulefree, name)(m1.parameters(), **kw)
    o2 = getattr(ft, name)(m2.parameters(), **kw)
    o1.train()
    o2.train()
    for s in range(25):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            _loss(m, s).backward()
            o.step()
        if s in (7, 18):
            o1.eval()
            o2.eval()
            assert _max_diff(m1, m2) <= 1e-6                  # x, the eval weights
            with pytest.raises(RuntimeError, match="eval"):
                o2.step()
            o1.train()
            o2.train()
    assert _max_diff(m1, m2) <= 1e-6
    for key in ("k", "weight_sum", "lr_max", "train_mode"):
        assert o2.param_groups[0][key] == pytest.approx(o1.param_groups[0][key], rel=1e-12), key
    # state dicts both ways: training continues as in the package
    o3 = getattr(schedulefree, name)(m1.parameters(), **kw)
    o3.load_state_dict(o2.state_dict())
    assert o3.param_groups[0]["k"] == 25
    o4 = getattr(ft, name)(m2.parameters(), **kw)
    o4.load_state_dict(o1.state_dict())
    for s in range(25, 30):
        for m, o in ((m1, o3), (m2, o4)):
            o.zero_grad()
            _loss(m, s).backward()
            o.step()
    assert _max_diff(m1, m2) <= 1e-6


# -- sparse gradients ---------------------------------------------------------------------------
def _embedding_pair():
    torch.manual_seed(1)
    e = nn.Embedding(53, 5, sparse=True)
    return e, copy.deepcopy(e)


def _ids(s):
    # repeated and unsorted ids: torch coalesces them (sums duplicates)
    return torch.randint(0, 53, (17,), generator=torch.Generator().manual_seed(s))


@pytest.mark.parametrize("name,kw", [("SparseAdam", dict(lr=1e-2, betas=(0.8, 0.99))),
                                     ("Adagrad", dict(lr=0.1, lr_decay=0.01))])
def test_sparse_coo_gradients_match_torch(name, kw):
    e1, e2 = _embedding_pair()
    o1 = getattr(torch.optim, name)(e1.parameters(), **kw)
    o2 = getattr(ft, name)(e2.parameters(), **kw)
    for s in range(40):
        for e, o in ((e1, o1), (e2, o2)):
            o.zero_grad()
            e(_ids(s)).square().sum().backward()
            o.step()
    torch.testing.assert_close(e2.weight, e1.weight, rtol=1e-6, atol=1e-7)
    o1.load_state_dict(o2.state_dict())
    o2.load_state_dict(o1.state_dict())
    for s in range(40, 45):
        for e, o in ((e1, o1), (e2, o2)):
            o.zero_grad()
            e(_ids(s)).square().sum().backward()
            o.step()
    torch.testing.assert_close(e2.weight, e1.weight, rtol=1e-6, atol=1e-7)


def test_sparse_adam_refuses_dense_gradients():
    m, _ = _pair()
    opt = ft.SparseAdam(m.parameters(), lr=1e-3)
    _loss(m, 0).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


# -- Lookahead --------------------------------------------------------------------------------------
LA = [("SGD", dict(lr=0.01, momentum=0.9), "pullback"), ("SGD", dict(lr=0.01, momentum=0.9), "reset"),
      ("AdamW", dict(lr=3e-3, weight_decay=0.1), "none")]


@pytest.mark.parametrize("name,kw,pullback", LA, ids=[f"{n}-{p}" for n, _, p in LA])
def test_lookahead_matches_pytorch_optimizer(name, kw, pullback):
    po = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer not installed")
    m1, m2 = _pair()
    o1 = po.Lookahead(getattr(torch.optim, name)(m1.parameters(), **kw), k=3, alpha=0.35,
                      pullback_momentum=pullback)
    o2 = ft.Lookahead(getattr(ft, name)(m2.parameters(), **kw), k=3, alpha=0.35, pullback_momentum=pullback)
    for s in range(14):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            _loss(m, s).backward()
            o.step()
    assert _max_diff(m1, m2) <= 1e-6
    sd = o2.state_dict()
    assert sd["base_optimizer"]["param_groups"][0]["counter"] == 14 % 3
    assert set(sd["lookahead_state"]) == {(0, i) for i in range(4)}
    o1.load_state_dict(sd)
    o2.load_state_dict(o1.state_dict())
    for s in range(14, 20):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            _loss(m, s).backward()
            o.step()
    assert _max_diff(m1, m2) <= 1e-6


def test_lookahead_refuses_a_torch_optimizer_and_a_bad_state_dict():
    m, _ = _pair()
    with pytest.raises(TypeError, match="fastopt.torch optimizer"):
        ft.Lookahead(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="alpha"):
        ft.Lookahead(ft.SGD(m.parameters(), lr=0.1), alpha=1.5)
    opt = ft.Lookahead(ft.AdamW(m.parameters(), lr=1e-3), k=2)
    _loss(m, 0).backward()
    opt.step()
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["lookahead_state"].pop((0, 1))
    with pytest.raises(ValueError, match="slow weights"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i, st in good["base_optimizer"]["state"].items():
        assert torch.equal(after["base_optimizer"]["state"][i]["exp_avg"], st["exp_avg"])
