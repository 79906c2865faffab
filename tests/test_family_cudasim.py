"""The new elements under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``; skipped otherwise).

Every element of the family and of fastopt.keras compiles as ``cuda.jit(device=True)``
inside a tiny kernel and gives the CPU-compiled element's results; every optimizer also
runs end to end on the ``"cuda"`` backend against the NumPy reference. The per-tensor
steps (LAMB, LARS, Keras ``clipnorm``) run the CUDA driver's per-row mode: one reduction
and one step launch per step per dtype group, in list and FlatParams mode.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_family_cudasim.py
"""
from __future__ import annotations

import os

import numba
import numpy as np
import pytest

from cases import RTOL, group_of, rel_err

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim,
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]
if SIM:
    # A module global: the simulator swaps numba.cuda for its own module in a kernel's
    # globals (a plain run never imports numba.cuda here).
    from numba import cuda


def _kernel(device):
    """A kernel applying device function ``device`` to each element, all outputs kept."""
    def kernel(p, g, s0, s1, s2, h, out):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if i < p.size:
            r = device(p[i], g[i], s0[i], s1[i], s2[i], h)
            for k in range(out.shape[0]):
                out[k, i] = r[k]
    return cuda.jit(kernel)


def _elements():
    """(id, element or reducer, scalars, n_outputs) for every new element."""
    from fastopt.kernels import adadelta, adamax, keras, lamb, lars, lion, nadam, radam
    f = np.float32
    out = [
        ("adamax", adamax.adamax_element, adamax.adamax_scalars(group_of(adamax.SPEC, lr=0.01, weight_decay=0.1, maximize=True), 3, f), 4),
        ("nadam", nadam.nadam_element, nadam.nadam_scalars(group_of(
            nadam.SPEC, mu_product=0.1, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), 3, f), 4),
        ("radam", radam.radam_element, radam.radam_scalars(group_of(radam.SPEC, lr=0.01, weight_decay=0.1, maximize=True), 9, f), 4),
        ("adadelta", adadelta.adadelta_element, adadelta.adadelta_scalars(group_of(adadelta.SPEC, weight_decay=0.1), 1, f), 4),
        ("lion", lion.lion_element, lion.lion_scalars(group_of(lion.SPEC, lr=1e-3, weight_decay=0.1), 1, f), 4),
        ("lamb", lamb.lamb_element, lamb.lamb_scalars(group_of(lamb.SPEC, lr=1e-3, weight_decay=0.01), 3, f), 4),
        ("lamb_moments", lamb.lamb_moments, lamb.lamb_scalars(group_of(lamb.SPEC, lr=1e-3, weight_decay=0.01), 3, f), 6),
        ("lars", lars.lars_element, lars.lars_scalars(group_of(lars.SPEC, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True), 1, f), 4),
        ("lars_norms", lars.lars_norms, lars.lars_scalars(group_of(lars.SPEC, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True), 1, f), 2),
        ("keras_square", keras.grad_square, keras.SquareScalars(f(0)), 2),
        ("keras_accumulate", keras.accumulate_element, keras.AccumulateScalars(f(0)), 4),
    ]
    hp = dict(momentum=0.9, nesterov=True, rho=0.9, epsilon=1e-7, centered=True, amsgrad=True,
              beta_1=0.9, beta_2=0.999, clipvalue=0.5, weight_decay=0.01)
    specs = {s.name: s for s in keras.SPECS}
    for kind, element in keras.ELEMENTS.items():
        group = group_of(specs[kind], **hp, learning_rate=1e-3, u_product=0.5)
        out.append((f"keras_{kind}", element, specs[kind].scalars(group, 3, f), 4))
    return out


ELEMENTS = _elements()


@pytest.mark.parametrize("name,fn,h,n_out", ELEMENTS, ids=[e[0] for e in ELEMENTS])
def test_element_compiles_as_device_function(name, fn, h, n_out):
    from fastopt.kernels.codegen import cpu_function
    from fastopt.kernels.cuda import device_function
    kernel = _kernel(device_function(fn))       # the element with its pieces, as a driver has it

    rng = np.random.default_rng(0)
    n = 37
    args = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    # States as a run leaves them: second moments >= the square of first moments (centered
    # RMSprop takes sqrt(v - a^2 + eps)), so s0, s1 in [1, 2) and s2 in [0, 1).
    args += [rng.uniform(1, 2, n).astype(np.float32) for _ in range(2)]
    args += [rng.uniform(0, 1, n).astype(np.float32)]
    out = np.zeros((n_out, n), np.float32)
    kernel[2, 32](*args, h, out)
    cpu = cpu_function(fn)
    expected = np.array([cpu(*(a[i] for a in args), h) for i in range(n)], dtype=np.float32).T
    # The simulator runs the device function as Python over NumPy scalars (math.sqrt
    # rounds in float64 there): equal up to float32 rounding.
    for k in range(n_out):
        assert rel_err(out[k], expected[k]) <= 1e-6, f"output {k}"


def _run(make, shapes, steps, step_fn):
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = make(a, "cuda"), make(b, "numpy")
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        step_fn(oa, grads, a)
        step_fn(ob, grads, b)
    for x, y, i in zip(a, b, init):
        assert rel_err(x, y) <= RTOL[np.dtype(np.float32)]
    assert any(x.size and not np.array_equal(x, i) for x, i in zip(a, init))


SHAPES = [(0,), (1,), (5, 3), (37,)]
FAMILY = [
    ("Adamax", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.5, weight_decay=0.1)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,kw", FAMILY, ids=[n for n, _ in FAMILY])
def test_family_on_the_cuda_backend(name, kw):
    from fastopt import family
    cls = getattr(family, name)
    _run(lambda ps, be: cls(ps, backend=be, **kw), SHAPES, 8, lambda o, g, ps: o.step(g))


KERAS = [
    ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True, clipvalue=0.5)),
    ("RMSprop", dict(momentum=0.5, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(learning_rate=0.05, global_clipnorm=2.0)),
    ("Adam", dict(amsgrad=True, learning_rate=0.01)),
    ("AdamW", dict(learning_rate=0.01)),
    ("Adamax", dict(learning_rate=0.01)),
    ("Nadam", dict(learning_rate=0.01)),
    ("Adadelta", dict(learning_rate=1.0)),
]


@pytest.mark.parametrize("name,kw", KERAS, ids=[n for n, _ in KERAS])
def test_keras_on_the_cuda_backend(name, kw):
    from fastopt import keras
    cls = getattr(keras, name)
    _run(lambda ps, be: cls(backend=be, **kw), SHAPES, 8, lambda o, g, ps: o.apply(g, ps))


# -- per-tensor steps: the CUDA driver's per-row values ------------------------------------------
# Tensors that cross several simulator chunks (CHUNK_MIN 8), an empty one, a single element,
# and an all-zero param in front (LAMB/LARS: its trust ratio is 1).
ROW_SHAPES = [(3, 3), (0,), (1,), (19,), (9,)]
MODES = ("list", "flat")


def _backend_object():
    from fastopt import _backend
    return _backend.get("cuda")


def _per_tensor_run(make, dtype, mode, steps=2, seed=2, grad_sd=None, launches=2):
    """Run ``make(params_or_flat, backend)`` on "cuda" (list or FlatParams ``mode``), "cpu"
    and "numpy" over the same gradients; every CUDA step makes ``launches`` launches.

    Returns {backend: (params as host arrays, optimizer)} and the initial params.
    """
    from fastopt import FlatParams
    be = _backend_object()
    rng = np.random.default_rng(seed)
    grad_sd = grad_sd or [1.0] * len(ROW_SHAPES)
    init = [rng.standard_normal(s).astype(dtype) for s in ROW_SHAPES]
    init[0][...] = 0
    ref, on_cpu = [x.copy() for x in init], [x.copy() for x in init]
    flat = None
    if mode == "flat":
        flat = FlatParams([x.copy() for x in init])
        o_cuda = make(flat, "cuda")
        on_cuda = flat.params
    else:
        on_cuda = [x.copy() for x in init]
        o_cuda = make(on_cuda, "cuda")
    o_cpu, o_ref = make(on_cpu, "cpu"), make(ref, "numpy")
    for _ in range(steps):
        grads = [(sd * rng.standard_normal(s)).astype(dtype) for s, sd in zip(ROW_SHAPES, grad_sd)]
        before = be.launches
        if flat is not None:
            for fg, g in zip(flat.grads, grads):
                fg[...] = g
            o_cuda.step()
        else:
            o_cuda.step([g.copy() for g in grads])
        assert be.launches - before == launches, "launches per step"
        o_cpu.step(grads)
        o_ref.step(grads)
    return {"cuda": ([np.array(p) for p in on_cuda], o_cuda), "cpu": (on_cpu, o_cpu),
            "numpy": (ref, o_ref)}, init


def _assert_all_close(actual, expected, dtype, what):
    tol = RTOL[np.dtype(dtype)]
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.dtype(dtype), f"{what}[{i}] dtype"
        err = rel_err(a, b)
        assert err <= tol, f"{what}[{i}]: relative error {err:.3g} > {tol:g}"


def _states(opt, names):
    st = opt.state
    return [st[i][n] for i in sorted(st) for n in names if n in st[i]]


def _check_runs(runs, init, dtype, names):
    got = runs["cuda"][0]
    for other in ("numpy", "cpu"):
        _assert_all_close(got, runs[other][0], dtype, f"params cuda vs {other}")
        a, b = _states(runs["cuda"][1], names), _states(runs[other][1], names)
        assert len(a) == len(b) > 0
        _assert_all_close(a, b, dtype, f"state cuda vs {other}")
    assert all(np.any(a != i) for a, i in zip(got, init) if a.size), "a tensor did not move"


TRUST = [
    ("LAMB", dict(lr=0.05, weight_decay=0.1)),
    ("LAMB", dict(lr=0.05, betas=(0.5, 0.9), eps_root=1e-3)),
    ("LARS", dict(lr=2.0, weight_decay=0.01, momentum=0.9, nesterov=True, eps=1e-4)),
    ("LARS", dict(lr=5.0, trust_coefficient=0.01)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", TRUST, ids=[f"{n}-{k}" for k, (n, _) in enumerate(TRUST)])
def test_trust_ratio_optimizers_on_the_cuda_backend(name, kw, dtype, mode):
    """LAMB and LARS on "cuda" equal the NumPy reference and the CPU backend, params and
    state, with one reduction and one step launch per step."""
    from fastopt import family
    cls = getattr(family, name)
    runs, init = _per_tensor_run(lambda ps, be: cls(ps, backend=be, **kw), dtype, mode)
    _check_runs(runs, init, dtype, cls.slot_names)


KERAS_CLIP = [
    ("Adam", dict(learning_rate=0.01, amsgrad=True, weight_decay=0.01)),
    ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
]
# clipnorm=1: tensors 0 and 3 are clipped, tensors 2 and 4 are not (their norms are ~0.1).
CLIP_SD = [1.0, 1.0, 0.1, 1.0, 0.03]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", KERAS_CLIP, ids=[n for n, _ in KERAS_CLIP])
def test_keras_clipnorm_on_the_cuda_backend(name, kw, dtype, mode):
    """Keras clipnorm on "cuda" (each tensor's gradient scaled by its own clip factor)
    equals the NumPy reference and the CPU backend: one reduction and one step launch."""
    from fastopt import keras
    cls = getattr(keras, name)

    class Stepper:                       # the Keras optimizer behind the optimizer interface
        def __init__(self, params, be):
            self.opt = cls(backend=be, clipnorm=1.0, **kw)
            self.opt.build(params)

        def step(self, grads=None):
            return self.opt.step(grads)

        @property
        def state(self):
            return self.opt._engine.state

    runs, init = _per_tensor_run(Stepper, dtype, mode, grad_sd=CLIP_SD)
    from fastopt.kernels import keras as keras_kernels
    _check_runs(runs, init, dtype, [n for n in keras_kernels.SLOTS[name] if n])


def test_two_dtypes_in_one_group_are_two_reductions_and_two_steps():
    from fastopt import LAMB
    be = _backend_object()
    rng = np.random.default_rng(4)
    shapes = [(9,), (3,), (0,), (12,)]
    dtypes = [np.float32, np.float64, np.float32, np.float64]
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = LAMB(a, lr=0.05, backend="cuda"), LAMB(b, lr=0.05, backend="numpy")
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        before = be.launches
        oa.step(grads)
        assert be.launches - before == 4
        ob.step(grads)
    for x, y, d in zip(a, b, dtypes):
        assert x.dtype == d and rel_err(x, y) <= RTOL[np.dtype(d)]


def test_lamb_unscales_gradients_in_both_passes():
    """step(grads * 4, grad_scale=0.25) equals step(grads): the norm pass and the step both
    apply the scale (4 * 0.25 is exact)."""
    from fastopt import LAMB
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(s).astype(np.float32) for s in ROW_SHAPES]
    a, b = [x.copy() for x in init], [x.copy() for x in init]
    oa, ob = LAMB(a, lr=0.05, backend="cuda"), LAMB(b, lr=0.05, backend="numpy")
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in ROW_SHAPES]
        assert oa.step([g * np.float32(4) for g in grads], grad_scale=0.25)
        ob.step(grads)
    for x, y in zip(a, b):
        assert rel_err(x, y) <= RTOL[np.dtype(np.float32)]


def _probe(p, g, s0, s1, s2, h):
    """p + g + s2, state unchanged: shows the gradient multiplier and the third argument."""
    return p + g + s2, s0, s1, s2


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_row_values_reach_their_rows(dtype):
    """Driver level: row r's value scales its gradients ("grad") or is the third state
    argument ("slot2", read-only: the s2 slot is neither read nor written); as the CPU."""
    from fastopt.kernels import cpu
    be = _backend_object()
    rng = np.random.default_rng(6)
    shapes = [(11,), (0,), (3,), (20,)]
    values = np.array([0.5, -2.0, 0.0], dtype=dtype)       # one per non-empty tensor
    per_tensor = [0.5, None, -2.0, 0.0]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    g = [rng.standard_normal(s).astype(dtype) for s in shapes]
    for mode in ("grad", "slot2"):
        s2 = [np.full(s, 7, dtype) for s in shapes]
        outs = {}
        for name in ("cuda", "cpu"):
            p = [x.copy() for x in p0]
            if name == "cuda":
                table = be.table(p, g, (None, None, s2), merge=False)
                be.run(_probe, table, (), grad_scale=3.0, row_values=be.row_array(table, values),
                       row_mode=mode)
            else:
                table = cpu.ChunkTable(p, g, (None, None, s2), merge=False)
                cpu.run(_probe, table, (), 3.0, row_values=values, row_mode=mode)
            outs[name] = p
        for k, (x, y, p, gk, v) in enumerate(zip(outs["cuda"], outs["cpu"], p0, g, per_tensor)):
            if v is None:
                continue
            v = dtype(v)
            if mode == "grad":      # the absent-in-the-element s2 is still the slot's 7
                expected = p + gk * (dtype(3.0) * v) + dtype(7)
            else:                   # g unscaled by v, s2 replaced by v
                expected = p + gk * dtype(3.0) + v
            np.testing.assert_array_equal(x, expected, err_msg=f"{mode} tensor {k}")
            np.testing.assert_array_equal(x, y, err_msg=f"{mode} tensor {k} cuda vs cpu")
        assert all(np.all(s == 7) for s in s2)              # never written


def test_row_values_are_checked():
    from fastopt.kernels import per_tensor
    be = _backend_object()
    p = [np.zeros(4, np.float32), np.zeros(3, np.float32)]
    g = [np.ones(4, np.float32), np.ones(3, np.float32)]
    merged = be.table(p, g, (None, None, None))
    with pytest.raises(ValueError, match="merge=False"):
        be.run(_probe, merged, (), row_values=cuda.to_device(np.ones(2, np.float32)), row_mode="grad")
    with pytest.raises(ValueError, match="merge=False"):
        per_tensor.run(_probe, merged, (), [1.0, 1.0], backend=be)
    table = per_tensor.table(p, g, (None, None, None), backend=be)
    assert table.table.shape[0] == 2
    for bad in (cuda.to_device(np.ones(3, np.float32)), cuda.to_device(np.ones(2, np.float64)), None):
        with pytest.raises(ValueError, match="row_values"):
            be.run(_probe, table, (), row_values=bad, row_mode="slot2")
    with pytest.raises(ValueError, match="one entry per row"):
        be.row_array(table, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="row_mode"):
        be.run(_probe, table, (), row_values=cuda.to_device(np.ones(2, np.float32)), row_mode="rows")
    assert np.array_equal(p[0], np.zeros(4)) and np.array_equal(p[1], np.zeros(3))


def test_row_values_array_is_allocated_once_per_table(monkeypatch):
    """FlatParams LARS: the device array of trust ratios is made on the first step and
    refilled afterwards (no allocation per step)."""
    from fastopt import LARS, FlatParams
    from fastopt.kernels import cuda as driver
    rng = np.random.default_rng(7)
    flat = FlatParams([rng.standard_normal(s).astype(np.float32) for s in ROW_SHAPES])
    opt = LARS(flat, lr=1.0, backend="cuda")
    made = []
    real = driver.cuda.device_array
    monkeypatch.setattr(driver.cuda, "device_array", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    arrays = set()
    for _ in range(3):
        flat.grad[...] = rng.standard_normal(flat.grad.shape).astype(np.float32)
        opt.step()
        layout = opt._plans[0].buckets[0].table.layout
        arrays.add(id(layout.row_values))
    assert len(arrays) == 1 and layout.row_values.shape == (4,)   # 4 non-empty tensors
    # made on the first step: the reduction's partials and the row values, nothing after
    assert len(made) == 2 and (4,) in made
