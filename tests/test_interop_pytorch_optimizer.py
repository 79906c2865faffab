"""State dicts between fastopt and pytorch_optimizer 4.1.0, both ways (fastopt.interop).

Every fastopt optimizer whose oracle is pytorch_optimizer (AdEMAMix, Adan, Lookahead):
(a) pytorch_optimizer -> fastopt: the oracle runs 15 steps over two param groups; its
    state dict loads into fastopt.X over NumPy arrays (tensors turned into arrays by
    ``fastopt.interop.from_pytorch_optimizer``; the group-level ``step`` and the missing
    ``maximize`` read by the loader) and into fastopt.torch.X (as it is); both then run
    25 more steps beside the oracle, params and state compared after each.
(b) fastopt -> pytorch_optimizer: the same with ``fastopt.interop.to_pytorch_optimizer``.
    Lookahead around torch.optim.AdamW (its inner state dict keeps torch.optim's layout)
    and around pytorch_optimizer.Adan (converted too: ``inner="pytorch_optimizer"``).
(c) Bad inputs refused with a clear error and nothing changed: a group step that
    disagrees with its params' steps, a negative or fractional group step, a group whose
    params have different step counts on export, low-bit state on export.

Tolerance (float64): 64 ulp times the run's scale of the quantity (the largest magnitude
it has taken). The two sides run the same equations; torch's lerp, addcmul and foreach
kernels round differently from a fused expression by an ulp per step. A step count off by
one, a state array in the wrong slot or a lost slow weight moves values by far more.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import interop

from cases import RunScales, assert_within_ulps, needs, optional_module

torch = optional_module("torch")
po = optional_module("pytorch_optimizer")
needs_oracle = needs(po if torch is not None else None,
                     "pytorch_optimizer (pip install pytorch-optimizer==4.1.0) and torch are the oracle")

ULPS = 64
FIRST, THEN = 15, 25
SHAPES = [(4, 3), (), (17,)]
GROUPS = [[0, 1], [2]]              # the params of each param group
ROWS = {
    "AdEMAMix": dict(cls="AdEMAMix", hp=dict(lr=1e-2, betas=(0.8, 0.99, 0.999), weight_decay=0.1,
                                             t_alpha_beta3=25, alpha=3.0),
                     second=dict(lr=5e-3, weight_decay=0.0)),
    "Adan": dict(cls="Adan", hp=dict(lr=1e-2, weight_decay=0.02, weight_decouple=True),
                 second=dict(lr=5e-3, weight_decouple=False)),
    "Lookahead(AdamW)": dict(cls="AdamW", inner="torch.optim", hp=dict(lr=1e-2, weight_decay=0.1),
                             second=dict(lr=5e-3), la=dict(k=5, alpha=0.5)),
    "Lookahead(Adan)": dict(cls="Adan", inner="pytorch_optimizer", hp=dict(lr=1e-2),
                            second=dict(lr=5e-3, weight_decay=0.01), la=dict(k=3, alpha=0.3)),
}


def _groups(row, params):
    return [{"params": [params[i] for i in GROUPS[0]]},
            {"params": [params[i] for i in GROUPS[1]], **row["second"]}]


class _Side:
    """One optimizer over copies of ``init``: "oracle" (pytorch_optimizer, or its Lookahead
    around torch.optim / pytorch_optimizer), "numpy" (fastopt.X) or "torch" (fastopt.torch.X)."""

    def __init__(self, kind, row, init):
        self.kind, self.row = kind, row
        if kind == "numpy":
            self.params = [np.array(a, copy=True) for a in init]
            inner = getattr(fo, row["cls"])(_groups(row, self.params), **row["hp"])
            self.opt = fo.Lookahead(inner, **row["la"]) if "la" in row else inner
            self.inner = inner
            return
        self.params = [torch.nn.Parameter(torch.tensor(np.array(a, copy=True))) for a in init]
        if kind == "torch":
            import fastopt.torch as fot
            self.inner = getattr(fot, row["cls"])(_groups(row, self.params), **row["hp"])
            self.opt = fot.Lookahead(self.inner, **row["la"]) if "la" in row else self.inner
            return
        if row.get("inner") == "torch.optim":
            self.inner = getattr(torch.optim, row["cls"])(_groups(row, self.params), **row["hp"])
        else:
            self.inner = getattr(po, row["cls"])(_groups(row, self.params), foreach=False, **row["hp"])
        self.opt = po.Lookahead(self.inner, **row["la"]) if "la" in row else self.inner

    def step(self, grads):
        if self.kind == "numpy":
            self.opt.step(grads)
            return
        for p, g in zip(self.params, grads):
            p.grad = torch.tensor(g)
        self.opt.step()

    def arrays(self):
        return [p if isinstance(p, np.ndarray) else p.detach().numpy() for p in self.params]

    def state(self) -> dict:
        """``{(param index, name): array}``: the inner state (without ``step``) and the slow weights."""
        out = {}
        for i, p in enumerate(self.params):
            key = i if self.kind == "numpy" else p
            items = dict(self.inner.state[key])
            if "la" in self.row:
                items.update(self.opt.state[key])
            for name, a in items.items():
                if name != "step":
                    out[i, name] = np.asarray(a.detach().numpy() if hasattr(a, "detach") else a)
        return out

    def steps(self) -> list:
        """Each param's step count (the group's, for pytorch_optimizer's own optimizers)."""
        if self.kind == "oracle" and self.row.get("inner") != "torch.optim":
            return [int(g["step"]) for gi, g in enumerate(self.inner.param_groups) for _ in GROUPS[gi]]
        key = (lambda i, p: i) if self.kind == "numpy" else (lambda i, p: p)
        return [int(self.inner.state[key(i, p)]["step"]) for i, p in enumerate(self.params)]


def _grads(seed, n):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(n)]


def _init(seed):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s)) for s in SHAPES]


def _compare(ours, theirs, scales, what):
    a, b = ours.arrays(), theirs.arrays()
    assert_within_ulps(a, b, scales.update("param", b), np.float64, f"params, {what}", ULPS)
    sa, sb = ours.state(), theirs.state()
    assert sa.keys() == sb.keys(), f"{what}: state keys {sorted(sa)} != {sorted(sb)}"
    for key in sb:
        name = key[1]
        assert_within_ulps([sa[key]], [sb[key]], scales.update(name, [sb[key]]), np.float64,
                           f"{key}, {what}", ULPS)


def _exported(row, sd):
    return interop.to_pytorch_optimizer(sd, inner=row.get("inner", "torch.optim"))


# -- (a), (b) both directions, both fastopt APIs --------------------------------------------------
@needs_oracle
@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize("direction", ["po->fastopt", "fastopt->po"])
@pytest.mark.parametrize("name", list(ROWS))
def test_load_mid_run_and_continue(name, direction, api):
    row = ROWS[name]
    init, first, then = _init(1), _grads(2, FIRST), _grads(3, THEN)
    src = _Side("oracle" if direction == "po->fastopt" else api, row, init)
    for gs in first:
        src.step(gs)
    dst = _Side(api if direction == "po->fastopt" else "oracle", row, src.arrays())
    sd = src.opt.state_dict()
    if direction == "po->fastopt":
        dst.opt.load_state_dict(interop.from_pytorch_optimizer(sd) if api == "numpy" else sd)
    else:
        exported = _exported(row, sd)
        base = exported.get("base_optimizer", exported)
        if row.get("inner") != "torch.optim":       # pytorch_optimizer's own layout
            assert [g["step"] for g in base["param_groups"]] == [FIRST, FIRST]
            assert all("step" not in st for st in base["state"].values())
        dst.opt.load_state_dict(exported)
    assert dst.steps() == [FIRST] * len(SHAPES)
    ours, theirs = (dst, src) if direction == "po->fastopt" else (src, dst)
    scales = RunScales()
    _compare(ours, theirs, scales, "after the load")
    for k, gs in enumerate(then, start=FIRST + 1):
        src.step(gs)
        dst.step(gs)
        _compare(ours, theirs, scales, f"step {k}")
    assert ours.steps() == [FIRST + THEN] * len(SHAPES)


def test_round_trip_through_pytorch_optimizer_keeps_everything():
    """fastopt -> pytorch_optimizer's layout -> fastopt: the same arrays and steps (with
    torch tensors in between where torch is importable, NumPy arrays otherwise)."""
    row = ROWS["AdEMAMix"]
    a = _Side("numpy", row, _init(4))
    for gs in _grads(5, 7):
        a.step(gs)
    back = interop.from_pytorch_optimizer(interop.to_pytorch_optimizer(a.opt.state_dict()))
    b = _Side("numpy", row, a.arrays())
    b.opt.load_state_dict(back)
    assert b.steps() == a.steps() == [7, 7, 7]
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=str(key))
    assert [g["lr"] for g in b.opt.param_groups] == [1e-2, 5e-3]


# -- (c) bad inputs ---------------------------------------------------------------------------------
def _po_layout_numpy():
    """A fastopt.AdEMAMix after 3 steps and its state dict in pytorch_optimizer's layout
    (group steps, no maximize), NumPy arrays: built without pytorch_optimizer."""
    params = [np.linspace(-1, 1, 6).reshape(2, 3), np.array(0.5)]
    opt = fo.AdEMAMix([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape) for p in params])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("maximize")
        g["step"] = 3
    for st in sd["state"].values():
        st.pop("step")
    return params, opt, sd


def _snapshot(params, opt):
    return ([p.copy() for p in params], {i: {k: np.array(v) for k, v in st.items()}
                                         for i, st in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        assert before[1][i].keys() == after[1][i].keys()
        for k in before[1][i]:
            np.testing.assert_array_equal(before[1][i][k], after[1][i][k])
    assert before[2] == after[2]


def test_loader_reads_group_steps_and_default_maximize():
    params, opt, sd = _po_layout_numpy()
    fresh = fo.AdEMAMix([{"params": [p.copy() for p in params[:1]]},
                         {"params": [p.copy() for p in params[1:]], "lr": 0.5}], lr=1e-2, maximize=True)
    fresh.load_state_dict(sd)
    assert [int(fresh.state[i]["step"]) for i in (0, 1)] == [3, 3]
    assert [g["maximize"] for g in fresh.param_groups] == [True, True]     # the optimizer's default
    assert all("step" not in g for g in fresh.param_groups)
    assert sd["param_groups"][0]["step"] == 3 and "step" not in sd["state"][0]    # input untouched
    sd["state"][0]["step"] = np.array(3.0, np.float32)      # both layouts at once, agreeing
    fresh.load_state_dict(sd)
    assert [int(fresh.state[i]["step"]) for i in (0, 1)] == [3, 3]


def _bad_state_dicts():
    def edit(fn):
        _, _, sd = _po_layout_numpy()
        fn(sd)
        return sd
    return [
        ("disagree", edit(lambda sd: sd["state"][0].update(step=np.array(2.0, np.float32))),
         r"state_dict\['state'\]\[0\]\['step'\] is 2 but state_dict\['param_groups'\]\[0\]\['step'\] is 3"),
        ("negative", edit(lambda sd: sd["param_groups"][1].update(step=-1)),
         r"param_groups'\]\[1\]\['step'\] must be a non-negative whole number"),
        ("fraction", edit(lambda sd: sd["param_groups"][0].update(step=2.5)),
         r"param_groups'\]\[0\]\['step'\] must be a non-negative whole number"),
        ("bool", edit(lambda sd: sd["param_groups"][0].update(step=True)),
         r"param_groups'\]\[0\]\['step'\] must be a scalar step count"),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _bad_state_dicts()])
def test_loader_refuses_inconsistent_steps_and_changes_nothing(case):
    _, sd, match = _bad_state_dicts()[case]
    params, opt, _ = _po_layout_numpy()
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(before, _snapshot(params, opt))


@needs(torch, "torch runs fastopt.torch")
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _bad_state_dicts()])
def test_torch_loader_refuses_inconsistent_steps_and_changes_nothing(case):
    import fastopt.torch as fot
    _, sd, match = _bad_state_dicts()[case]
    ps = [torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)),
          torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))]
    opt = fot.AdEMAMix([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}], lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    before = (opt.state_dict(), [p.detach().clone() for p in ps])
    sd = {"state": {i: {k: torch.from_numpy(np.array(v)) for k, v in st.items()}
                    for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert [g for g in after["param_groups"]] == before[0]["param_groups"]
    for i, st in before[0]["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    assert all(torch.equal(p, q) for p, q in zip(ps, before[1]))


def test_export_refuses_a_group_with_different_step_counts():
    params = [np.ones(3), np.ones(2), np.ones(4)]
    opt = fo.Adan([{"params": params[:1]}, {"params": params[1:]}])
    opt.step([np.ones(3), np.ones(2), np.ones(4)])
    opt.step([np.ones(3), None, np.ones(4)])          # params[1] skips a step: 1 against 2
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"param_groups'\]\[1\]: its params have different step "
                                         r"counts \(param 1: 1, param 2: 2\)"):
        interop.to_pytorch_optimizer(sd)
    assert int(sd["state"][1]["step"]) == 1 and "step" not in sd["param_groups"][1]


def test_export_refuses_lowbit_state_and_bad_arguments():
    p = np.ones(300, np.float32)
    opt = fo.AdEMAMix([p], state_format="bfloat16")
    opt.step([np.ones(300, np.float32)])
    with pytest.raises(ValueError, match="low-bit state"):
        interop.to_pytorch_optimizer(opt.state_dict())
    with pytest.raises(ValueError, match="inner must be one of"):
        interop.to_pytorch_optimizer(opt.state_dict(), inner="optax")
    with pytest.raises(ValueError, match="'state' .* and 'param_groups'"):
        interop.to_pytorch_optimizer({"state": []})
    la = fo.Lookahead(fo.SGD([np.ones(2)], lr=0.1))
    sd = la.state_dict()
    sd["lookahead_state"][7] = sd["lookahead_state"][0]
    with pytest.raises(ValueError, match=r"\[7\]: the key names no param"):
        interop.to_pytorch_optimizer(sd)


def test_export_without_state_writes_step_zero():
    opt = fo.Adan([np.ones(3)])
    out = interop.to_pytorch_optimizer(opt.state_dict())
    assert out["state"] == {} and out["param_groups"][0]["step"] == 0
