"""Property-based tests: random runs agree with the reference; bad input changes nothing.

Hypothesis draws, per optimizer: shapes (0-size and 0-d tensors, up to a thousand tiny
tensors, tensors that cross the CPU driver's 65536-element chunks), valid
hyperparameters over their whole legal range, float32 or float64, a number of steps,
which params skip which steps, fused gradient clipping. Each run goes through the NumPy
reference, the CPU driver over separate arrays and the CPU driver over a FlatParams:
list and FlatParams mode must agree bit for bit and both must agree with the reference.

Bad input is drawn from a catalogue (wrong dtype, shape, count, contiguity, aliasing,
NaN/negative/ill-typed hyperparameters, bad gradient scales, mismatched state dicts,
bad params at construction): the call must raise TypeError/ValueError, and every byte
of the params, the state, the step counters and the FlatParams buffers must be as
before; one more good step must then agree bit for bit with a twin that never saw the
bad call (hidden damage: cached tables, counters).

Examples are derandomized (fixed per test) so CI runs the same cases every time.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastopt as fo

from cases import DTYPES, Grads, assert_close, compare_impls, hyper_kind, init_params, make_impls, rms
from reliability_cases import (ALL_CASES, STATS, assert_unchanged, default_hp, hyperparameters,
                               snapshot)

# Examples per property, scaled: most examples draw new hyperparameters, and each new
# setting of an optimizer's flags compiles a kernel (~1-2 s), which is most of this file's
# time. The test command runs 0.3 of the written counts; FASTOPT_PROPERTY_SCALE=1
# (or more) explores further.
SCALE = float(os.environ.get("FASTOPT_PROPERTY_SCALE", "0.3"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
CASE_PARAMS = [pytest.param(c, id=c.name) for c in ALL_CASES]


# -- strategies -----------------------------------------------------------------------
def _shape(max_dim=6):
    return st.lists(st.integers(0, max_dim), min_size=0, max_size=3).map(tuple)


@st.composite
def shape_lists(draw):
    """Mostly a handful of small tensors (0-size and 0-d included); sometimes hundreds
    of tiny ones; sometimes one that spans several 65536-element chunks."""
    kind = draw(st.sampled_from(["small", "small", "small", "tiny_many", "chunked"]))
    if kind == "tiny_many":
        n = draw(st.integers(100, 1000))
        sizes = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        return [(s,) for s in sizes]
    shapes = draw(st.lists(_shape(), min_size=1, max_size=8))
    if kind == "chunked":
        shapes.insert(draw(st.integers(0, len(shapes))), (65536 * 2 + draw(st.integers(1, 999)),))
    return shapes


# -- 1. random valid runs: reference == cpu list == cpu FlatParams -------------------
def compare_run(impls, dtype, when, slots, scales):
    """cpu list == cpu FlatParams bit for bit; both within RTOL of the reference.

    As :func:`cases.compare_impls`, but the error is measured against the largest
    magnitude each quantity has had in the run so far (``scales``, updated here): a
    state that shrinks by orders of magnitude in one step (clipping with a coefficient
    that jumps, beta1 = 0) carries a rounding error of the values it passed through,
    and torch's ``lerp`` form (the reference's) and the kernel's ``b*m + (1-b)*g``
    round differently there.
    """
    by = {i.name: i for i in impls}
    for what in ("params",) + tuple(slots):
        arrays = {n: (i.params if what == "params" else i.state(what)) for n, i in by.items()}
        lst, flat, ref = arrays["cpu-list"], arrays["cpu-flat"], arrays["numpy"]
        for k, (a, b) in enumerate(zip(lst, flat)):
            assert (a is None) == (b is None), f"{when}: {what}[{k}] present in one mode only"
            if a is not None:
                assert np.array_equal(a, b, equal_nan=True), \
                    f"{when}: {what}[{k}] differs between list and FlatParams mode"
        present = [k for k, e in enumerate(ref) if e is not None]
        assert present == [k for k, a in enumerate(lst) if a is not None], \
            f"{when}: {what} exists for params {present} in the reference only"
        expected = [ref[k] for k in present]
        scales[what] = max(scales.get(what, 0.0), rms(expected))
        assert_close([lst[k] for k in present], expected, dtype, f"{when}: cpu vs numpy: {what}",
                     scale=scales[what])
    steps = [i.steps() for i in impls]
    assert all(s == steps[0] for s in steps), f"{when}: step counts differ: {steps}"


@pytest.mark.parametrize("case", CASE_PARAMS)
@settings(max_examples=examples(25), **SETTINGS)
@given(data=st.data())
def test_random_runs_agree_with_reference_and_across_modes(case, data):
    hp = data.draw(hyperparameters(case), label="hp")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shapes = data.draw(shape_lists(), label="shapes")
    n_steps = data.draw(st.integers(1, 5), label="steps")
    seed = data.draw(st.integers(0, 2 ** 31), label="seed")
    skipping = data.draw(st.booleans(), label="skip some params on some steps")
    clip = data.draw(st.one_of(st.none(), st.floats(0.05, 20.0)), label="max_grad_norm")
    init = init_params(shapes, dtype, seed)
    impls = make_impls(case, init, hp, with_torch=False)
    scales: dict = {}
    if clip is not None:
        for impl in impls:
            impl.opt.max_grad_norm = clip
    grads = Grads(shapes, dtype, seed + 1)
    rng = np.random.default_rng(seed + 2)
    for k in range(n_steps):
        flat_grad, views = grads.next()
        if skipping:
            views = [None if rng.random() < 0.3 else g for g in views]
        for impl in impls:
            impl.step(flat_grad, views)
        compare_run(impls, dtype, f"{case.name} step {k + 1} hp={hp} shapes={len(shapes)}",
                    case.slot_names, scales)
    if clip is not None:
        norms = {i.name: i.opt.last_grad_norm for i in impls}
        assert norms["cpu-list"] == norms["cpu-flat"], norms
        assert math.isclose(norms["cpu-list"], norms["numpy"], rel_tol=1e-6), norms
    STATS["property_runs"] += 1
    STATS["property_steps"] += n_steps


def test_two_thousand_tiny_tensors():
    """The issue's 'thousands of tiny tensors', once, outside hypothesis (costly in the
    per-tensor reference)."""
    case = ALL_CASES[3]                       # adam
    assert case.name == "adam"
    shapes = [(i % 4,) for i in range(2000)] + [()]
    init = init_params(shapes, np.float32, 7)
    impls = make_impls(case, init, case.hp(), with_torch=False)
    grads = Grads(shapes, np.float32, 8)
    for k in range(3):
        flat_grad, views = grads.next()
        for impl in impls:
            impl.step(flat_grad, views)
    compare_impls(impls, np.float32, "2000 tiny tensors", slots=case.slot_names)


# -- 2. bad input: an error, and not one byte changed ---------------------------------
class Env:
    """An optimizer that has stepped, its params, and how to make good gradients.

    List mode: params are views into one backing buffer with a gap after each (so a
    gradient can overlap a param without being it). FlatParams mode: the step reads
    the FlatParams' grads.
    """

    def __init__(self, case, hp, dtype, shapes, mode, seed, clip=None):
        self.case, self.hp, self.dtype, self.shapes, self.mode = case, hp, np.dtype(dtype), shapes, mode
        self.rng = np.random.default_rng(seed)
        self.bad_rng = np.random.default_rng(seed + 1)
        init = init_params(shapes, dtype, seed)
        if mode == "flat":
            self.flat = fo.FlatParams(init)
            self.params = self.flat.params
            self.flats = [self.flat]
        else:
            self.flat = None
            sizes = [a.size for a in init]
            self.backing = np.zeros(sum(sizes) + len(sizes), dtype)
            self.params, off = [], 0
            for a in init:
                view = self.backing[off:off + a.size].reshape(a.shape)
                view[...] = a
                self.params.append(view)
                off += a.size + 1
            self.flats = []
        self.opt = case.fo_cls(self.params if mode == "list" else self.flat, max_grad_norm=clip, **hp)

    def grads(self):
        """Valid gradients for a bad call (their own random stream: the good steps'
        stream must stay in step with the twin's)."""
        return [self.bad_rng.standard_normal(p.shape).astype(self.dtype) for p in self.params]

    def good_step(self):
        g = [self.rng.standard_normal(p.shape).astype(self.dtype) for p in self.params]
        if self.flat is not None:
            for dst, src in zip(self.flat.grads, g):
                dst[...] = src
            assert self.opt.step() is True
        else:
            assert self.opt.step(g) is True

    def snap(self, ids=True):
        s = snapshot(self.opt, self.params, self.flats)
        return s if ids else {k: v for k, v in s.items() if not k.endswith(".params")}


def _nonempty(env, min_size=1):
    return [k for k, p in enumerate(env.params) if p.size >= min_size]


# Each action: function(env, draw) -> (call, exception types, undo or None). Every env
# has params of 3 and 4 elements, so each action finds a param it applies to.
def _with_grad(env, k, g):
    grads = env.grads()
    grads[k] = g
    return lambda: env.opt.step(grads)


def bad_grad_dtype(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 0)))
    other = draw(st.sampled_from([d for d in (np.float32, np.float64, np.float16, np.int32,
                                               np.int64, np.complex64, np.bool_)
                                  if np.dtype(d) != env.dtype]))
    return _with_grad(env, k, np.zeros(env.params[k].shape, other)), (TypeError,), None


def bad_grad_shape(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 0)))
    shape = env.params[k].shape
    choices = [shape + (1,), (int(np.prod(shape)) + 1,)]
    if len(shape) >= 1:
        choices.append(shape[:-1] + (shape[-1] + 1,))
    if len(shape) >= 2 and shape[0] != shape[1]:
        choices.append((shape[1], shape[0]) + shape[2:])
    new = draw(st.sampled_from(choices))
    return _with_grad(env, k, np.zeros(new, env.dtype)), (ValueError,), None


def bad_grad_count(env, draw):
    grads = env.grads()
    if draw(st.booleans()):
        grads = grads + [np.zeros(3, env.dtype)]
    else:
        grads = grads[:-1]
    return (lambda: env.opt.step(grads)), (ValueError,), None


def bad_grad_not_contiguous(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 2)))
    p = env.params[k]
    big = np.zeros(p.shape + (2,), env.dtype)
    g = big[..., 0]
    assert not g.flags.c_contiguous
    return _with_grad(env, k, g), (ValueError,), None


def bad_grad_is_param(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 1)))
    return _with_grad(env, k, env.params[k]), (ValueError,), None


def bad_grad_overlaps_param(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 2)))      # shifted by one, still overlapping
    p = env.params[k]
    base = env.flat.data if env.flat is not None else env.backing
    start = (p.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // env.dtype.itemsize
    shift = draw(st.sampled_from([-1, 1])) if start >= 1 else 1
    lo = start + shift
    if lo + p.size > base.size:
        lo = start - 1
    assert 0 <= lo and lo + p.size <= base.size
    return _with_grad(env, k, base[lo:lo + p.size].reshape(p.shape)), (ValueError,), None


def bad_grad_not_array(env, draw):
    k = draw(st.sampled_from(_nonempty(env, 0)))
    g = draw(st.sampled_from([env.params[k].tolist(), 1.0, "grad", object()]))
    return _with_grad(env, k, g), (TypeError,), None


def bad_grads_single_array(env, draw):
    g = np.zeros(env.params[0].shape, env.dtype)
    return (lambda: env.opt.step(g)), (TypeError,), None


def bad_grad_scale(env, draw):
    scale = draw(st.sampled_from([math.nan, math.inf, -1.0, 0.0, -math.inf, "1.0", None]))
    if scale is None:
        scale = [1.0]
    return (lambda: env.opt.step(env.grads(), grad_scale=scale)), (TypeError, ValueError), None


# Hyperparameters with a lower bound of 0 (negative is invalid) in every spec that has
# them, by their declared checks (cases.hyper_kind).
_NON_NEGATIVE = frozenset(
    h.name for c in ALL_CASES for h in c.spec.hypers if hyper_kind(h) in ("nonnegative", "unit")) - \
    frozenset(h.name for c in ALL_CASES for h in c.spec.hypers if hyper_kind(h) == "real")


def bad_hyperparameter(env, draw):
    group = env.opt.param_groups[0]
    numeric = sorted(k for k, v in group.items()
                     if k != "params" and not isinstance(v, bool))
    flags = sorted(k for k, v in group.items() if isinstance(v, bool))
    name = draw(st.sampled_from(numeric + flags))
    old = group[name]
    if name in flags:
        value = draw(st.sampled_from(["yes", 1, None, 0.0]))
    elif name == "betas":
        value = draw(st.sampled_from([(math.nan, 0.999), (0.9, math.inf), (-0.1, 0.999),
                                      (0.9, 1.0), (1.5, 0.9), (0.9,), "0.9", None]))
    else:
        bad = [math.nan, math.inf, -math.inf, "0.1", None, [0.1]]
        if name in _NON_NEGATIVE:
            bad.append(-draw(st.floats(1e-6, 10.0)))
        value = draw(st.sampled_from(bad))
    if name == "lr" and value is None:
        value = "lr"            # None is not a schedule either; keep the draw an invalid lr

    def call():
        group[name] = value
        env.opt.step(env.grads() if env.flat is None else None)

    def undo():
        group[name] = old
    return call, (TypeError, ValueError), undo


REPLACE = object()


def _state_keys(sd, draw):
    assume(sd["state"])              # SGD without momentum keeps no state
    pid = draw(st.sampled_from(sorted(sd["state"])))
    return pid, sd["state"][pid], sorted(k for k in sd["state"][pid] if k != "step")


def _sd_wrong_shape(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    k = draw(st.sampled_from(keys))
    st_[k] = np.zeros(np.shape(st_[k]) + (draw(st.integers(2, 3)),), st_[k].dtype)


def _sd_bad_dtype(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    k = draw(st.sampled_from(keys))
    dt = draw(st.sampled_from([np.int32, np.int64, np.bool_, np.complex64, object, "U3"]))
    st_[k] = np.zeros(np.shape(st_[k]), dt)


def _sd_missing_key(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    # A host-state value (NAdam's mu_product) may be absent on purpose: the load computes
    # it from the steps (a state dict from elsewhere), so only state columns are required.
    keys = [k for k in keys if k != "mu_product"]
    del st_[draw(st.sampled_from(keys + (["step"] if "step" in st_ else [])))]


def _sd_extra_key(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    st_[draw(st.sampled_from(["not_a_state_key", "momentum_buffer_", 7]))] = np.zeros(1)


def _sd_bad_step(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    st_["step"] = draw(st.sampled_from([np.float32(math.nan), np.float32(-1), np.float32(1.5),
                                        np.float64(1e30), np.float32(math.inf), np.zeros(2),
                                        "1", np.array(True), None]))


def _sd_groups(sd, draw):
    how = draw(st.sampled_from(["extra_group", "more_ids", "fewer_ids", "duplicate_ids",
                                "ids_not_list", "no_groups", "group_not_dict"]))
    g0 = sd["param_groups"][0]
    if how == "extra_group":
        sd["param_groups"].append(dict(g0, params=[10 ** 6]))
    elif how == "more_ids":
        g0["params"] = g0["params"] + [10 ** 6]
    elif how == "fewer_ids":
        g0["params"] = g0["params"][:-1]
    elif how == "duplicate_ids":
        g0["params"][1] = g0["params"][0]
    elif how == "ids_not_list":
        g0["params"] = len(g0["params"])
    elif how == "no_groups":
        sd["param_groups"] = []
    else:
        sd["param_groups"] = [5]


def _sd_bad_hyperparameter(sd, draw):
    g0 = sd["param_groups"][0]
    name = draw(st.sampled_from(sorted(k for k, v in g0.items() if k != "params")))
    if isinstance(g0[name], bool):
        g0[name] = "yes"
    elif name == "betas":
        g0[name] = (math.nan, 0.9)
    else:
        g0[name] = draw(st.sampled_from([math.nan, math.inf, "0.1"]
                                        + ([-1.0] if name in _NON_NEGATIVE else [])))


def _sd_missing_hyperparameter(sd, draw):
    g0 = sd["param_groups"][0]
    # ("foreach": schedule-free's groups record it for the schedulefree package to load;
    # it is no hyperparameter of fastopt's, and a state dict without it is complete)
    del g0[draw(st.sampled_from(sorted(k for k in g0 if k not in ("params", "foreach"))))]


def _sd_unknown_param_id(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    sd["state"][draw(st.sampled_from([10 ** 6, -1, "0"]))] = copy.deepcopy(st_)


def _sd_state_not_dict(sd, draw):
    pid, st_, keys = _state_keys(sd, draw)
    sd["state"][pid] = draw(st.sampled_from([np.zeros(3), None, [st_[keys[0]]]]))


def _sd_bad_iterations(sd, draw):
    sd["iterations"] = draw(st.sampled_from([-1, 1.5, math.nan, "x", 2 ** 60]))


def _sd_not_torch_layout(sd, draw):
    return REPLACE, draw(st.sampled_from([[], None, {"state": {}}, {"param_groups": []},
                                 {"state": [], "param_groups": sd["param_groups"]},
                                 {"state": sd["state"], "param_groups": 5}]))


SD_MUTATIONS = {
    "wrong_shape": _sd_wrong_shape, "bad_dtype": _sd_bad_dtype, "missing_key": _sd_missing_key,
    "extra_key": _sd_extra_key, "bad_step": _sd_bad_step, "groups": _sd_groups,
    "bad_hyperparameter": _sd_bad_hyperparameter,
    "missing_hyperparameter": _sd_missing_hyperparameter,
    "unknown_param_id": _sd_unknown_param_id, "state_not_dict": _sd_state_not_dict,
    "bad_iterations": _sd_bad_iterations, "not_torch_layout": _sd_not_torch_layout,
}


def _bad_state_dict(which):
    def action(env, draw):
        sd = env.opt.state_dict()
        out = SD_MUTATIONS[which](sd, draw)     # edits sd in place, or replaces it
        if out is not None:
            assert out[0] is REPLACE
            sd = out[1]
        return (lambda: env.opt.load_state_dict(sd)), (TypeError, ValueError), None
    return action


def bad_state_of_other_optimizer(env, draw):
    # Another optimizer whose groups lack some of this one's hyperparameters (torch, too,
    # would take RAdam's state from Adam: same keys, same meaning).
    def group_keys(case):
        return set(case.fo_cls([np.zeros(1, np.float32)]).defaults)
    mine = group_keys(env.case)
    other_case = draw(st.sampled_from([c for c in ALL_CASES if mine - group_keys(c)]))
    params = [np.array(p, copy=True) for p in env.params]
    other = other_case.fo_cls(params, **other_case.hp())
    other.step([np.ones(p.shape, p.dtype) for p in params])
    sd = other.state_dict()
    return (lambda: env.opt.load_state_dict(sd)), (TypeError, ValueError), None


CATALOGUE = {
    "grad_dtype": bad_grad_dtype,
    "grad_shape": bad_grad_shape,
    "grad_count": bad_grad_count,
    "grad_not_contiguous": bad_grad_not_contiguous,
    "grad_is_param": bad_grad_is_param,
    "grad_overlaps_param": bad_grad_overlaps_param,
    "grad_not_array": bad_grad_not_array,
    "grads_single_array": bad_grads_single_array,
    "grad_scale": bad_grad_scale,
    "hyperparameter": bad_hyperparameter,
    **{f"state_dict:{k}": _bad_state_dict(k) for k in SD_MUTATIONS},
    "state_dict_of_other_optimizer": bad_state_of_other_optimizer,
}


@st.composite
def env_specs(draw):
    case = draw(st.sampled_from(ALL_CASES))
    # Small shapes, at least two params of >= 2 elements (aliasing and strides need them).
    shapes = draw(st.lists(_shape(4), min_size=0, max_size=4))
    shapes = [(3,), (2, 2)] + shapes
    order = draw(st.permutations(range(len(shapes))))
    return dict(case=case, hp=draw(hyperparameters(case)), dtype=draw(st.sampled_from(DTYPES)),
                shapes=[shapes[i] for i in order], mode=draw(st.sampled_from(["list", "flat"])),
                seed=draw(st.integers(0, 2 ** 31)),
                clip=draw(st.one_of(st.none(), st.just(1.0))))


@pytest.mark.parametrize("action", sorted(CATALOGUE))
@settings(max_examples=examples(30), **SETTINGS)
@given(spec=env_specs(), data=st.data())
def test_bad_input_raises_and_changes_no_byte(action, spec, data):
    env, twin = Env(**spec), Env(**spec)
    n_good = data.draw(st.integers(1, 3), label="good steps first")
    for _ in range(n_good):
        env.good_step()
        twin.good_step()
    before = env.snap()
    call, exceptions, undo = CATALOGUE[action](env, data.draw)
    with pytest.raises(exceptions) as info:
        call()
    message = str(info.value)
    assert len(message) > 15, f"{action}: unclear error {message!r}"
    if undo is not None:
        undo()
    assert_unchanged(before, env.snap(), f"{spec['case'].name}/{spec['mode']}: {action} ({message})")
    STATS["bad_inputs_tried"] += 1
    STATS[f"bad_input:{action}"] += 1
    # Hidden damage: one more good step agrees bit for bit with the twin.
    env.good_step()
    twin.good_step()
    assert_unchanged(twin.snap(ids=False), env.snap(ids=False), f"{action}: then a good step vs twin")


# -- 3. bad params at construction: an error, the arrays untouched ---------------------
def _ro(a):
    a.setflags(write=False)
    return a


BAD_CONSTRUCTION = {
    "int": lambda dt: [np.zeros(3, dt), np.zeros(3, np.int32)],
    "complex": lambda dt: [np.zeros(3, np.complex128)],
    "object": lambda dt: [np.array([1.0, 2.0], dtype=object)],
    "float16_without_master_weights": lambda dt: [np.zeros(3, np.float16)],
    "non_contiguous": lambda dt: [np.zeros((4, 6), dt)[:, ::2]],
    "fortran": lambda dt: [np.asfortranarray(np.zeros((3, 4), dt))],
    "read_only": lambda dt: [np.zeros(2, dt), _ro(np.zeros(3, dt))],
    "same_array_twice": lambda dt: (lambda a: [a, np.zeros(2, dt), a])(np.ones(3, dt)),
    "overlapping_views": lambda dt: (lambda b: [b[:5], b[4:]])(np.arange(9, dtype=dt)),
    "empty": lambda dt: [],
    "single_array": lambda dt: np.zeros(3, dt),
    "nested_list": lambda dt: [[np.zeros(3, dt)]],
}


@settings(max_examples=examples(60), **SETTINGS)
@given(case=st.sampled_from(ALL_CASES), what=st.sampled_from(sorted(BAD_CONSTRUCTION)),
       dtype=st.sampled_from(DTYPES), data=st.data())
def test_bad_construction_raises_and_touches_nothing(case, what, dtype, data):
    params = BAD_CONSTRUCTION[what](dtype)
    arrays = [params] if isinstance(params, np.ndarray) else \
        [a for a in params if isinstance(a, np.ndarray) and a.dtype != object]
    before = [a.tobytes() for a in arrays]
    with pytest.raises((TypeError, ValueError)):
        case.fo_cls(params, **data.draw(hyperparameters(case)))
    assert [a.tobytes() for a in arrays] == before
    STATS["bad_inputs_tried"] += 1


@settings(max_examples=examples(60), **SETTINGS)
@given(case=st.sampled_from(ALL_CASES), data=st.data())
def test_bad_hyperparameter_at_construction(case, data):
    names = sorted(k for k, v in default_hp(case).items() if not isinstance(v, bool))
    name = data.draw(st.sampled_from(names))
    if name == "betas":
        value = data.draw(st.sampled_from([(math.nan, 0.9), (0.9, 1.0), (-1.0, 0.9), 0.9]))
    else:
        value = data.draw(st.sampled_from([math.nan, math.inf, "0.1", None]
                                          + ([-1.0] if name in _NON_NEGATIVE else [])))
    if name == "lr" and value is None:
        value = math.nan
    p = np.ones(4, np.float32)
    with pytest.raises((TypeError, ValueError)):
        case.fo_cls([p], **{name: value})
    assert np.all(p == 1)
    STATS["bad_inputs_tried"] += 1


# -- 4. param replacement, late read-only, grads aliasing another param -----------------
def _stepped_adam():
    params = [np.ones(4, np.float32), np.full(4, 2.0, np.float32)]
    opt = fo.Adam(params, lr=0.1)
    opt.step([np.ones(4, np.float32), np.ones(4, np.float32)])
    return params, opt


def test_grad_that_is_another_param_is_rejected():
    params, opt = _stepped_adam()
    before = snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.step([params[1], np.ones(4, np.float32)])
    assert_unchanged(before, snapshot(opt, params), "grad aliasing another param")


def test_param_made_read_only_after_construction_is_rejected():
    params, opt = _stepped_adam()
    params[0].setflags(write=False)
    before = snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.step([np.ones(4, np.float32), np.ones(4, np.float32)])
    assert_unchanged(before, snapshot(opt, params), "read-only param")


def test_param_replaced_by_another_shape_is_rejected():
    params, opt = _stepped_adam()
    smaller = np.ones(3, np.float32)
    opt.param_groups[0]["params"] = [smaller, params[1]]
    before = snapshot(opt, [smaller, params[1]])
    with pytest.raises(ValueError):
        opt.step([np.ones(3, np.float32), np.ones(4, np.float32)])
    assert_unchanged(before, snapshot(opt, [smaller, params[1]]), "replaced param")
