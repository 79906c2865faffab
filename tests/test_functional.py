"""The functional API: in-place steps over caller-owned state, equal to the classes.

``fo.functional.<name>`` on the CPU must equal the class on the CPU bit for bit (same
element, same scalars) and the class on the reference; its ``backend="numpy"`` form
must equal the class's reference bit for bit; CPU and reference agree within RTOL.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

import fastopt as fo

from cases import (ALL_CASES, DTYPES, Grads, assert_close, bad_hyperparameters, bad_value_id,
                   init_params, row_id)

SHAPES = [(0,), (1,), (3, 5), (70,)]
N_STEPS = 20


# Every optimizer whose spec declares a functional form: all of them, LAMB and LARS
# included (their per-tensor pass runs inside the call; the trust ratio is no argument).
FUNCTIONAL = [c for c in ALL_CASES if c.spec.functional]


def _functional_grid():
    return [pytest.param(c, row, id=f"{c.name}-{row_id(row)}") for c in FUNCTIONAL for row in c.grid]


def test_functional_forms_are_the_specs():
    assert [c.name for c in FUNCTIONAL] == [c.name for c in ALL_CASES if hasattr(fo.functional, c.name)]
    assert sorted(fo.functional.__all__) == sorted(c.name for c in FUNCTIONAL)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in FUNCTIONAL])
def test_functional_arguments_are_the_columns(case):
    """``(params, grads, <the spec's columns>, *, step, <hyperparameters>, backend)``: a
    per-tensor value (LAMB's and LARS's trust ratio) is neither a column nor a keyword."""
    sig = inspect.signature(case.functional)
    positional = [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["params", "grads", *(c.functional_name for c in case.spec.columns)]
    keywords = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert keywords[0] == "step" and keywords[-1] == "backend"
    assert set(keywords[1:-1]) >= set(case.functional_kwargs(case.hp()))


class FunctionalRun:
    """Params and caller-owned state for ``fo.functional.<name>``."""

    def __init__(self, case, hp, init, backend):
        self.case, self.backend = case, backend
        self.kw = case.functional_kwargs(hp)
        self.params = [a.copy() for a in init]
        self.slots = {name: [np.full(a.shape, case.initial_state(hp, name), a.dtype) for a in init]
                      for name in case.slot_names}
        self.step_count = 0

    def step(self, grads):
        self.step_count += 1
        out = self.case.functional(self.params, grads, *self.slots.values(), step=self.step_count,
                                   backend=self.backend, **self.kw)
        assert out is None


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,row", _functional_grid())
def test_functional_equals_class_and_reference(case, row, dtype):
    hp = case.hp(row)
    init = init_params(SHAPES, dtype, 1)
    f_cpu = FunctionalRun(case, hp, init, "cpu")
    f_ref = FunctionalRun(case, hp, init, "numpy")
    ids_before = [id(p) for p in f_cpu.params]
    c_cpu_params = [a.copy() for a in init]
    c_cpu = case.fo_cls(c_cpu_params, backend="cpu", **hp)
    c_ref_params = [a.copy() for a in init]
    c_ref = case.fo_cls(c_ref_params, backend="numpy", **hp)
    src = Grads(SHAPES, dtype, 2)
    for _ in range(N_STEPS):
        g = src.next()[1]
        f_cpu.step(g)
        f_ref.step(g)
        c_cpu.step(g)
        c_ref.step(g)
    assert [id(p) for p in f_cpu.params] == ids_before
    c_cpu_state, c_ref_state = c_cpu.state, c_ref.state
    for k in range(len(SHAPES)):
        assert f_cpu.params[k].tobytes() == c_cpu_params[k].tobytes(), f"params[{k}]: functional vs class"
        assert f_ref.params[k].tobytes() == c_ref_params[k].tobytes(), f"params[{k}]: numpy functional vs class"
        for name, arrays in f_cpu.slots.items():
            if name in c_cpu_state.get(k, {}):
                assert arrays[k].tobytes() == c_cpu_state[k][name].tobytes(), f"{name}[{k}]"
                assert f_ref.slots[name][k].tobytes() == c_ref_state[k][name].tobytes(), f"{name}[{k}]"
    assert_close(f_cpu.params, f_ref.params, dtype, "functional cpu vs reference")
    for name in f_cpu.slots:
        if name in c_cpu_state.get(0, {}):
            assert_close(f_cpu.slots[name], f_ref.slots[name], dtype, f"functional {name}")
    assert not np.array_equal(f_cpu.params[2], init[2])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in FUNCTIONAL])
def test_functional_mixed_dtypes_in_one_call(case):
    """float32 and float64 tensors in one call: one pass per dtype, each as if alone."""
    hp = case.hp()
    shapes = [(4,), (3,), (2, 2)]
    dtypes = [np.float32, np.float64, np.float32]
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    together = FunctionalRun(case, hp, init, "cpu")
    alone = [FunctionalRun(case, hp, [a], "cpu") for a in init]
    for _ in range(5):
        g = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        together.step(g)
        for run, gk in zip(alone, g):
            run.step([gk])
    for k, run in enumerate(alone):
        assert together.params[k].dtype == init[k].dtype
        assert together.params[k].tobytes() == run.params[0].tobytes()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in FUNCTIONAL])
def test_functional_zero_tensors_equal_class(case):
    """An all-zero param, an all-zero gradient and an empty tensor in one call (LAMB's and
    LARS's trust ratio is 1 there): the functional form equals the class, on the CPU
    bit for bit and on the reference bit for bit."""
    hp = case.hp()
    rng = np.random.default_rng(5)
    init = [np.zeros(3, np.float32), rng.standard_normal(4).astype(np.float32),
            np.zeros(0, np.float32), rng.standard_normal((1, 1)).astype(np.float32)]
    for backend in ("cpu", "numpy"):
        f = FunctionalRun(case, hp, init, backend)
        c_params = [a.copy() for a in init]
        c = case.fo_cls(c_params, backend=backend, **hp)
        for _ in range(4):
            g = [np.zeros(3, np.float32), np.zeros(4, np.float32), np.zeros(0, np.float32),
                 rng.standard_normal((1, 1)).astype(np.float32)]
            g[0] = rng.standard_normal(3).astype(np.float32)
            f.step(g)
            c.step(g)
        for k in range(len(init)):
            assert f.params[k].tobytes() == c_params[k].tobytes(), f"{backend}: params[{k}]"


def _bad_call_args(case):
    """Three float32 tensors (two of one shape, for "the same array twice"), their
    gradients and state for ``case``'s full row, and the first column active there."""
    hp = case.hp()
    run = FunctionalRun(case, hp, init_params([(3,), (3,), (2, 2)], np.float32, 6), "cpu")
    grads = [np.full(a.shape, 0.5, np.float32) for a in run.params]
    group = {**{h.name: h.default for h in case.spec.hypers}, **hp}
    active = case.fo_cls._active_slots(group)
    s = next(i for i, name in enumerate(active) if name is not None)
    return run, grads, list(run.slots.values()), s, active[s]


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _with(lists, s, value):
    return [value if i == s else x for i, x in enumerate(lists)]


# (how the call's params, grads, state lists and keywords are spoiled, exception, message
# pattern, "{slot}" standing for the state column spoiled); ``s`` is its position.
BAD_CALLS = {
    "step_zero": (lambda p, g, S, s: (p, g, S, {"step": 0}), ValueError, "step"),
    "step_negative": (lambda p, g, S, s: (p, g, S, {"step": -1}), ValueError, "step"),
    "step_bool": (lambda p, g, S, s: (p, g, S, {"step": True}), ValueError, "step"),
    "step_float": (lambda p, g, S, s: (p, g, S, {"step": 1.5}), ValueError, "step"),
    "empty_params": (lambda p, g, S, s: ([], [], [[] for _ in S], {}), ValueError, "empty"),
    "grads_count": (lambda p, g, S, s: (p, g[:1], S, {}), ValueError, "grads"),
    "grad_shape": (lambda p, g, S, s: (p, [g[0], np.zeros(4, np.float32), g[2]], S, {}), ValueError,
                   r"grads\[1\]"),
    "grad_dtype": (lambda p, g, S, s: (p, [g[0], g[1].astype(np.float64), g[2]], S, {}),
                   (ValueError, TypeError), r"grads\[1\]"),
    "grad_is_param": (lambda p, g, S, s: (p, [g[0], p[1], g[2]], S, {}), ValueError,
                      r"grads\[1\] is params\[1\]"),
    "param_read_only": (lambda p, g, S, s: ([p[0], _read_only(p[1]), p[2]], g, S, {}), ValueError,
                        r"params\[1\].*read-only"),
    "param_not_array": (lambda p, g, S, s: ([p[0], [1.0, 2.0, 3.0], p[2]], g, S, {}), TypeError,
                        r"params\[1\]"),
    "params_overlap": (lambda p, g, S, s: ([p[0], p[0][:], p[2]], g, S, {}), ValueError,
                       r"params\[0\] and params\[1\] are overlapping memory"),
    "missing_state": (lambda p, g, S, s: (p, g, _with(S, s, None), {}), ValueError, "{slot}"),
    "state_count": (lambda p, g, S, s: (p, g, _with(S, s, S[s][:1]), {}), ValueError, "{slot}"),
    "state_shape": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], np.zeros(4, np.float32), S[s][2]]), {}),
                    ValueError, r"{slot}\[1\]"),
    "state_dtype": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], S[s][1].astype(np.float64), S[s][2]]),
                                        {}), ValueError, r"{slot}\[1\]"),
    "state_not_array": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], [0.0] * 3, S[s][2]]), {}),
                        TypeError, r"{slot}\[1\]"),
    "state_is_param": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], p[1], S[s][2]]), {}), ValueError,
                       r"params\[1\] and {slot}\[1\] are the same array"),
    "state_twice": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], S[s][0], S[s][2]]), {}), ValueError,
                    r"{slot}\[0\] and {slot}\[1\] are the same array"),
    "state_read_only": (lambda p, g, S, s: (p, g, _with(S, s, [S[s][0], _read_only(S[s][1]), S[s][2]]), {}),
                        ValueError, "read-only"),
    "unknown_backend": (lambda p, g, S, s: (p, g, S, {"backend": "fast"}), ValueError, "backend"),
    "unknown_keyword": (lambda p, g, S, s: (p, g, S, {"bogus": 1}), TypeError, "bogus"),
}


@pytest.mark.parametrize("what", list(BAD_CALLS))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in FUNCTIONAL])
def test_functional_bad_input_changes_nothing(case, what):
    run, grads, slots, s, slot = _bad_call_args(case)
    arrays = run.params + grads + [a for arrays in slots for a in arrays]
    before = [a.tobytes() for a in arrays]
    spoil, exc, pattern = BAD_CALLS[what]
    p, g, S, extra = spoil(run.params, grads, slots, s)
    with pytest.raises(exc, match=pattern.replace("{slot}", slot)):
        case.functional(p, g, *S, **{**run.kw, **extra})
    assert [a.tobytes() for a in arrays] == before


def _adam_args(dtype=np.float32):
    p = [np.ones(3, dtype), np.ones((2, 2), dtype)]
    g = [np.full(3, 0.5, dtype), np.full((2, 2), 0.5, dtype)]
    m = [np.zeros(3, dtype), np.zeros((2, 2), dtype)]
    v = [np.zeros(3, dtype), np.zeros((2, 2), dtype)]
    return p, g, m, v


# Checks one optimizer's hyperparameters make of its state.
SPEC_BAD_CALLS = {
    "missing_amsgrad_state": (lambda p, g, m, v: fo.functional.adam(p, g, m, v, amsgrad=True), ValueError,
                              "max_exp_avg_sq"),
    "sgd_nesterov": (lambda p, g, m, v: fo.functional.sgd(p, g, m, nesterov=True), ValueError, "nesterov"),
    "sgd_missing_buffers": (lambda p, g, m, v: fo.functional.sgd(p, g, None, momentum=0.9), ValueError,
                            "momentum_buffer"),
}


@pytest.mark.parametrize("what", list(SPEC_BAD_CALLS))
def test_functional_bad_state_for_hyperparameters_changes_nothing(what):
    p, g, m, v = _adam_args()
    before = [a.tobytes() for a in p + m + v]
    call, exc, pattern = SPEC_BAD_CALLS[what]
    with pytest.raises(exc, match=pattern):
        call(p, g, m, v)
    assert [a.tobytes() for a in p + m + v] == before


def _functional_bad_hypers():
    """Each keyword hyperparameter of each functional form (betas split into beta1, ...)
    with each bad value of its kind (cases.BAD_VALUES)."""
    out = []
    for c in FUNCTIONAL:
        keywords = {h.name for h in c.spec.settable if h.functional}
        for name, value, mention in bad_hyperparameters(c):
            if name not in keywords:
                continue
            if name == "betas":
                n = len(next(h.default for h in c.spec.hypers if h.name == "betas"))
                if not isinstance(value, tuple) or len(value) != n:
                    continue                    # the functional form takes the betas one by one
                kw = {f"beta{k}": b for k, b in enumerate(value, 1)}
            else:
                kw = {name: value}
            out.append(pytest.param(c, kw, mention, id=f"{c.name}-{bad_value_id(name, value)}"))
    return out


@pytest.mark.parametrize("case,kw,mention", _functional_bad_hypers())
def test_functional_bad_hyperparameter_changes_nothing(case, kw, mention):
    hp = case.hp({})
    init = init_params([(3,), (2, 2)], np.float32, 4)
    run = FunctionalRun(case, hp, init, "cpu")
    before = [a.tobytes() for a in run.params + [x for xs in run.slots.values() for x in xs]]
    with pytest.raises((ValueError, TypeError), match=rf"(?<![\w]){re.escape(mention)}(?![\w])"):
        case.functional(run.params, [np.ones_like(a) for a in init], *run.slots.values(),
                        **{**run.kw, **kw})
    assert [a.tobytes() for a in run.params + [x for xs in run.slots.values() for x in xs]] == before


def test_functional_sgd_without_momentum_needs_no_buffers():
    p = [np.ones(3, np.float32)]
    fo.functional.sgd(p, [np.ones(3, np.float32)], lr=0.5)
    assert np.array_equal(p[0], np.full(3, 0.5, np.float32))


def test_functional_sgd_step_one_initialises_the_buffer():
    """step=1 makes the momentum buffer the gradient (whatever it held), as torch does."""
    p = [np.zeros(3)]
    buf = [np.full(3, 100.0)]
    fo.functional.sgd(p, [np.ones(3)], buf, step=1, lr=0.1, momentum=0.9, dampening=0.5)
    assert np.array_equal(buf[0], np.ones(3))
    fo.functional.sgd(p, [np.ones(3)], buf, step=2, lr=0.1, momentum=0.9, dampening=0.5)
    assert np.allclose(buf[0], 0.9 + 0.5, rtol=1e-15)
    assert np.allclose(p[0], -0.1 - 0.1 * 1.4, rtol=1e-15)
