"""fastopt/sparse.py ``check``: bounds read off the coalesced (sorted) indices.

An index out of range anywhere (first, last, in the middle of unsorted indices, among
duplicates, an unsigned index past int64) is refused with the least and the greatest
index in the message, before anything changes; indices of any integer dtype, in any
order, step exactly as the same rows given sorted and int64.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt as fo
from fastopt import sparse

R, D = 50, 4


@pytest.mark.parametrize("indices,least,greatest", [
    (np.array([3, 50, 7]), 3, 50),
    (np.array([49, -1, 2]), -1, 49),
    (np.array([9, 9, 60, 2, 9]), 2, 60),
    (np.array([-5], np.int32), -5, -5),
    (np.array([4, 2**63 + 5], np.uint64), 4, 2**63 + 5),
    (np.array([1, 50], np.uint8), 1, 50),
])
def test_out_of_range_index_changes_nothing(indices, least, greatest):
    p = np.ones((R, D), np.float32)
    opt = fo.SparseAdam([p])
    rows = np.ones((indices.size, D), np.float32)
    with pytest.raises(IndexError, match=rf"grads\[0\]\.indices must lie in \[0, {R}\), "
                                         rf"got \[{least}, {greatest}\]"):
        opt.step([fo.SparseGrad(indices, rows)])
    assert np.all(p == 1) and opt.state == {}


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64, np.uint64])
def test_any_integer_indices_in_any_order_step_as_sorted_int64(dtype):
    rng = np.random.default_rng(0)
    index = np.array([7, 0, 49, 7, 3, 12], dtype)
    rows = rng.standard_normal((index.size, D)).astype(np.float32)
    # the same gradient coalesced by hand: sorted unique int64, duplicates summed in order
    unique = np.array([0, 3, 7, 12, 49], np.int64)
    summed = np.stack([rows[index == u].sum(axis=0, dtype=np.float32) for u in unique])
    a = rng.standard_normal((R, D)).astype(np.float32)
    b = a.copy()
    ours, hand = fo.SparseAdam([a]), fo.SparseAdam([b])
    for _ in range(3):
        ours.step([fo.SparseGrad(index, rows)])
        hand.step([fo.SparseGrad(unique, summed)])
    np.testing.assert_array_equal(a, b)
    checked = sparse.check(fo.SparseGrad(index, rows), a, 0)
    assert checked.indices.dtype == np.int64
    np.testing.assert_array_equal(checked.indices, unique)


def test_sorted_contiguous_int64_gradient_is_passed_through():
    index = np.array([1, 4, 9], np.int64)
    rows = np.ones((3, D), np.float32)
    checked = sparse.check(fo.SparseGrad(index, rows), np.zeros((R, D), np.float32), 0)
    assert checked.indices is index and checked.rows is rows
