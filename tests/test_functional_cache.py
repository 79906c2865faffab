"""The functional forms remember their last call's checks (fastopt/functional.py: _Checked).

A call over the same host arrays, unchanged, checks only its gradients and
hyperparameters and reuses the last call's chunk tables. These tests hold that to:
- the same bits as the class, over many calls with new and repeated gradient arrays, for
  float32, bfloat16 and int8 state and a per-tensor optimizer (LAMB);
- every change to an array that a full check would refuse (read-only, dtype or shape
  changed in place, an array passed twice, a gradient that is its param) refused again,
  naming it, with nothing changed;
- no array kept alive by the memory of a call;
- the checks skipped only when they would pass (counted, not timed).
"""
from __future__ import annotations

import gc
import re
import threading
import weakref

import numpy as np
import pytest

import fastopt as fo
from fastopt import _validate, functional, lowbit
from fastopt.kernels.lowp import bfloat16_dtype

SHAPES = [(300,), (17, 33), (5001,), (1,)]


def _arrays(seed, shapes=SHAPES, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _grads(step, shapes=SHAPES):
    return _arrays(1000 + step, shapes)


def _adam_state(params, fmt):
    """Zero Adam state in ``fmt``: arrays, and the absmax dict for int8."""
    if fmt == "float32":
        return [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params], None
    if fmt == "bfloat16":
        bf16 = bfloat16_dtype()
        return ([np.zeros(p.shape, bf16) for p in params],
                [np.zeros(p.shape, bf16) for p in params], None)
    m, v, am, av = [], [], [], []
    for p in params:
        for codes, scales, storage in ((m, am, lowbit.INT8_SIGNED), (v, av, lowbit.INT8_UNSIGNED)):
            c, a = lowbit.encode(np.zeros(p.shape, np.float32), storage, 256)
            codes.append(c)
            scales.append(a)
    return m, v, {"exp_avgs": am, "exp_avg_sqs": av}


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_repeated_calls_equal_the_class_bit_for_bit(fmt):
    if fmt == "bfloat16" and bfloat16_dtype() is None:
        pytest.skip("ml_dtypes is not installed")
    params = _arrays(0)
    ref = [p.copy() for p in params]
    m, v, absmax = _adam_state(params, fmt)
    opt = fo.Adam(ref, lr=1e-2, weight_decay=0.01,
                  state_format=fmt, min_8bit_size=0) if fmt == "int8" else \
        fo.Adam(ref, lr=1e-2, weight_decay=0.01, state_format=fmt)
    same = _grads(0)
    for t in range(1, 13):
        grads = same if t % 3 == 0 else _grads(t)      # new arrays, and the same ones again
        functional.adam(params, grads, m, v, absmax=absmax, step=t, lr=1e-2, weight_decay=0.01)
        opt.step(grads)
        for a, b in zip(params, ref):
            assert np.array_equal(a, b), f"step {t}"
    for i in range(len(params)):
        st = opt.state[i]
        assert np.array_equal(m[i].view(np.uint8), st["exp_avg"].view(np.uint8))
        assert np.array_equal(v[i].view(np.uint8), st["exp_avg_sq"].view(np.uint8))


def _beside_the_class(form, cls, seed, steps):
    """``steps`` calls of ``form`` and steps of ``cls`` on copies of the same params, with
    new gradients each time: the two param lists after each step."""
    params = _arrays(seed)
    ref = [p.copy() for p in params]
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    opt = cls(ref, lr=1e-2)
    for t in range(1, steps + 1):
        grads = _grads(t)
        form(params, grads, m, v, step=t, lr=1e-2)
        opt.step(grads)
        yield params, ref


def test_a_per_tensor_optimizer_equals_the_class():
    for t, (params, ref) in enumerate(_beside_the_class(functional.lamb, fo.LAMB, 1, 8), 1):
        for a, b in zip(params, ref):
            assert np.array_equal(a, b), f"step {t}"


def _count_param_checks(monkeypatch):
    calls = []
    real = _validate.param

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(_validate, "param", counted)
    return calls


def test_a_call_over_the_same_arrays_checks_only_the_gradients(monkeypatch):
    params = _arrays(2)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    calls = _count_param_checks(monkeypatch)
    functional.adam(params, _grads(1), m, v, step=1)
    assert len(calls) == len(params)
    calls.clear()
    functional.adam(params, _grads(2), m, v, step=2)
    functional.adam(list(params), _grads(3), list(m), list(v), step=3)   # new lists, same arrays
    assert calls == []
    # another state array: everything is checked again
    m[1] = m[1].copy()
    functional.adam(params, _grads(4), m, v, step=4)
    assert len(calls) == len(params)
    # other hyperparameters with the same columns keep the memory; amsgrad adds a column
    calls.clear()
    functional.adam(params, _grads(5), m, v, step=5, lr=0.5, beta1=0.5, beta2=0.6)
    assert calls == []
    functional.adam(params, _grads(6), m, v, [np.zeros_like(p) for p in params], step=6,
                    amsgrad=True)
    assert len(calls) == len(params)


def _read_only(params, m, v):
    params[2].flags.writeable = False
    return "read-only"


def _dtype_in_place(params, m, v):
    v[1].dtype = np.int32        # same itemsize: the same shape, other values
    return "exp_avg_sq[1] must have params' dtype"


def _shape_in_place(params, m, v):
    m[1].shape = (33, 17)
    return "exp_avg[1] must match params[1] in shape"


def _twice(params, m, v):
    v[0] = m[0]
    return "exp_avg[0] and exp_avg_sq[0] are the same array"


def _grad_is_param(params, m, v):
    return "grads[3] is params[3] itself"


CHANGES = {"read-only param": _read_only, "dtype changed in place": _dtype_in_place,
           "shape changed in place": _shape_in_place, "one array twice": _twice,
           "gradient is its param": _grad_is_param}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_array_is_refused_again_and_nothing_changes(change):
    params = _arrays(3)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for t in (1, 2):
        functional.adam(params, _grads(t), m, v, step=t)
    mention = CHANGES[change](params, m, v)
    before = [a.copy() for a in params + m + v]
    grads = _grads(3)
    if change == "gradient is its param":
        grads[3] = params[3]
    with pytest.raises((ValueError, TypeError), match=re.escape(mention)):
        functional.adam(params, grads, m, v, step=3)
    for a, b in zip(params + m + v, before):
        assert np.array_equal(a.view(np.uint8).ravel(), b.view(np.uint8).ravel())


def test_the_memory_keeps_no_array_alive():
    params = _arrays(4)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    functional.adam(params, _grads(1), m, v, step=1)
    refs = [weakref.ref(a) for a in params + m + v]
    del params, m, v
    gc.collect()
    assert all(r() is None for r in refs)
    # new arrays (possibly at the same addresses) are checked and stepped as new
    params = _arrays(5)
    ref = [p.copy() for p in params]
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    opt = fo.Adam(ref)
    for t in (1, 2):
        grads = _grads(t)
        functional.adam(params, grads, m, v, step=t)
        opt.step(grads)
    for a, b in zip(params, ref):
        assert np.array_equal(a, b)


def test_another_backend_is_not_served_from_memory():
    params = _arrays(6)
    ref = [p.copy() for p in params]
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    rm, rv = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    for t in range(1, 5):
        grads = _grads(t)
        backend = "cpu" if t % 2 else "numpy"
        functional.adam(params, grads, m, v, step=t, backend=backend)
        functional.adam(ref, grads, rm, rv, step=t, backend="numpy")
    for a, b in zip(params, ref):
        assert np.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_threads_with_their_own_arrays_each_equal_the_class():
    """Two threads alternate calls over their own arrays: each call finds the other's
    memory, or its own; either way its steps are the class's."""
    out, errors = {}, []

    def train(seed):
        try:
            for params, ref in _beside_the_class(functional.adam, fo.Adam, seed, 29):
                pass
            out[seed] = all(np.array_equal(a, b) for a, b in zip(params, ref))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(s,)) for s in (7, 8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert out == {7: True, 8: True}


def test_functional_forms_bind_their_arguments_as_python_functions():
    """The forms are written as Python functions with the spec's signature (no
    ``inspect.Signature.bind`` per call): Python binds and refuses the arguments."""
    params = _arrays(9)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    ref = [p.copy() for p in params]
    rm, rv = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    grads = _grads(1)
    functional.adam(params, grads, m, v, None, step=1, lr=0.1, beta2=0.99)
    functional.adam(params=ref, grads=grads, exp_avg_sqs=rv, exp_avgs=rm, lr=0.1, beta2=0.99)
    for a, b in zip(params, ref):
        assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="missing 2 required positional arguments: 'exp_avgs' and"):
        functional.adam(params, grads)
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        functional.adam(params, grads, m, v, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="positional arguments but 6 were given"):
        functional.adam(params, grads, m, v, None, 2)
    assert functional.adam.__module__ == "fastopt.functional"
    assert functional.adam.__name__ == "adam"
