"""GradScaler: torch.amp.GradScaler's scale sequence, the fused step, state dicts, bad input."""
import inspect
import math

import numpy as np
import pytest

import fastopt as fo
from fastopt.amp import GradScaler

torch = pytest.importorskip("torch")

# A scripted run: True = the iteration's gradients hold an inf (or NaN).
SCRIPT = ([False] * 5 + [True] + [False] * 3 + [True, True] + [False] * 7 + [True]
          + [False] * 12 + [True] * 3 + [False] * 4)


def _torch_scales(script, grad_value=np.inf, scaler=None, **kw):
    """The scale after each update of torch's CPU GradScaler driven through a real optimizer."""
    p = torch.nn.Parameter(torch.full((4,), 1e-3))     # small: the scaled loss stays finite
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = scaler or torch.amp.GradScaler("cpu", **kw)
    scales, trackers = [], []
    for bad in script:
        opt.zero_grad()
        loss = scaler.scale((p * p).sum())
        loss.backward()
        if bad:
            p.grad[1] = grad_value
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler.state_dict()["_growth_tracker"])
    return scales, trackers, scaler.state_dict()


class _FakeOptimizer:
    """The optimizer side of the contract: step(grads, *, grad_scale) -> False on non-finite."""

    def __init__(self):
        self.calls = []

    def step(self, grads=None, *, grad_scale=None):
        self.calls.append(grad_scale)
        return all(np.isfinite(g).all() for g in grads)


def _fastopt_scales(script, grad_value=np.inf, **kw):
    opt = _FakeOptimizer()
    scaler = GradScaler(**kw)
    scales, trackers = [], []
    for bad in script:
        scaler.scale(np.float32(1.0))
        g = np.ones(4, np.float32)
        if bad:
            g[1] = grad_value
        applied = scaler.step(opt, [g])
        assert applied is (not bad)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler.state_dict()["_growth_tracker"])
    return scales, trackers, scaler.state_dict(), opt


@pytest.mark.parametrize("kw", [
    dict(),
    dict(growth_interval=3),
    dict(init_scale=1000.3, growth_factor=1.7, backoff_factor=0.3, growth_interval=2),
    dict(init_scale=3e38, growth_interval=1),            # growth would overflow float32
], ids=["defaults", "interval3", "odd-factors", "overflow"])
@pytest.mark.parametrize("bad_value", [np.inf, np.nan], ids=["inf", "nan"])
def test_scale_sequence_matches_torch(kw, bad_value):
    t_scales, t_trackers, t_sd = _torch_scales(SCRIPT, bad_value, **kw)
    f_scales, f_trackers, f_sd, opt = _fastopt_scales(SCRIPT, bad_value, **kw)
    assert f_scales == t_scales                     # exact: float32 arithmetic as torch
    assert f_trackers == t_trackers
    assert f_sd == t_sd
    assert len(set(t_scales)) > 2                    # the script exercised growth and backoff
    # Every step got torch's inverse scale: float32(1 / scale) of the scale before the step.
    before = [float(np.float32(kw.get("init_scale", 2.0 ** 16)))] + t_scales[:-1]
    assert opt.calls == [float(np.float32(1.0 / s)) for s in before]


def test_update_found_inf_override_and_manual_scale():
    s = GradScaler(init_scale=8.0, growth_interval=2)
    s.update(found_inf=False)
    assert s.state_dict()["_growth_tracker"] == 1
    s.update(found_inf=False)
    assert s.get_scale() == 16.0 and s.state_dict()["_growth_tracker"] == 0
    s.update(found_inf=True)
    assert s.get_scale() == 8.0
    s.update(new_scale=3.0)
    assert s.get_scale() == 3.0
    s.update(new_scale=np.array(5.0))
    assert s.get_scale() == 5.0
    with pytest.raises(RuntimeError, match="No inf checks"):
        s.update()


def test_step_twice_without_update_raises():
    s, opt = GradScaler(), _FakeOptimizer()
    s.step(opt, [np.ones(2, np.float32)])
    with pytest.raises(RuntimeError, match="already been called"):
        s.step(opt, [np.ones(2, np.float32)])
    s.update()
    s.step(opt, [np.ones(2, np.float32)])       # a new iteration may step again


def test_two_optimizers_one_inf_backs_off():
    s, a, b = GradScaler(init_scale=4.0), _FakeOptimizer(), _FakeOptimizer()
    assert s.step(a, [np.ones(2, np.float32)]) is True
    assert s.step(b, [np.array([1.0, np.inf], np.float32)]) is False
    s.update()
    assert s.get_scale() == 2.0


def test_scale_outputs():
    s = GradScaler(init_scale=4.0)
    assert s.scale(1.5) == 6.0
    out = s.scale(np.array([1.0, 2.0], np.float16))
    assert out.dtype == np.float16 and out.tolist() == [4.0, 8.0]
    a, b = s.scale((np.float32(1), np.float64(2)))
    assert a == 4 and b == 8 and a.dtype == np.float32
    t = s.scale(torch.tensor(2.0))
    assert float(t) == 8.0
    off = GradScaler(enabled=False)
    x = np.ones(3)
    assert off.scale(x) is x and off.get_scale() == 1.0 and off.state_dict() == {}


def test_disabled_step_passes_through():
    s, opt = GradScaler(enabled=False), _FakeOptimizer()
    s.step(opt, [np.array([np.inf], np.float32)])
    assert opt.calls == [None]          # plain step, no grad_scale
    s.update()                          # no-op


def test_state_dict_roundtrip_and_torch_interop(tmp_path):
    _, _, t_sd = _torch_scales(SCRIPT[:12], growth_interval=3)
    assert t_sd["_growth_tracker"] != 0                # a mid-interval state
    s = GradScaler()
    s.load_state_dict(t_sd)                             # torch's dict loads as is
    assert s.state_dict() == t_sd
    fo.save(tmp_path / "scaler.npz", s.state_dict())
    r = GradScaler()
    r.load_state_dict(fo.load(tmp_path / "scaler.npz"))
    assert r.state_dict() == t_sd
    # ... and continues exactly like torch's scaler resumed from the same dict.
    ts = torch.amp.GradScaler("cpu")
    ts.load_state_dict(t_sd)
    rest = SCRIPT[12:]
    t_scales, t_trackers, _ = _torch_scales(rest, scaler=ts)
    opt = _FakeOptimizer()
    seq = []
    for bad in rest:
        r.step(opt, [np.array([np.inf if bad else 1.0], np.float32)])
        r.update()
        seq.append((r.get_scale(), r.state_dict()["_growth_tracker"]))
    assert seq == list(zip(t_scales, t_trackers))


@pytest.mark.parametrize("bad,err", [
    ({}, RuntimeError),
    ({"scale": 1.0}, ValueError),
    ({"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 5, "_growth_tracker": 0}, ValueError),
    ({"scale": 1.0, "growth_factor": 0.5, "backoff_factor": 0.5, "growth_interval": 5, "_growth_tracker": 0}, ValueError),
    ({"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2.5, "_growth_tracker": 0}, TypeError),
    ({"scale": 1.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 5, "_growth_tracker": -1}, ValueError),
])
def test_load_state_dict_rejects_bad_input_atomically(bad, err):
    s = GradScaler(init_scale=8.0)
    before = s.state_dict()
    with pytest.raises(err):
        s.load_state_dict(bad)
    assert s.state_dict() == before


@pytest.mark.parametrize("kw,err", [
    (dict(growth_factor=1.0), ValueError),
    (dict(backoff_factor=1.0), ValueError),
    (dict(backoff_factor=0.0), ValueError),
    (dict(init_scale=0.0), ValueError),
    (dict(init_scale=float("nan")), ValueError),
    (dict(growth_interval=0), ValueError),
    (dict(growth_interval=2.0), TypeError),
    (dict(enabled=1), TypeError),
])
def test_constructor_rejects_bad_arguments(kw, err):
    with pytest.raises(err):
        GradScaler(**kw)


def test_unscale_then_clip_then_step():
    """unscale_ for code that needs unscaled grads (clipping); step then does not unscale."""
    s, opt = GradScaler(init_scale=4.0), _FakeOptimizer()
    g = np.array([4.0, 8.0], np.float32)
    assert s.unscale_(opt, [g]) is True
    np.testing.assert_array_equal(g, [1.0, 2.0])
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt, [g])
    assert s.step(opt, [g]) is True
    assert opt.calls == [None]
    s.update()
    bad = np.array([np.inf, 1.0], np.float32)
    assert s.unscale_(opt, [bad]) is False
    assert s.step(opt, [bad]) is False
    assert opt.calls == [None]                     # skipped: the optimizer was not called
    s.update()
    assert s.get_scale() == 2.0


_HAS_GRAD_SCALE = "grad_scale" in inspect.signature(fo.Adam.step).parameters


@pytest.mark.skipif(not _HAS_GRAD_SCALE, reason="Optimizer.step(grad_scale=) not available")
@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
def test_with_fastopt_adam(flat):
    """Through the real fused step: skipped steps change nothing, applied ones equal an
    unscaled step (power-of-two scales make the unscaling exact)."""
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in [(7, 3), (70_000,)]]
    ref_params = [a.copy() for a in init]
    ref = fo.Adam(ref_params, lr=1e-2)
    if flat:
        fp = fo.FlatParams(init)
        params, opt = fp.params, fo.Adam(fp, lr=1e-2)
    else:
        params = [a.copy() for a in init]
        opt = fo.Adam(params, lr=1e-2)
    scaler = GradScaler(init_scale=2.0 ** 10, growth_interval=2)
    for it, bad in enumerate([False, True, False, False, True, False]):
        grads = [rng.standard_normal(a.shape).astype(np.float32) for a in init]
        scaled = [g * np.float32(scaler.get_scale()) for g in grads]
        if bad:
            scaled[it % 2].reshape(-1)[3] = np.inf
        before = [p.copy() for p in params]
        state_before = {i: {k: np.array(v, copy=True) for k, v in st.items()} for i, st in opt.state.items()}
        if flat:
            for dst, src in zip(fp.grads, scaled):
                dst[...] = src
            applied = scaler.step(opt)
        else:
            applied = scaler.step(opt, scaled)
        scaler.update()
        assert applied is (not bad)
        if bad:
            for p, b in zip(params, before):
                assert p.tobytes() == b.tobytes()
            for i, st in opt.state.items():
                for k, v in st.items():
                    assert np.asarray(v).tobytes() == state_before[i][k].tobytes()
        else:
            ref.step(grads)
            for p, r in zip(params, ref_params):
                np.testing.assert_array_equal(p, r)
    assert scaler.get_scale() != 2.0 ** 10
    assert math.isfinite(scaler.get_scale())
