"""State dicts saved by fastopt before the spec redesign still load, and training goes on
from them exactly.

tests/data/state_dicts_v0/ holds, per optimizer and dtype, what fastopt at commit
a058636 (the last one before optimizers became specs) saved after 3 steps of a run in
which one param skipped step 2 (differing step counts; NAdam's per-param mu_product),
and the params that run reached after 5 steps (tests/data/make_state_dicts_v0.py wrote
them). Loading the state dict into today's optimizer over the step-3 params and taking
steps 4 and 5 must reach the same params: bit for bit on the "numpy" backend (the
reference is unchanged), within the parity tolerance on "cpu".
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

import fastopt as fo

DATA = Path(__file__).parent / "data" / "state_dicts_v0"
FILES = sorted(DATA.glob("*.npz"))
SHAPES = [(3, 5), (7,), (1,)]
RTOL = {np.dtype(np.float16): 0.0, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _grads(step):      # as tests/data/make_state_dicts_v0.py
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s) for s in SHAPES]


def test_the_files_cover_every_optimizer_class_of_that_time():
    names = {f.name.split("-")[0] for f in FILES}
    assert names == {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam",
                     "Adadelta", "Lion", "LAMB", "LARS"}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_old_state_dict_loads_and_training_continues(path, backend):
    saved = fo.load(path)
    name = path.name.split("-")[0]
    master = "master" in path.name
    sd = saved["state_dict"]
    params = [np.array(p) for p in saved["after3"]]
    cls = getattr(fo, name)
    takes = inspect.signature(cls).parameters
    hp = {k: v for k, v in sd["param_groups"][0].items() if k in takes and k != "params"}
    opt = cls(params, backend=backend, master_weights=master, **hp)
    opt.load_state_dict(sd)
    steps = [int(st["step"]) for st in opt.state_dict()["state"].values() if "step" in st]
    if steps:
        assert sorted(set(steps)) == [2, 3], "the files were made with differing step counts"
    for step in (4, 5):
        opt.step([g.astype(params[0].dtype) for g in _grads(step)])
    want = [np.array(p) for p in saved["after5"]]
    moved = False
    for got, expected, start in zip(params, want, saved["after3"]):
        if backend == "numpy" or master:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=RTOL[got.dtype], atol=1e-7)
        moved |= not np.array_equal(got, np.array(start))
    assert moved, "steps 4 and 5 changed nothing: the comparison would be vacuous"
