"""The functional forms over caller-owned low-bit state: bfloat16 arrays, and int8 codes
with their absmax arrays (``absmax={<argument>: [...]}``, ``block_size``).

A caller who keeps the state as a class with ``state_format`` keeps it (int8 for tensors
of at least 4096 elements, float32 below; bfloat16 everywhere) must get the class's
params, codes and absmax bit for bit, on the CPU driver and on the NumPy reference; bad
low-bit arguments are refused, naming the argument, before anything changes.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import lowbit

from cases import ALL_CASES, Grads, init_params

SHAPES = [(5000,), (300,), (4096,), (0,), (1,)]      # int8, float32 (small), int8 exactly, empty, one
N_STEPS = 12
MIN_8BIT = 4096
# A column of every kind: signed and unsigned maps, a non-zero initial value (Adagrad),
# host-side values (NAdam), four columns (Adan), a momentum buffer set at step 1 (SGD).
NAMES = ["adam", "sgd", "adagrad", "nadam", "adan", "lion"]
CASES = [c for c in ALL_CASES if c.name in NAMES]


def _storage(case, k):
    return lowbit.INT8_UNSIGNED if case.spec.columns[k].unsigned else lowbit.INT8_SIGNED


class LowBitRun:
    """Params, state arrays and absmax arrays the caller keeps, as the class would."""

    def __init__(self, case, hp, init, fmt, backend, block=256):
        self.case, self.backend, self.block = case, backend, block
        self.kw = case.functional_kwargs(hp)
        self.params = [a.copy() for a in init]
        self.slots, self.absmax = {}, {}
        for k, name in enumerate(case.slot_names):
            fill = case.initial_state(hp, name)
            arrays, scales = [], []
            for a in init:
                values = np.full(a.shape, fill, np.float32)
                if fmt == "int8" and a.size >= MIN_8BIT:
                    codes, absmax = lowbit.encode(values, _storage(case, k), block)
                    arrays.append(codes)
                    scales.append(absmax)
                else:
                    arrays.append(values.astype(lowbit.bfloat16()) if fmt == "bfloat16" else values)
                    scales.append(None)
            self.slots[name] = arrays
            if any(s is not None for s in scales):
                self.absmax[case.spec.columns[k].functional_name] = scales
        self.count = 0

    def step(self, grads):
        self.count += 1
        extra = {"absmax": self.absmax, "block_size": self.block} if self.absmax else {}
        self.case.functional(self.params, grads, *self.slots.values(), step=self.count,
                             backend=self.backend, **self.kw, **extra)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint8).tobytes()


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_functional_low_bit_state_equals_the_class(case, fmt, backend):
    hp = case.hp()
    init = init_params(SHAPES, np.float32, 1)
    run = LowBitRun(case, hp, init, fmt, backend)
    class_params = [a.copy() for a in init]
    opt = case.fo_cls(class_params, backend=backend, state_format=fmt, min_8bit_size=MIN_8BIT, **hp)
    src = Grads(SHAPES, np.float32, 2)
    for _ in range(N_STEPS):
        g = src.next()[1]
        run.step(g)
        opt.step(g)
    state = opt.state
    for i in range(len(SHAPES)):
        assert _bits(run.params[i]) == _bits(class_params[i]), f"params[{i}]"
        for name, arrays in run.slots.items():
            if name not in state.get(i, {}):
                continue
            assert np.asarray(state[i][name]).dtype == arrays[i].dtype, f"{name}[{i}]"
            assert _bits(arrays[i]) == _bits(state[i][name]), f"{name}[{i}]"
            column = case.spec.columns[case.slot_names.index(name)].functional_name
            if column in run.absmax and run.absmax[column][i] is not None:
                assert _bits(run.absmax[column][i]) == _bits(state[i][name + "_absmax"]), \
                    f"{name}_absmax[{i}]"
    assert not np.array_equal(run.params[0], init[0])


def _adam_run(fmt="int8"):
    case = next(c for c in ALL_CASES if c.name == "adam")
    hp = dict(case.hp(), amsgrad=False)
    return LowBitRun(case, hp, init_params([(5000,), (300,)], np.float32, 3), fmt, "cpu")


def _damage(run, what):
    """The arguments of one call with ``what`` wrong, and the message it must raise."""
    g = [np.ones(p.shape, np.float32) for p in run.params]
    m, v = run.slots["exp_avg"], run.slots["exp_avg_sq"]
    absmax = {k: list(a) for k, a in run.absmax.items()}
    kw = dict(params=run.params, grads=g, exp_avgs=m, exp_avg_sqs=v, absmax=absmax, block_size=256)
    if what == "no absmax":
        kw["absmax"] = None
        return kw, r"exp_avgs\[0\] is uint8.*absmax\['exp_avgs'\]"
    if what == "absmax missing a column":
        del absmax["exp_avg_sqs"]
        return kw, r"exp_avg_sqs\[0\] is uint8"
    if what == "absmax too short":
        absmax["exp_avgs"][0] = absmax["exp_avgs"][0][:-1].copy()
        return kw, r"absmax\['exp_avgs'\]\[0\] must be a 1-D float32 array of 20 values"
    if what == "absmax float64":
        absmax["exp_avgs"][0] = absmax["exp_avgs"][0].astype(np.float64)
        return kw, r"absmax\['exp_avgs'\]\[0\] must be a 1-D float32"
    if what == "absmax for a float32 tensor":
        absmax["exp_avgs"][1] = np.zeros(2, np.float32)
        return kw, r"absmax\['exp_avgs'\]\[1\] must be None"
    if what == "absmax wrong length":
        absmax["exp_avgs"] = absmax["exp_avgs"][:1]
        return kw, r"absmax\['exp_avgs'\] has 1 entries, expected 2"
    if what == "absmax unknown key":
        absmax["exp_avg"] = absmax["exp_avgs"]
        return kw, r"absmax has 'exp_avg', which is not a state argument"
    if what == "absmax not a dict":
        kw["absmax"] = [absmax["exp_avgs"]]
        return kw, r"absmax must be a dict"
    if what == "block size":
        kw["block_size"] = 100
        return kw, r"block_size must be a power of two"
    if what == "block size of the codes":
        kw["block_size"] = 512
        return kw, r"must be a 1-D float32 array of 10 values \(one per 512"
    if what == "int16 state":
        kw["exp_avgs"] = [m[0].astype(np.int16), m[1]]
        return kw, r"exp_avg\[0\] must have params' dtype float32, or hold low-bit state"
    if what == "state shape":
        kw["exp_avgs"] = [m[0][:-1].copy(), m[1]]
        return kw, r"exp_avg\[0\] must match params\[0\] in shape"
    if what == "absmax shares memory":
        absmax["exp_avg_sqs"][0] = absmax["exp_avgs"][0]
        return kw, r"absmax\['exp_avgs'\]\[0\] and absmax\['exp_avg_sqs'\]\[0\] are the same array"
    raise AssertionError(what)


BAD = ["no absmax", "absmax missing a column", "absmax too short", "absmax float64",
       "absmax for a float32 tensor", "absmax wrong length", "absmax unknown key",
       "absmax not a dict", "block size", "block size of the codes", "int16 state", "state shape",
       "absmax shares memory"]


@pytest.mark.parametrize("what", BAD)
def test_bad_low_bit_arguments_are_refused_and_change_nothing(what):
    run = _adam_run()
    run.step([np.full(p.shape, 0.5, np.float32) for p in run.params])     # state is not all zero
    kw, message = _damage(run, what)
    arrays = [*run.params, *run.slots["exp_avg"], *run.slots["exp_avg_sq"],
              *[a for col in run.absmax.values() for a in col if a is not None]]
    before = [a.copy() for a in arrays]
    with pytest.raises((ValueError, TypeError), match=message):
        fo.functional.adam(step=2, lr=1e-3, **kw)
    for a, b in zip(arrays, before):
        assert _bits(a) == _bits(b)


def test_bfloat16_state_needs_float32_params():
    p = [np.ones(8, np.float64)]
    m = [np.zeros(8, lowbit.bfloat16())]
    with pytest.raises(ValueError, match=r"exp_avg\[0\] must have params' dtype float64"):
        fo.functional.adam(p, [np.ones(8)], m, [np.zeros(8, lowbit.bfloat16())])
    assert np.all(p[0] == 1)
