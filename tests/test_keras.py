"""fastopt.keras: Keras 3's optimizers (names, defaults, equations) over the fused kernels.

Checked against the examples of Keras's documentation, against steps derived by hand
from Keras's update rules, and against the NumPy reference (``backend="numpy"``, written
separately from the equations) over many steps with every flag and clipping option.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import fastopt as fo
from cases import assert_close
from fastopt import keras as fk
from fastopt.schedules import ExponentialDecay
from fastopt.sparse import SparseGrad

SHAPES = [(0,), (1,), (3, 5), (70001,)]


# -- the documentation's examples and hand-derived first steps ---------------------------------
def test_sgd_momentum_documentation_example():
    """Keras's SGD docstring: lr 0.1, momentum 0.9, loss var^2/2 from var = 1.0: the first
    step changes var by 0.1, the second by 0.18 (1.0 -> 0.9 -> 0.72)."""
    var = np.array([1.0], np.float32)
    opt = fk.SGD(learning_rate=0.1, momentum=0.9)
    values = [float(var[0])]
    for _ in range(2):
        opt.apply_gradients(zip([var.copy()], [var]))      # d(var^2/2)/dvar = var
        values.append(float(var[0]))
    steps = [values[0] - values[1], values[1] - values[2]]
    np.testing.assert_allclose(steps, [0.1, 0.18], rtol=1e-6)
    np.testing.assert_allclose(values, [1.0, 0.9, 0.72], rtol=1e-6)
    assert opt.iterations == 2
    np.testing.assert_allclose(opt.variables[0], [-0.18], rtol=1e-6)   # the velocity


def test_rmsprop_documentation_example():
    """Keras's RMSprop docstring: lr 0.1 on var^2/2 from var = 10.0 gives 9.683772."""
    var = np.array([10.0], np.float32)
    opt = fk.RMSprop(learning_rate=0.1)
    opt.apply([var.copy()], [var])
    assert f"{var[0]:.6f}" == "9.683772"


def test_sgd_nesterov_by_hand():
    """v = m v - lr g; w += m v - lr g."""
    w = np.array([1.0, -1.0])
    opt = fk.SGD(learning_rate=0.1, momentum=0.5, nesterov=True)
    g1, g2 = np.array([2.0, 1.0]), np.array([-1.0, 4.0])
    opt.apply([g1], [w])
    v1 = -0.1 * g1
    w1 = np.array([1.0, -1.0]) + 0.5 * v1 - 0.1 * g1
    np.testing.assert_allclose(w, w1, rtol=1e-15)
    opt.apply([g2], [w])
    v2 = 0.5 * v1 - 0.1 * g2
    np.testing.assert_allclose(w, w1 + 0.5 * v2 - 0.1 * g2, rtol=1e-15)


def test_adagrad_initial_accumulator_and_eps_inside_sqrt():
    w = np.array([1.0, 2.0])
    opt = fk.Adagrad(learning_rate=0.5)
    opt.apply([np.array([1.0, -3.0])], [w])
    acc = 0.1 + np.array([1.0, 9.0])
    np.testing.assert_allclose(opt.variables[0], acc, rtol=1e-15)
    np.testing.assert_allclose(w, [1.0, 2.0] - 0.5 * np.array([1.0, -3.0]) / np.sqrt(acc + 1e-7), rtol=1e-15)


def test_adam_epsilon_hat_and_rmsprop_momentum_by_hand():
    # Adam step 1: alpha = lr sqrt(1 - b2) / (1 - b1); w -= m alpha / (sqrt(v) + eps_hat).
    w = np.array([0.0, 0.0])
    g = np.array([1e-6, -2.0])
    fk.Adam(learning_rate=0.01, epsilon=1e-3).apply([g], [w])
    m, vel = 0.1 * g, 0.001 * g * g
    alpha = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)
    np.testing.assert_allclose(w, -m * alpha / (np.sqrt(vel) + 1e-3), rtol=1e-14)
    # RMSprop with momentum: inc = lr g / sqrt(v + eps); mom = 0.5 mom + inc; w -= mom.
    w = np.array([1.0])
    opt = fk.RMSprop(learning_rate=0.1, rho=0.5, momentum=0.5, epsilon=1e-7)
    opt.apply([np.array([2.0])], [w])
    inc1 = 0.1 * 2.0 / math.sqrt(0.5 * 4.0 + 1e-7)
    opt.apply([np.array([1.0])], [w])
    inc2 = 0.1 * 1.0 / math.sqrt(0.5 * 2.0 + 0.5 * 1.0 + 1e-7)
    np.testing.assert_allclose(w, [1.0 - inc1 - (0.5 * inc1 + inc2)], rtol=1e-14)


def test_weight_decay_is_applied_before_the_update_as_keras():
    """w -= w * wd * lr first (AdamW's default wd 0.004); with a zero gradient Adam's
    update is 0, so only the decay moves w."""
    w = np.array([2.0, -4.0])
    opt = fk.AdamW(learning_rate=0.1)
    assert opt.get_config()["weight_decay"] == 0.004
    opt.apply([np.zeros(2)], [w])
    np.testing.assert_allclose(w, np.array([2.0, -4.0]) * (1 - 0.004 * 0.1), rtol=1e-15)
    w = np.array([1.0])
    fk.SGD(learning_rate=0.5, weight_decay=0.2).apply([np.array([1.0])], [w])
    np.testing.assert_allclose(w, [(1.0 - 1.0 * 0.2 * 0.5) - 0.5 * 1.0], rtol=1e-15)


def test_adamax_nadam_adadelta_first_step_by_hand():
    g = np.array([0.5, -2.0])
    w = np.zeros(2)
    fk.Adamax(learning_rate=0.1).apply([g], [w])
    np.testing.assert_allclose(w, -0.1 * (0.1 * g) / ((1 - 0.9) * (np.abs(g) + 1e-7)), rtol=1e-14)
    w = np.zeros(2)
    fk.Nadam(learning_rate=0.1).apply([g], [w])
    u1, u2 = 0.9 * (1 - 0.5 * 0.96), 0.9 * (1 - 0.5 * 0.96 ** 2)
    m_hat = u2 * (0.1 * g) / (1 - u1 * u2) + (1 - u1) * g / (1 - u1)
    np.testing.assert_allclose(w, -0.1 * m_hat / (np.sqrt(0.001 * g * g / 0.001) + 1e-7), rtol=1e-13)
    w = np.zeros(2)
    fk.Adadelta(learning_rate=1.0).apply([g], [w])
    s = 0.05 * g * g
    np.testing.assert_allclose(w, -(np.sqrt(1e-7) * g / np.sqrt(s + 1e-7)), rtol=1e-14)


# -- clipping ------------------------------------------------------------------------------------
def test_clipnorm_is_per_tensor_global_clipnorm_is_global_clipvalue_is_elementwise():
    big, small = np.array([3.0, 4.0]), np.array([0.3, 0.4])       # norms 5 and 0.5
    w = [np.zeros(2), np.zeros(2)]
    fk.SGD(learning_rate=1.0, clipnorm=1.0).apply([big, small], w)
    np.testing.assert_allclose(w[0], -big / 5.0, rtol=1e-15)
    np.testing.assert_allclose(w[1], -small, rtol=1e-15)
    w = [np.zeros(2), np.zeros(2)]
    fk.SGD(learning_rate=1.0, global_clipnorm=1.0).apply([big, small], w)
    total = math.sqrt(25.0 + 0.25)
    np.testing.assert_allclose(w[0], -big / total, rtol=1e-14)
    np.testing.assert_allclose(w[1], -small / total, rtol=1e-14)
    w = [np.zeros(2), np.zeros(2)]
    fk.SGD(learning_rate=1.0, clipvalue=0.35).apply([big, small], w)
    np.testing.assert_allclose(w[0], [-0.35, -0.35])
    np.testing.assert_allclose(w[1], [-0.3, -0.35])
    w = [np.zeros(2)]
    fk.SGD(learning_rate=1.0, global_clipnorm=1.0).apply([np.zeros(2)], w)   # zero norm: no NaN
    assert np.array_equal(w[0], np.zeros(2))


def test_only_one_clip_option():
    with pytest.raises(ValueError, match="only one of clipnorm, clipvalue and global_clipnorm"):
        fk.Adam(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="only one"):
        fk.SGD(global_clipnorm=1.0, clipnorm=2.0)


# -- against the NumPy reference -------------------------------------------------------------
KERAS = [
    (fk.SGD, dict(learning_rate=0.05)),
    (fk.SGD, dict(learning_rate=0.05, momentum=0.9, weight_decay=0.01, clipvalue=0.5)),
    (fk.SGD, dict(learning_rate=0.05, momentum=0.9, nesterov=True, global_clipnorm=3.0)),
    (fk.RMSprop, dict(learning_rate=1e-3, clipnorm=2.0)),
    (fk.RMSprop, dict(learning_rate=1e-3, momentum=0.5, centered=True, weight_decay=0.01)),
    (fk.RMSprop, dict(learning_rate=1e-3, momentum=0.5, rho=0.8, clipvalue=0.5)),
    (fk.Adagrad, dict(learning_rate=0.05, initial_accumulator_value=0.5, global_clipnorm=5.0)),
    (fk.Adam, dict(learning_rate=1e-2)),
    (fk.Adam, dict(learning_rate=1e-2, amsgrad=True, clipnorm=1.0, beta_1=0.8)),
    (fk.AdamW, dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True, clipvalue=0.5)),
    (fk.Adamax, dict(learning_rate=1e-2, weight_decay=0.01, global_clipnorm=3.0)),
    (fk.Nadam, dict(learning_rate=1e-2, clipnorm=1.0)),
    (fk.Nadam, dict(learning_rate=1e-2, beta_1=0.5, weight_decay=0.01)),
    (fk.Adadelta, dict(learning_rate=1.0, rho=0.9, clipvalue=0.5)),
]
KERAS_IDS = [f"{c.__name__}-{k}" for k, (c, _) in enumerate(KERAS)]


def _keras_run(cls, kw, dtype, shapes, steps, seed, flat=False, schedule=False):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    a = [x.copy() for x in init]
    b = [x.copy() for x in init]
    if schedule:
        kw = dict(kw, learning_rate=ExponentialDecay(kw["learning_rate"], 10, 0.5))
    oa, ob = cls(backend="cpu", **kw), cls(backend="numpy", **kw)
    fa = fo.FlatParams(init) if flat else None
    if flat:
        oa.build(fa)
        a = fa.params
    for _ in range(steps):
        grads = [(3 * rng.standard_normal(s)).astype(dtype) for s in shapes]
        if flat:
            for fg, g in zip(fa.grads, grads):
                fg[...] = g
            assert oa.step() is True
        else:
            oa.apply(grads, a)
        ob.apply(grads, b)
    assert any(x.size and not np.array_equal(x, i) for x, i in zip(a, init)), "nothing moved"
    return a, b, oa, ob


@pytest.mark.parametrize("cls,kw", KERAS, ids=KERAS_IDS)
def test_matches_reference(cls, kw):
    """100 float32 steps, list mode: params and every state array within RTOL."""
    a, b, oa, ob = _keras_run(cls, kw, np.float32, SHAPES, 100, zlib.crc32(repr(sorted(kw.items())).encode()))
    assert_close(a, b, np.float32, "params")
    assert_close(oa.variables, ob.variables, np.float32, "state")
    assert oa.iterations == ob.iterations == 100


@pytest.mark.parametrize("k", [1, 8, 11])
def test_flat_params_float64_and_schedules(k):
    """FlatParams mode, float64, learning rate from a Keras-style schedule."""
    cls, kw = KERAS[k]
    a, b, oa, ob = _keras_run(cls, kw, np.float64, SHAPES, 40, k, flat=True, schedule=True)
    assert_close(a, b, np.float64, "params")
    assert oa.learning_rate == pytest.approx(kw["learning_rate"] * 0.5 ** 4)


# -- sparse gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_sparse_rows_with_duplicates_equal_the_dense_step(momentum, nesterov):
    """Without momentum duplicates scatter-add; with momentum the gradient is deduplicated
    (summed) and every row's velocity decays: both equal the dense step."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    sparse, dense = table.copy(), table.copy()
    os_ = fk.SGD(learning_rate=0.1, momentum=momentum, nesterov=nesterov)
    od = fk.SGD(learning_rate=0.1, momentum=momentum, nesterov=nesterov)
    for k in range(6):
        idx = np.array([1, 7, 1, 3] if k % 2 == 0 else [5, 5])
        rows = rng.standard_normal((idx.size, 4)).astype(np.float32)
        g = np.zeros_like(table)
        np.add.at(g, idx, rows)
        os_.apply([SparseGrad(idx, rows)], [sparse])
        od.apply([g], [dense])
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-7)
    untouched = [0, 2, 4, 6, 8, 9]
    assert np.array_equal(sparse[untouched], table[untouched])


def test_sgd_sparse_accepts_indexed_slices_like_objects():
    class IndexedSlices:                           # the shape of tf.IndexedSlices
        def __init__(self, values, indices):
            self.values, self.indices = values, indices

    w = np.zeros((4, 2))
    fk.SGD(learning_rate=1.0).apply([IndexedSlices(np.ones((3, 2)), np.array([0, 0, 2]))], [w])
    np.testing.assert_allclose(w, [[-2, -2], [0, 0], [-1, -1], [0, 0]])


@pytest.mark.parametrize("cls", [fk.SGD, fk.RMSprop, fk.Adagrad, fk.Adam, fk.AdamW, fk.Adamax,
                                 fk.Nadam, fk.Adadelta], ids=lambda c: c.__name__)
def test_every_optimizer_takes_sparse_gradients_as_keras(cls):
    """Keras 3 takes sparse gradients in every optimizer, with the dense step's result
    (its test_sparse_correctness); checked here on the NumPy reference, with weight decay."""
    w_sparse, w_dense = np.ones((5, 2)), np.ones((5, 2))
    opt_s = cls(learning_rate=0.1, weight_decay=0.01, backend="numpy")
    opt_d = cls(learning_rate=0.1, weight_decay=0.01, backend="numpy")
    for k in range(3):
        idx = np.array([0, 3, 0]) if k != 1 else np.array([2])
        rows = np.full((idx.size, 2), 0.5 + k)
        dense = np.zeros((5, 2))
        np.add.at(dense, idx, rows)
        opt_s.apply([SparseGrad(idx, rows)], [w_sparse])
        opt_d.apply([dense], [w_dense])
    np.testing.assert_allclose(w_sparse, w_dense, rtol=1e-14)
    assert not np.array_equal(w_sparse, np.ones((5, 2)))


# -- the Keras interface -------------------------------------------------------------------------
def test_apply_subsets_iterations_and_state_dict_round_trip():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(3), rng.standard_normal((2, 2))]
    opt = fk.Nadam(learning_rate=0.01)
    with pytest.raises(ValueError, match="build"):
        opt.apply([np.ones(3)])
    opt.build(w)
    opt.apply([np.ones(3)], [w[0]])                # a subset: the other variable is skipped
    assert opt.iterations == 1 and 1 not in opt._engine.state
    with pytest.raises(ValueError, match="unknown variable"):
        opt.apply([np.ones(3)], [np.zeros(3)])
    with pytest.raises(ValueError, match="No gradients"):
        opt.apply([None, None])
    grads = [[rng.standard_normal(x.shape) for x in w] for _ in range(6)]
    for g in grads[:3]:
        opt.apply(g)
    sd = opt.state_dict()
    assert sd["iterations"] == 4 and 0 < sd["u_product"] < 1
    w2 = [x.copy() for x in w]
    opt2 = fk.Nadam(learning_rate=0.01)
    opt2.build(w2)
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        opt.apply(g)
        opt2.apply(g)
    for x, y in zip(w, w2):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="iterations"):
        opt2.load_state_dict({**sd, "iterations": -1})


def test_learning_rate_setter_and_callables():
    w = np.zeros(1)
    opt = fk.SGD(learning_rate=lambda: 0.25)
    opt.apply([np.ones(1)], [w])
    np.testing.assert_allclose(w, [-0.25])
    opt.learning_rate = 0.5
    opt.apply([np.ones(1)], [w])
    np.testing.assert_allclose(w, [-0.75])
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = -1.0
    sched = fk.SGD(learning_rate=ExponentialDecay(0.1, 1, 0.5))
    with pytest.raises(TypeError, match="not settable"):
        sched.learning_rate = 0.1


BAD = [
    (fk.SGD, dict(momentum=1.5), "momentum"), (fk.SGD, dict(learning_rate=-0.1), "learning_rate"),
    (fk.SGD, dict(nesterov="yes"), "nesterov"), (fk.SGD, dict(clipnorm=-1.0), "clipnorm"),
    (fk.RMSprop, dict(rho=1.5), "rho"), (fk.RMSprop, dict(epsilon=-1.0), "epsilon"),
    (fk.RMSprop, dict(centered=1), "centered"),
    (fk.Adagrad, dict(initial_accumulator_value=-0.1), "initial_accumulator_value"),
    (fk.Adam, dict(beta_1=1.0), "beta_1"), (fk.Adam, dict(beta_2=-0.5), "beta_2"),
    (fk.Adam, dict(amsgrad=None), "amsgrad"), (fk.Adam, dict(clipvalue=math.nan), "clipvalue"),
    (fk.AdamW, dict(weight_decay=None), "weight_decay"), (fk.AdamW, dict(weight_decay=-1.0), "weight_decay"),
    (fk.Adamax, dict(global_clipnorm=-2.0), "global_clipnorm"), (fk.Nadam, dict(beta_1=2.0), "beta_1"),
    (fk.Adadelta, dict(rho=-0.1), "rho"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD, ids=[f"{c.__name__}-{n}" for c, _, n in BAD])
def test_bad_hyperparameters_name_the_parameter(cls, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cls(**kwargs)


def test_keras_defaults():
    assert fk.SGD().get_config()["learning_rate"] == 0.01
    assert fk.Adagrad().get_config()["initial_accumulator_value"] == 0.1
    for cls in (fk.RMSprop, fk.Adagrad, fk.Adam, fk.AdamW, fk.Adamax, fk.Nadam, fk.Adadelta):
        cfg = cls().get_config()
        assert cfg["learning_rate"] == 0.001 and cfg["epsilon"] == 1e-7, cls
    assert fk.RMSprop().get_config()["rho"] == 0.9 and fk.Adadelta().get_config()["rho"] == 0.95


def test_flat_params_apply_and_checkpoint_round_trip(tmp_path):
    """apply(grads, flat) builds on the FlatParams; the state dict (with iterations and
    Nadam's u_product) survives fo.save / fo.load and the resumed run is identical."""
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(4)]
    flat = fo.FlatParams(init)
    opt = fk.Nadam(learning_rate=0.01)
    for g in grads[:2]:
        opt.apply(g, flat)
    path = tmp_path / "nadam.npz"
    fo.save(path, opt.state_dict())
    other = [p.copy() for p in flat.params]
    opt2 = fk.Nadam(learning_rate=0.01)
    opt2.build(other)
    opt2.load_state_dict(fo.load(path))
    assert opt2.iterations == 2
    for g in grads[2:]:
        opt.apply(g, flat)
        opt2.apply(g, other)
    for a, b in zip(flat.params, other):
        np.testing.assert_array_equal(a, b)
