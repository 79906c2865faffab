"""EMA: the fused update against NumPy and torch's lerp, swap, warmup, state, bad input."""
import numpy as np
import pytest

import fastopt as fo
from fastopt.ema import EMA

SHAPES = [(0,), (3,), (17, 5), (70_001,)]   # 70_001: more than one chunk


def _arrays(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _run(ema, params, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for p in params:
            p += rng.standard_normal(p.shape).astype(p.dtype)
        ema.update()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "num_updates"])
def test_cpu_list_and_flat_match_numpy_bitwise(dtype, warmup):
    init = _arrays(0, dtype)
    ref_params = [a.copy() for a in init]
    lst_params = [a.copy() for a in init]
    flat = fo.FlatParams(init)
    ref = EMA(ref_params, decay=0.9, use_num_updates=warmup, backend="numpy")
    lst = EMA(lst_params, decay=0.9, use_num_updates=warmup, backend="cpu")
    fl = EMA(flat, decay=0.9, use_num_updates=warmup, backend="cpu")
    for ema, params in ((ref, ref_params), (lst, lst_params), (fl, flat.params)):
        _run(ema, params, 6, seed=1)
    for r, a, b in zip(ref.shadow, lst.shadow, fl.shadow):
        assert r.tobytes() == a.tobytes() == b.tobytes()
    assert not np.array_equal(ref.shadow[2], ref_params[2])      # it averaged something


def test_matches_torch_lerp_and_formula():
    torch = pytest.importorskip("torch")
    init = _arrays(2)
    params = [a.copy() for a in init]
    ema = EMA(params, decay=0.75)
    t_shadow = [torch.tensor(a) for a in init]
    rng = np.random.default_rng(3)
    for _ in range(5):
        for p in params:
            p += rng.standard_normal(p.shape).astype(np.float32)
        ema.update()
        torch._foreach_lerp_(t_shadow, [torch.tensor(p) for p in params], 1 - 0.75)
    for s, t in zip(ema.shadow, t_shadow):
        # torch's vectorised lerp fuses multiply-adds: agreement to the last bit or two.
        np.testing.assert_allclose(s, t.numpy(), rtol=2e-6, atol=1e-6)
    # The textbook form decay * s + (1 - decay) * p, in float64 from scratch.
    params64 = [a.astype(np.float64) for a in init]
    shadow64 = [a.copy() for a in params64]
    rng = np.random.default_rng(3)
    for _ in range(5):
        for p in params64:
            p += rng.standard_normal(p.shape).astype(np.float32)
        for s, p in zip(shadow64, params64):
            s *= 0.75
            s += 0.25 * p
    for s, r in zip(ema.shadow, shadow64):
        np.testing.assert_allclose(s, r, rtol=1e-5, atol=1e-5)


def test_warmup_decay_schedule():
    ema = EMA([np.zeros(3, np.float32)], decay=0.99, use_num_updates=True)
    seen = []
    for _ in range(2000):
        seen.append(ema.current_decay())
        ema.update()
    assert seen[0] == pytest.approx(0.1) and seen[1] == pytest.approx(2 / 11)
    assert seen[-1] == 0.99 and all(a <= b for a, b in zip(seen, seen[1:]))
    # Update 0 with decay 0.1 pulls the shadow 90% of the way to the weights.
    p = np.full(4, 10.0, np.float32)
    e = EMA([p], decay=0.999, use_num_updates=True)
    p[...] = 20.0
    e.update()
    np.testing.assert_allclose(e.shadow[0], 19.0, rtol=1e-6)


@pytest.mark.parametrize("flat", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_swap_exchanges_and_twice_restores(flat, backend):
    init = _arrays(4)
    if flat:
        fp = fo.FlatParams(init)
        params, ema = fp.params, EMA(fp, decay=0.5, backend=backend)
    else:
        params = [a.copy() for a in init]
        ema = EMA(params, decay=0.5, backend=backend)
    _run(ema, params, 3, seed=5)
    model = [p.copy() for p in params]
    avg = [s.copy() for s in ema.shadow]
    ema.swap()
    for p, s, m, a in zip(params, ema.shadow, model, avg):
        assert p.tobytes() == a.tobytes() and s.tobytes() == m.tobytes()
    with pytest.raises(RuntimeError, match="swapped"):
        ema.update()
    ema.swap()
    for p, s, m, a in zip(params, ema.shadow, model, avg):
        assert p.tobytes() == m.tobytes() and s.tobytes() == a.tobytes()
    with ema.averaged():
        assert all(p.tobytes() == a.tobytes() for p, a in zip(params, avg))
    assert all(p.tobytes() == m.tobytes() for p, m in zip(params, model))


def test_decay_edges_and_copy_to():
    p = np.arange(4, dtype=np.float32)
    e1 = EMA([p], decay=1.0)
    p += 5
    e1.update()
    np.testing.assert_array_equal(e1.shadow[0], np.arange(4))      # decay 1: frozen
    e0 = EMA([p], decay=0.0)
    p += 5
    e0.update()
    np.testing.assert_array_equal(e0.shadow[0], p)                  # decay 0: follows
    out = [np.zeros(4, np.float32)]
    e1.copy_to(out)
    np.testing.assert_array_equal(out[0], np.arange(4))
    e1.copy_to()
    np.testing.assert_array_equal(p, np.arange(4))


def test_mixed_dtypes():
    a, b = np.ones(5, np.float32), np.ones(7, np.float64)
    ema = EMA([a, b], decay=0.5)
    a[...] = 3
    b[...] = 5
    ema.update()
    np.testing.assert_array_equal(ema.shadow[0], 2.0)
    np.testing.assert_array_equal(ema.shadow[1], 3.0)
    assert ema.shadow[0].dtype == np.float32 and ema.shadow[1].dtype == np.float64


def test_state_dict_checkpoint_resume_bit_for_bit(tmp_path):
    init = _arrays(6)
    a_params = [x.copy() for x in init]
    a = EMA(a_params, decay=0.9, use_num_updates=True)
    _run(a, a_params, 3, seed=7)
    fo.save(tmp_path / "ema.npz", a.state_dict())
    b_params = [x.copy() for x in a_params]
    b = EMA(b_params, decay=0.5)
    b.load_state_dict(fo.load(tmp_path / "ema.npz"))
    assert b.decay == 0.9 and b.use_num_updates and b.num_updates == 3
    _run(a, a_params, 4, seed=8)
    _run(b, b_params, 4, seed=8)
    for x, y in zip(a.shadow, b.shadow):
        assert x.tobytes() == y.tobytes()


def test_load_state_dict_rejects_bad_input_atomically():
    ema = EMA([np.ones(3, np.float32)], decay=0.9)
    good = ema.state_dict()
    bad_cases = [
        ({**good, "shadow": [np.ones(4)]}, ValueError),
        ({**good, "shadow": []}, ValueError),
        ({**good, "decay": 1.5}, ValueError),
        ({**good, "num_updates": -1}, ValueError),
        ({k: v for k, v in good.items() if k != "shadow"}, ValueError),
        ({**good, "shadow": [np.ones(3, np.int32)]}, TypeError),
    ]
    for sd, err in bad_cases:
        with pytest.raises(err):
            ema.load_state_dict(sd)
        assert ema.decay == 0.9 and ema.num_updates == 0
        np.testing.assert_array_equal(ema.shadow[0], 1.0)


@pytest.mark.parametrize("args,kw,err", [
    (([np.ones(3, np.float32)],), dict(decay=1.5), ValueError),
    (([np.ones(3, np.float32)],), dict(decay=True), TypeError),
    (([np.ones(3, np.int64)],), {}, TypeError),
    ((np.ones(3, np.float32),), {}, TypeError),
    (([],), {}, ValueError),
    (([np.ones((3, 4), np.float32)[:, 1]],), {}, ValueError),
    (([np.ones(3, np.float32)],), dict(backend="gpu"), ValueError),
])
def test_bad_arguments(args, kw, err):
    with pytest.raises(err):
        EMA(*args, **kw)


def test_same_array_twice_rejected():
    a = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="same array"):
        EMA([a, a])
