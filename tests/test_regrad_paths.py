"""New gradient arrays at every step: the short paths taken for them give what the long
ones give.

- ``ChunkTable.with_grads`` writes the new addresses into a copy of the table where new
  gradients cannot change its rows (kernels/cpu.py ``_regrad``); the table it returns
  equals a table made anew over the same arrays, for separate arrays, FlatParams arenas,
  gradients that sit back to back (rows may merge: made anew), absent state columns
  (read from the gradient's address), empty tensors and int8 columns.
- ``_check_grads_alias_no_param`` checks a few gradients one by one and many as vectors:
  both refuse a gradient inside another param, naming both, and change nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import lowbit
from fastopt.kernels import cpu
from fastopt.kernels.layout import INT8_SIGNED, INT8_UNSIGNED, NATIVE


def _separate(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


def _back_to_back(sizes):
    buffer = np.zeros(sum(sizes), np.float32)
    out, start = [], 0
    for n in sizes:
        out.append(buffer[start:start + n])
        start += n
    return out


SIZES = [300, 0, 5001, 1, 70000, 256]


def _assert_same_table(a, b):
    assert np.array_equal(a.table, b.table)
    assert np.array_equal(a.chunks, b.chunks)
    assert np.array_equal(a.starts, b.starts)
    assert a.n_elements == b.n_elements


@pytest.mark.parametrize("params_layout", ["separate", "arena"])
@pytest.mark.parametrize("state_layout", ["separate", "arena", "absent"])
@pytest.mark.parametrize("grads_layout", ["separate", "back to back"])
def test_with_grads_equals_a_table_made_anew(params_layout, state_layout, grads_layout):
    make = {"separate": _separate, "arena": _back_to_back, "back to back": _back_to_back}
    params = make[params_layout](SIZES)
    slots = (None, None) if state_layout == "absent" else \
        (make[state_layout](SIZES), make[state_layout](SIZES))
    first = make[grads_layout](SIZES)
    table = cpu.ChunkTable(params, first, slots)
    for step in range(3):
        grads = make[grads_layout](SIZES)
        _assert_same_table(table.with_grads(grads), cpu.ChunkTable(params, grads, slots))
        table = table.with_grads(grads)


def test_with_grads_writes_only_where_rows_cannot_change():
    sizes = [1000, 2000, 3000]
    # params and state back to back: rows merge when the gradients are back to back too
    params, state = _back_to_back(sizes), _back_to_back(sizes)
    merged = cpu.ChunkTable(params, _back_to_back(sizes), (state,))
    assert merged.table.shape[0] == 1 and merged.regrad is None
    split = merged.with_grads(_separate(sizes))
    assert split.table.shape[0] == 3
    assert split.regrad is None           # its params and state could still merge
    # separate params: no two rows can ever merge
    separate = cpu.ChunkTable(_separate(sizes), _back_to_back(sizes), (state,))
    assert separate.regrad is not None


def test_with_grads_over_int8_columns():
    sizes = [5000, 300, 8192]
    params = _separate(sizes)
    codes, absmax = [], []
    for storage in (INT8_SIGNED, INT8_UNSIGNED):
        c, a = zip(*(lowbit.encode(np.zeros(n, np.float32), storage, 256) for n in sizes))
        codes.append(list(c))
        absmax.append(list(a))
    options = dict(formats=(INT8_SIGNED, INT8_UNSIGNED), scales=tuple(absmax), block=256)
    table = cpu.ChunkTable(params, _separate(sizes, 1), tuple(codes), **options)
    assert table.regrad is not None
    grads = _separate(sizes, 2)
    _assert_same_table(table.with_grads(grads),
                       cpu.ChunkTable(params, grads, tuple(codes), **options))
    assert NATIVE not in table.formats


@pytest.mark.parametrize("n", [3, 20])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_gradient_inside_another_param_is_refused(n, where):
    """``n`` at most 8 takes the one-by-one check, more the vector one."""
    backing = np.zeros(64 * n, np.float32)
    params = [backing[64 * i:64 * (i + 1)] for i in range(n)]
    opt = fo.Adam(params, lr=0.1)
    grads = [np.ones(64, np.float32) for _ in range(n)]
    opt.step(grads)
    before = backing.copy()
    i = 0 if where == "first" else n - 1
    other = n - 1 - i
    grads = [np.ones(64, np.float32) for _ in range(n)]
    # params[other] itself, or a view that starts inside the param before it
    grads[i] = backing[0:64] if other == 0 else backing[64 * other - 8:64 * other + 56]
    with pytest.raises(ValueError, match=rf"grads\[{i}\] overlaps the memory of params\[{other}\]"):
        opt.step(grads)
    assert np.array_equal(backing, before)
    # a gradient right after the last param's bytes overlaps nothing
    tail = np.zeros(64 * n + 64, np.float32)
    params2 = [tail[64 * j:64 * (j + 1)] for j in range(n)]
    opt2 = fo.Adam(params2, lr=0.1)
    grads2 = [np.ones(64, np.float32) for _ in range(n)]
    grads2[i] = tail[64 * n:]
    assert opt2.step(grads2)
