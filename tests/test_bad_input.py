"""Bad input: a clear error naming the culprit, and nothing changed.

Every failing call is made on an optimizer that has already stepped (so it has state),
with a snapshot of the bytes of every param and state array taken before; after the
error the bytes must be identical. Then the optimizer and an identical twin that never
saw the bad call take one more good step: they must agree bit for bit, which also
catches hidden damage (step counts, cached tables).

Every optimizer of the database (``cases.ALL_CASES``); the hyperparameters tried are each
spec's, with the bad values of their kind (``cases.bad_hyperparameters``).
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest

import fastopt as fo

from cases import (ALL_CASES, BY_NAME, CASES, NAN, bad_hyperparameters, bad_value_id, case_params,
                   hyper_kind)

ALL_CASE_PARAMS = case_params(ALL_CASES)


# -- fixtures ---------------------------------------------------------------------------
def make_params():
    """Mixed dtypes (two buckets); param 2 is a view into a larger buffer, so a gradient
    can overlap it without being it."""
    rng = np.random.default_rng(0)
    backing = rng.standard_normal(24).astype(np.float32)
    return [rng.standard_normal(6).astype(np.float32),
            rng.standard_normal((2, 3)),
            backing[:12].reshape(3, 4),
            rng.standard_normal(5)]


def good_grads(params, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def stepped_twins(case, hp=None, groups=False):
    """Two identical optimizers over identical params, two good steps each."""
    hp = case.hp() if hp is None else hp
    out = []
    for _ in range(2):
        params = make_params()
        src = ([{"params": params[:2], **hp}, {"params": params[2:], **hp}] if groups else params)
        opt = case.fo_cls(src, **({} if groups else hp))
        for k in range(2):
            opt.step(good_grads(params, k))
        out.append((params, opt))
    return out


def snapshot(params, opt):
    """Bytes of every param and state array, plus dtypes and shapes."""
    ps = [(p.dtype.str, p.shape, p.tobytes()) for p in params]
    st = {i: {k: (np.asarray(v).dtype.str, np.shape(v), np.asarray(v).tobytes()) for k, v in s.items()}
          for i, s in opt.state.items()}
    return ps, st


def groups_of(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_unchanged(params, opt, snap, twin, groups=None):
    """Bytes as in ``snap``; then one good step agrees bit for bit with the twin."""
    now = snapshot(params, opt)
    assert now[0] == snap[0], "params changed by a failed call"
    assert now[1] == snap[1], "state changed by a failed call"
    if groups is not None:
        assert groups_of(opt) == groups, "param groups changed by a failed call"
    twin_params, twin_opt = twin
    g = good_grads(params, 99)
    opt.step(g)
    twin_opt.step(g)
    assert snapshot(params, opt) == snapshot(twin_params, twin_opt), \
        "after a failed call the optimizer no longer steps like its twin"


def named(name):
    """A regex that finds ``name`` as a whole word (``lr`` but not inside ``lr_decay``)."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


# -- construction ----------------------------------------------------------------------
def _backing():
    return np.zeros(12, dtype=np.float32)


BAD_PARAM_LISTS = {
    "empty_list": (lambda: [], ValueError, "empty"),
    "empty_group": (lambda: [{"params": []}], ValueError, "empty"),
    "single_array": (lambda: np.zeros(3, np.float32), TypeError, "list"),
    "same_array_twice": (lambda: (lambda a: [np.zeros(2, np.float32), a, a])(np.zeros(3, np.float32)),
                         ValueError, r"params\[1\] and params\[2\] are the same array"),
    "overlapping_views": (lambda: (lambda b: [b[:6], b[4:10]])(_backing()), ValueError,
                          r"params\[0\] and params\[1\].*overlapping"),
    "int32": (lambda: [np.zeros(3, np.float32), np.zeros(3, np.int32)], TypeError, r"\[1\].*int32"),
    "int64": (lambda: [np.zeros(3, np.int64)], TypeError, r"\[0\].*int64"),
    "complex64": (lambda: [np.zeros(3, np.complex64)], TypeError, r"\[0\].*complex64"),
    "object": (lambda: [np.array([1.0, 2.0], dtype=object)], TypeError, r"\[0\].*object"),
    "bool": (lambda: [np.zeros(3, bool)], TypeError, r"\[0\].*bool"),
    "non_contiguous": (lambda: [np.zeros((3, 8), np.float32)[:, ::2]], ValueError, r"\[0\].*contiguous"),
    "fortran_order": (lambda: [np.asfortranarray(np.zeros((3, 4)))], ValueError, r"\[0\].*contiguous"),
    "read_only": (lambda: [np.zeros(2), (lambda a: (a.setflags(write=False), a)[1])(np.zeros(3))],
                  ValueError, r"\[1\].*read-only"),
    "not_an_array": (lambda: [np.zeros(3), [1.0, 2.0]], TypeError, r"\[1\]"),
    "mixed_dicts_and_arrays": (lambda: [np.zeros(3), {"params": [np.zeros(2)]}], TypeError, "mixes"),
    "overlapping_groups": (lambda: (lambda a: [{"params": [a]}, {"params": [np.zeros(1), a]}])(np.zeros(3)),
                           ValueError, "same array"),
    "overlapping_groups_views": (lambda: (lambda b: [{"params": [b[:5]]}, {"params": [b[3:]]}])(_backing()),
                                 ValueError, "overlapping"),
    "unknown_hyperparameter": (lambda: [{"params": [np.zeros(3)], "lrr": 0.1}], TypeError, "lrr"),
}


@pytest.mark.parametrize("case", [BY_NAME["sgd"], BY_NAME["adam"]], ids=["sgd", "adam"])
@pytest.mark.parametrize("what", list(BAD_PARAM_LISTS))
def test_bad_params_at_construction(case, what):
    build, exc, pattern = BAD_PARAM_LISTS[what]
    params = build()
    before = [(a.tobytes() if isinstance(a, np.ndarray) and a.dtype != object else repr(a))
              for a in (params if isinstance(params, list) else [params])
              for a in (a["params"] if isinstance(a, dict) else [a])]
    with pytest.raises(exc, match=pattern):
        case.fo_cls(params, **case.hp())
    after = [(a.tobytes() if isinstance(a, np.ndarray) and a.dtype != object else repr(a))
             for a in (params if isinstance(params, list) else [params])
             for a in (a["params"] if isinstance(a, dict) else [a])]
    assert before == after


def test_disjoint_views_of_one_buffer_are_fine():
    """The positive control of the overlap checks: adjacent views are distinct params."""
    b = np.zeros(10, np.float32)
    opt = fo.SGD([b[:5], b[5:]], lr=1.0)
    opt.step([np.ones(5, np.float32), np.full(5, 2.0, np.float32)])
    assert np.array_equal(b, [-1.0] * 5 + [-2.0] * 5)


@pytest.mark.parametrize("case", ALL_CASE_PARAMS)
def test_add_param_group_overlapping_leaves_optimizer_unchanged(case):
    (params, opt), twin = stepped_twins(case)
    snap, groups = snapshot(params, opt), groups_of(opt)
    with pytest.raises(ValueError, match="same array"):
        opt.add_param_group({"params": [np.zeros(2, np.float32), params[1]]})
    with pytest.raises(ValueError, match="overlapping"):
        opt.add_param_group({"params": [params[2].base[10:14]]})
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*int"):
        opt.add_param_group({"params": [np.zeros(2, np.int32)]})
    assert len(opt.param_groups) == 1
    assert assert_unchanged(params, opt, snap, twin, groups) is None


# -- hyperparameters ------------------------------------------------------------------
def _bad_hp_params():
    """Every hyperparameter of every spec with each bad value of its kind (cases.BAD_VALUES),
    and the cross-hyperparameter rules of a spec's ``check``."""
    out = [pytest.param(case, name, value, mention, id=f"{case.name}-{bad_value_id(name, value)}")
           for case in ALL_CASES for name, value, mention in bad_hyperparameters(case)]
    # nesterov needs momentum > 0 and dampening == 0
    sgd = BY_NAME["sgd"]
    out.append(pytest.param(sgd, None, dict(nesterov=True, momentum=0.0, dampening=0.0), "nesterov",
                            id="sgd-nesterov_without_momentum"))
    out.append(pytest.param(sgd, None, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov",
                            id="sgd-nesterov_with_dampening"))
    return out


@pytest.mark.parametrize("case", case_params(CASES))
def test_refuses_what_torch_refuses(case):
    """The ranges the specs declare are not looser than torch.optim's: every value the
    torch class refuses at construction, fastopt refuses too, naming the hyperparameter."""
    torch = pytest.importorskip("torch")
    params = [np.zeros(3)]
    refused = 0
    for h in case.spec.settable:
        if isinstance(h.default, bool) or not isinstance(h.default, (int, float, tuple)):
            continue
        candidates = ([(-0.1,) + h.default[1:], h.default[:1] + (1.0,) + h.default[2:]]
                      if isinstance(h.default, tuple) else [-0.1, -1.0, 1.5])
        for value in candidates:
            try:
                case.torch_cls()([torch.zeros(3)], **{**case.hp({}), h.name: value})
            except ValueError:
                refused += 1
                with pytest.raises((ValueError, TypeError), match=named(h.name)):
                    case.fo_cls(params, **{**case.hp({}), h.name: value})
    assert refused, "torch refused none of the values: the test tested nothing"


def _bad_hp(name, value):
    """The group overrides: ``{name: value}``, or ``value`` itself for a rule."""
    return dict(value) if name is None else {name: value}


@pytest.mark.parametrize("case,name,value,mention", _bad_hp_params())
def test_bad_hyperparameter_at_construction(case, name, value, mention):
    over = _bad_hp(name, value)
    params = make_params()
    before = [p.tobytes() for p in params]
    with pytest.raises((ValueError, TypeError), match=named(mention)):
        case.fo_cls(params, **{**case.hp({}), **over})
    with pytest.raises((ValueError, TypeError), match=named(mention)):
        case.fo_cls([{"params": params[:2]}, {"params": params[2:], **over}], **case.hp({}))
    assert [p.tobytes() for p in params] == before


@pytest.mark.parametrize("case,name,value,mention", _bad_hp_params())
def test_bad_hyperparameter_set_between_steps(case, name, value, mention):
    """A group edited into a bad state: the step raises, naming the hyperparameter and
    the group, and nothing moves (the other group neither)."""
    over = _bad_hp(name, value)
    (params, opt), twin = stepped_twins(case, hp=case.hp({}), groups=True)
    snap, groups = snapshot(params, opt), groups_of(opt)
    opt.param_groups[1].update(over)
    with pytest.raises((ValueError, TypeError), match=named(mention)) as err:
        opt.step(good_grads(params, 5))
    assert "param_groups[1]" in str(err.value)
    opt.param_groups[1].update(groups[1])
    assert_unchanged(params, opt, snap, twin, groups)


# -- gradients ----------------------------------------------------------------------
def _overlapping_grad(params):
    backing = params[2].base           # params[2] is backing[:12]
    return backing[6:18].reshape(3, 4)


BAD_GRADS = {
    # name: (grads from (params, good grads), exception, pattern)
    "too_few": (lambda p, g: g[:3], ValueError, r"grads has 3 entries, expected 4"),
    "too_many": (lambda p, g: g + [g[0].copy()], ValueError, r"grads has 5 entries, expected 4"),
    "single_array": (lambda p, g: g[0], TypeError, "grads"),
    "wrong_shape": (lambda p, g: g[:2] + [np.zeros((3, 5), np.float32)] + g[3:], ValueError,
                    r"grads\[2\] has shape \(3, 5\)"),
    "wrong_shape_same_size": (lambda p, g: g[:2] + [np.zeros((4, 3), np.float32)] + g[3:], ValueError,
                              r"grads\[2\] has shape \(4, 3\)"),
    "flattened": (lambda p, g: g[:2] + [g[2].ravel()] + g[3:], ValueError, r"grads\[2\] has shape \(12,\)"),
    "wrong_float_dtype": (lambda p, g: g[:2] + [g[2].astype(np.float64)] + g[3:], TypeError,
                          r"grads\[2\].*float64"),
    "int_dtype": (lambda p, g: g[:2] + [np.zeros((3, 4), np.int32)] + g[3:], TypeError, r"grads\[2\].*int32"),
    "complex_dtype": (lambda p, g: g[:2] + [np.zeros((3, 4), np.complex64)] + g[3:], TypeError,
                      r"grads\[2\].*complex64"),
    "non_contiguous": (lambda p, g: g[:2] + [np.zeros((3, 8), np.float32)[:, ::2]] + g[3:], ValueError,
                       r"grads\[2\].*contiguous"),
    "fortran_order": (lambda p, g: g[:2] + [np.asfortranarray(np.zeros((3, 4), np.float32))] + g[3:],
                      ValueError, r"grads\[2\].*contiguous"),
    "the_param_itself": (lambda p, g: g[:2] + [p[2]] + g[3:], ValueError, r"grads\[2\] is params\[2\] itself"),
    "overlapping_the_param": (lambda p, g: g[:2] + [_overlapping_grad(p)] + g[3:], ValueError,
                              r"grads\[2\].*overlaps"),
    "not_an_array": (lambda p, g: g[:2] + [[[0.0] * 4] * 3] + g[3:], TypeError, r"grads\[2\]"),
    # same shape and float kind, other byte order: the fast check compares typestrs
    "byte_swapped": (lambda p, g: g[:2] + [g[2].astype(g[2].dtype.newbyteorder())] + g[3:],
                     TypeError, r"grads\[2\] has dtype >f"),
    "ndarray_subclass": (lambda p, g: g[:2] + [np.ma.masked_array(g[2])[:, ::2]] + g[3:],
                         ValueError, r"grads\[2\]"),
}


@pytest.mark.parametrize("case", ALL_CASE_PARAMS)
@pytest.mark.parametrize("what", list(BAD_GRADS))
def test_bad_grads_change_nothing(case, what):
    """The bad gradient sits at index 2: params 0 and 1 (both dtypes) come before it and
    must not be updated either."""
    (params, opt), twin = stepped_twins(case)
    snap = snapshot(params, opt)
    make, exc, pattern = BAD_GRADS[what]
    with pytest.raises(exc, match=pattern):
        opt.step(make(params, good_grads(params, 3)))
    assert_unchanged(params, opt, snap, twin)


@pytest.mark.parametrize("case", ALL_CASE_PARAMS)
def test_bad_grad_in_second_group_leaves_first_group(case):
    (params, opt), twin = stepped_twins(case, groups=True)
    snap = snapshot(params, opt)
    g = good_grads(params, 4)
    g[3] = g[3][:4]
    with pytest.raises(ValueError, match=r"grads\[3\] has shape \(4,\)"):
        opt.step(g)
    assert_unchanged(params, opt, snap, twin)


@pytest.mark.parametrize("case", ALL_CASE_PARAMS)
def test_bad_grads_flat_mode(case):
    """FlatParams optimizer given an explicit bad grads list, and grads=None over params
    that are not FlatParams views."""
    flat = fo.FlatParams([np.ones(4, np.float32), np.ones((2, 3), np.float32), np.ones(5, np.float32)])
    opt = case.fo_cls(flat, **case.hp())
    flat.grad[...] = 0.5
    opt.step()
    snap = snapshot(flat.params, opt)
    for bad, pattern in [([flat.grads[0], flat.grads[1], np.zeros(4, np.float32)], r"grads\[2\] has shape"),
                         ([flat.grads[0], flat.params[1], flat.grads[2]], r"grads\[1\] is params\[1\]"),
                         ([flat.grads[0], flat.grads[1]], "grads has 2 entries")]:
        with pytest.raises(ValueError, match=pattern):
            opt.step(bad)
        assert snapshot(flat.params, opt) == snap
    plain = case.fo_cls([np.ones(3, np.float32)], **case.hp())
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] is not a FlatParams view"):
        plain.step()


# -- load_state_dict ------------------------------------------------------------------
def _first_slot(case, opt):
    return next(k for k in opt.state[0] if k != "step")


def _bad_state_dicts(case, opt):
    """name -> (a bad state dict, pattern the error must match)."""
    good = opt.state_dict()
    slot = _first_slot(case, opt)
    out = {}

    def variant(name, pattern, edit):
        sd = copy.deepcopy(good)
        edit(sd)
        out[name] = (sd, pattern)

    out["not_a_dict"] = ([good], "state_dict")
    out["no_state_key"] = ({"param_groups": good["param_groups"]}, "state")
    variant("missing_slot", re.escape(repr(slot)), lambda sd: sd["state"][2].pop(slot))
    if case.fo_cls.has_step_state:
        variant("missing_step", "'step'", lambda sd: sd["state"][1].pop("step"))
        variant("nan_step", "step", lambda sd: sd["state"][1].__setitem__("step", np.float32(NAN)))
        variant("negative_step", "step", lambda sd: sd["state"][1].__setitem__("step", np.float32(-1)))
        variant("fractional_step", "step", lambda sd: sd["state"][1].__setitem__("step", np.float32(1.5)))
    variant("missing_group_key", named("lr"), lambda sd: sd["param_groups"][0].pop("lr"))
    variant("bad_group_value", named("lr"), lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0))
    real = [h.name for h in case.spec.hypers if hyper_kind(h) in ("real", "nonnegative", "unit")]
    variant("nan_group_value", named(real[-1]),
            lambda sd: sd["param_groups"][0].__setitem__(real[-1], NAN))
    variant("wrong_shape", rf"\[3\]\[{re.escape(repr(slot))}\] has shape \(4,\)",
            lambda sd: sd["state"][3].__setitem__(slot, np.zeros(4)))
    variant("transposed_shape", r"has shape \(4, 3\)",
            lambda sd: sd["state"][2].__setitem__(slot, np.zeros((4, 3))))
    variant("int_state", "dtype", lambda sd: sd["state"][0].__setitem__(slot, np.zeros(6, np.int64)))
    variant("state_not_an_array", repr(slot), lambda sd: sd["state"][0].__setitem__(slot, "zeros"))
    variant("unknown_state_key", "bogus", lambda sd: sd["state"][0].__setitem__("bogus", np.zeros(6)))
    variant("unknown_param_id", "99", lambda sd: sd["state"].__setitem__(99, sd["state"][0]))
    variant("wrong_group_count", "param groups",
            lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[])))
    variant("wrong_param_count", "params", lambda sd: sd["param_groups"][0].__setitem__("params", [0, 1, 2]))
    # the last param's state is bad, the first three good: nothing may be loaded
    variant("bad_last_entry", r"\[3\]", lambda sd: sd["state"][3].__setitem__(slot, np.zeros(7)))
    return out


_SD_CASES = ["not_a_dict", "no_state_key", "missing_slot", "missing_step", "nan_step", "negative_step",
             "fractional_step", "missing_group_key", "bad_group_value",
             "nan_group_value", "wrong_shape", "transposed_shape", "int_state", "state_not_an_array",
             "unknown_state_key", "unknown_param_id", "wrong_group_count", "wrong_param_count",
             "bad_last_entry"]


_STEP_CASES = {"missing_step", "nan_step", "negative_step", "fractional_step"}


@pytest.mark.parametrize("case,what", [
    pytest.param(c, w, id=f"{c.name}-{w}") for c in ALL_CASES for w in _SD_CASES
    if c.fo_cls.has_step_state or w not in _STEP_CASES])
def test_bad_state_dict_changes_nothing(case, what):
    (params, opt), twin = stepped_twins(case)
    sd, pattern = _bad_state_dicts(case, opt)[what]
    # Make the loaded values differ from the current ones, so a partial load would show.
    for st in sd["state"].values() if isinstance(sd, dict) and isinstance(sd.get("state"), dict) else ():
        for k, v in st.items():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim:
                st[k] = v + 1
    snap, groups = snapshot(params, opt), groups_of(opt)
    with pytest.raises((ValueError, TypeError), match=pattern):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap, twin, groups)


def _wrong_optimizer_params():
    out = []
    for a in ALL_CASES:
        for b in ALL_CASES:
            da = a.fo_cls([np.zeros(1)]).defaults
            db = b.fo_cls([np.zeros(1)]).defaults
            # A state dict is recognised as another optimizer's by the hyperparameters it
            # lacks (extra group keys are carried along, as torch does). Adam and AdamW
            # share every key (AdamW is Adam with decoupled_weight_decay, as in torch):
            # their state dicts are interchangeable, as torch's are.
            if set(da) - set(db):
                out.append(pytest.param(a, b, id=f"{b.name}_into_{a.name}"))
    return out


@pytest.mark.parametrize("case,other", _wrong_optimizer_params())
def test_state_dict_of_another_optimizer(case, other):
    (params, opt), twin = stepped_twins(case)
    ps = make_params()
    src = other.fo_cls(ps, **other.hp())
    src.step(good_grads(ps, 1))
    snap, groups = snapshot(params, opt), groups_of(opt)
    with pytest.raises(ValueError, match=f"not a {type(opt).__name__} state dict"):
        opt.load_state_dict(src.state_dict())
    assert_unchanged(params, opt, snap, twin, groups)
