"""Silent surprises and weak messages (issue 12): each one is now loud and says the fix.

- FlatParams copies its inputs: an optimizer given the originals warns.
- A FlatParams ``step()`` before any gradient was written raises instead of stepping zeros.
- Params swapped into ``param_groups`` may not overlap other params.
- ``fo.save`` honours the umask for new files and keeps an overwritten file's mode.
- Messages: torch tensors, keras/other names, non-contiguous grads, torch state dicts.

Every refused call leaves params and state byte for byte as they were.
"""
from __future__ import annotations

import gc
import os
import stat
import warnings

import numpy as np
import pytest

import fastopt as fo
from fastopt.flat import FlatParamsCopyWarning

from cases import BY_NAME

TORCH_STYLE = [fo.SGD, fo.Adagrad, fo.RMSprop, fo.Adam, fo.AdamW, fo.Adamax, fo.NAdam,
               fo.RAdam, fo.Adadelta, fo.Lion, fo.LAMB, fo.LARS]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,), (2,)]]


def _snapshot(params, opt):
    return ([p.tobytes() for p in params],
            {i: {k: np.asarray(v).tobytes() for k, v in s.items()} for i, s in opt.state.items()},
            opt._steps.tobytes())


@pytest.fixture
def no_copy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlatParamsCopyWarning)
        yield


# -- FlatParams copies its inputs ---------------------------------------------------------
def test_flatparams_docstring_says_it_copies():
    doc = " ".join(fo.FlatParams.__doc__.split())
    assert "the original arrays keep their initial values" in doc
    assert "FlatParamsCopyWarning" in doc and "``zero_grad()`` does not count" in doc


def test_optimizer_over_the_copied_originals_warns_and_points_to_flat_params():
    w = _arrays()
    flat = fo.FlatParams(w)
    with pytest.warns(FlatParamsCopyWarning, match=r"\['params'\]\[0\].*copied.*flat\.params\[0\]") as rec:
        opt = fo.SGD(w, lr=0.5)
    assert len(rec) == 1                                    # one warning, not one per param
    assert rec[0].filename == __file__                      # points at the user's line
    # Only a warning: the optimizer steps the arrays it was given, as asked.
    opt.step([np.ones_like(a) for a in w])
    assert np.array_equal(w[1], _arrays()[1] - 0.5)
    assert np.array_equal(flat.params[1], _arrays()[1])     # what the warning is about


def test_copied_original_in_a_later_group_or_swapped_in_warns():
    w = _arrays()
    flat = fo.FlatParams(w[1:])
    with pytest.warns(FlatParamsCopyWarning, match=r"param_groups\[0\]\['params'\]\[1\].*tensor 0"):
        opt = fo.Adam([{"params": [w[0], w[1]]}], lr=0.1)
    opt = fo.Adam([w[0]], lr=0.1)
    with pytest.warns(FlatParamsCopyWarning, match=r"param_groups\[1\]\['params'\]\[0\].*tensor 1"):
        opt.add_param_group({"params": [w[2]]})
    opt2 = fo.SGD([np.zeros(5, np.float32)], lr=0.1)
    opt2.step([np.ones(5, np.float32)])
    opt2.param_groups[0]["params"][0] = w[1]
    with pytest.warns(FlatParamsCopyWarning, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt2.step([np.ones(5, np.float32)])
    del flat


def test_no_copy_warning_for_views_copies_or_a_dead_flatparams(no_copy_warning):
    w = _arrays()
    flat = fo.FlatParams(w)
    fo.SGD(flat, lr=0.1)
    fo.SGD(flat.params, lr=0.1)
    fo.SGD([a.copy() for a in w], lr=0.1)
    fo.SGD([{"params": flat.params[:1]}, {"params": flat.params[1:]}], lr=0.1)
    del flat
    gc.collect()
    fo.SGD(w, lr=0.1)                  # the FlatParams is gone: nothing to confuse it with


# -- a FlatParams step before any gradient was written -------------------------------------
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad"])
def test_step_before_any_gradient_is_refused_and_changes_nothing(name):
    case = BY_NAME[name]
    flat = fo.FlatParams(_arrays())
    opt = case.fo_cls(flat, **case.hp())     # weight decay on: a zero step would move params
    before = _snapshot(flat.params, opt)
    with pytest.raises(ValueError, match=r"step\(\) got no grads.*none were ever written.*flat\.grads"):
        opt.step()
    assert _snapshot(flat.params, opt) == before and not opt.state and opt.iterations == 0
    flat.zero_grad()                          # zeroing is not writing a gradient
    opt.zero_grad()
    with pytest.raises(ValueError, match="none were ever written"):
        opt.step()
    assert _snapshot(flat.params, opt) == before
    for g in flat.grads:                      # the gradients are written: the step runs
        g[...] = 0.25
    assert opt.step() is True
    assert not np.array_equal(flat.params[0], _arrays()[0])


def test_zero_gradients_written_on_purpose_are_stepped():
    """Explicit zeros are a gradient (torch's zero_grad(set_to_none=False)): weight
    decay acts and the step counts."""
    flat = fo.FlatParams(_arrays())
    opt = fo.AdamW(flat, lr=0.1, weight_decay=0.5)
    flat.grad[...] = 0.0
    assert opt.step() is True
    assert np.allclose(flat.params[0], _arrays()[0] * (1 - 0.1 * 0.5))
    assert opt.state[0]["step"] == 1


def test_explicit_grads_need_no_flat_gradients():
    flat = fo.FlatParams(_arrays())
    opt = fo.SGD(flat, lr=1.0)
    opt.step([np.ones_like(p) for p in flat.params])
    assert np.array_equal(flat.params[1], _arrays()[1] - 1.0)


def test_two_arenas_the_unwritten_one_is_named():
    a, b = fo.FlatParams(_arrays(0)), fo.FlatParams([np.ones(7, np.float32)])
    opt = fo.SGD([{"params": a.params}, {"params": b.params}], lr=0.1)
    a.grad[...] = 1.0
    before = _snapshot(a.params + b.params, opt)
    with pytest.raises(ValueError, match=r"FlatParams\(1 tensors, 7 elements.*param_groups\[1\]"):
        opt.step()
    assert _snapshot(a.params + b.params, opt) == before


# -- params swapped in may not overlap ----------------------------------------------------
def _swapped_setup():
    backing = np.arange(20, dtype=np.float32)
    params = [backing[0:10], backing[10:20]]
    opt = fo.SGD(params, lr=0.5, momentum=0.9)
    opt.step([np.ones(10, np.float32)] * 2)
    return backing, params, opt


@pytest.mark.parametrize("swap", ["overlapping_view", "the_other_param"])
def test_swapped_in_param_overlapping_another_is_refused(swap):
    backing, params, opt = _swapped_setup()
    before = (backing.tobytes(), _snapshot(params, opt))
    new = backing[5:15] if swap == "overlapping_view" else params[0]
    opt.param_groups[0]["params"][1] = new
    what = "overlapping memory" if swap == "overlapping_view" else "the same array"
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[0\] and "
                                         rf"param_groups\[0\]\['params'\]\[1\] are {what}"):
        opt.step([np.ones(10, np.float32)] * 2)
    assert (backing.tobytes(), _snapshot(params, opt)) == before
    # Put back, the optimizer steps as a twin that never saw the bad swap.
    opt.param_groups[0]["params"][1] = params[1]
    _, twin_params, twin = _swapped_setup()
    for o in (opt, twin):
        o.step([np.full(10, 2.0, np.float32)] * 2)
    assert _snapshot(params, opt) == _snapshot(twin_params, twin)


def test_swapped_in_param_overlapping_another_group_is_refused():
    backing = np.zeros(20, np.float32)
    opt = fo.SGD([{"params": [backing[:10]]}, {"params": [backing[10:]]}], lr=0.5)
    opt.param_groups[1]["params"][0] = backing[8:18]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and "
                                         r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step([np.ones(10, np.float32)] * 2)
    assert not backing.any()


def test_params_swapped_into_two_groups_at_once_may_not_overlap():
    """Each swap alone overlaps nothing the optimizer had; together they overlap."""
    opt = fo.SGD([{"params": [np.zeros(10, np.float32)]}, {"params": [np.zeros(10, np.float32)]}],
                 lr=0.5, momentum=0.9)
    opt.step([np.ones(10, np.float32)] * 2)
    state = _snapshot([], opt)
    x = np.zeros(20, np.float32)
    opt.param_groups[0]["params"][0] = x[0:10]
    opt.param_groups[1]["params"][0] = x[5:15]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and "
                                         r"param_groups\[1\]\['params'\]\[0\] are overlapping"):
        opt.step([np.ones(10, np.float32)] * 2)
    assert not x.any() and _snapshot([], opt) == state
    # A gradient of group 0 inside the param just swapped into group 1.
    opt.param_groups[1]["params"][0] = x[10:20]
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps the memory of params\[1\]"):
        opt.step([x[10:20], np.ones(10, np.float32)])
    assert not x.any() and _snapshot([], opt) == state


def test_swapped_in_disjoint_param_is_fine():
    """Positive control: a fresh array swapped in steps."""
    backing, params, opt = _swapped_setup()
    new = np.zeros(10, np.float32)
    opt.param_groups[0]["params"][1] = new
    opt.step([np.ones(10, np.float32)] * 2)
    assert np.all(new < 0)


# -- fo.save file modes -----------------------------------------------------------------
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def umask():
    """Sets the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027, 0o077], ids=oct)
def test_save_creates_files_with_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "ckpt.npz"
    fo.save(path, {"a": np.arange(3.0)})
    assert _mode(path) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]
    assert np.array_equal(fo.load(path)["a"], np.arange(3.0))


@posix_only
@pytest.mark.parametrize("old_mode", [0o644, 0o640, 0o604, 0o600], ids=oct)
def test_save_over_a_file_keeps_its_mode(tmp_path, umask, old_mode):
    umask(0o077)                      # would give 0o600: the old file's mode wins
    path = tmp_path / "ckpt.npz"
    fo.save(path, {"a": 1})
    os.chmod(path, old_mode)
    fo.save(path, {"a": 2})
    assert _mode(path) == old_mode and fo.load(path) == {"a": 2}


# -- messages -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", TORCH_STYLE, ids=lambda c: c.__name__)
def test_keras_names_suggest_torch_names(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\).*'learning_rate'.*takes lr="):
        cls([np.zeros(3, np.float32)], learning_rate=0.1)


def test_unexpected_keywords_name_the_fix():
    p = [np.zeros(3, np.float32)]
    with pytest.raises(TypeError, match=r"'epsilon'.*eps="):
        fo.Adam(p, epsilon=1e-7)
    with pytest.raises(TypeError, match=r"'beta_1'.*betas=\(beta1, beta2\)"):
        fo.Adam(p, beta_1=0.8)
    with pytest.raises(TypeError, match=r"'weight_deacy'.*did you mean weight_decay="):
        fo.AdamW(p, weight_deacy=0.1)
    with pytest.raises(TypeError, match=r"'fused'.*drop fused="):
        fo.Adam(p, fused=True)
    with pytest.raises(TypeError, match=r"'learning_rate' -> 'lr'"):
        fo.SGD([{"params": p, "learning_rate": 0.1}])
    assert fo.keras.Adam(learning_rate=0.1) is not None     # keras classes keep keras names


def test_non_contiguous_grad_says_the_fix():
    params = [np.zeros((3, 4), np.float32), np.zeros((4, 3), np.float32)]
    opt = fo.Adam(params, lr=0.1)
    opt.step([np.ones((3, 4), np.float32), np.ones((4, 3), np.float32)])
    before = _snapshot(params, opt)
    with pytest.raises(ValueError,
                       match=r"grads\[1\] is not C-contiguous.*np\.ascontiguousarray\(grads\[1\]\)"):
        opt.step([np.ones((3, 4), np.float32), np.ones((3, 4), np.float32).T])
    assert _snapshot(params, opt) == before


def test_save_names_the_key_it_cannot_store(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(TypeError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\]\[1\] is of type object"):
        fo.save(path, {"state": {0: {"exp_avg": [np.zeros(2), object()]}}})
    with pytest.raises(TypeError, match=r"state_dict\['param_groups'\] has a key \(1, 2\)"):
        fo.save(path, {"param_groups": {(1, 2): 3}})
    with pytest.raises(TypeError, match=r"state_dict\['a'\] has dtype <U1"):
        fo.save(path, {"a": np.array(["x"])})
    assert not list(tmp_path.iterdir())


# -- torch tensors (skipped without torch) --------------------------------------------------
def test_torch_tensors_point_to_fastopt_torch():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=r"\['params'\]\[0\] is a torch Parameter.*fastopt\.torch\.Adam\("):
        fo.Adam([w], lr=0.1)
    with pytest.raises(TypeError, match=r"params is a torch Tensor.*fastopt\.torch\.AdamW\("):
        fo.AdamW(torch.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match=r"FlatParams: arrays\[1\] is a torch Tensor.*flat=True"):
        fo.FlatParams([np.zeros(2, np.float32), torch.zeros(3)])
    params = [np.zeros(3, np.float32)]
    opt = fo.SGD(params, lr=0.1, momentum=0.9)
    opt.step([np.ones(3, np.float32)])
    before = _snapshot(params, opt)
    with pytest.raises(TypeError, match=r"grads\[0\] is a torch Tensor.*numpy\(\)"):
        opt.step([torch.ones(3)])
    assert _snapshot(params, opt) == before


def test_save_of_a_torch_state_dict_names_the_key_not_the_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1000))
    topt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(1000)
    topt.step()
    path = tmp_path / "torch.npz"
    with pytest.raises(TypeError) as err:
        fo.save(path, topt.state_dict())
    msg = str(err.value)
    assert "state_dict['state'][0]['step']" in msg and "torch.save" in msg and ".numpy()" in msg
    assert "tensor(" not in msg and len(msg) < 400
    assert not path.exists() and not list(tmp_path.iterdir())


# -- copies of an optimizer -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_its_own_params_not_the_originals(how):
    import copy
    import pickle
    params = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
    opt = fo.Adam(params, lr=0.5)
    grads = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
    opt.step(grads)                           # cached tables hold the params' addresses
    before = _snapshot(params, opt)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin.step(grads)
    assert _snapshot(params, opt) == before   # the original was not stepped by its copy
    opt.step(grads)
    assert _snapshot(params, opt) == _snapshot(twin.param_groups[0]["params"], twin)
