"""Rprop and ASGD against torch.optim.Rprop and torch.optim.ASGD (torch 2.13), long runs.

Every run feeds the same gradients to a fastopt optimizer (backend cpu, numpy, or cuda
under ``NUMBA_ENABLE_CUDASIM=1``: tests/test_cuda_simulator.py runs this file's cuda rows
in a child process) and to torch's (its default single-tensor path on CPU
tensors), over 0-d, one-element, odd-sized and chunk-crossing tensors plus many small
ones, in float32 and float64, for 120+ steps, some params skipping steps (so their step
counts, and ASGD's per-param ``eta`` and ``mu``, differ).

Rprop is compared bit for bit: its arithmetic is a product by a factor, a clamp and a
move by a sign times the step size (exact), each rounded once in the param's dtype, as
torch does. ASGD's ``eta``, ``mu`` and ``step`` are compared bit for bit (host scalars:
torch's float64 Python arithmetic rounded to its float32 state tensors); its params and
``ax`` within ``ASGD_ULPS`` ulp of the run's scale (the largest magnitude the quantity
took), because torch's vectorised ``add(alpha=)`` is a fused multiply-add where fastopt
rounds the product first (measured: at most 1.15 ulp over the grid below; one-element
tensors, which torch runs unvectorised, agree bit for bit). fastopt's CPU driver and its
NumPy reference perform the same operations in the same order and are compared bit for
bit.

State dicts: torch's (tensors made NumPy arrays) loads into fastopt and the two continue
together; fastopt's (arrays made tensors) equals torch's own at the same point and loads
into torch, which then continues as from its own. torch casts a loaded state's ``eta``
and ``mu`` to the param's dtype (``Optimizer.load_state_dict``), so a float64 torch run
that was reloaded keeps them in float64 from then on: the comparison after a load into
torch is against torch loaded from its own state dict.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels.cpu import CHUNK

from cases import SIM, backend_memory, cuda_unavailable, need_backend, needs, optional_module

torch = optional_module("torch")
needs_torch = needs(torch, "torch.optim is the oracle of Rprop and ASGD")

BACKENDS = ["cpu", "numpy", "cuda"]
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
STEPS = 120
ASGD_ULPS = 4

RPROP_ROWS = {
    "defaults": {},
    "maximize": dict(maximize=True),
    # tight bounds: step sizes hit both of them
    "bounds": dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True),
    "min-zero": dict(lr=0.05, etas=(0.7, 1.1), step_sizes=(0.0, 1.0)),
    "etas-near-one": dict(lr=1e-3, etas=(0.999, 1.001), step_sizes=(1e-6, 50)),
}
ASGD_ROWS = {
    "defaults": {},                                     # t0 = 1e6: ax is a copy of p
    "averaging": dict(t0=10.0),                         # averaging from step 12
    "decay": dict(lambd=0.05, alpha=0.5, t0=0.0, weight_decay=0.1),
    "maximize": dict(lr=0.02, lambd=1e-3, alpha=1.0, t0=3.5, weight_decay=0.01, maximize=True),
    "t0-zero-alpha-zero": dict(lambd=0.1, alpha=0.0, t0=0.0),
}
# Rows whose lr changes mid-run (ASGD: eta takes the new lr one step later, as torch's).
LR_CHANGE_AT = STEPS // 2


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


_cuda_unavailable, _need, _memory = cuda_unavailable, need_backend, backend_memory


def _shapes(backend):
    """0-d, one element, odd 2-D, empty, a tensor past one CPU chunk, many small ones (the
    simulator runs each GPU thread in Python: smaller there)."""
    if backend == "cuda" and SIM:
        return [(), (1,), (3, 5), (0,), (70,)] + [(k % 4 + 1,) for k in range(6)]
    big = (CHUNK + 3,) if backend == "cpu" else (1031,)
    return [(), (1,), (3, 5), (0,), big, (2, 3, 7)] + [(k % 7,) for k in range(40)]


class _Grads:
    """Gradients of magnitudes 1e-3 to 10 per tensor, exact zeros, signs that persist
    (each element's sign flips with probability 0.3: Rprop's step sizes grow and shrink),
    and the param at index 2 skipping every fourth step (None)."""

    def __init__(self, shapes, dtype, seed):
        self.shapes, self.dtype = shapes, dtype
        self.rng = np.random.default_rng(seed)
        self.signs = [np.where(self.rng.random(s) < 0.5, -1.0, 1.0) for s in shapes]

    def next(self, step):
        out = []
        for k, shape in enumerate(self.shapes):
            flip = self.rng.random(shape) < 0.3
            self.signs[k] = np.where(flip, -self.signs[k], self.signs[k])
            g = self.signs[k] * np.abs(self.rng.standard_normal(shape)) * 10.0 ** self.rng.uniform(-3, 1)
            g = np.where(self.rng.random(shape) < 0.05, 0.0, g)
            out.append(np.asarray(g, dtype=self.dtype))
        if step % 4 == 0:
            out[2] = None
        return out


class Pair:
    """A fastopt optimizer and torch's over equal copies of the same params."""

    def __init__(self, name, hp, init, backend):
        self.put, self.get = _memory(backend)
        self.params = [self.put(p.copy()) for p in init]
        self.opt = getattr(fo, name)(self.params, backend=backend, **hp)
        self.tparams = [torch.from_numpy(p.copy()) for p in init]
        self.topt = getattr(torch.optim, name)(self.tparams, **hp)

    def step(self, grads, which="both"):
        if which in ("both", "fo"):
            self.opt.step([None if g is None else self.put(g) for g in grads])
        if which in ("both", "torch"):
            for t, g in zip(self.tparams, grads):
                t.grad = None if g is None else torch.from_numpy(g.copy())
            self.topt.step()

    def set_lr(self, lr):
        self.opt.param_groups[0]["lr"] = lr
        self.topt.param_groups[0]["lr"] = lr

    def values(self):
        return [self.get(p) for p in self.params], [t.numpy() for t in self.tparams]


def _ulp(dtype):
    return float(np.finfo(dtype).eps)


class _Scale:
    """The largest magnitude each compared quantity has taken so far (params, ax)."""

    def __init__(self):
        self.seen = {}

    def update(self, key, arrays):
        m = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
        self.seen[key] = max(self.seen.get(key, 0.0), m)
        return self.seen[key]


def _compare(pair, name, dtype, when, scale, ulps=None):
    """Params and every state entry of fastopt against torch: bit for bit, or (``ulps``)
    within ``ulps`` ulp of the run's scale for params and ASGD's ``ax``."""
    mine, theirs = pair.values()
    sd, tsd = pair.opt.state_dict(), pair.topt.state_dict()
    assert sorted(sd["state"]) == sorted(tsd["state"]), f"{when}: params with state"
    pairs = [("params", mine, theirs)]
    for key in tsd["state"][next(iter(tsd["state"]))]:
        pairs.append((key, [np.asarray(sd["state"][i][key]) for i in sorted(tsd["state"])],
                      [tsd["state"][i][key].numpy() for i in sorted(tsd["state"])]))
    for key, a, b in pairs:
        for k, (x, y) in enumerate(zip(a, b)):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{when}: {key}[{k}] dtype/shape"
        exact = ulps is None or key in ("step", "eta", "mu", "step_size", "prev")
        if exact:
            for k, (x, y) in enumerate(zip(a, b)):
                np.testing.assert_array_equal(x, y, err_msg=f"{when}: {name} {key}[{k}]")
        else:
            tol = ulps * _ulp(dtype) * scale.update(key, b)
            worst = max((float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b)
                         if x.size), default=0.0)
            assert worst <= tol, f"{when}: {name} {key} differs by {worst:.3g} > {tol:.3g}"


def _run(name, row, hp, backend, dtype, steps=STEPS, lr_change=True):
    shapes = _shapes(backend)
    seed = _seed(name, row, np.dtype(dtype).name)
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    pair = Pair(name, hp, init, backend)
    grads = _Grads(shapes, dtype, seed + 1)
    scale = _Scale()
    ulps = ASGD_ULPS if name == "ASGD" else None
    for k in range(1, steps + 1):
        if lr_change and k == LR_CHANGE_AT:
            pair.set_lr(0.5 * hp.get("lr", 0.01))
        pair.step(grads.next(k))
        if k in (1, 2, 3, LR_CHANGE_AT, LR_CHANGE_AT + 1, LR_CHANGE_AT + 2) or k % 20 == 0 or k == steps:
            _compare(pair, name, dtype, f"{backend} step {k}", scale, ulps)
    return pair


# -- Rprop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("row", list(RPROP_ROWS))
@pytest.mark.parametrize("backend", BACKENDS)
@needs_torch
def test_rprop_matches_torch_bit_for_bit(backend, row, dtype):
    _need(backend)
    hp = RPROP_ROWS[row]
    pair = _run("Rprop", row, hp, backend, dtype)
    sizes = np.concatenate([np.asarray(pair.opt.state[i]["step_size"]).ravel()
                            for i in pair.opt.state])
    prevs = np.concatenate([np.asarray(pair.opt.state[i]["prev"]).ravel() for i in pair.opt.state])
    lo, hi = hp.get("step_sizes", (1e-6, 50))
    # not vacuous: step sizes moved both ways, some gradients were forgotten (sign flips)
    assert np.unique(sizes).size > 3
    assert (prevs == 0).any() and (prevs != 0).any()
    if row == "bounds":
        assert (sizes == np.dtype(dtype).type(lo)).any() and (sizes == np.dtype(dtype).type(hi)).any()
    counts = [float(pair.opt.state[i]["step"]) for i in pair.opt.state]
    assert len(set(counts)) == 2, counts          # the skipping param counts fewer steps


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rprop_sign_of_the_product_not_of_the_factors(dtype):
    """torch takes sign(g * prev): a product that underflows to 0 (float32) leaves the step
    size as it is and forgets nothing; NaN and infinite gradients as torch (sign(NaN) is
    0: the param stays, the NaN is kept in prev)."""
    tiny = np.dtype(dtype).type(1e-25 if dtype == np.float32 else 1e-170)
    init = [np.linspace(-1, 1, 9).astype(dtype), np.zeros((), dtype)]
    for backend in ("cpu", "numpy"):
        pair = Pair("Rprop", dict(lr=0.1), init, backend)
        seq = [
            [np.full(9, tiny, dtype), np.asarray(tiny)],
            [np.full(9, -tiny, dtype), np.asarray(-tiny)],     # tiny * tiny: 0 in float32
            [np.array([np.nan, np.inf, -np.inf, 1, -1, 0, 2, -2, 3], dtype), np.asarray(np.nan, dtype)],
            [np.array([1, 1, 1, -1, -1, 1, 2, 2, -3], dtype), np.asarray(1.0, dtype)],
            [np.array([1, -1, 1, -1, 1, 1, 2, -2, 3], dtype), np.asarray(-1.0, dtype)],
        ]
        for k, grads in enumerate(seq, 1):
            pair.step(grads)
            _compare(pair, "Rprop", dtype, f"{backend} step {k}", _Scale())
            if k == 2:      # the product underflowed: no sign flip, the step size kept at lr
                assert np.all(pair.opt.state[0]["step_size"] == np.dtype(dtype).type(0.1))
                assert np.all(pair.opt.state[0]["prev"] == -tiny)


# -- ASGD -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("row", list(ASGD_ROWS))
@pytest.mark.parametrize("backend", BACKENDS)
@needs_torch
def test_asgd_matches_torch(backend, row, dtype):
    _need(backend)
    hp = ASGD_ROWS[row]
    pair = _run("ASGD", row, hp, backend, dtype)
    st = pair.opt.state
    etas = {float(st[i]["eta"]) for i in st}
    mus = {float(st[i]["mu"]) for i in st}
    assert len(etas) == (1 if hp.get("alpha", 0.75) == 0 else 2), etas   # per-param eta (skipping param)
    params = [pair.get(p) for p in pair.params]
    if hp.get("t0", 1e6) > STEPS:           # averaging never started: ax is p, bit for bit
        assert mus == {1.0}
        for i in st:
            np.testing.assert_array_equal(np.asarray(st[i]["ax"]), params[i])
    else:
        assert len(mus) == 2 and max(mus) < 1
        assert any(not np.array_equal(np.asarray(st[i]["ax"]), params[i]) for i in st if params[i].size)


@needs_torch
def test_asgd_eta_takes_a_changed_lr_one_step_later():
    """torch computes eta from the lr at the end of a step: the step after an lr change
    still moves by the old lr's eta (here checked against torch and by the moves)."""
    init = [np.zeros(4, np.float64)]
    pair = Pair("ASGD", dict(lr=0.1, lambd=0.0), init, "cpu")
    g = [np.ones(4)]
    pair.step(g)
    pair.set_lr(0.001)
    before = pair.get(pair.params[0]).copy()
    pair.step(g)
    moved = before - pair.get(pair.params[0])
    assert np.allclose(moved, 0.1)                 # eta = 0.1 still (lambd = 0: eta = lr)
    assert float(pair.opt.state[0]["eta"]) == np.float32(0.001)
    _compare(pair, "ASGD", np.float64, "after the lr change", _Scale(), ASGD_ULPS)


@pytest.mark.parametrize("name,hp", [("Rprop", dict(etas=(0.4, 1.3), step_sizes=(1e-4, 1.0))),
                                     ("ASGD", dict(lambd=1e-3, t0=2.0, weight_decay=0.01))])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_driver_equals_numpy_reference_bit_for_bit(name, hp, dtype):
    """The element (compiled) and the independent reference do the same operations in the
    same order and precision: equal bits after 130 steps with the lr halved midway."""
    shapes = _shapes("numpy")
    rng = np.random.default_rng(_seed("ref", name, np.dtype(dtype).name))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    runs = {b: [p.copy() for p in init] for b in ("cpu", "numpy")}
    opts = {b: getattr(fo, name)(runs[b], backend=b, **hp) for b in runs}
    grads = _Grads(shapes, dtype, 7)
    for k in range(1, 131):
        if k == 65:
            for o in opts.values():
                o.param_groups[0]["lr"] *= 0.5
        gs = grads.next(k)
        for o in opts.values():
            o.step(gs)
    for a, b in zip(runs["cpu"], runs["numpy"]):
        np.testing.assert_array_equal(a, b)
    for i in opts["cpu"].state:
        for key, v in opts["cpu"].state[i].items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(opts["numpy"].state[i][key]))


# -- many small tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp", [("Rprop", dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05))),
                                     ("ASGD", dict(t0=20.0, weight_decay=0.01))])
@needs_torch
def test_thousand_small_tensors(name, hp):
    shapes = [(k % 5,) if k % 3 else () for k in range(1000)]
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    pair = Pair(name, hp, init, "cpu")
    grads = _Grads(shapes, np.float32, 6)
    for k in range(1, 101):
        pair.step(grads.next(k))
    _compare(pair, name, np.float32, "after 100 steps", _Scale(), ASGD_ULPS if name == "ASGD" else None)


# -- state dicts both ways ------------------------------------------------------------------------
def _to_numpy(sd):
    return {"state": {i: {k: (v.numpy().copy() if isinstance(v, torch.Tensor) else v)
                          for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _to_torch(sd):
    return {"state": {i: {k: torch.from_numpy(np.array(v)) for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


HP_SD = {"Rprop": dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05), maximize=True),
         "ASGD": dict(lr=0.02, lambd=1e-3, alpha=0.6, t0=5.0, weight_decay=0.01)}


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Rprop", "ASGD"])
def test_torch_state_dict_loads_into_fastopt_and_both_continue(name, backend, dtype):
    _need(backend)
    hp = HP_SD[name]
    shapes = _shapes(backend)
    rng = np.random.default_rng(_seed("sd1", name))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = _Grads(shapes, dtype, 3)
    pair = Pair(name, hp, init, backend)
    for k in range(1, 60):
        if k == 30:
            pair.topt.param_groups[0]["lr"] = hp["lr"] * 0.5
        pair.step(grads.next(k), which="torch")
    # a fresh fastopt optimizer over torch's current values, loaded from torch's state dict
    pair.params = [pair.put(t.numpy().copy()) for t in pair.tparams]
    pair.opt = getattr(fo, name)(pair.params, backend=backend, **hp)
    pair.opt.load_state_dict(_to_numpy(pair.topt.state_dict()))
    assert pair.opt.param_groups[0]["lr"] == hp["lr"] * 0.5
    ulps = ASGD_ULPS if name == "ASGD" else None
    scale = _Scale()
    _compare(pair, name, dtype, "loaded", scale, ulps)
    for k in range(60, 130):
        pair.step(grads.next(k))
    _compare(pair, name, dtype, "continued", scale, ulps)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["Rprop", "ASGD"])
def test_fastopt_state_dict_is_torchs_and_loads_into_torch(name, dtype):
    hp = HP_SD[name]
    shapes = _shapes("cpu")
    rng = np.random.default_rng(_seed("sd2", name))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = _Grads(shapes, dtype, 4)
    pair = Pair(name, hp, init, "cpu")
    for k in range(1, 60):
        if k == 30:
            pair.set_lr(hp["lr"] * 0.5)
        pair.step(grads.next(k))
    ulps = ASGD_ULPS if name == "ASGD" else None
    _compare(pair, name, dtype, "saved", _Scale(), ulps)     # fastopt's state dict is torch's
    saved = pair.opt.state_dict()
    assert all(saved["state"][i]["step"].dtype == np.float32 for i in saved["state"])
    # torch from fastopt's state dict, and torch from its own, over the same values
    own = pair.topt.state_dict()
    from_fo = [torch.from_numpy(pair.get(p).copy()) for p in pair.params]
    t_fo = getattr(torch.optim, name)(from_fo, **hp)
    t_fo.load_state_dict(_to_torch(saved))
    from_own = [t.detach().clone() for t in from_fo]
    t_own = getattr(torch.optim, name)(from_own, **hp)
    t_own.load_state_dict(own)
    for k in range(60, 130):
        gs = grads.next(k)
        for ps, opt in ((from_fo, t_fo), (from_own, t_own)):
            for t, g in zip(ps, gs):
                t.grad = None if g is None else torch.from_numpy(g.copy())
            opt.step()
    scale = max(float(t.abs().max()) for t in from_own if t.numel())
    for a, b in zip(from_fo, from_own):
        if name == "Rprop":
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        elif a.numel():
            assert float((a - b).abs().max()) <= ASGD_ULPS * _ulp(dtype) * scale
    sd_fo, sd_own = t_fo.state_dict(), t_own.state_dict()
    for i in sd_own["state"]:
        for key in ("step", "eta", "mu", "prev", "step_size"):
            if key in sd_own["state"][i]:
                assert torch.equal(sd_fo["state"][i][key], sd_own["state"][i][key]), (i, key)


def test_asgd_state_dict_must_carry_eta_and_mu():
    params = [np.ones(3, np.float32)]
    opt = fo.ASGD(params)
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    for key, bad, match in (("eta", None, "lacks 'eta'"), ("mu", None, "lacks 'mu'"),
                            ("mu", np.float32(0.0), r"'mu'\] must be in \(0.0, 1.0\]"),
                            ("mu", np.float32(1.5), r"'mu'\] must be in"),
                            ("eta", np.float32(-1.0), r"'eta'\] must be in"),
                            ("eta", np.float32(math.nan), r"'eta'\] must be in"),
                            ("eta", np.zeros(2, np.float32), "must be a real scalar"),
                            ("eta", np.array(1, np.int32), "must be a real scalar"),
                            ("eta", True, "must be a real scalar")):
        broken = {"state": {0: dict(sd["state"][0])}, "param_groups": sd["param_groups"]}
        if bad is None:
            del broken["state"][0][key]
        else:
            broken["state"][0][key] = bad
        before = opt.state_dict()
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken)
        after = opt.state_dict()
        assert float(after["state"][0]["eta"]) == float(before["state"][0]["eta"])
        np.testing.assert_array_equal(after["state"][0]["ax"], before["state"][0]["ax"])
    # a float64 eta (torch after loading into float64 params) loads, rounded to float32
    ok = {"state": {0: dict(sd["state"][0], eta=np.float64(0.0123456789))},
          "param_groups": sd["param_groups"]}
    opt.load_state_dict(ok)
    assert opt.state[0]["eta"] == np.float32(0.0123456789)


# -- hyperparameter checks ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(etas=(1.0, 1.2)), r"etas\[0\] \(etaminus\)"),
    (dict(etas=(0.0, 1.2)), r"etas\[0\] \(etaminus\)"),
    (dict(etas=(0.5, 1.0)), r"etas\[1\] \(etaplus\)"),
    (dict(etas=(0.5,)), "etas must be a pair"),
    (dict(etas=0.5), "etas must be a pair"),
    (dict(step_sizes=(-1e-6, 50)), r"step_sizes\[0\]"),
    (dict(step_sizes=(1e-6, math.nan)), r"step_sizes\[1\]"),
    (dict(step_sizes=(1.0, 0.5)), "min <= max"),
    (dict(step_sizes="ab"), "step_sizes must be a pair"),
])
def test_rprop_refuses_bad_etas_and_step_sizes(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fo.Rprop([np.zeros(2, np.float32)], **kwargs)
    opt = fo.Rprop([np.zeros(2, np.float32)])
    opt.param_groups[0].update(kwargs)
    p = opt.param_groups[0]["params"][0]
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step([np.ones(2, np.float32)])
    assert not p.any() and not opt.state


@pytest.mark.parametrize("kwargs", [dict(lambd=-1e-4), dict(alpha=math.nan), dict(t0=-1.0),
                                    dict(weight_decay=-0.1), dict(lr=-0.01), dict(t0="1")])
def test_asgd_refuses_bad_hyperparameters(kwargs):
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        fo.ASGD([np.zeros(2, np.float32)], **kwargs)


@needs_torch
def test_signatures_and_defaults_are_torchs():
    import inspect
    for name in ("Rprop", "ASGD"):
        ref = {n: p.default for n, p in inspect.signature(getattr(torch.optim, name)).parameters.items()}
        mine = {n: p.default for n, p in inspect.signature(getattr(fo, name)).parameters.items()}
        for n, d in mine.items():
            if n in ref:
                assert d == ref[n], (name, n)
        assert {n for n in ref if n not in ("foreach", "capturable", "differentiable", "params")} \
            <= set(mine), name

