"""16-bit params with float32 master weights: rounding, parity, skip, checkpoints."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt as fo

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
LOW = [np.dtype(np.float16), BF16]
SHAPES = [(0,), (1,), (3, 5), (70_001,)]
OPTIMIZERS = [
    (fo.SGD, dict(lr=0.05, momentum=0.9)),
    (fo.Adagrad, dict(lr=0.05)),
    (fo.RMSprop, dict(lr=0.01, centered=True)),
    (fo.Adam, dict(lr=0.01)),
    (fo.AdamW, dict(lr=0.01, amsgrad=True)),
]
IDS = [c.__name__ for c, _ in OPTIMIZERS]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES], rng


# Every optimizer in float16, two in bfloat16 (the rounding is what differs between the two kinds).
COMBOS = [(np.dtype(np.float16), c, k) for c, k in OPTIMIZERS] + [
    (BF16, c, k) for c, k in OPTIMIZERS if c in (fo.SGD, fo.AdamW)]


@pytest.mark.parametrize("dtype,cls,kw", COMBOS,
                         ids=[f"{d}-{c.__name__}" for d, c, _ in COMBOS])
def test_cpu_list_and_flat_match_reference_bit_for_bit(dtype, cls, kw):
    init, rng = _data(dtype)
    lst, ref = [p.copy() for p in init], [p.copy() for p in init]
    flat = fo.FlatParams([p.copy() for p in init])
    o_lst = cls(lst, master_weights=True, **kw)
    o_ref = cls(ref, master_weights=True, backend="numpy", **kw)
    o_flat = cls(flat, master_weights=True, **kw)
    for _ in range(12):
        grads = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]
        o_lst.step(grads)
        o_ref.step(grads)
        for fg, g in zip(flat.grads, grads):
            fg[...] = g
        o_flat.step()
    for i, (a, b, c) in enumerate(zip(lst, ref, flat.params)):
        master = o_lst.state[i]["master_param"] if a.size else None
        if master is not None:
            assert master.dtype == np.float32
            ref_master = o_ref.state[i]["master_param"]
            assert np.linalg.norm(master - ref_master) <= 1e-6 * max(np.linalg.norm(ref_master), 1e-30)
            # the model copy is the master rounded to nearest even
            np.testing.assert_array_equal(_bits(a), _bits(master.astype(dtype)))
        np.testing.assert_array_equal(_bits(a), _bits(c))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_master_weights_accumulate_updates_too_small_for_16_bits(dtype):
    """The reason for master weights: 1e-4 steps on 1.0 vanish in 16 bits, not in float32."""
    p = [np.ones(1000, dtype)]
    opt = fo.SGD(p, lr=1e-4, master_weights=True)
    for _ in range(100):
        opt.step([np.ones(1000, dtype)])
    assert np.allclose(opt.state[0]["master_param"], 1 - 100 * 1e-4, rtol=1e-5)
    assert np.all(p[0].astype(np.float32) < 1.0)      # the copy follows the master


def test_stochastic_rounding_is_unbiased_and_seeded():
    value = np.float32(1.0 + 2.0 ** -9)               # a quarter of the way to the next bf16
    results = []
    for seed in (7, 7, 8):
        p = [np.full(100_000, value, np.float32).astype(BF16)]
        opt = fo.SGD(p, lr=0.0, master_weights=True, stochastic_rounding=True, seed=seed)
        opt.state_dict()          # no state yet
        opt._ensure_state(0, p[0], opt.param_groups[0], (None, None, None))
        opt._state[0]["master_param"][...] = value
        opt.step([np.zeros(100_000, BF16)])
        results.append(p[0].astype(np.float32))
    lo, hi = np.float32(1.0), np.float32(1.0078125)
    for r in results:
        assert set(np.unique(r)) <= {lo, hi}
        assert abs(r.astype(np.float64).mean() - float(value)) < 5 * 0.0078125 * np.sqrt(0.1875 / 1e5)
    np.testing.assert_array_equal(results[0], results[1])        # same seed, same bits
    assert not np.array_equal(results[0], results[2])


def test_nonfinite_16bit_grads_skip_the_step():
    init, rng = _data(np.float16)
    ps = [p.copy() for p in init]
    opt = fo.Adam(ps, master_weights=True)
    opt.step([rng.standard_normal(s).astype(np.float16) for s in SHAPES])
    before = [p.tobytes() for p in ps], {i: {k: np.array(v).tobytes() for k, v in st.items()}
                                         for i, st in opt.state.items()}
    grads = [np.full(s, 60000, np.float16) for s in SHAPES]
    grads[-1][5] = np.inf
    assert opt.step(grads, grad_scale=1 / 1024) is False
    after = [p.tobytes() for p in ps], {i: {k: np.array(v).tobytes() for k, v in st.items()}
                                        for i, st in opt.state.items()}
    assert before == after


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    init, rng = _data(BF16)
    a, b = [p.copy() for p in init], [p.copy() for p in init]
    oa = fo.AdamW(a, master_weights=True)
    grads = [[rng.standard_normal(s).astype(np.float32).astype(BF16) for s in SHAPES] for _ in range(6)]
    for g in grads[:3]:
        oa.step(g)
    fo.save(tmp_path / "ckpt.npz", oa.state_dict())
    b = [p.copy() for p in a]
    ob = fo.AdamW(b, master_weights=True)
    ob.load_state_dict(fo.load(tmp_path / "ckpt.npz"))
    for g in grads[3:]:
        oa.step(g)
        ob.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(_bits(x), _bits(y))


def test_16bit_params_need_master_weights():
    with pytest.raises(TypeError, match="master_weights=True"):
        fo.Adam([np.zeros(3, np.float16)])
    with pytest.raises(TypeError, match="master_weights"):
        fo.Adam([np.zeros(3, np.float32)], master_weights=1)


def test_warm_cache_process_steps_new_grads(tmp_path):
    """A master-weights kernel loaded from Numba's disk cache steps new gradient arrays
    as the freshly compiled one did (it was once reported to crash): cold, then warm, in
    fresh processes, the second one loading every kernel from the cache."""
    script = textwrap.dedent("""
        import numpy as np, ml_dtypes, fastopt as fo
        bf = np.dtype(ml_dtypes.bfloat16)
        rng = np.random.default_rng(0)
        shapes = [3, 70001, 25]
        ps = [rng.standard_normal(n).astype(bf) for n in shapes]
        opt = fo.AdamW(ps, master_weights=True)
        for _ in range(4):
            opt.step([rng.standard_normal(n).astype(bf) for n in shapes])
        print("ok", float(ps[1].astype(np.float32).sum()))
    """)
    cache = tmp_path / "cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    outs, files = [], []
    for _ in range(2):
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                   text=True, timeout=300))
        files.append(sorted(p.name for p in cache.rglob("*.nbc")))
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout
    assert any("master" in name for name in files[0]), "the master kernel was not cached"
    assert files[1] == files[0], "the warm process compiled instead of loading the cache"
