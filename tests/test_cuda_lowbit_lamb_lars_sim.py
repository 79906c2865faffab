"""LAMB and LARS with int8 state on the CUDA backend, under the CUDA simulator, against the
CPU backend: the per-tensor table with its absmax arrays (kernels/per_tensor.py), the
CUDA driver's read-only blockwise reduction, and its blockwise step with the trust ratio
in a row slot (int8 LAMB's step recomputes and stores the moments: fastopt/_passes.py).

The two drivers sum the norms in different orders (the trust ratio may differ in its
last bits), so params and float32 state are compared to rounding level relative to the
run's scale (cases.rel_err: 4 ulps of a param near 1 seen after 3 steps) and codes for equality (LAMB's moments
do not depend on the ratio; LARS's trace does, through a rounding that lands on the same
code unless a value sits on a code boundary). ``tests/test_cuda_simulator.py`` runs the
simulator files with ``NUMBA_ENABLE_CUDASIM=1``; a plain run skips this one.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_cuda_lowbit_lamb_lars_sim.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from cases import rel_err, rms

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim, pytest.mark.usefixtures("quick_thread_switches"),
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]

F32 = np.float32
# empty, one, a block and a bit (float32 state under min_8bit_size=512), two blocks and a bit
SIZES = [(0,), (1,), (300,), (700,)]


def _run(name, hp, backend_name, steps=3):
    import fastopt as fo
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(F32) for s in SIZES]
    opt = getattr(fo, name)(params, backend=backend_name, state_format="int8", min_8bit_size=512,
                            **hp)
    for t in range(1, steps + 1):
        g = np.random.default_rng(100 + t)
        opt.step([(g.standard_normal(s) * F32(0.1)).astype(F32) for s in SIZES])
    return params, opt


@pytest.mark.parametrize("name,hp", [
    ("LAMB", dict(lr=0.01, weight_decay=0.1)),
    ("LARS", dict(lr=1.0, weight_decay=0.1, nesterov=True)),
])
def test_int8_on_cuda_matches_cpu(name, hp):
    (pc, oc), (ph, oh) = (_run(name, hp, b) for b in ("cuda", "cpu"))
    for i, (a, b) in enumerate(zip(pc, ph)):
        assert rel_err(a, b, rms(ph)) < 1e-6, f"params[{i}]"
    assert oc.state.keys() == oh.state.keys()
    for i in oc.state:
        assert oc.state[i].keys() == oh.state[i].keys()
        for key, a in oc.state[i].items():
            a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(oh.state[i][key]))
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if a.dtype == np.uint8:
                assert np.array_equal(a, b), f"state[{i}][{key!r}]"
            elif key != "step":
                assert rel_err(a, b, rms([b])) < 1e-6, f"state[{i}][{key!r}]"
    assert oc.state[3][oc.slot_names[0]].dtype == np.uint8
    assert oc.state[2][oc.slot_names[0]].dtype == np.float32
