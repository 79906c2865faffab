"""fastopt.keras: Keras 3's base-optimizer options and edges (issue 12).

use_ema / ema_momentum / ema_overwrite_frequency, loss_scale_factor,
gradient_accumulation_steps, exclude_from_weight_decay, build([]), sparse gradients for
every optimizer, and the calls a Keras user writes first. Expected values come from
Keras's rules (keras/src/optimizers/base_optimizer.py) written out in NumPy here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt as fo
from fastopt import keras as fk
from fastopt.schedules import PiecewiseConstantDecay
from fastopt.sparse import SparseGrad


def _keras_adam(w, grads_per_step, lrs, b1=0.9, b2=0.999, eps=1e-7):
    """Keras's Adam in float64 NumPy: alpha = lr sqrt(1 - b2^t) / (1 - b1^t)."""
    w = np.array(w, dtype=np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w -= m * (lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)) / (np.sqrt(v) + eps)
    return w


# -- the calls a Keras user writes first ---------------------------------------------------------
def test_readme_example_runs_and_matches_keras_adam():
    import numpy as np
    import fastopt as fo

    w = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
    opt = fo.keras.Adam(learning_rate=1e-3)            # Keras: no variables here
    for _ in range(3):
        grads = [2 * w[0], np.ones(2, np.float32)]     # e.g. d/dw of sum(w0^2) + sum(w1)
        opt.apply(grads, w)                            # builds on the first call
    assert opt.iterations == 3

    expected = np.ones((3, 2))
    m, v = np.zeros((3, 2)), np.zeros((3, 2))
    for t in (1, 2, 3):
        g = 2 * expected
        m += (g - m) * 0.1
        v += (g * g - v) * 0.001
        expected = expected - m * (1e-3 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)) / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(w[0], expected, rtol=1e-6)


def test_positional_learning_rate_apply_and_apply_gradients():
    w1, w2 = np.zeros(3, np.float32), np.zeros(3, np.float32)
    g = np.array([1.0, -2.0, 0.5], np.float32)
    fk.Adam(0.01).apply([g], [w1])
    assert fk.Adam(learning_rate=0.01).apply_gradients(zip([g], [w2])) == 1
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_allclose(w1, _keras_adam(np.zeros(3), [g], [0.01]), rtol=1e-6)


@pytest.mark.parametrize("call", [
    lambda w: fk.Adam(w, learning_rate=1e-3),          # Python's "multiple values" trap
    lambda w: fk.Adam(w),
    lambda w: fk.SGD(fo.FlatParams(w), 0.1),
    lambda w: fk.Nadam(iter(w), learning_rate=1e-3),
])
def test_torch_style_construction_says_what_to_write(call):
    w = [np.zeros(2, np.float32)]
    with pytest.raises(TypeError, match=r"learning_rate=1e-3\), then opt.apply\(grads, variables\)"):
        call(w)


def test_build_with_no_variables():
    opt = fk.Adam()
    opt.build([])
    assert opt.built and opt.variables == [] and opt.iterations == 0
    opt.apply([], [])                                  # Keras: empty grads are a no-op
    assert opt.iterations == 0
    sd = opt.state_dict()
    assert sd["state"] == {} and sd["iterations"] == 0
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown variable"):
        opt.apply([np.ones(2)], [np.zeros(2)])
    with pytest.raises(ValueError, match="gradients for the 0 variables"):
        opt.apply([np.ones(2)])


# -- sparse gradients ---------------------------------------------------------------------------------
SPARSE = [
    (fk.Adagrad, dict(learning_rate=0.1)),                       # rows in place
    (fk.Adagrad, dict(learning_rate=0.1, clipnorm=0.5)),         # rows, per-tensor clip
    (fk.Adam, dict(learning_rate=0.05)),                         # densified
    (fk.SGD, dict(learning_rate=0.1, momentum=0.9, weight_decay=0.05)),   # decayed: densified
]


@pytest.mark.parametrize("cls,kw", SPARSE, ids=[f"{c.__name__}-{k}" for k, (c, _) in enumerate(SPARSE)])
def test_sparse_gradients_give_the_dense_step(cls, kw):
    """Keras's test_sparse_correctness: a sparse gradient (duplicates summed) steps as the
    same gradient made dense, for Adagrad and Adam too."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((8, 3)).astype(np.float32)
    other = rng.standard_normal(4).astype(np.float32)
    ws, wd = [table.copy(), other.copy()], [table.copy(), other.copy()]
    os_, od = cls(**kw), cls(**kw)
    for k in range(4):
        idx = np.array([1, 6, 1]) if k % 2 == 0 else np.array([3])
        rows = rng.standard_normal((idx.size, 3)).astype(np.float32)
        g_other = rng.standard_normal(4).astype(np.float32)
        dense = np.zeros_like(table)
        np.add.at(dense, idx, rows)
        os_.apply([SparseGrad(idx, rows), g_other], ws)
        od.apply([dense, g_other], wd)
    for a, b in zip(ws, wd):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    for a, b in zip(os_.variables, od.variables):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    if cls is fk.Adagrad:            # rows never seen keep their value and accumulator
        assert np.array_equal(ws[0][[0, 2, 4, 5, 7]], table[[0, 2, 4, 5, 7]])
        assert np.all(os_.variables[0][[0, 2, 4, 5, 7]] == np.float32(0.1))


def test_sparse_indexed_slices_on_the_numpy_reference_with_clipvalue():
    class IndexedSlices:                       # the shape of tf.IndexedSlices
        def __init__(self, values, indices):
            self.values, self.indices = values, indices

    w_sparse, w_dense = np.ones((4, 2)), np.ones((4, 2))
    kw = dict(learning_rate=0.5, clipvalue=0.3, backend="numpy")
    for cls in (fk.Adagrad, fk.Adam):
        opt_s, opt_d = cls(**kw), cls(**kw)
        opt_s.apply([IndexedSlices(np.full((3, 2), 0.2), np.array([0, 0, 2]))], [w_sparse])
        dense = np.array([[0.4, 0.4], [0, 0], [0.2, 0.2], [0, 0]])
        opt_d.apply([dense], [w_dense])
        np.testing.assert_allclose(w_sparse, w_dense, rtol=1e-15)
        assert not np.array_equal(w_sparse, np.ones((4, 2)))


# -- loss_scale_factor ----------------------------------------------------------------------------------
def test_loss_scale_factor_divides_gradients_before_clipping():
    w = np.zeros(2)
    opt = fk.SGD(learning_rate=1.0, global_clipnorm=1.0, loss_scale_factor=8.0)
    opt.apply([np.array([24.0, 32.0])], [w])           # unscaled [3, 4]: norm 5 -> [0.6, 0.8]
    np.testing.assert_allclose(w, [-0.6, -0.8], rtol=1e-15)
    assert opt.scale_loss(2.5) == 20.0 and fk.SGD().scale_loss(2.5) == 2.5
    w = np.zeros(3, np.float32)
    scaled = np.array([1024.0, -2048.0, 1.0], np.float32)
    fk.Adam(learning_rate=0.01, loss_scale_factor=1024.0).apply([scaled], [w])
    expected = _keras_adam(np.zeros(3), [np.array([1.0, -2.0, 1 / 1024])], [0.01])
    np.testing.assert_allclose(w, expected, rtol=1e-5)


def test_global_clipnorm_of_a_non_finite_norm_is_nan_as_keras():
    """Keras's clip_by_global_norm adds norm - norm: an infinite gradient makes every
    variable NaN (no silent skip; LossScaleOptimizer is the skipping tool)."""
    w = [np.zeros(2), np.ones(2)]
    fk.SGD(learning_rate=1.0, global_clipnorm=1.0).apply([np.array([np.inf, 0.0]), np.ones(2)], w)
    assert np.isnan(w[0]).all() and np.isnan(w[1]).all()


# -- gradient accumulation ------------------------------------------------------------------------------
def test_gradient_accumulation_is_one_step_on_the_mean_every_n_calls():
    """Adam, n = 3, loss_scale_factor 4, lr from a schedule of the call count: calls 1-2
    only accumulate; call 3 steps with the mean (bias correction t = 1, lr at call count
    2); call 6 steps again (t = 2, lr at call count 5)."""
    rng = np.random.default_rng(1)
    init = rng.standard_normal((2, 3))
    w = init.copy()
    grads = [rng.standard_normal((2, 3)) for _ in range(6)]
    lr = PiecewiseConstantDecay([1, 4], [0.1, 0.01, 0.001])
    opt = fk.Adam(learning_rate=lr, loss_scale_factor=4.0, gradient_accumulation_steps=3)
    for k, g in enumerate(grads[:2]):
        opt.apply([4.0 * g], [w])
        assert np.array_equal(w, init) and opt.iterations == 0
    np.testing.assert_allclose(opt.variables[0], grads[0] + grads[1], rtol=1e-15)   # the accumulator
    opt.apply([4.0 * grads[2]], [w])
    assert opt.iterations == 1
    mean1 = sum(grads[:3]) / 3
    np.testing.assert_allclose(w, _keras_adam(init, [mean1], [0.01]), rtol=1e-12)
    assert np.array_equal(opt.variables[0], np.zeros((2, 3)))
    for g in grads[3:]:
        opt.apply([4.0 * g], [w])
    assert opt.iterations == 2 and opt.apply_gradients(zip([4.0 * grads[0]], [w])) == 7
    np.testing.assert_allclose(w, _keras_adam(init, [mean1, sum(grads[3:]) / 3], [0.01, 0.001]),
                               rtol=1e-12)


def test_gradient_accumulation_clips_the_mean_and_reads_flat_grads():
    """Keras clips the averaged gradient (not each call's): [6, 8] then [0, 0] average to
    [3, 4], norm 5, clipped to [0.6, 0.8]. Here from a FlatParams' grads, with step()."""
    flat = fo.FlatParams([np.zeros(2, np.float32), np.ones(1, np.float32)])
    opt = fk.SGD(learning_rate=1.0, clipnorm=1.0, gradient_accumulation_steps=2)
    opt.build(flat)
    for g in ([6.0, 8.0], [0.0, 0.0]):
        flat.grads[0][...] = g
        flat.grads[1][...] = 0.5
        assert opt.step() is True
    np.testing.assert_allclose(flat.params[0], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(flat.params[1], [0.5], rtol=1e-6)
    assert opt.iterations == 1
    with pytest.raises(TypeError, match="loss_scale_factor"):
        opt.step(grad_scale=0.5)


# -- EMA --------------------------------------------------------------------------------------------------
def test_ema_over_several_steps_and_overwrite_frequency():
    """a_1 = w_1 (momentum 0 at iteration 0), then a = 0.8 a + 0.2 w; with frequency 3 the
    variables take the average after iterations 3 and 6 ((iterations + 1) % 3 == 0)."""
    rng = np.random.default_rng(2)
    init = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(7)]
    for freq in (None, 3):
        w = init.copy()
        opt = fk.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=freq)
        expect_w, expect_a = init.copy(), None
        for t, g in enumerate(grads):
            opt.apply([g], [w])
            expect_w = expect_w - 0.1 * g
            expect_a = expect_w.copy() if t == 0 else 0.8 * expect_a + 0.2 * expect_w
            if freq and (t + 1) % freq == 0:
                expect_w = expect_a.copy()
            np.testing.assert_allclose(opt.variables[0], expect_a, rtol=1e-13)   # the average
            np.testing.assert_allclose(w, expect_w, rtol=1e-13)
        if freq is None:
            assert not np.allclose(w, expect_a)
            opt.finalize_variable_values()
            np.testing.assert_allclose(w, expect_a, rtol=1e-13)


def test_ema_and_accumulators_in_the_state_dict(tmp_path):
    rng = np.random.default_rng(4)
    init = [rng.standard_normal(3), rng.standard_normal((2, 2))]
    grads = [[rng.standard_normal(x.shape) for x in init] for _ in range(7)]
    kw = dict(learning_rate=0.01, use_ema=True, gradient_accumulation_steps=2)
    a = [x.copy() for x in init]
    opt = fk.Nadam(**kw)
    for g in grads[:3]:
        opt.apply(g, a)
    path = tmp_path / "opt.npz"
    fo.save(path, opt.state_dict())
    b = [x.copy() for x in a]
    opt2 = fk.Nadam(**kw)
    opt2.build(b)
    opt2.load_state_dict(fo.load(path))
    assert opt2.iterations == opt.iterations == 1
    for g in grads[3:]:
        opt.apply(g, a)
        opt2.apply(g, b)
    for x, y in zip(a + opt.variables, b + opt2.variables):
        np.testing.assert_array_equal(x, y)
    no_ema = _built(fk.Nadam(learning_rate=0.01, gradient_accumulation_steps=2), [x.copy() for x in b])
    with pytest.raises(ValueError, match="average"):
        no_ema.load_state_dict(opt.state_dict())


def _built(opt, variables):
    opt.build(variables)
    return opt


# -- exclude_from_weight_decay ----------------------------------------------------------------------------
class Named(np.ndarray):
    """An array with a ``name``, as Keras and TF variables have."""

    def __new__(cls, value, name):
        out = np.array(value, dtype=np.float64).view(cls)
        out.name = name
        return out


def test_exclude_from_weight_decay_by_variable_and_by_name():
    """Zero gradients: Adam's update is 0, so a decayed variable scales by 1 - wd lr and an
    excluded one stays put."""
    decay = 1 - 0.5 * 0.1
    kernel, bias = Named([1.0, 2.0], "dense/kernel"), Named([3.0], "dense/bias")
    norm = Named([4.0], "ln/gamma")
    opt = fk.AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[norm], var_names=["bias"])
    opt.apply([np.zeros(2), np.zeros(1), np.zeros(1)], [kernel, bias, norm])
    np.testing.assert_allclose(kernel, [decay, 2 * decay], rtol=1e-15)
    assert bias[0] == 3.0 and norm[0] == 4.0
    with pytest.raises(ValueError, match="before the optimizer is built"):
        opt.exclude_from_weight_decay(var_names=["kernel"])
    # NumPy arrays have no name: build(variables, names=...) names them.
    w = [np.ones(2), np.ones(3), np.ones(1)]
    opt = fk.SGD(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias", "^emb"])
    with pytest.raises(ValueError, match="names"):
        opt.apply([np.zeros(2), np.zeros(3), np.zeros(1)], w)
    opt.build(w, names=["d/kernel", "d/bias", "embedding"])
    opt.apply([np.zeros(2), np.zeros(3), np.zeros(1)], w)
    np.testing.assert_allclose(w[0], [decay, decay], rtol=1e-15)
    assert np.array_equal(w[1], np.ones(3)) and np.array_equal(w[2], np.ones(1))


def test_excluded_variables_share_the_global_norm_state_ids_and_sparse_rows():
    """Excluded variables step as a second group: global_clipnorm still spans every
    variable, state ids stay the build positions, and an excluded variable's sparse rows
    step in place while the decayed one's gradient is densified."""
    w = [np.zeros(2), np.zeros(2), np.zeros(2)]
    opt = fk.SGD(learning_rate=1.0, weight_decay=0.1, global_clipnorm=1.0, momentum=0.5)
    opt.exclude_from_weight_decay(var_list=[w[1]])
    opt.apply([np.array([3.0, 0.0]), np.array([0.0, 4.0]), np.zeros(2)], w)
    np.testing.assert_allclose(w[0], [-0.6, 0.0], rtol=1e-15)
    np.testing.assert_allclose(w[1], [0.0, -0.8], rtol=1e-15)
    sd = opt.state_dict()
    np.testing.assert_allclose(sd["state"][1]["momentum"], [0.0, -0.8], rtol=1e-15)
    assert sorted(sd["param_groups"][0]["params"] + sd["param_groups"][1]["params"]) == [0, 1, 2]
    assert sd["param_groups"][1]["params"] == [1] and sd["param_groups"][1]["weight_decay"] is None
    w2 = [x.copy() for x in w]
    opt2 = fk.SGD(learning_rate=1.0, weight_decay=0.1, global_clipnorm=1.0, momentum=0.5)
    opt2.exclude_from_weight_decay(var_list=[w2[1]])
    opt2.build(w2)
    opt2.load_state_dict(sd)
    grads = [np.array([0.3, 0.1]), np.array([0.2, -0.1]), np.array([0.0, 0.5])]
    opt.apply(grads, w)
    opt2.apply(grads, w2)
    for a, b in zip(w + opt.variables, w2 + opt2.variables):
        np.testing.assert_array_equal(a, b)
    # Sparse rows: the same as dense gradients on a twin optimizer.
    tables = [np.ones((5, 2)), np.ones((5, 2))]
    twins = [np.ones((5, 2)), np.ones((5, 2))]
    opts = []
    for arrays in (tables, twins):
        o = fk.SGD(learning_rate=0.1, weight_decay=0.2)
        o.exclude_from_weight_decay(var_list=[arrays[1]])
        opts.append(o)
    idx, rows = np.array([4, 0, 4]), np.full((3, 2), 0.5)
    dense = np.zeros((5, 2))
    np.add.at(dense, idx, rows)
    opts[0].apply([SparseGrad(idx, rows), SparseGrad(idx, rows)], tables)
    opts[1].apply([dense, dense], twins)
    for a, b in zip(tables, twins):
        np.testing.assert_allclose(a, b, rtol=1e-15)
    np.testing.assert_allclose(tables[0][1], [1 - 0.02] * 2, rtol=1e-15)    # decayed, no gradient
    assert np.array_equal(tables[1][1], [1.0, 1.0])                         # excluded, no gradient


# -- config and bad options ------------------------------------------------------------------------------
def test_config_has_keras_options_and_round_trips():
    opt = fk.Adam(learning_rate=0.01, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5,
                  loss_scale_factor=128.0, gradient_accumulation_steps=4)
    cfg = opt.get_config()
    for key, value in dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5,
                           loss_scale_factor=128.0, gradient_accumulation_steps=4).items():
        assert cfg[key] == value
    assert fk.Adam.from_config(cfg).get_config() == cfg


BAD = [
    (dict(use_ema=True, ema_momentum=1.5), "ema_momentum"),
    (dict(use_ema=True, ema_overwrite_frequency=2.5), "ema_overwrite_frequency"),
    (dict(use_ema="yes"), "use_ema"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
    (dict(gradient_accumulation_steps=2.0), "gradient_accumulation_steps"),
    (dict(loss_scale_factor=0.0), "loss_scale_factor"),
    (dict(loss_scale_factor=math.inf), "loss_scale_factor"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[n for _, n in BAD])
def test_bad_options_name_the_option(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        fk.SGD(**kwargs)
