"""The low-bit drivers' fast paths give the bits of their plain forms.

``blockwise.encode_block`` (the AVX2 gather loop that encodes a block eight values at a
time) against a brute-force nearest-code search and against ``blockwise.encode``, at
every threshold of both maps, on special values and on random bit patterns; the 32-bit
absmax bits; the 16-bit store's rounding against an integer description of round to
nearest even (and against ml_dtypes where installed), NaN included.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from fastopt.kernels import blockwise, lowp


@numba.njit(cache=True)
def _encode_plain(x, inv, table):
    out = np.empty(x.size, np.uint8)
    for i in range(x.size):
        out[i] = blockwise.encode(x[i] * inv, table)
    return out


@numba.njit(cache=True)
def _encode_fast(x, inv, table, out):
    return blockwise.encode_block(x, inv, table, out, x.size)


def _edges(kind) -> np.ndarray:
    """Every threshold of the map with the floats beside it, both signs, the map's own
    values, special values and random bit patterns of every exponent."""
    q = blockwise.dynamic_map(kind)
    t = blockwise.thresholds(q)
    near = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)), q])
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45,
                        1.0000001, 2.0, 3e38, -3e38], dtype=np.float32)
    patterns = rng.integers(0, 2 ** 32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([near, -near, special, patterns]).astype(np.float32)


def _brute(x, q) -> np.ndarray:
    """The first index of the smallest float32 distance: the nearest code, ties to the lower."""
    out = np.zeros(x.size, np.int64)
    finite = np.isfinite(x)
    out[finite] = np.abs(x[finite, None] - q[None, :]).argmin(axis=1)
    return out


@pytest.mark.parametrize("kind", [blockwise.SIGNED, blockwise.UNSIGNED])
@pytest.mark.parametrize("inv", [1.0, 0.37])
def test_encode_block_gives_the_codes_of_encode(kind, inv):
    x = _edges(kind)
    x = x[: (x.size // 8 - 1) * 8 + 5]          # a count that is not a multiple of 8
    table = blockwise.encoder(kind)
    plain = _encode_plain(x, np.float32(inv), table)
    fast = np.full(x.size, 0xAB, np.uint8)
    done = _encode_fast(x, np.float32(inv), table, fast)
    assert done == (x.size // 8 * 8 if blockwise.has_avx2() else 0)
    assert np.array_equal(fast[:done], plain[:done])
    assert np.all(fast[done:] == 0xAB), "encode_block wrote past the count it returned"
    # and the plain encoder is the nearest code wherever the scaled value is finite and in [-1, 1]
    with np.errstate(invalid="ignore"):
        y = x * np.float32(inv)
    inside = np.isfinite(y) & (np.abs(y) <= 1)
    assert np.array_equal(plain[inside], _brute(y[inside], blockwise.dynamic_map(kind)))


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 255, 256])
def test_encode_block_counts(count):
    x = np.linspace(-1, 1, 256).astype(np.float32)[:count].copy()
    out = np.zeros(count, np.uint8)
    done = _encode_fast(x, np.float32(1.0), blockwise.encoder(blockwise.SIGNED), out)
    assert done == (count // 8 * 8 if blockwise.has_avx2() else 0)


def test_encode_block_refuses_other_arrays():
    table = blockwise.encoder(blockwise.SIGNED)

    @numba.njit
    def wrong(x, out):
        return blockwise.encode_block(x, np.float32(1.0), table, out, x.size)

    with pytest.raises(numba.TypingError):
        wrong(np.zeros(8, np.float64), np.zeros(8, np.uint8))


def test_magnitude_bits_stay_32_bits():
    """A 64-bit max has no AVX2 instruction: the block's absmax loop ran 4 lanes wide."""
    @numba.njit
    def bits(x):
        return blockwise.magnitude_bits(x)

    assert bits(np.float32(-2.5)) == np.float32(2.5).view(np.uint32)
    assert bits.nopython_signatures[0].return_type == numba.uint32
    assert bits(np.float32(np.nan)) > np.float32(np.inf).view(np.uint32)


# -- bfloat16 stores ------------------------------------------------------------------------
@numba.njit(cache=True)
def _store_all(x):
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = lowp.store(x[i], lowp.BFLOAT16)
    return out


def _nearest_even_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even on the dropped 16 bits, in int64 arithmetic; a NaN keeps its
    top bits with the quiet bit set."""
    u = x.view(np.uint32).astype(np.int64)
    low, high = u & 0xFFFF, u >> 16
    up = (low > 0x8000) | ((low == 0x8000) & (high & 1 == 1))
    out = (high + up) & 0xFFFF
    return np.where(np.isnan(x), high | 0x40, out).astype(np.uint16)


def _bf16_cases() -> np.ndarray:
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234], dtype=np.uint32)
    return (high[:, None] | low[None, :]).ravel().view(np.float32)


def test_bfloat16_store_rounds_to_nearest_even():
    x = _bf16_cases()
    assert np.array_equal(_store_all(x), _nearest_even_bf16(x))


def test_bfloat16_store_matches_ml_dtypes():
    dtype = lowp.bfloat16_dtype()
    if dtype is None:
        pytest.skip("ml_dtypes is not installed")
    x = _bf16_cases()
    ours = _store_all(x)
    with np.errstate(invalid="ignore"):
        theirs = x.astype(dtype).view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.all(np.isnan(ours[~finite].view(dtype).astype(np.float32)))
