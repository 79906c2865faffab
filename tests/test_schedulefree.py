"""Schedule-free AdamW and SGD against the ``schedulefree`` package (its user classes).

(a) fastopt.AdamWScheduleFree / SGDScheduleFree and schedulefree's classes of the same
    names stepped side by side from the same NumPy arrays: 120 steps, a grid of
    hyperparameters (warm-up on and off, weight decay, r, weight_lr_power, betas or
    momentum, a beta that makes torch's lerp take its other form), one param skipping
    steps (None gradient), the lr halved mid-run, eval()/train() switches mid-run with
    the params compared in eval mode (x) after each eval(); shapes 0-d, one element,
    odd, several dims; float32 and float64; backends "cpu", "numpy" and "cuda" (under
    the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``, or on a GPU). Params, ``z``,
    ``exp_avg_sq`` and the group host state (``k``, ``weight_sum``, ``lr_max``,
    ``scheduled_lr``, ``train_mode``) are compared after every step.
(b) Thousands of small tensors on "cpu", list and FlatParams modes (same bits).
(c) State dicts both ways (the package's, tensors as NumPy arrays, into fastopt; and
    fastopt's, arrays as tensors, into the package), saved in train and in eval mode;
    both continue together.
(d) The train/eval contract: a step in eval mode raises and changes nothing, switches
    are idempotent, params without state are left alone, ``z`` is never written by a
    switch, a skipped step (non-finite gradient under ``grad_scale``) leaves the host
    state, ``eval()`` with beta 0 refuses; 16-bit params with master weights and
    bfloat16 / int8 ``z`` switch as the reference does.

Tolerance against the package: ULPS units in the last place of the dtype, times the
run's scale of the quantity compared (the largest magnitude it has taken so far over
all tensors). Element-wise relative error is meaningless: torch's CPU lerp and add with
alpha use fused multiply-adds and its float32 sqrt is not correctly rounded, so the two
differ by roundings of intermediate values, which the interpolation ``y = lerp(y, z, c)``
carries into elements near zero. Measured on the rows of (a), "cpu" and "numpy", 120
steps: at most 5.8 ulp x scale (SGD, both dtypes; AdamW 2.4), so 16 leaves a margin of
three while a wrong term (decay at x instead of y, a missed bias correction, the
average's weight off by one step) is orders of magnitude above it. The host state is
computed with the same float64 operations in the same order and compared exactly.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import fastopt as fo
from cases import needs, optional_module, rel_err, sd_to_numpy, sd_to_torch

torch = optional_module("torch")
sf = optional_module("schedulefree")
needs_oracle = needs(sf, "the oracle is the schedulefree package (pip install schedulefree)")

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ULPS = 16
STEPS = 120
EVAL_AT = (30, 75)          # eval(), compare x, train() again
LR_HALVED_AT = 50
SKIP_EVERY = 7              # param 1 has no gradient at these steps
HOST_KEYS = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")

ADAMW_ROWS = {
    "defaults": {},
    "warmup-decay": dict(lr=0.01, warmup_steps=20, weight_decay=0.1),
    # beta1 = 0.5: eval's weight 1 - 1/beta1 = -1 takes torch's second lerp form
    "r-power-betas": dict(lr=0.02, betas=(0.5, 0.99), eps=1e-6, r=1.0, weight_lr_power=0.0),
    "all": dict(lr=0.01, betas=(0.3, 0.9), warmup_steps=5, weight_decay=0.01, r=0.5,
                weight_lr_power=1.0),
}
SGD_ROWS = {
    "defaults": {},
    "warmup-decay": dict(lr=0.1, warmup_steps=20, weight_decay=0.1),
    "r-power-momentum": dict(lr=0.05, momentum=0.5, r=1.0, weight_lr_power=0.0),
    "all": dict(lr=0.05, momentum=0.2, warmup_steps=5, weight_decay=0.01, r=0.5,
                weight_lr_power=1.0),
}
ROWS = [pytest.param("AdamWScheduleFree", name, row, id=f"adamw-{name}")
        for name, row in ADAMW_ROWS.items()] + \
       [pytest.param("SGDScheduleFree", name, row, id=f"sgd-{name}") for name, row in SGD_ROWS.items()]
SLOTS = {"AdamWScheduleFree": ("z", "exp_avg_sq"), "SGDScheduleFree": ("z",)}
SHAPES = [(), (1,), (3, 5), (1001,), (2, 3, 4)]
SIM_SHAPES = [(), (1,), (3, 5), (37,)]
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def _cuda_reason():
    try:
        fo._backend.get("cuda")
    except fo.BackendUnavailableError as e:
        return f"no CUDA device (NUMBA_ENABLE_CUDASIM=1 runs these under the simulator): {e}"
    if not SIM:
        return "the CUDA rows of this file run under the simulator (NumPy arrays)"
    return None


def _need(backend):
    if backend == "cuda":
        reason = _cuda_reason()
        if reason:
            pytest.skip(reason)


class Pair:
    """fastopt and the package over copies of the same arrays."""

    def __init__(self, name, hp, init, backend, mode="list", package_train=True):
        self.name = name
        arrays = [np.array(a) for a in init]
        self.flat = fo.FlatParams(arrays) if mode == "flat" else None
        self.params = self.flat.params if self.flat is not None else arrays
        self.opt = getattr(fo, name)(self.flat if self.flat is not None else arrays,
                                     backend=backend, **hp)
        self.tparams = [torch.from_numpy(np.array(a)) for a in init]
        self.topt = getattr(sf, name)(self.tparams, **hp)
        if package_train:
            self.topt.train()          # the package starts in eval mode; fastopt in train mode
        self.scales: dict = {}

    def step(self, grads):
        if self.flat is not None and all(g is not None for g in grads):
            for dst, g in zip(self.flat.grads, grads):
                dst[...] = g
            assert self.opt.step() is True
        else:
            assert self.opt.step(grads) is True
        for t, g in zip(self.tparams, grads):
            # a copy: the package divides the gradient in place
            t.grad = None if g is None else torch.from_numpy(np.array(g))
        self.topt.step()

    def eval(self):
        self.opt.eval()
        self.topt.eval()

    def train(self):
        self.opt.train()
        self.topt.train()

    def set_lr(self, factor):
        for g, tg in zip(self.opt.param_groups, self.topt.param_groups):
            g["lr"] *= factor
            tg["lr"] *= factor

    def compare(self, when, dtype):
        """Params, state and host state against the package (see the module doc)."""
        quantities = {"params": ([np.asarray(p) for p in self.params],
                                 [t.numpy() for t in self.tparams])}
        state = self.opt.state
        for key in SLOTS[self.name]:
            mine = [state[i][key] if i in state else None for i in range(len(self.params))]
            theirs = [self.topt.state[t][key].numpy() if key in self.topt.state[t] else None
                      for t in self.tparams]
            assert [m is None for m in mine] == [t is None for t in theirs], f"{when}: {key} presence"
            quantities[key] = ([m for m in mine if m is not None], [t for t in theirs if t is not None])
        tol = ULPS * np.finfo(dtype).eps
        for what, (mine, theirs) in quantities.items():
            top = max([float(np.max(np.abs(t))) for t in theirs if t.size] + [0.0])
            scale = self.scales[what] = max(self.scales.get(what, 0.0), top)
            for i, (a, b) in enumerate(zip(mine, theirs)):
                assert a.dtype == dtype and a.shape == b.shape, f"{when}: {what}[{i}]"
                err = float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))
                assert err <= tol * scale, \
                    f"{when}: {what}[{i}] differs by {err:.3g} > {ULPS} ulp x scale {scale:.3g}"
        for g, tg in zip(self.opt.param_groups, self.topt.param_groups):
            for key in HOST_KEYS:
                assert g[key] == tg[key], f"{when}: group {key} {g[key]!r} != package {tg[key]!r}"


def _grads(shapes, dtype, rng, step):
    out = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if step % SKIP_EVERY == 0:
        out[1] = None
    return out


def _run(name, hp, shapes, dtype, backend, mode="list", steps=STEPS):
    rng = np.random.default_rng(_seed(name, sorted(hp.items()), np.dtype(dtype), backend))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    pair = Pair(name, hp, init, backend, mode)
    for step in range(1, steps + 1):
        pair.step(_grads(shapes, dtype, rng, step))
        pair.compare(f"{backend} step {step}", dtype)
        if step == LR_HALVED_AT:
            pair.set_lr(0.5)
        if step in EVAL_AT:
            pair.eval()
            pair.compare(f"{backend} eval() after step {step}", dtype)
            pair.train()
            pair.compare(f"{backend} train() after step {step}", dtype)
    pair.eval()
    pair.compare(f"{backend} final eval()", dtype)
    assert all(not g["train_mode"] for g in pair.opt.param_groups)
    moved = [not np.array_equal(p, a) for p, a in zip(pair.params, init)]
    assert all(moved), f"params that moved: {moved}"
    return pair


# -- (a) against the package ---------------------------------------------------------------
@needs_oracle
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,row_name,row", ROWS)
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_equals_the_package(backend, name, row_name, row, dtype):
    _run(name, row, SHAPES, dtype, backend)


@needs_oracle
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,row_name,row", [ROWS[0], ROWS[3], ROWS[4], ROWS[7]])
def test_equals_the_package_on_cuda(name, row_name, row, dtype):
    _need("cuda")
    _run(name, row, SIM_SHAPES, dtype, "cuda")


# -- (b) many small tensors, FlatParams --------------------------------------------------------
@needs_oracle
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_thousands_of_small_tensors_and_flat_params(name):
    shapes = [(k % 5 + 1,) for k in range(2000)] + [(), (70001,)]
    hp = dict(ADAMW_ROWS if name.startswith("AdamW") else SGD_ROWS)["all"]
    rng = np.random.default_rng(_seed("many", name))
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    pairs = [Pair(name, hp, init, "cpu", mode) for mode in ("list", "flat")]
    for step in range(1, 101):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for pair in pairs:
            pair.step(grads)
        if step == 50:
            for pair in pairs:
                pair.eval()
            pairs[0].compare("eval() after step 50", np.float32)
            for pair in pairs:
                pair.train()
    pairs[0].compare("after 100 steps", np.float32)
    lst, flat = pairs
    for a, b in zip(lst.params, flat.params):
        assert a.tobytes() == b.tobytes(), "list and FlatParams modes differ"
    for i in range(len(shapes)):
        for key in SLOTS[name]:
            assert lst.opt.state[i][key].tobytes() == flat.opt.state[i][key].tobytes()


# -- (c) state dicts both ways ---------------------------------------------------------------
@needs_oracle
@pytest.mark.parametrize("saved_in", ["train", "eval"])
@pytest.mark.parametrize("direction", ["package-to-fastopt", "fastopt-to-package"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
@pytest.mark.parametrize("backend", ["cpu", "numpy", "cuda"])
def test_state_dicts_load_both_ways(backend, name, direction, saved_in):
    _need(backend)
    dtype = np.float32
    shapes = [(), (1,), (3, 5), (23,)]
    hp = dict(ADAMW_ROWS if name.startswith("AdamW") else SGD_ROWS)["all"]
    rng = np.random.default_rng(_seed("sd", name, direction, saved_in, backend))
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    first = Pair(name, hp, init, backend)
    for step in range(1, 21):
        first.step(_grads(shapes, dtype, rng, step))
    if saved_in == "eval":
        first.eval()
    # the package and fastopt keep the same group keys (fastopt's add the package's foreach)
    assert set(first.opt.state_dict()["param_groups"][0]) == set(first.topt.state_dict()["param_groups"][0])
    # a fresh pair over the saved params; one side loads the other's state dict
    values = [t.numpy().copy() for t in first.tparams]
    second = Pair(name, hp, values, backend, package_train=False)
    if direction == "package-to-fastopt":
        second.opt.load_state_dict(sd_to_numpy(first.topt.state_dict()))
        second.topt.load_state_dict(first.topt.state_dict())
    else:
        sd = first.opt.state_dict()
        second.opt.load_state_dict(sd)
        second.topt.load_state_dict(sd_to_torch(sd))
    second.compare("after loading", dtype)
    assert second.opt.param_groups[0]["train_mode"] is (saved_in == "train")
    if saved_in == "eval":
        with pytest.raises(RuntimeError, match="eval mode"):
            second.opt.step([np.ones(s, dtype) for s in shapes])
        second.train()
    for step in range(21, 41):
        second.step(_grads(shapes, dtype, rng, step))
        second.compare(f"step {step} after loading", dtype)
    second.eval()
    second.compare("eval() after loading", dtype)


@needs_oracle
def test_a_package_state_dict_with_no_state_yet_loads_in_eval_mode():
    """A new package optimizer is in eval mode: its state dict says so, and fastopt then
    refuses to step until train(), as the package does."""
    p = [np.ones(3, np.float32)]
    topt = sf.AdamWScheduleFree([torch.ones(3)])
    opt = fo.AdamWScheduleFree(p)
    opt.load_state_dict(sd_to_numpy(topt.state_dict()))
    with pytest.raises(RuntimeError, match="train"):
        opt.step([np.ones(3, np.float32)])
    opt.train()
    assert opt.step([np.ones(3, np.float32)]) is True


# -- (d) the train/eval contract -----------------------------------------------------------------
def _snapshot(opt, params):
    state = {i: {k: np.array(v).tobytes() for k, v in st.items()} for i, st in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [np.array(p).tobytes() for p in params], state, groups


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
@pytest.mark.parametrize("backend", ["cpu", "numpy", "cuda"])
def test_step_in_eval_mode_raises_and_changes_nothing(name, backend):
    _need(backend)
    params = [np.linspace(-1, 1, 7).astype(np.float32), np.ones((2, 3), np.float32)]
    opt = getattr(fo, name)([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, backend=backend)
    grads = [np.full(p.shape, 0.5, np.float32) for p in params]
    opt.step(grads)
    opt.eval()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\].*eval mode"):
        opt.step(grads)
    assert _snapshot(opt, params) == before
    # one group back in train mode is not enough: the other one would step x as y
    opt.param_groups[0]["train_mode"] = True
    with pytest.raises(RuntimeError, match=r"param_groups\[1\].*eval mode"):
        opt.step(grads)
    opt.param_groups[0]["train_mode"] = False
    assert _snapshot(opt, params) == before
    opt.train()
    assert opt.step(grads) is True and opt.param_groups[1]["k"] == 2


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
@pytest.mark.parametrize("backend", ["cpu", "numpy", "cuda"])
def test_switches_are_idempotent_and_never_write_z(name, backend):
    _need(backend)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float64) for s in [(5,), (), (4, 3)]]
    untouched = params[2].copy()
    opt = getattr(fo, name)(params, lr=0.05, backend=backend)
    opt.eval()
    opt.train()                     # no state yet: nothing moves, only the mode flips
    assert opt.param_groups[0]["train_mode"] is True
    for _ in range(5):
        opt.step([rng.standard_normal(p.shape) for p in params[:2]] + [None])
    y = [p.copy() for p in params]
    z = [opt.state[i]["z"].copy() for i in range(2)]
    assert 2 not in opt.state
    opt.eval()
    x = [p.copy() for p in params]
    opt.eval()
    assert all(np.array_equal(a, b) for a, b in zip(params, x)), "a second eval() moved the params"
    assert not np.array_equal(x[0], y[0])
    assert np.array_equal(params[2], untouched), "a param without state was switched"
    opt.train()
    opt.train()
    for a, b in zip(params, y):
        assert rel_err(a, b) < 1e-14, "eval() then train() did not give y back"
    for i in range(2):
        assert opt.state[i]["z"].tobytes() == z[i].tobytes(), "a switch wrote z"
    # y = (1 - beta) z + beta x
    beta = opt.param_groups[0]["betas"][0] if "betas" in opt.param_groups[0] else opt.param_groups[0]["momentum"]
    for i in range(2):
        np.testing.assert_allclose((1 - beta) * z[i] + beta * x[i], y[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_a_skipped_step_leaves_the_host_state(name):
    params = [np.ones(4, np.float32)]
    opt = getattr(fo, name)(params, lr=0.1, warmup_steps=3)
    opt.step([np.ones(4, np.float32)])
    before = _snapshot(opt, params)
    assert opt.step([np.array([1, np.inf, 0, 0], np.float32)], grad_scale=0.5) is False
    assert _snapshot(opt, params) == before
    with pytest.raises(ValueError):
        opt.step([np.ones(3, np.float32)])          # a wrong shape: refused, nothing changes
    assert _snapshot(opt, params) == before
    assert opt.step([np.ones(4, np.float32)]) is True
    g = opt.param_groups[0]
    assert g["k"] == 2 and g["scheduled_lr"] == pytest.approx(0.1 * 2 / 3)


def test_eval_with_beta_zero_refuses_before_changing_anything():
    params = [np.ones(3), np.ones(2)]
    opt = fo.AdamWScheduleFree([{"params": params[:1]}, {"params": params[1:], "betas": (0.0, 0.9)}],
                               lr=0.1)
    opt.step([np.ones(3), np.ones(2)])
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*betas\[0\]"):
        opt.eval()
    assert _snapshot(opt, params) == before


def test_bad_group_host_state_is_refused():
    opt = fo.SGDScheduleFree([np.ones(3)], lr=0.1)
    for key, bad in [("k", -1), ("k", 1.5), ("weight_sum", -1.0), ("train_mode", 1),
                     ("warmup_steps", 2.5), ("momentum", 0.0), ("momentum", 1.0)]:
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        with pytest.raises((TypeError, ValueError), match=key):
            opt.step([np.ones(3)])
        opt.param_groups[0][key] = old
    with pytest.raises(TypeError, match="k"):
        fo.SGDScheduleFree([np.ones(3)], k=3)       # host state is no constructor argument
    assert opt.step([np.ones(3)]) is True


def _low_dtypes():
    from fastopt.kernels.lowp import bfloat16_dtype
    bf16 = bfloat16_dtype()
    return [pytest.param(np.dtype(np.float16), id="float16"),
            pytest.param(bf16, id="bfloat16", marks=pytest.mark.skipif(bf16 is None, reason="needs ml_dtypes"))]


@pytest.mark.parametrize("dtype", _low_dtypes())
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_master_weights_switch_their_masters(name, dtype):
    """16-bit params with float32 master weights: eval()/train() switch the masters (as
    the float32 run does) and the params are their masters rounded, on "cpu" and "numpy"."""
    rng = np.random.default_rng(_seed("mw", name))
    init = [rng.standard_normal(n).astype(np.float32) for n in (300, 7)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(6)]
    masters = {}
    for backend in ("cpu", "numpy"):
        p16 = [a.astype(dtype) for a in init]
        opt = getattr(fo, name)(p16, lr=0.05, master_weights=True, backend=backend)
        f32 = getattr(fo, name)([a.astype(dtype).astype(np.float32) for a in init], lr=0.05,
                                backend="numpy")
        for k, row in enumerate(grads):
            opt.step([g.astype(dtype) for g in row])
            f32.step([g.astype(dtype).astype(np.float32) for g in row])
            if k == 3:
                opt.eval()
                f32.eval()
                for i, p in enumerate(p16):
                    m = opt.state[i]["master_param"]
                    assert np.array_equal(p, m.astype(dtype)), "params are not their masters rounded"
                    assert rel_err(m, f32.param_groups[0]["params"][i]) < 1e-6
                opt.train()
                f32.train()
        masters[backend] = [opt.state[i]["master_param"].copy() for i in range(2)]
        for i, p in enumerate(p16):
            assert rel_err(masters[backend][i], f32.param_groups[0]["params"][i]) < 1e-6
    for a, b in zip(masters["cpu"], masters["numpy"]):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_low_bit_z_switches_as_the_reference(name, fmt):
    """``z`` in bfloat16 or int8 (state_format): the switch decodes it and leaves it as it
    is; "cpu" and "numpy" give the same params after eval() and train()."""
    pytest.importorskip("ml_dtypes", reason="bfloat16 state needs ml_dtypes")
    rng = np.random.default_rng(_seed("lowbit", name, fmt))
    init = [rng.standard_normal(n).astype(np.float32) for n in (5000, 9)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(4)]
    runs = {}
    for backend in ("cpu", "numpy"):
        params = [a.copy() for a in init]
        opt = getattr(fo, name)(params, lr=0.05, backend=backend, state_format=fmt)
        for row in grads:
            opt.step(row)
        z = {k: np.array(v).tobytes() for k, v in opt.state[0].items()}
        opt.eval()
        x = [p.copy() for p in params]
        assert {k: np.array(v).tobytes() for k, v in opt.state[0].items()} == z, "eval() wrote z"
        opt.train()
        runs[backend] = (x, [p.copy() for p in params])
    for a, b in zip(runs["cpu"][0] + runs["cpu"][1], runs["numpy"][0] + runs["numpy"][1]):
        assert rel_err(a, b) < 1e-6
