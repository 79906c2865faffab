"""fastopt.Lookahead against pytorch_optimizer.Lookahead 4.1.0.

(a) Lookahead around fastopt.SGD (momentum, dampening: the pullback options act on its
    momentum_buffer), fastopt.Adam and fastopt.AdamW, against pytorch_optimizer.Lookahead
    around the same torch.optim optimizers: 120 steps, k in {1, 2, 3, 5, 7}, alpha at 0.5
    (torch's lerp takes its second form there), 0.3, 0.8, 0.97 and 0 (the oracle refuses 1), pullback "none",
    "reset" and "pullback", params that have no gradient at some steps (they are left
    out of that update, as the oracle leaves them), 0-d, one element, odd sizes, a
    tensor over a CPU chunk and 300 small tensors, float32 and float64, backends "cpu"
    and "numpy", lists and FlatParams; "cuda" under the simulator. Params, slow weights,
    slow momenta and the inner state are compared every step.
(b) The slow update is one driver call per dtype (CPU) / one launch (CUDA simulator).
(c) Two groups with counters out of phase (a group added mid-run), a skipped inner step.
(d) State dicts: from and to pytorch_optimizer's layout (keys ``(group, index)``, the
    counter in the inner groups), fastopt.save / fastopt.load round trips continuing
    bit for bit, bad state dicts refused with nothing changed.
(e) Bad arguments, backup_and_load_cache / clear_and_load_backup.

Tolerance: the inner optimizers differ from torch by float rounding (fused multiply-adds,
tests/cases.py rel_err); the comparison is norm-relative per tensor against the run's RMS
scale, 1e-6 in float32 and 1e-12 in float64. A wrong counter, a missed or extra slow
update, the wrong lerp direction or a pullback left out moves values by far more.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastopt as fo
from fastopt import interop
from fastopt.kernels import lookahead as kernel

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
STEPS = 120
SHAPES = {
    "mixed": [(5, 3), (), (1,), (33,)],
    "chunk": [(65536 + 3,), (7,)],
    "many-small": [(k % 4 + 1,) for k in range(300)],
}
INNER = {
    "sgd": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "adam": ("Adam", dict(lr=1e-2, amsgrad=True)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.fixture(scope="module")
def po():
    pytest.importorskip("torch", reason="torch is needed for the pytorch_optimizer oracle")
    return pytest.importorskip("pytorch_optimizer",
                               reason="pytorch_optimizer (pip install pytorch-optimizer==4.1.0) is "
                                      "Lookahead's external oracle")


def _rel_close(ours, theirs, dtype, what, scale):
    tol = RTOL[np.dtype(dtype)]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        floor = max(np.sqrt(b.size) * scale, 1e-300)
        err = np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), floor)
        assert err <= tol, f"{what}[{i}] (shape {a.shape}): relative error {err:.3g} > {tol:g}"


def _rms(arrays):
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays] + [np.zeros(0)])
    return float(np.sqrt(np.mean(flat * flat))) if flat.size else 0.0


def _grads(rng, shapes, dtype, step, skip=True):
    out = []
    for i, s in enumerate(shapes):
        if skip and (step + i) % 6 == 0:
            out.append(None)
        else:
            out.append(np.asarray(rng.standard_normal(s)).astype(dtype))
    return out


class _Pair:
    """fastopt.Lookahead and pytorch_optimizer.Lookahead over copies of the same params."""

    def __init__(self, po, inner, dtype, shapes, backend="cpu", mode="list", seed=0, **la):
        import torch
        name, hp = INNER[inner]
        rng = np.random.default_rng(seed)
        self.init = [np.asarray(rng.standard_normal(s)).astype(dtype) for s in shapes]
        arrays = [a.copy() for a in self.init]
        self.flat = fo.FlatParams(arrays) if mode == "flat" else None
        self.params = self.flat.params if self.flat is not None else arrays
        self.tparams = [torch.tensor(a.copy()) for a in self.init]
        self.inner_name = name
        self.ours = fo.Lookahead(getattr(fo, name)(self.flat if self.flat is not None else self.params,
                                                   backend=backend, **hp), **la)
        self.theirs = po.Lookahead(getattr(torch.optim, name)(self.tparams, **hp), **la)
        self.dtype = dtype

    def step(self, grads):
        import torch
        for t, g in zip(self.tparams, grads):
            t.grad = None if g is None else torch.tensor(g.copy())
        self.theirs.step()
        if self.flat is not None and all(g is not None for g in grads):
            for view, g in zip(self.flat.grads, grads):
                view[...] = g
            assert self.ours.step() is True
        else:
            assert self.ours.step(grads) is True

    def compare(self, what):
        theirs = [t.numpy() for t in self.tparams]
        scale = _rms(theirs)
        _rel_close([np.asarray(p) for p in self.params], theirs, self.dtype, f"params ({what})", scale)
        slow_t = [self.theirs.state[t]["slow_params"].numpy() for t in self.tparams]
        _rel_close([np.asarray(self.ours.state[i]["slow_params"]) for i in range(len(slow_t))], slow_t,
                   self.dtype, f"slow_params ({what})", scale)
        if self.ours.pullback_momentum == "pullback":
            sm = [self.theirs.state[t]["slow_momentum"].numpy() for t in self.tparams]
            _rel_close([np.asarray(self.ours.state[i]["slow_momentum"]) for i in range(len(sm))], sm,
                       self.dtype, f"slow_momentum ({what})", _rms(sm))
        inner_t = self.theirs.optimizer.state
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key not in self.ours.optimizer.slot_names:
                continue
            have = [i for i, t in enumerate(self.tparams) if key in inner_t.get(t, {})
                    and self.ours.optimizer.state.get(i)]
            want = [inner_t[self.tparams[i]][key].numpy() for i in have]
            _rel_close([np.asarray(self.ours.optimizer.state[i][key]) for i in have], want,
                       self.dtype, f"{key} ({what})", _rms(want))


def _run(po, inner, dtype, shapes, steps=STEPS, backend="cpu", mode="list", skip=True, **la):
    pair = _Pair(po, inner, dtype, SHAPES[shapes] if isinstance(shapes, str) else shapes,
                 backend=backend, mode=mode, **la)
    rng = np.random.default_rng(1)
    for step in range(1, steps + 1):
        if step == steps // 2:
            for o in (pair.ours, pair.theirs):
                o.param_groups[0]["lr"] *= 0.5
        pair.step(_grads(rng, [p.shape for p in pair.params], dtype, step,
                         skip=skip and mode == "list"))
        pair.compare(f"step {step}")
    for p, p0 in zip(pair.params, pair.init):
        if la.get("alpha", 0.5) > 0:      # alpha 0: each update puts the start back
            assert np.max(np.abs(np.asarray(p, np.float64) - p0)) > 1e-4, "a param did not move"
    return pair


# -- (a) against pytorch_optimizer ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sgd_momentum_matches_oracle(po, dtype, pullback, backend):
    # alpha 0.5 is symmetric in fast and slow: 0.35 also tells the direction of the pull
    _run(po, "sgd", dtype, "mixed", backend=backend, k=5, alpha=0.35, pullback_momentum=pullback)


@pytest.mark.parametrize("inner", ["adam", "adamw"])
@pytest.mark.parametrize("k,alpha", [(5, 0.5), (1, 0.3), (7, 0.8), (3, 0.0), (2, 0.97)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adam_family_matches_oracle(po, dtype, k, alpha, inner):
    _run(po, inner, dtype, "mixed", k=k, alpha=alpha)


@pytest.mark.parametrize("shapes", ["chunk", "many-small"])
@pytest.mark.parametrize("mode", ["list", "flat"])
def test_shapes_and_flat_params_match_oracle(po, shapes, mode):
    _run(po, "sgd", np.float32, shapes, steps=40 if shapes == "chunk" else 101, mode=mode,
         k=4, alpha=0.6, pullback_momentum="pullback")


@pytest.mark.skipif(not SIM, reason="the 'cuda' backend runs here under the CUDA simulator "
                                    "(NUMBA_ENABLE_CUDASIM=1)")
@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_simulator_matches_oracle(po, dtype, mode):
    _run(po, "sgd", dtype, [(3,), (2, 2), (1,)], steps=12, backend="cuda", mode=mode, k=3,
         alpha=0.4, pullback_momentum="pullback")


# -- (b) one fused pass -----------------------------------------------------------------------
def test_slow_update_is_one_driver_call_per_dtype(monkeypatch):
    from fastopt import _backend
    driver = _backend.get("cpu")
    calls = []
    original = type(driver.driver).run

    def counting(self, element, table, *args, **kwargs):
        calls.append(element)
        return original(self, element, table, *args, **kwargs)

    monkeypatch.setattr(type(driver.driver), "run", counting)
    params = [np.ones(s, np.float32) for s in [(10,), (3, 3), (), (1000,)]] + [np.ones(5)]
    opt = fo.Lookahead(fo.SGD(params, lr=0.1, momentum=0.5), k=2, pullback_momentum="pullback")
    for step in range(1, 5):
        calls.clear()
        opt.step([np.full(p.shape, 0.1, p.dtype) for p in params])
        slow = [c for c in calls if c is kernel.lookahead_element]
        assert len(slow) == (2 if step % 2 == 0 else 0), (step, calls)   # float32 and float64


@pytest.mark.skipif(not SIM, reason="launch counting runs under the CUDA simulator")
def test_cuda_slow_update_is_one_launch():
    from fastopt import _backend
    be = _backend.get("cuda")
    flat = fo.FlatParams([np.ones(s, np.float32) for s in [(10,), (3, 3), (7,)]])
    opt = fo.Lookahead(fo.SGD(flat, lr=0.1, backend="cuda"), k=2)
    for g in flat.grads:
        g[...] = 0.1
    opt.step()
    before = be.driver.launches
    opt.step()
    assert be.driver.launches - before == 2          # the SGD step and the slow update


# -- (c) counters -----------------------------------------------------------------------------------
def test_group_added_mid_run_has_its_own_counter(po):
    import torch
    rng = np.random.default_rng(3)
    a0, b0 = rng.standard_normal(4), rng.standard_normal(3)
    a, b = a0.copy(), b0.copy()
    ta, tb = torch.tensor(a0.copy()), torch.tensor(b0.copy())
    ours = fo.Lookahead(fo.SGD([a], lr=0.1, momentum=0.5), k=3, alpha=0.4)
    theirs = po.Lookahead(torch.optim.SGD([ta], lr=0.1, momentum=0.5), k=3, alpha=0.4)
    for step in range(1, 12):
        if step == 3:
            ours.add_param_group({"params": [b], "lr": 0.2})
            theirs.add_param_group({"params": [tb], "lr": 0.2})
        gs = [rng.standard_normal(4)] + ([rng.standard_normal(3)] if step >= 3 else [])
        for t, g in zip((ta, tb), gs):
            t.grad = torch.tensor(g)
        theirs.step()
        ours.step(gs)
        np.testing.assert_allclose(a, ta.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, tb.numpy(), rtol=1e-12, atol=1e-14)
    sd = ours.state_dict()
    assert [g["counter"] for g in sd["base_optimizer"]["param_groups"]] == \
        [g["counter"] for g in theirs.param_groups] == [11 % 3, 9 % 3]


def test_skipped_inner_step_counts_nothing():
    p = np.ones(3, np.float32)
    opt = fo.Lookahead(fo.SGD([p], lr=0.1), k=2)
    opt.step([np.ones(3, np.float32)])
    before = p.copy()
    assert opt.step([np.array([np.inf, 0, 0], np.float32)], grad_scale=1.0) is False
    assert np.array_equal(p, before) and opt._counters == [1]
    opt.step([np.ones(3, np.float32)])          # the second applied step: the slow update
    np.testing.assert_allclose(p, 1 + 0.5 * (0.8 - 1), rtol=1e-6)
    np.testing.assert_array_equal(opt.state[0]["slow_params"], p)


def test_alpha_zero_puts_the_start_back():
    rng = np.random.default_rng(4)
    p = rng.standard_normal(6)
    zero = fo.Lookahead(fo.Adam([p], lr=0.05), k=3, alpha=0.0)
    start = p.copy()
    for _ in range(3):
        zero.step([rng.standard_normal(6)])
    np.testing.assert_array_equal(p, start)


# -- (d) state dicts -------------------------------------------------------------------------------
@pytest.mark.parametrize("pullback", ["none", "pullback"])
@pytest.mark.parametrize("direction", ["po->fastopt", "fastopt->po"])
def test_state_dicts_interchange_with_oracle(po, direction, pullback):
    import torch
    rng = np.random.default_rng(5)
    shapes = [(4, 3), (), (9,)]
    first = [[rng.standard_normal(s) for s in shapes] for _ in range(7)]
    then = [[rng.standard_normal(s) for s in shapes] for _ in range(13)]
    hp = dict(lr=0.05, momentum=0.9, nesterov=True)
    la = dict(k=5, alpha=0.3, pullback_momentum=pullback)
    init = [np.asarray(rng.standard_normal(s)) for s in shapes]
    src_p = [a.copy() for a in init]
    src_t = [torch.tensor(a.copy()) for a in init]

    def torch_step(opt, ts, gs):
        for t, g in zip(ts, gs):
            t.grad = torch.tensor(g)
        opt.step()

    if direction == "po->fastopt":
        src = po.Lookahead(torch.optim.SGD(src_t, **hp), **la)
        for gs in first:
            torch_step(src, src_t, gs)
        sd = interop.from_pytorch_optimizer(src.state_dict())
        assert (0, 1) in sd["lookahead_state"]
        dst_p = [t.numpy().copy() for t in src_t]
        dst = fo.Lookahead(fo.SGD(dst_p, **hp), **la)
        dst.load_state_dict(sd)
        assert dst._counters == [2]
        for gs in then:
            torch_step(src, src_t, gs)
            dst.step(gs)
        ours, theirs, slow_o, slow_t = dst_p, src_t, dst, src
    else:
        src = fo.Lookahead(fo.SGD(src_p, **hp), **la)
        for gs in first:
            src.step(gs)
        dst_t = [torch.tensor(a.copy()) for a in src_p]
        dst = po.Lookahead(torch.optim.SGD(dst_t, **hp), **la)
        dst.load_state_dict(interop.to_pytorch_optimizer(src.state_dict()))
        assert dst.param_groups[0]["counter"] == 2
        for gs in then:
            src.step(gs)
            torch_step(dst, dst_t, gs)
        ours, theirs, slow_o, slow_t = src_p, dst_t, src, dst
    for i, (a, t) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, t.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(slow_o.state[i]["slow_params"], slow_t.state[t]["slow_params"].numpy(),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(slow_o.optimizer.state[i]["momentum_buffer"],
                                   slow_t.optimizer.state[t]["momentum_buffer"].numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["list", "flat"])
def test_save_load_round_trip_continues_bit_for_bit(tmp_path, mode):
    rng = np.random.default_rng(6)
    shapes = [(5,), (2, 3), ()]
    init = [np.asarray(rng.standard_normal(s)).astype(np.float32) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s)).astype(np.float32) for s in shapes] for _ in range(17)]

    def make():
        arrays = [a.copy() for a in init]
        holder = fo.FlatParams(arrays) if mode == "flat" else arrays
        params = holder.params if mode == "flat" else arrays
        return params, fo.Lookahead(fo.SGD(holder, lr=0.1, momentum=0.8), k=4, alpha=0.7,
                                    pullback_momentum="pullback")

    pa, a = make()
    for g in grads:
        a.step(g)
    pb, b = make()
    for g in grads[:9]:
        b.step(g)
    fo.save(tmp_path / "la.npz", b.state_dict())
    pc, c = make()
    for p, q in zip(pc, pb):
        p[...] = q
    c.load_state_dict(fo.load(tmp_path / "la.npz"))
    for g in grads[9:]:
        c.step(g)
    for x, y in zip(pa, pc):
        np.testing.assert_array_equal(x, y)
    for i in range(len(shapes)):
        np.testing.assert_array_equal(a.state[i]["slow_params"], c.state[i]["slow_params"])
        np.testing.assert_array_equal(a.state[i]["slow_momentum"], c.state[i]["slow_momentum"])


def test_bad_state_dicts_change_nothing():
    p = np.ones((2, 2))
    opt = fo.Lookahead(fo.SGD([p], lr=0.1, momentum=0.5), k=2)
    opt.step([np.ones((2, 2))])
    good = opt.state_dict()
    before = (p.copy(), opt.state[0]["slow_params"].copy(), list(opt._counters))

    def broken(fn):
        sd = opt.state_dict()
        fn(sd)
        return sd

    bad = [
        (broken(lambda sd: sd["lookahead_state"].pop(0)), "no slow weights"),
        (broken(lambda sd: sd["lookahead_state"][0].update(slow_params=np.ones(3))), "shape"),
        (broken(lambda sd: sd["lookahead_state"].update({5: sd["lookahead_state"][0]})), "names no param"),
        (broken(lambda sd: sd["base_optimizer"]["param_groups"][0].update(counter=-1)), "counter"),
        (broken(lambda sd: sd["base_optimizer"]["param_groups"][0].update(momentum="x")), "momentum"),
        ({"state": {}}, "lookahead_state"),
    ]
    for sd, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            opt.load_state_dict(sd)
        assert np.array_equal(p, before[0]) and opt._counters == before[2]
        assert np.array_equal(opt.state[0]["slow_params"], before[1])
    opt.load_state_dict(good)


# -- (e) arguments and evaluation with the slow weights ------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k"), (dict(k=1.5), "k"), (dict(k=True), "k"), (dict(alpha=-0.1), "alpha"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(pullback_momentum="always"), "pullback_momentum"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fo.Lookahead(fo.SGD([np.ones(2)], lr=0.1), **kwargs)


def test_refuses_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="fastopt optimizer"):
        fo.Lookahead(object())
    with pytest.raises(NotImplementedError, match="16-bit"):
        fo.Lookahead(fo.Adam([np.ones(2, np.float16)], master_weights=True))


def test_backup_and_load_cache():
    p = np.zeros(3)
    opt = fo.Lookahead(fo.SGD([p], lr=1.0), k=10)
    opt.step([np.ones(3)])
    fast = p.copy()
    opt.backup_and_load_cache()
    np.testing.assert_array_equal(p, 0.0)           # the slow weights: still the start
    opt.clear_and_load_backup()
    np.testing.assert_array_equal(p, fast)
    with pytest.raises(RuntimeError):
        opt.clear_and_load_backup()
