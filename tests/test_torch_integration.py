"""fastopt.torch inside real torch training loops: parity with torch.optim, zero copies,
state dicts both ways, LR schedulers, zero_grad, params without grads, and flat=True's
buffers and rule checks."""
from __future__ import annotations

import copy
import inspect
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
import fastopt.torch as ft  # noqa: E402

from cases import ALL_CASES  # noqa: E402

N_LAYERS, WIDTH, BATCH, STEPS = 50, 16, 8, 300

# Every optimizer of the database (cases.ALL_CASES, from the specs) with its row of most
# terms on (the spec's ``full`` example). A row with maximize=True trains on the negated
# loss, so every run descends the same landscape.
BY_CLASS = {c.spec.name: c for c in ALL_CASES}
WITH_TORCH = [pytest.param(c, id=c.spec.name) for c in ALL_CASES if c.in_torch]
WITHOUT_TORCH = [pytest.param(c, id=c.spec.name) for c in ALL_CASES if not c.in_torch]


class Bank(nn.Module):
    """A bank of N_LAYERS Linear(WIDTH, WIDTH) experts, averaged: y = mean_k tanh(W_k x + b_k).

    2 * N_LAYERS parameter tensors. The experts run as one batched matmul over the stacked
    weights (backward splits the gradient back into each tensor's own .grad), so a
    training step costs little beyond the optimizer step under test, and the experts sit
    side by side rather than in a deep chain, so float32 rounding does not grow
    chaotically over hundreds of steps.
    """

    def __init__(self, n_layers=N_LAYERS, width=WIDTH):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))

    def forward(self, x):
        w = torch.stack([m.weight for m in self.layers])          # (k, out, in)
        b = torch.stack([m.bias for m in self.layers])            # (k, out)
        h = torch.tanh(torch.einsum("ni,koi->nko", x, w) + b)
        return h.mean(1)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Bank(**kw)


def batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g))
            for _ in range(n)]


DATA = batches()


def train(model, opt, steps, sign=1.0, set_to_none=True, start=0, scheduler=None):
    for s in range(start, start + steps):
        x, y = DATA[s % len(DATA)]
        opt.zero_grad(set_to_none=set_to_none)
        loss = sign * nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def rel_errors(m1, m2):
    """Per-tensor ||a - b|| / ||a||."""
    with torch.no_grad():
        return [float((a - b).norm() / a.norm().clamp_min(1e-30))
                for a, b in zip(m1.parameters(), m2.parameters())]


def assert_same_params(m1, m2, tol=1e-5):
    errs = rel_errors(m1, m2)
    worst = int(np.argmax(errs))
    assert errs[worst] <= tol, f"tensor {worst}: relative error {errs[worst]:.3g} > {tol}"


def test_model_has_enough_tensors():
    assert len(list(make_model().parameters())) >= 100


@pytest.mark.parametrize("case", WITH_TORCH)
def test_300_steps_match_torch_optim(case):
    hp = case.hp()
    name = case.spec.name
    sign = -1.0 if hp.get("maximize") else 1.0
    m_torch = make_model()
    train(m_torch, case.torch_cls()(m_torch.parameters(), foreach=True, **hp), STEPS, sign)
    m_fast = make_model()
    train(m_fast, ft.OPTIMIZERS[name](m_fast.parameters(), **hp), STEPS, sign)
    m_flat = make_model()
    opt_flat = ft.OPTIMIZERS[name](m_flat.parameters(), flat=True, **hp)
    train(m_flat, opt_flat, STEPS, sign)
    assert rel_errors(make_model(), m_torch)[0] > 1e-3          # training moved the params
    assert_same_params(m_torch, m_fast)
    assert_same_params(m_torch, m_flat)


@pytest.mark.parametrize("case", WITHOUT_TORCH)
def test_300_steps_match_the_numpy_reference(case):
    """No torch.optim counterpart: hold the kernels to fastopt's NumPy reference."""
    hp = case.hp()
    name = case.spec.name
    sign = -1.0 if hp.get("maximize") else 1.0
    m_ref = make_model()
    train(m_ref, ft.OPTIMIZERS[name](m_ref.parameters(), backend="numpy", **hp), STEPS, sign)
    m_fast = make_model()
    train(m_fast, ft.OPTIMIZERS[name](m_fast.parameters(), **hp), STEPS, sign)
    m_flat = make_model()
    train(m_flat, ft.OPTIMIZERS[name](m_flat.parameters(), flat=True, **hp), STEPS, sign)
    assert rel_errors(make_model(), m_ref)[0] > 1e-4
    assert_same_params(m_ref, m_fast)
    assert_same_params(m_ref, m_flat)


def test_every_fastopt_optimizer_has_a_torch_class():
    """One fastopt.torch class per spec, then one per exported optimizer class of its own
    (Adafactor, Muon): a torch.optim.Optimizer wrapping the fastopt class."""
    import fastopt
    from fastopt.optimizers import CLASSES
    specs = list(CLASSES)
    assert list(ft.OPTIMIZERS)[:len(specs)] == specs
    # SparseAdam (sparse gradients only) is tested in its own files, not in the database
    assert [n for n in specs if n != "SparseAdam"] == list(BY_CLASS)
    assert list(ft.OPTIMIZERS)[len(specs):] == ["Adafactor", "Muon"]
    for name, cls in ft.OPTIMIZERS.items():
        assert issubclass(cls, torch.optim.Optimizer), name
        assert cls._fastopt_class is getattr(fastopt, name), name
    assert "flat" in str(inspect.signature(ft.Adam))


# -- zero copies --------------------------------------------------------------------------------
def test_steps_update_the_tensors_memory_in_place():
    model = make_model(n_layers=2)
    opt = ft.Adam(model.parameters(), lr=0.1)
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    p = next(model.parameters())
    exp_avg = opt.state[p]["exp_avg"]           # a live view of fastopt's state
    seen = exp_avg.clone()
    train(model, opt, 1, start=1)
    assert not torch.equal(seen, exp_avg)
    assert opt.state[p]["exp_avg"].data_ptr() == exp_avg.data_ptr()
    assert float(opt.state[p]["step"]) == 2.0


# -- state dicts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_state_dicts_are_interchangeable_with_torch_optim(direction, flat):
    hp = dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)
    m_ref = make_model(n_layers=4)
    o_ref = torch.optim.Adam(m_ref.parameters(), **hp)
    train(m_ref, o_ref, 20)

    m_a = make_model(n_layers=4)
    m_b = make_model(n_layers=4)
    if direction == "torch->fastopt":
        o_a = torch.optim.Adam(m_a.parameters(), **hp)
        o_b = ft.Adam(m_b.parameters(), flat=flat, **hp)
    else:
        o_a = ft.Adam(m_a.parameters(), flat=flat, **hp)
        o_b = torch.optim.Adam(m_b.parameters(), **hp)
    train(m_a, o_a, 10)
    buf = io.BytesIO()
    torch.save(o_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and float(sd["state"][0]["step"]) == 10
    with torch.no_grad():
        for pa, pb in zip(m_a.parameters(), m_b.parameters()):
            pb.copy_(pa)
    o_b.load_state_dict(sd)
    train(m_b, o_b, 10, start=10)
    assert_same_params(m_ref, m_b)
    sd_b = o_b.state_dict()
    assert sd_b["param_groups"][0]["params"] == list(range(8))
    for k in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
        assert sd_b["param_groups"][0][k] == o_ref.state_dict()["param_groups"][0][k]


def test_load_state_dict_rejects_another_optimizers_dict_and_changes_nothing():
    model = make_model(n_layers=2)
    opt = ft.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    before = opt.state_dict()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, 1)
    with pytest.raises(ValueError, match="not a Adam state dict|not an Adam state dict"):
        opt.load_state_dict(sgd.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        for k in before["state"][i]:
            assert torch.equal(after["state"][i][k], before["state"][i][k])


def test_state_assignment_is_loaded_before_the_next_step():
    """ZeroRedundancyOptimizer.load_state_dict writes opt.state[p] directly."""
    m_t, m_f = make_model(n_layers=2), make_model(n_layers=2)
    o_t = torch.optim.RMSprop(m_t.parameters(), lr=1e-2, momentum=0.9)
    o_f = ft.RMSprop(m_f.parameters(), lr=1e-2, momentum=0.9)
    train(m_t, o_t, 5)
    with torch.no_grad():
        for pt, pf in zip(m_t.parameters(), m_f.parameters()):
            pf.copy_(pt)
    for pt, pf in zip(m_t.parameters(), m_f.parameters()):
        o_f.state[pf] = {k: v.clone() for k, v in o_t.state[pt].items()}
    p0 = next(m_f.parameters())
    assert p0 in o_f.state and len(o_f.state) == 4
    assert float(o_f.state[p0]["step"]) == 5
    train(m_t, o_t, 5, start=5)
    train(m_f, o_f, 5, start=5)
    assert_same_params(m_t, m_f)
    o_f.state[p0]["step"].fill_(0)               # in-place edits of 'step' count too
    assert float(o_f.state_dict()["state"][0]["step"]) in (0.0, 10.0)


# -- schedulers, groups, params without gradients ---------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_lr_schedulers_drive_the_fastopt_step(flat):
    def run(cls, **kw):
        model = make_model(n_layers=4)
        opt = cls([{"params": list(model.parameters())[:4]},
                   {"params": list(model.parameters())[4:], "lr": 3e-3}], lr=1e-2, **kw)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2e-2, 5e-3], total_steps=40)
        return train(model, opt, 40, scheduler=sched), opt
    m_t, o_t = run(torch.optim.Adam)
    m_f, o_f = run(ft.Adam, flat=flat)
    assert_same_params(m_t, m_f)
    assert o_f.param_groups[0]["betas"] == o_t.param_groups[0]["betas"]   # cycled momentum
    assert o_f.param_groups[1]["lr"] == pytest.approx(o_t.param_groups[1]["lr"])


@pytest.mark.parametrize("flat", [False, True])
def test_params_without_grads_are_skipped(flat):
    def run(cls, **kw):
        model = make_model(n_layers=6)
        layers = model.layers
        layers[0].weight.requires_grad_(False)             # frozen
        unused = nn.Parameter(torch.ones(5))               # never in the graph
        opt = cls(list(model.parameters()) + [unused], lr=1e-2, weight_decay=0.1, **kw)
        train(model, opt, 10, set_to_none=not flat)
        return model, unused, opt
    m_t, u_t, o_t = run(torch.optim.AdamW)
    m_f, u_f, o_f = run(ft.AdamW, flat=flat)
    assert_same_params(m_t, m_f)
    assert torch.equal(m_f.layers[0].weight, make_model(n_layers=6).layers[0].weight)
    assert m_f.layers[0].weight not in o_f.state
    if flat:            # a flat param keeps a zero grad, so AdamW's weight decay still applies
        assert torch.equal(u_t, torch.ones(5))
        assert torch.allclose(u_f, torch.full((5,), (1 - 1e-2 * 0.1) ** 10))
    else:
        assert torch.equal(u_f, torch.ones(5)) and u_f not in o_f.state


def test_zero_grad_follows_torch_and_flat_zeroes_in_place():
    model = make_model(n_layers=2)
    opt = ft.SGD(model.parameters(), lr=0.1)
    train(model, opt, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    model = make_model(n_layers=2)
    opt = ft.SGD(model.parameters(), lr=0.1, flat=True)
    grads = [p.grad for p in model.parameters()]
    base = grads[0].data_ptr()
    sizes = np.cumsum([0] + [p.numel() * 4 for p in model.parameters()])
    assert [g.data_ptr() - base for g in grads] == list(sizes[:-1])     # one buffer, in order
    assert [p.data_ptr() - model.layers[0].weight.data_ptr() for p in model.parameters()] == list(sizes[:-1])
    train(model, opt, 1)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))     # backward accumulated in place
    assert any(g.any() for g in grads)
    opt.zero_grad()                                     # set_to_none=True: still zeroed in place
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))


def test_add_param_group_and_empty_groups():
    model = make_model(n_layers=4)
    params = list(model.parameters())
    opt = ft.Adam([{"params": params[:2]}, {"params": []}], lr=1e-2)   # ZeRO gives ranks empty groups
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    ref = torch.optim.Adam([{"params": []}, {"params": params[:2]}], lr=1e-2)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 0, 6]
    train(model, opt, 3)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(8))
    assert sd["param_groups"][2]["params"] == list(range(2, 8))
    assert ref.param_groups[1]["lr"] == 1e-2


def test_closure_and_bad_arguments():
    model = make_model(n_layers=2)
    opt = ft.Adam(model.parameters(), lr=1e-2)
    x, y = DATA[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    assert opt.step(closure).item() > 0
    with pytest.raises(ValueError, match="lr"):
        ft.Adam(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="capturable"):
        ft.Adam(model.parameters(), capturable=True)
    with pytest.raises(TypeError, match="bfloat16"):
        ft.Adam([nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    with pytest.raises(TypeError, match="flat must be a bool"):
        ft.Adam(model.parameters(), flat="yes")
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ft.RMSprop(emb.parameters(), lr=0.1)          # (SGD, Adagrad, Adam take sparse rows)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step()
    with pytest.raises(TypeError, match="pickled"):
        copy.deepcopy(ft.SGD(model.parameters(), lr=0.1))


def test_max_grad_norm_matches_clip_then_step():
    m_t, m_f = make_model(n_layers=4), make_model(n_layers=4)
    o_t = torch.optim.Adam(m_t.parameters(), lr=1e-2)
    o_f = ft.Adam(m_f.parameters(), lr=1e-2, max_grad_norm=0.05, flat=True)
    for s in range(20):
        x, y = DATA[s % len(DATA)]
        for m, o in ((m_t, o_t), (m_f, o_f)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if o is o_t:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            o.step()
    assert_same_params(m_t, m_f)


# -- following rebound params, and flat=True's rules ---------------------------------------------
def test_rebound_param_is_followed_without_flat():
    m_t, m_f = make_model(n_layers=3), make_model(n_layers=3)
    o_t = torch.optim.Adam(m_t.parameters(), lr=1e-2)
    o_f = ft.Adam(m_f.parameters(), lr=1e-2)
    train(m_t, o_t, 3)
    train(m_f, o_f, 3)
    for m in (m_t, m_f):
        for p in m.parameters():
            p.data = p.data.clone()                     # what parameters_as_bucket_view does
    train(m_t, o_t, 3, start=3)
    train(m_f, o_f, 3, start=3)
    assert_same_params(m_t, m_f)


def _flat_setup():
    model = make_model(n_layers=3)
    opt = ft.Adam(model.parameters(), lr=1e-2, flat=True)
    train(model, opt, 2)
    x, y = DATA[0]
    return model, opt, x, y


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], sd["state"][i]["exp_avg"])
               for i in sd["state"])


def _disturb(model, violation):
    """What frameworks do to .grad / .data between steps."""
    p = model.layers[1].weight
    if violation == "model.zero_grad":
        model.zero_grad()                               # set_to_none=True (HF Trainer, FSDP1)
    elif violation == "grad=None":
        p.grad = None
    elif violation == "grad replaced":
        p.grad = torch.zeros_like(p)                    # DDP gradient_as_bucket_view=True
    elif violation == "data rebound":
        q = model.layers[2].bias
        q.data = q.data.clone()                         # ZeRO bucket views, FSDP1, model.to()
    else:
        for q in model.parameters():
            if q.grad is not None:
                q.grad.zero_()


VIOLATIONS = ["model.zero_grad", "grad=None", "grad replaced", "create_graph", "data rebound"]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("violation", VIOLATIONS)
def test_flat_adopts_what_wrappers_do_to_grad_and_data(violation):
    """flat=True adopts a .grad that was set to None or replaced (copied into the flat buffer
    before the step) and a .data that was rebound (stepped where it now lives): five
    steps with the disturbance before each backward equal the same steps without flat
    (and a param whose .grad stays None is skipped, as torch skips it)."""
    models = [make_model(n_layers=3), make_model(n_layers=3)]
    opts = [ft.Adam(models[0].parameters(), lr=1e-2, flat=True), ft.Adam(models[1].parameters(), lr=1e-2)]
    for m, o in zip(models, opts):
        train(m, o, 2)
    for s in range(5):
        x, y = DATA[s % len(DATA)]
        for m, o in zip(models, opts):
            o.zero_grad(set_to_none=False)
            _disturb(m, violation)
            nn.functional.mse_loss(m(x), y).backward(create_graph=violation == "create_graph")
            o.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        a.grad = b.grad = None
    # the flat buffer is whole again after opt.zero_grad(): grads are views of it
    opts[0].zero_grad()
    train(models[0], opts[0], 1)
    base = opts[0]._flat_buffers[0][1].data_ptr()
    offsets = np.cumsum([0] + [q.numel() * 4 for q in models[0].parameters()])[:-1]
    assert [p.grad.data_ptr() - base for p in models[0].parameters()] == list(offsets)


def test_flat_param_without_gradient_is_skipped():
    """A flat param whose .grad is None at the step (set to None, no backward through it)
    is not stepped: no weight decay, no momentum, no step count, as in torch.optim."""
    m_t, m_f = make_model(n_layers=3), make_model(n_layers=3)
    o_t = torch.optim.AdamW(m_t.parameters(), lr=1e-2, weight_decay=0.5)
    o_f = ft.AdamW(m_f.parameters(), lr=1e-2, weight_decay=0.5, flat=True)
    train(m_t, o_t, 2)
    train(m_f, o_f, 2)
    x, y = DATA[0]
    for m, o in ((m_t, o_t), (m_f, o_f)):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        m.layers[1].weight.grad = None
        o.step()
    assert_same_params(m_t, m_f)
    p_t, p_f = m_t.layers[1].weight, m_f.layers[1].weight
    assert int(o_f.state[p_f]["step"]) == int(o_t.state[p_t]["step"]) == 2


def test_flat_refuses_a_model_cast_after_building():
    """A model cast to another dtype after building the optimizer (torch allows no .grad of
    another dtype otherwise) cannot be stepped from the flat buffer: refused, naming the
    dtype, before the optimizer's state changes."""
    model, opt, x, y = _flat_setup()
    before = opt.state_dict()
    model.double()
    x, y = x.double(), y.double()
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises((ft.FlatParamsError, ValueError), match="float64|dtype"):
        opt.step()
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i]["exp_avg"], before["state"][i]["exp_avg"]) for i in before["state"])


def test_flat_params_save_with_safetensors(tmp_path):
    """flat=True params are views of one buffer, each over a storage object of its own, so
    safetensors' save_model (what accelerate's save_state calls) accepts them; the loaded
    model equals the trained one and training continues through the flat buffer."""
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    model = make_model(n_layers=3)
    opt = ft.AdamW(model.parameters(), lr=1e-2, flat=True)
    train(model, opt, 2)
    st.save_model(model, str(tmp_path / "model.safetensors"))
    other = make_model(seed=5, n_layers=3)
    st.load_model(other, str(tmp_path / "model.safetensors"))
    assert_same_params(model, other, tol=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1, start=2)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    base = opt._flat_buffers[0][1].data_ptr()
    offsets = np.cumsum([0] + [q.numel() * 4 for q in model.parameters()])[:-1]
    assert [p.grad.data_ptr() - base for p in model.parameters()] == list(offsets)
