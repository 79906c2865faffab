"""fastopt.torch.X as a drop-in for torch.optim.X: constructor signatures (positional order
included), implementation switches, state and state dicts before and after the first step,
tensor hyperparameters, and the import error without torch (issue 12)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import fastopt  # noqa: E402
import fastopt.family  # noqa: E402
import fastopt.torch as ft  # noqa: E402

# SparseAdam is left out: these tests step dense gradients, which it refuses (as torch's),
# and fastopt.torch does not pass torch's sparse COO gradients on yet.
# Muon too: torch.optim.Muon takes 2-D params only; tests/test_muon.py compares it.
BOTH = sorted(n for n in ft.OPTIMIZERS if hasattr(torch.optim, n) and n not in ("SparseAdam", "Muon"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A valid, non-default value for every argument of torch's constructors (the implementation
# switches at values fastopt accepts): passed positionally where torch allows it.
VALUES = {
    "lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.01, "amsgrad": True,
    "momentum": 0.5, "dampening": 0.0, "nesterov": True, "lr_decay": 0.01,
    "initial_accumulator_value": 0.1, "alpha": 0.9, "centered": True, "momentum_decay": 0.005,
    "decoupled_weight_decay": True, "rho": 0.8, "maximize": True,
    "etas": (0.4, 1.3), "step_sizes": (1e-5, 10.0), "lambd": 1e-3, "t0": 2.0,
    "beta2_decay": -0.5, "d": 2.0,
    "foreach": False, "fused": None, "capturable": False, "differentiable": False,
}
VALUES_OF = {"Adafactor": {"eps": (1e-20, 1e-2)}}      # (eps is a pair there)
# Hyperparameters per optimizer for the state-dict comparisons: defaults, then options on.
CONFIGS = {
    "SGD": [{}, dict(momentum=0.9, nesterov=True, weight_decay=0.1)],
    "Adagrad": [{}, dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2)],
    "RMSprop": [{}, dict(momentum=0.5, centered=True, weight_decay=0.1)],
    "Adam": [{}, dict(amsgrad=True, weight_decay=0.1, maximize=True)],
    "AdamW": [{}, dict(amsgrad=True)],
    "Adamax": [{}, dict(weight_decay=0.1)],
    "NAdam": [{}, dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "RAdam": [{}, dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "Adadelta": [{}, dict(weight_decay=0.1, maximize=True)],
    "Rprop": [{}, dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True)],
    "ASGD": [{}, dict(lambd=1e-3, t0=1.0, weight_decay=0.1, maximize=True)],
    "Adafactor": [{}, dict(eps=(1e-20, 1e-2), d=2.0, beta2_decay=-0.5, weight_decay=0.1, maximize=True)],
}


def make_params(seed=0):
    """Three trainable tensors (the last never gets a gradient) and one frozen tensor."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
          for shape in ((4, 3), (5,), (2,))]
    frozen = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64),
                                requires_grad=False)
    return ps + [frozen]


def set_grads(params, step):
    """Gradients for the first two params (in place where a grad exists: flat=True's rule)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params[:2]:
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


def assert_same_value(a, b, where, rtol=1e-12):
    """Same type, and for tensors the same dtype, shape, device and values (within rtol)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12, msg=where)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{where}[{k}]", rtol)
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def assert_same_state_dict(mine, ref, rtol=1e-12):
    assert mine.keys() == ref.keys()
    assert len(mine["param_groups"]) == len(ref["param_groups"])
    for gi, (g, r) in enumerate(zip(mine["param_groups"], ref["param_groups"])):
        assert g.keys() == r.keys(), f"group {gi}: {sorted(g.keys() ^ r.keys())}"
        for k in r:
            assert_same_value(g[k], r[k], f"param_groups[{gi}][{k!r}]")
    assert mine["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        assert mine["state"][i].keys() == st.keys(), f"state[{i}]"
        for k in st:
            assert_same_value(mine["state"][i][k], st[k], f"state[{i}][{k!r}]", rtol)


# -- signatures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BOTH)
def test_signature_is_torchs_then_fastopts_keyword_only_extras(name):
    ref = list(inspect.signature(getattr(torch.optim, name)).parameters.values())
    mine = list(inspect.signature(ft.OPTIMIZERS[name]).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[:len(ref)]] == \
        [(p.name, p.kind, p.default) for p in ref]
    extras = mine[len(ref):]
    assert {"backend", "flat"} <= {p.name for p in extras}
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extras)
    # fastopt's own defaults are torch's, so the defaults taken from torch change no math.
    fo_cls = ft.OPTIMIZERS[name]._fastopt_class
    torch_defaults = {p.name: p.default for p in ref if p.name != "params"}
    for n, p in inspect.signature(fo_cls).parameters.items():
        if n in torch_defaults:
            assert p.default == torch_defaults[n], n


@pytest.mark.parametrize("name", BOTH)
def test_positional_arguments_bind_as_in_torch(name):
    sig = inspect.signature(getattr(torch.optim, name))
    values = {**VALUES, **VALUES_OF.get(name, {})}
    args = [values[n] for n, p in sig.parameters.items()
            if n != "params" and p.kind == p.POSITIONAL_OR_KEYWORD]
    kwargs = {n: values[n] for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
    p_t, p_f = make_params(), make_params()
    o_t = getattr(torch.optim, name)(p_t, *args, **kwargs)
    o_f = ft.OPTIMIZERS[name](p_f, *args, **kwargs)
    g_t = {k: v for k, v in o_t.param_groups[0].items() if k != "params"}
    g_f = {k: v for k, v in o_f.param_groups[0].items() if k != "params"}
    assert g_f == g_t
    if "maximize" in {n for n, p in sig.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD}:
        assert o_f.param_groups[0]["maximize"] is True      # RMSprop: 9th positional argument
    for s in range(3):                                       # the values are used, not just stored
        set_grads(p_t, s)
        set_grads(p_f, s)
        o_t.step()
        o_f.step()
    for a, b in zip(p_t, p_f):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError):
        getattr(torch.optim, name)(p_t, *args, None, None, None, None, None)
    with pytest.raises(TypeError):
        ft.OPTIMIZERS[name](p_f, *args, None, None, None, None, None)


def test_fastopt_only_classes_take_torchs_switches_as_keywords():
    p = make_params()
    opt = ft.Lion(p, lr=1e-4, foreach=True)
    switches = ("foreach", "fused", "capturable", "differentiable")
    assert {k: opt.param_groups[0][k] for k in switches} == \
        dict(foreach=True, fused=None, capturable=False, differentiable=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'fussed'"):
        ft.Lion(p, fussed=True)


# -- state and state dicts before and after the first step ----------------------------------------
@pytest.mark.parametrize("config", [0, 1], ids=["defaults", "options"])
@pytest.mark.parametrize("name", BOTH)
def test_state_dicts_match_torch_before_and_after_the_first_step(name, config):
    hp = CONFIGS[name][config]
    p_t, p_f = make_params(), make_params()
    o_t = getattr(torch.optim, name)(p_t, **hp)
    o_f = ft.OPTIMIZERS[name](p_f, **hp)
    for s in range(3):
        assert_same_state_dict(o_f.state_dict(), o_t.state_dict())
        for a, b in zip(p_t, p_f):
            ref = o_t.state.get(a, {})          # (torch's state[a] would insert an empty entry)
            assert set(o_f.state[b]) == set(ref)
            for k, v in ref.items():
                assert_same_value(o_f.state[b][k], v, f"step {s}: opt.state[p][{k!r}]")
        set_grads(p_t, s)
        set_grads(p_f, s)
        o_t.step()
        o_f.step()
    assert_same_state_dict(o_f.state_dict(), o_t.state_dict())
    if name != "SGD" or hp.get("momentum"):                  # (plain SGD keeps no state)
        assert len(o_t.state_dict()["state"]) >= 2           # the comparison saw state


@pytest.mark.parametrize("flat", [False, True])
def test_adagrad_creates_every_params_state_at_construction(flat):
    p_t, p_f = make_params(), make_params()
    hp = dict(lr=0.1, initial_accumulator_value=0.3)
    o_t = torch.optim.Adagrad(p_t, **hp)
    o_f = ft.Adagrad(p_f, flat=flat, **hp)
    frozen = p_f[3]
    assert not frozen.requires_grad and frozen in o_f.state and len(o_f.state) == 4
    assert float(o_f.state[frozen]["step"]) == 0.0
    assert torch.equal(o_f.state[frozen]["sum"], torch.full((3,), 0.3, dtype=torch.float64))
    assert_same_state_dict(o_f.state_dict(), o_t.state_dict())
    if flat:     # a flat param keeps a zero gradient (fastopt.torch's flat rules): torch's too
        p_t[2].grad = torch.zeros_like(p_t[2])
    for s in range(3):
        set_grads(p_t, s)
        set_grads(p_f, s)
        o_t.step()
        o_f.step()
    assert_same_state_dict(o_f.state_dict(), o_t.state_dict())
    assert float(o_f.state[frozen]["step"]) == 0.0 and float(o_f.state[p_f[0]]["step"]) == 3.0
    # A fresh optimizer's state dict (every step 0) loads into torch and back.
    o_t2 = torch.optim.Adagrad(make_params(), **hp)
    o_t2.load_state_dict(ft.Adagrad(make_params(), **hp).state_dict())
    assert_same_state_dict(o_t2.state_dict(), torch.optim.Adagrad(make_params(), **hp).state_dict())


def test_adagrad_honours_a_groups_own_initial_accumulator_value():
    """A documented difference: torch fills every group's sum with the constructor's value."""
    params = make_params()
    opt = ft.Adagrad([{"params": params[:1]},
                      {"params": params[1:2], "initial_accumulator_value": 0.5}],
                     initial_accumulator_value=0.3)
    assert torch.equal(opt.state[params[0]]["sum"], torch.full((4, 3), 0.3, dtype=torch.float64))
    assert torch.equal(opt.state[params[1]]["sum"], torch.full((5,), 0.5, dtype=torch.float64))


def test_empty_state_entries_from_torchs_defaultdict_load():
    p_t, p_f = make_params(), make_params()
    o_t = torch.optim.Adam(p_t, lr=0.1)
    set_grads(p_t, 0)
    o_t.step()
    assert o_t.state[p_t[3]] == {}                       # torch inserts an empty entry here
    sd = o_t.state_dict()
    assert sd["state"][3] == {}
    o_f = ft.Adam(p_f, lr=0.1)
    o_f.load_state_dict(sd)
    assert sorted(o_f.state_dict()["state"]) == [0, 1] and p_f[3] not in o_f.state


def test_nadam_state_has_a_live_mu_product():
    p_t, p_f = make_params(), make_params()
    o_t, o_f = torch.optim.NAdam(p_t), ft.NAdam(p_f)
    for s in range(2):
        set_grads(p_t, s)
        set_grads(p_f, s)
        o_t.step()
        o_f.step()
    assert set(o_f.state[p_f[0]]) == set(o_t.state[p_t[0]]) == \
        {"step", "exp_avg", "exp_avg_sq", "mu_product"}
    held = o_f.state[p_f[0]]["mu_product"]
    assert_same_value(held, o_t.state[p_t[0]]["mu_product"], "mu_product")
    before = float(held)
    set_grads(p_f, 2)
    o_f.step()
    assert float(held) != before                            # a view, updated like torch's tensor
    assert float(held) == float(o_f.state_dict()["state"][0]["mu_product"])


# -- implementation switches ---------------------------------------------------------------------
@pytest.mark.parametrize("name", BOTH)
def test_foreach_with_fused_raises_as_torch_does(name):
    params = make_params()
    if "fused" not in inspect.signature(getattr(torch.optim, name)).parameters:
        for cls in (getattr(torch.optim, name), ft.OPTIMIZERS[name]):
            with pytest.raises(TypeError, match="fused"):
                cls(params, fused=True)
        return
    for cls in (getattr(torch.optim, name), ft.OPTIMIZERS[name]):
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            cls(params, foreach=True, fused=True)
    for kw in (dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)):
        opt = ft.OPTIMIZERS[name](params, **kw)
        assert {k: opt.param_groups[0][k] for k in kw} == kw      # recorded, as torch does


def test_fused_with_foreach_in_a_later_group_is_refused_too():
    params = make_params()
    opt = ft.Adam(params[:2])
    with pytest.raises(RuntimeError, match=r"param_groups\[1\].*cannot be `True` together"):
        opt.add_param_group({"params": params[2:], "fused": True, "foreach": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("option", ["capturable", "differentiable"])
@pytest.mark.parametrize("name", BOTH)
def test_capturable_and_differentiable_are_refused(name, option):
    params = make_params()
    if option not in inspect.signature(getattr(torch.optim, name)).parameters:
        with pytest.raises(TypeError, match=option):
            ft.OPTIMIZERS[name](params, **{option: True})
        return
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        ft.OPTIMIZERS[name](params, **{option: True})
    opt = ft.OPTIMIZERS[name](params)
    set_grads(params, 0)
    opt.param_groups[0][option] = True                   # set later: refused at the step
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {option}=True is not supported"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    opt.param_groups[0][option] = False
    opt.step()
    assert not torch.equal(before[0], params[0])


def test_load_state_dict_keeps_the_optimizers_own_switches():
    p_t, p_f = make_params(), make_params()
    o_t = torch.optim.Adam(p_t, lr=0.1, foreach=True)
    set_grads(p_t, 0)
    o_t.step()
    sd = o_t.state_dict()
    sd["param_groups"][0]["capturable"] = True           # e.g. saved from a CUDA-graph run
    o_f = ft.Adam(p_f, lr=0.1)
    o_f.load_state_dict(sd)
    assert o_f.param_groups[0]["foreach"] is None and o_f.param_groups[0]["capturable"] is False
    set_grads(p_f, 1)
    o_f.step()
    assert float(o_f.state[p_f[0]]["step"]) == 2.0


# -- tensor hyperparameters ----------------------------------------------------------------------
# torch computes with a tensor hyperparameter's dtype (float32 here) where fastopt computes
# the step's scalars in float64 on the host: float64 params then differ in the 7th digit.
TENSOR_RTOL = 1e-6


def _tensor_hp(name):
    hp = {"lr": torch.tensor(0.02, dtype=torch.float64)}
    if name in ("Adam", "AdamW"):
        hp["betas"] = (torch.tensor(0.8), torch.tensor(0.99))
    if name == "SGD":
        hp.update(momentum=0.9, weight_decay=torch.tensor(0.1))
    return hp


@pytest.mark.parametrize("name", BOTH)
def test_tensor_hyperparameters_match_torch_at_construction_and_in_param_groups(name):
    p_t, p_f = make_params(), make_params()
    hp_t, hp_f = _tensor_hp(name), _tensor_hp(name)
    o_t = getattr(torch.optim, name)(p_t, **hp_t)
    o_f = ft.OPTIMIZERS[name](p_f, **hp_f)
    assert o_f.param_groups[0]["lr"] is hp_f["lr"]          # kept as given, as torch keeps it
    for s in range(6):
        if s == 2:                                          # changed in place
            hp_t["lr"].fill_(0.01)
            hp_f["lr"].fill_(0.01)
        if s == 4:                                          # assigned into the group
            o_t.param_groups[0]["lr"] = torch.tensor([0.005])
            o_f.param_groups[0]["lr"] = torch.tensor([0.005])
        set_grads(p_t, s)
        set_grads(p_f, s)
        o_t.step()
        o_f.step()
        for a, b in zip(p_t, p_f):
            torch.testing.assert_close(b, a, rtol=TENSOR_RTOL, atol=1e-12, msg=f"step {s}")
    assert_same_state_dict(o_f.state_dict(), o_t.state_dict(), rtol=TENSOR_RTOL)
    # a float lr where the tensor was: same params again
    o_t.param_groups[0]["lr"] = o_f.param_groups[0]["lr"] = 0.003
    set_grads(p_t, 6)
    set_grads(p_f, 6)
    o_t.step()
    o_f.step()
    torch.testing.assert_close(p_f[0], p_t[0], rtol=TENSOR_RTOL, atol=1e-12)


def test_tensor_hyperparameters_are_checked_consistently():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be a number or a 1-element tensor"):
        ft.Adam(params, lr=torch.ones(2))
    with pytest.raises(ValueError, match=r"betas\[1\] is a tensor on meta.*on the CPU"):
        ft.Adam(params, betas=(torch.tensor(0.9), torch.ones((), device="meta")))
    opt = ft.Adam(params, lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['weight_decay'\] must be a number"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                             "weight_decay": torch.zeros(3)})
    assert len(opt.param_groups) == 1
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    for bad, match in ((torch.ones(2), "must be a number"),
                       (torch.ones(1, device="meta"), "is a tensor on meta")):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(ValueError, match=rf"param_groups\[0\]\['lr'\] {match}"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        assert not opt.state
    with pytest.raises(ValueError, match="lr"):
        ft.Adam(params, lr=torch.tensor(-1.0))             # fastopt's checks see the value


def test_state_dict_with_tensor_lr_loads_both_ways():
    p_t, p_f = make_params(), make_params()
    o_t = torch.optim.Adam(p_t, lr=torch.tensor(0.1))
    set_grads(p_t, 0)
    o_t.step()
    o_f = ft.Adam(p_f)
    o_f.load_state_dict(o_t.state_dict())
    assert isinstance(o_f.param_groups[0]["lr"], torch.Tensor)
    with torch.no_grad():
        for a, b in zip(p_t, p_f):
            b.copy_(a)
    set_grads(p_t, 1)
    set_grads(p_f, 1)
    o_t.step()
    o_f.step()
    torch.testing.assert_close(p_f[0], p_t[0], rtol=TENSOR_RTOL, atol=1e-12)
    bad = o_t.state_dict()
    bad["param_groups"][0]["lr"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]\['lr'\]"):
        o_f.load_state_dict(bad)


# -- importing without torch ---------------------------------------------------------------------
def test_import_without_torch_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"          # `import torch` now raises ImportError
        "import fastopt\n"
        "try:\n"
        "    import fastopt.torch\n"
        "except ImportError as e:\n"
        "    print('MESSAGE', e)\n"
        "    print('CAUSE', type(e.__cause__).__name__)\n"
        "else:\n"
        "    print('IMPORTED')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED" not in out.stdout
    assert "pip install fastopt[torch]" in out.stdout
    assert "CAUSE ModuleNotFoundError" in out.stdout     # the original error is carried
