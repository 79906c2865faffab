"""Gradient clipping against torch.nn.utils, the NumPy backend and exact float64 sums;
determinism across thread counts; bad input."""
import math

import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt import clip
from fastopt.kernels import clip as kclip

torch = pytest.importorskip("torch")

SHAPES = [(3,), (100, 7), (70_001,), (0,), (5, 5)]     # several chunks, an empty tensor
NORMS = [2.0, 1.0, math.inf, 0.5, 3.0, -1.0, 0.0, -math.inf]


def _grads(seed=0, dtype=np.float32, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]


def _torch_clip(grads, max_norm, norm_type):
    """torch's clip_grad_norm_ on copies: (total norm, clipped grads aligned with ``grads``,
    None where torch cannot take the tensor: empty ones under inf or negative orders)."""
    keep = [g.size > 0 or 0 <= norm_type < math.inf for g in grads]
    params = []
    for g, k in zip(grads, keep):
        if k:
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
            p.grad = torch.tensor(g)
            params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    it = iter(params)
    return float(total), [next(it).grad.numpy() if k else None for k in keep]


def _exact(grads, p):
    x = np.concatenate([g.ravel() for g in grads]).astype(np.float64)
    if p == math.inf:
        return np.abs(x).max()
    if p == -math.inf:
        return np.abs(x).min()
    if p == 0:
        return float(sum(np.count_nonzero(g) > 0 for g in grads))      # torch: norm of norms
    return math.fsum(np.abs(x) ** p) ** (1 / p)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_norm_and_clipping_match_torch(norm_type, backend):
    grads = _grads()
    mine = [g.copy() for g in grads]
    max_norm = 0.5 * _exact(grads, norm_type)
    total = clip.clip_grad_norm(mine, max_norm, norm_type, backend=backend)
    t_total, t_grads = _torch_clip(grads, max_norm, norm_type)
    # float64 accumulation: close to the exact value; torch sums in float32.
    assert total == pytest.approx(_exact(grads, norm_type), rel=1e-12)
    assert total == pytest.approx(t_total, rel=1e-5)
    coef = kclip.clip_coefficient(total, max_norm, np.float32)
    assert coef < 1
    for g, m, t in zip(grads, mine, t_grads):
        # Bitwise: each grad times the float32 coefficient torch's formula gives for this norm.
        assert m.tobytes() == (g * coef).astype(np.float32).tobytes()
        if t is not None:
            # torch's float32 norm is off by up to ~1e-5 relative for p != 2 over 70k terms.
            np.testing.assert_allclose(m, t, rtol=2e-5, atol=0)


def test_coefficient_is_torch_formula_bitwise():
    rng = np.random.default_rng(1)
    norms = np.concatenate([rng.random(300) * 10, rng.random(100) * 1e-5, [0.0, 1e-6, 0.7, np.inf, np.nan]])
    for dtype, tdt in ((np.float32, torch.float32), (np.float64, torch.float64)):
        for n in norms:
            t = torch.tensor(float(n), dtype=tdt)
            want = torch.clamp(0.7 / (t + 1e-6), max=1.0).item()
            got = float(kclip.clip_coefficient(float(n), 0.7, dtype))
            assert (got == want) or (math.isnan(got) and math.isnan(want)), (dtype, n, got, want)


def test_inf_norm_is_bitwise_torch():
    grads = _grads(2)[:3]
    mine = [g.copy() for g in grads]
    total = clip.clip_grad_norm(mine, 0.25, "inf")
    t_total, t_grads = _torch_clip(grads, 0.25, math.inf)
    assert total == t_total
    for m, t in zip(mine, t_grads):
        assert m.tobytes() == t.tobytes()


def test_float64_matches_torch():
    grads = _grads(3, np.float64)
    mine = [g.copy() for g in grads]
    total = clip.clip_grad_norm(mine, 1.0)
    t_total, t_grads = _torch_clip(grads, 1.0, 2.0)
    assert total == pytest.approx(t_total, rel=1e-13)
    for m, t in zip(mine, t_grads):
        np.testing.assert_allclose(m, t, rtol=1e-14)


def test_no_clip_below_max_norm_leaves_bits():
    grads = _grads(4)
    mine = [g.copy() for g in grads]
    total = clip.clip_grad_norm(mine, 1e6)
    assert total < 1e6
    assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, mine))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_deterministic_across_thread_counts(norm_type):
    grads = _grads(5, shapes=[(300_001,), (17,), (131_072,)])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = clip.global_norm(grads, norm_type)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = clip.global_norm(grads, norm_type)
    finally:
        numba.set_num_threads(before)
    assert one == two      # the same bits
    assert one == pytest.approx(_exact(grads, norm_type), rel=1e-12)


def test_flat_params_and_list_agree():
    grads = _grads(6)
    flat = fo.FlatParams([np.zeros(g.shape, np.float32) for g in grads])
    for dst, g in zip(flat.grads, grads):
        dst[...] = g
    lst = [g.copy() for g in grads]
    for p in (2.0, 1.0, 0.0, math.inf):
        assert clip.global_norm(flat, p) == clip.global_norm(lst, p)     # the same bits
    assert clip.clip_grad_norm(flat, 0.3) == clip.clip_grad_norm(lst, 0.3)
    for a, b in zip(flat.grads, lst):
        assert a.tobytes() == b.tobytes()


def test_none_entries_empty_and_single_array():
    g = np.array([3.0, 4.0], np.float32)
    assert clip.global_norm([None, g, None]) == 5.0
    assert clip.global_norm([]) == 0.0
    assert clip.clip_grad_norm([None], 1.0) == 0.0
    assert clip.clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-6)


def test_mixed_dtypes_and_float16():
    a = np.full(10, 3.0, np.float32)
    b = np.full(6, 4.0, np.float64)
    h = np.full(4, 2.0, np.float16)
    want = math.sqrt(10 * 9 + 6 * 16 + 4 * 4)
    assert clip.global_norm([a, b, h]) == pytest.approx(want, rel=1e-15)
    clip.clip_grad_norm([a, b, h], 1.0)
    total = clip.global_norm([a, b, h])
    assert total == pytest.approx(1.0, rel=1e-3)
    assert a.dtype == np.float32 and b.dtype == np.float64 and h.dtype == np.float16


def test_nonfinite_grads():
    grads = _grads(7)[:3]
    grads[1][3, 2] = np.inf
    mine = [g.copy() for g in grads]
    with pytest.raises(RuntimeError, match="non-finite") as info:
        clip.clip_grad_norm(mine, 1.0, error_if_nonfinite=True)
    assert isinstance(info.value, clip.NonFiniteNormError)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, mine))   # untouched
    # Without the flag, torch's behaviour: coefficient 0, inf * 0 = NaN.
    total = clip.clip_grad_norm(mine, 1.0)
    t_total, t_grads = _torch_clip(grads, 1.0, 2.0)
    assert total == t_total == math.inf
    for m, t in zip(mine, t_grads):
        np.testing.assert_array_equal(m, t)
    grads[0][0] = np.nan
    assert math.isnan(clip.global_norm(grads, math.inf))
    assert math.isnan(clip.global_norm(grads, 2.0))


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_clip_grad_value_matches_torch_bitwise(backend):
    grads = _grads(8, shapes=[(70_001,), (3, 4)])
    grads[1][0, 0], grads[1][0, 1], grads[1][0, 2] = np.nan, np.inf, -np.inf
    mine = [g.copy() for g in grads]
    assert clip.clip_grad_value(mine, 0.5, backend=backend) is None
    ts = [torch.tensor(g) for g in grads]
    params = []
    for t in ts:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t
        params.append(p)
    torch.nn.utils.clip_grad_value_(params, 0.5)
    for m, p in zip(mine, params):
        np.testing.assert_array_equal(m, p.grad.numpy())
        assert np.nanmax(np.abs(m)) <= 0.5
    assert math.isnan(mine[1][0, 0])


@pytest.mark.parametrize("call,err", [
    (lambda g: clip.clip_grad_norm(g, -1.0), ValueError),
    (lambda g: clip.clip_grad_norm(g, float("nan")), ValueError),
    (lambda g: clip.clip_grad_norm(g, True), TypeError),
    (lambda g: clip.clip_grad_norm(g, 1.0, norm_type="two"), TypeError),
    (lambda g: clip.clip_grad_norm(g, 1.0, norm_type=float("nan")), ValueError),
    (lambda g: clip.clip_grad_norm(g, 1.0, error_if_nonfinite=1), TypeError),
    (lambda g: clip.clip_grad_value(g, -0.1), ValueError),
    (lambda g: clip.clip_grad_norm([g[0], g[0]], 1.0), ValueError),
    (lambda g: clip.clip_grad_norm([g[0].astype(np.int32)], 1.0), TypeError),
    (lambda g: clip.clip_grad_norm([np.zeros((4, 4), np.float32)[:, 1]], 1.0), ValueError),
    (lambda g: clip.clip_grad_norm(["x"], 1.0), TypeError),
    (lambda g: clip.clip_grad_norm(5, 1.0), TypeError),
    (lambda g: clip.clip_grad_norm(g, 1.0, backend="tpu"), ValueError),
])
def test_bad_input_raises_and_changes_nothing(call, err):
    grads = _grads(9)[:3]
    mine = [g.copy() for g in grads]
    with pytest.raises(err):
        call(mine)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, mine))


def test_read_only_grads():
    g = np.ones(4, np.float32)
    g.flags.writeable = False
    assert clip.global_norm([g]) == 2.0          # reading is fine
    with pytest.raises(ValueError, match="read-only"):
        clip.clip_grad_norm([g], 1.0)


_SIM_SCRIPT = r"""
import math, numpy as np
from fastopt import clip
from fastopt.amp import GradScaler
from fastopt.ema import EMA
import fastopt as fo
rng = np.random.default_rng(0)
gs = [rng.standard_normal(s).astype(np.float32) for s in [(37,), (5, 3), (0,), (1,)]]
for p in [2.0, 1.0, math.inf, 3.0, 0.0]:
    a, b = [g.copy() for g in gs], [g.copy() for g in gs]
    na = clip.clip_grad_norm(a, 0.5, p, backend="cuda")
    nb = clip.clip_grad_norm(b, 0.5, p, backend="cpu")
    assert abs(na - nb) <= 1e-13 * nb, (p, na, nb)
    assert all(np.allclose(x, y, rtol=1e-6, atol=0) for x, y in zip(a, b)), p
a, b = [g.copy() for g in gs], [g.copy() for g in gs]
clip.clip_grad_value(a, 0.3, backend="cuda")
clip.clip_grad_value(b, 0.3, backend="cpu")
assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
ps, pc = [g.copy() for g in gs], [g.copy() for g in gs]
e1, e2 = EMA(ps, 0.9, backend="cuda"), EMA(pc, 0.9, backend="cpu")
for _ in range(3):
    for x, y in zip(ps, pc):
        x += 1
        y += 1
    e1.update()
    e2.update()
assert all(x.tobytes() == y.tobytes() for x, y in zip(e1.shadow, e2.shadow))
e1.swap()
e2.swap()
assert all(x.tobytes() == y.tobytes() for x, y in zip(ps, pc))
g = [np.array([2.0, np.inf, 1.0], np.float32)]
assert GradScaler(init_scale=2.0).unscale_(fo.SGD([np.zeros(3, np.float32)], backend="cuda"), g) is False
assert g[0].tolist() == [1.0, math.inf, 0.5]
print("SIM-OK")
"""


def test_cuda_backend_under_simulator():
    """The CUDA paths (reductions, scaling, clamping, EMA, unscale) on the numba CUDA
    simulator in a child process, against the CPU backend."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", _SIM_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "SIM-OK" in out.stdout, out.stderr[-3000:]


def test_clip_grads_with_norm_is_the_second_half():
    grads = _grads(10)
    a, b = [g.copy() for g in grads], [g.copy() for g in grads]
    total = clip.clip_grad_norm(a, 0.7)
    clip.clip_grads_with_norm(b, 0.7, clip.global_norm(b))
    assert total == clip.global_norm(grads)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    with pytest.raises(TypeError):
        clip.clip_grads_with_norm(b, 0.7, "1.0")


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_all_finite(backend):
    grads = _grads(11, shapes=[(70_001,), (3, 4), (0,)])
    assert clip.all_finite(grads, backend=backend) is True
    for bad in (np.inf, -np.inf, np.nan):
        g = [x.copy() for x in grads]
        g[0][65_537] = bad                   # in the second chunk
        assert clip.all_finite(g, backend=backend) is False
    assert clip.all_finite([np.full(3, 3e38, np.float32)], backend=backend)   # large, finite
    assert clip.all_finite([]) is True
