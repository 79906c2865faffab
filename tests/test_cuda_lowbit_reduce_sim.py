"""Reductions over blockwise int8 columns on the CUDA driver, under the CUDA simulator.

A reduction reads blockwise columns read-only (LAMB's and LARS's first pass with int8
state): each code is decoded with its quantization block's absmax, and nothing is
re-encoded. Checked here against a NumPy decoding (``qmap[code] * absmax``, float32
math, float64 sums) and against the CPU driver's reduction of the same table; refused
where it would have to store a blockwise column. ``tests/test_cuda_simulator.py`` runs
this file with ``NUMBA_ENABLE_CUDASIM=1``; a plain run skips it.

    NUMBA_ENABLE_CUDASIM=1 pytest -p no:cacheprovider tests/test_cuda_lowbit_reduce_sim.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [pytest.mark.cudasim,
              pytest.mark.skipif(not SIM, reason="run under the CUDA simulator by tests/test_cuda_simulator.py")]

F32 = np.float32
SIGNED, UNSIGNED = "int8-signed", "int8-unsigned"


def _columns(sizes, block, seed):
    """params, grads, state columns (int8-signed, int8-unsigned, absent) and their scales."""
    from fastopt import lowbit
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(F32) for s in sizes]
    grads = [rng.standard_normal(s).astype(F32) for s in sizes]
    first = [lowbit.encode(rng.standard_normal(s).astype(F32) * F32(0.1), SIGNED, block) for s in sizes]
    second = [lowbit.encode(np.abs(rng.standard_normal(s)).astype(F32) * F32(1e-3), UNSIGNED, block)
              for s in sizes]
    slots = ([c for c, _ in first], [c for c, _ in second], None)
    scales = ([a for _, a in first], [a for _, a in second], None)
    return params, grads, slots, scales


def _decoded(codes, absmax, kind, block):
    """The published decoding, by hand: each code's map value times its block's absmax."""
    from fastopt.kernels import blockwise
    qmap = blockwise.dynamic_map(kind)
    return qmap[codes] * np.repeat(absmax, block)[:codes.size]


# Blocks of 16: the simulator's chunks (32 elements here) then hold two quantization
# blocks each, so each element's absmax is found by its offset in the chunk.
@pytest.mark.parametrize("sizes,block", [([(0,), (1,), (300,), (1029,)], 256),
                                         ([(300,), (64,), (7,)], 16)],
                         ids=["sizes-0-1-300-1029-block256", "block16-two-per-chunk"])
@pytest.mark.parametrize("reads", ["s0 s1", "g s1"])
def test_reduction_decodes_blockwise_columns(sizes, block, reads):
    """Per-tensor sums (p * t, t) of t = the flagged arrays' sum (kernels/roof.py's
    pass_reducer) over decoded int8 columns: the CUDA and the CPU driver's equal NumPy's
    to the rounding of their float32 block sums; the codes and absmax untouched."""
    from fastopt import _backend
    from fastopt.kernels import cpu, roof
    be = _backend.get("cuda")
    params, grads, slots, scales = _columns(sizes, block, seed=len(sizes) + block)
    formats = (SIGNED, UNSIGNED, "native")
    h = roof.pass_scalars(reads, F32)
    codes_before = [[c.copy() for c in col] for col in slots[:2]]
    scales_before = [[a.copy() for a in col] for col in scales[:2]]
    cuda_table = be.table(params, grads, slots, merge=False, formats=formats, scales=scales, block=block)
    cpu_table = cpu.ChunkTable(params, grads, slots, merge=False, formats=formats, scales=scales,
                               block=block)
    sums = {}
    for name, driver, table in (("cuda", be, cuda_table), ("cpu", cpu, cpu_table)):
        partials = driver.reduce_chunks(roof.pass_reducer, table, h)
        sums[name] = np.add.reduceat(partials, table.starts, axis=0) if partials.size else partials
    live = [i for i, s in enumerate(sizes) if s[0]]
    want, bound = np.zeros((len(live), 2)), np.zeros((len(live), 2))
    for row, i in enumerate(live):
        t = np.zeros(sizes[i], F32)
        if h.read_g:
            t += grads[i]
        if h.read0:
            t += _decoded(slots[0][i], scales[0][i], "signed", block)
        if h.read1:
            t += _decoded(slots[1][i], scales[1][i], "unsigned", block)
        terms = [(params[i] * t).astype(np.float64), t.astype(np.float64)]
        want[row] = [x.sum() for x in terms]
        # The drivers add a block's terms in float32 (the CPU driver by design, the
        # simulator's float32 scalars too): a sum may differ from the float64 one by
        # its terms' magnitude times float32 rounding per addition.
        bound[row] = [np.abs(x).sum() * x.size * 2.0 ** -24 for x in terms]
    assert sums["cuda"].shape == sums["cpu"].shape == want.shape
    assert np.all(np.abs(sums["cuda"] - want) <= bound), (sums["cuda"], want)
    assert np.all(np.abs(sums["cpu"] - want) <= bound), (sums["cpu"], want)
    for k in range(2):
        for i in range(len(sizes)):
            np.testing.assert_array_equal(slots[k][i], codes_before[k][i])
            np.testing.assert_array_equal(scales[k][i], scales_before[k][i])


def test_reduction_refuses_to_store_a_blockwise_column():
    from fastopt import _backend
    from fastopt.kernels import roof
    be = _backend.get("cuda")
    params, grads, slots, scales = _columns([(300,)], 256, seed=7)
    table = be.table(params, grads, slots, merge=False, formats=(SIGNED, UNSIGNED, "native"),
                     scales=scales, block=256)
    before = [slots[0][0].copy(), scales[0][0].copy()]
    with pytest.raises(ValueError, match="blockwise"):
        be.reduce_chunks(roof.pass_reducer, table, roof.pass_scalars("s0", F32),
                         writes=(False, True, False, False))
    np.testing.assert_array_equal(slots[0][0], before[0])
    np.testing.assert_array_equal(scales[0][0], before[1])
