"""Fused extras of the step: grad_scale (unscale + skip on non-finite) and max_grad_norm."""
import numpy as np
import pytest

import fastopt as fo

SHAPES = [(0,), (1,), (3, 4), (70_001,)]
OPTIMIZERS = [
    (fo.SGD, dict(lr=0.1, momentum=0.9)),
    (fo.Adagrad, dict(lr=0.1)),
    (fo.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (fo.Adam, dict(lr=0.01, amsgrad=True)),
    (fo.AdamW, dict(lr=0.01)),
]
IDS = [c.__name__ for c, _ in OPTIMIZERS]


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _grads(rng, dtype=np.float32, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


def _snapshot(opt, params):
    return [p.tobytes() for p in params], {i: {k: np.array(v).tobytes() for k, v in st.items()}
                                           for i, st in opt.state.items()}


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_fused_clipping_equals_clip_then_step(cls, kw, backend):
    fused_p, plain_p = _params(), _params()
    fused = cls(fused_p, max_grad_norm=0.5, backend=backend, **kw)
    plain = cls(plain_p, backend=backend, **kw)
    rng = np.random.default_rng(1)
    for _ in range(10):
        grads = _grads(rng)
        fused.step(grads)
        clipped = [g.copy() for g in grads]
        norm = fo.clip_grad_norm(clipped, 0.5, backend=backend)
        plain.step(clipped)
        assert fused.last_grad_norm == pytest.approx(norm, rel=1e-12)
    for a, b in zip(fused_p, plain_p):
        np.testing.assert_array_equal(a, b)     # same coefficient, same rounding: same bits


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_fused_clipping_matches_torch(cls, kw):
    torch = pytest.importorskip("torch")
    tcls = getattr(torch.optim, cls.__name__)
    ps = _params()
    tp = [torch.tensor(p.copy()) for p in ps]
    opt = cls(ps, max_grad_norm=1.0, **kw)
    topt = tcls(tp, **kw)
    rng = np.random.default_rng(2)
    for _ in range(30):
        grads = _grads(rng)
        opt.step(grads)
        for t, g in zip(tp, grads):
            t.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tp, 1.0)
        topt.step()
    for p, t in zip(ps, tp):
        ref = t.numpy()
        assert np.linalg.norm(p - ref) <= 1e-6 * max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_nonfinite_grad_skips_whole_step(cls, kw, bad, backend):
    ps = _params()
    opt = cls(ps, backend=backend, **kw)
    rng = np.random.default_rng(3)
    assert opt.step(_grads(rng, scale=1024.0), grad_scale=1 / 1024) is True
    before = _snapshot(opt, ps)
    sd_before = opt.state_dict()
    grads = _grads(rng, scale=1024.0)
    grads[-1][12345] = bad                      # one bad element in the last tensor
    assert opt.step(grads, grad_scale=1 / 1024) is False
    assert _snapshot(opt, ps) == before
    sd_after = opt.state_dict()
    for i in sd_before["state"]:
        for k, v in sd_before["state"][i].items():
            np.testing.assert_array_equal(v, sd_after["state"][i][k])


def test_skipped_first_step_creates_no_state():
    ps = _params()
    opt = fo.Adam(ps)
    grads = _grads(np.random.default_rng(4))
    grads[2][0, 0] = np.nan
    assert opt.step(grads, grad_scale=1.0) is False
    assert opt.state == {} and opt.state_dict()["state"] == {}


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_grad_scale_unscales_in_the_kernel(cls, kw):
    """step(scale * g, grad_scale=1/scale) with a power-of-two scale equals step(g) exactly."""
    a, b = _params(), _params()
    oa, ob = cls(a, **kw), cls(b, **kw)
    rng = np.random.default_rng(5)
    for _ in range(5):
        grads = _grads(rng)
        oa.step(grads)
        ob.step([g * np.float32(65536.0) for g in grads], grad_scale=1 / 65536)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_grad_scale_and_max_grad_norm_are_validated():
    ps = _params()
    with pytest.raises(ValueError, match="max_grad_norm"):
        fo.Adam(ps, max_grad_norm=0.0)
    opt = fo.Adam(ps)
    before = [p.copy() for p in ps]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_scale"):
            opt.step(_grads(np.random.default_rng(6)), grad_scale=bad)
    for p, q in zip(ps, before):
        np.testing.assert_array_equal(p, q)
