"""16-bit storage formats on the CUDA side: float16 and bfloat16 <-> float32.

The CUDA driver reads every 16-bit column (float16 or bfloat16 state, the model copy
and the gradients of master-weight training) as its raw uint16 patterns and converts
them with the functions below, compiled by ``cuda.jit(device=True)``. They are plain
NumPy-scalar code, so the CUDA simulator runs the very same functions as Python. The
one primitive is the float32 <-> uint32 bit cast, a scalar ``.view``, which Numba
lowers to an LLVM bitcast on the GPU and NumPy does natively in the simulator.

Integer work is in int64 (uint64 in the hash): Numba widens 32-bit integer arithmetic
to 64 bits where NumPy would keep (and wrap) 32, so both must agree without relying on
either. The rounding rules are those of ``kernels/lowp.py`` (the CPU driver's): to
nearest even, subnormals kept, overflow to infinity, NaN stays a quiet NaN; bfloat16
may round stochastically, adding 16 random bits below the kept ones.

Blockwise 8-bit columns (kernels/blockwise.py) use three more: :func:`magnitude_bits`
(a block's absmax is the integer max of its values' magnitude bits, so a NaN becomes
the absmax, as on the CPU), :func:`inverse` and :func:`encode`, the nearest code of a
normalised value from two tables (``lut``: 4 codes per uint32 word, one per bucket of the
value's top 16 bits; ``mid``: the threshold above each code), built from the CPU's maps
by ``kernels/cuda_tables.py`` (:func:`~kernels.cuda_tables.encoder_tables`). The codes
are those of the CPU's encoder, bit for bit: both are the exact nearest code in float32
arithmetic, ties to the lower code.
"""
from __future__ import annotations

import numpy as np


def float_bits(x):
    """The bits of float32 ``x`` as a non-negative int64."""
    return np.int64(np.float32(x).view(np.uint32))


def bits_float(u):
    """The float32 whose bits are ``u`` (an int64 in [0, 2**32))."""
    return np.uint32(u).view(np.float32)


def half_to_float(bits):
    """float16 pattern -> float32 (exact)."""
    h = np.int64(bits)
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:
        # zero or subnormal: mantissa * 2^-24, exact in float32
        value = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return -value if h & 0x8000 else value
    sign = (h & 0x8000) << 16
    if exponent == 31:
        return bits_float(sign | 0x7F800000 | (mantissa << 13))
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13))


def float_to_half(x):
    """float32 -> float16 pattern, round to nearest even."""
    u = float_bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x47800000:                     # >= 2^16 after rounding: infinity, or NaN
        out = 0x7E00 if a > 0x7F800000 else 0x7C00
    elif a < 0x38800000:                    # below 2^-14: subnormal or zero
        # Adding 0.5 puts the 10 kept mantissa bits at the bottom of the sum, and the
        # float addition itself rounds to nearest even.
        out = float_bits(bits_float(a) + np.float32(0.5)) - 0x3F000000
    else:
        odd = (a >> 13) & 1
        # rebias the exponent (127 -> 15), round to nearest even on the 13 dropped bits
        out = (a - 0x38000000 + 0xFFF + odd) >> 13
    return np.uint16(out | sign)


def bfloat16_to_float(bits):
    """bfloat16 pattern -> float32 (exact: the top half of a float32)."""
    return bits_float(np.int64(bits) << 16)


def float_to_bfloat16(x, noise):
    """float32 -> bfloat16 pattern: to nearest even when ``noise`` < 0, else adding the
    16 random bits ``noise`` (0..65535) before truncating (stochastic rounding)."""
    u = float_bits(x)
    if x != x:                              # NaN: keep it a (quiet) NaN
        return np.uint16((u >> 16) | 0x40)
    if noise >= 0:
        u = u + noise
    else:
        u = u + 0x7FFF + ((u >> 16) & 1)
    return np.uint16(u >> 16)


def _times(x, c):
    """``x * c`` modulo 2**64 (uint64 ``x``, ``c`` < 2**32) from 32-bit halves: no
    product overflows, so NumPy (the simulator) has nothing to warn about."""
    low = (x & np.uint64(0xFFFFFFFF)) * c
    high = ((low >> np.uint64(32)) + (x >> np.uint64(32)) * c) & np.uint64(0xFFFFFFFF)
    return (high << np.uint64(32)) | (low & np.uint64(0xFFFFFFFF))


def mix32(x):
    """The CPU driver's hash for stochastic rounding, bit for bit: kernels/lowp.mix32 as
    Numba compiles it, lowbias32's steps on 64-bit integers (Numba widens its uint32
    arithmetic, so nothing is truncated to 32 bits between the steps)."""
    x = np.uint64(x)
    x ^= x >> np.uint64(16)
    x = _times(x, np.uint64(0x7FEB352D))
    x ^= x >> np.uint64(15)
    x = _times(x, np.uint64(0x846CA68B))
    x ^= x >> np.uint64(16)
    return np.int64(x & np.uint64(0xFFFFFFFF))


def stochastic_noise(seed, position):
    """The 16 random bits for the element at ``position`` of a step seeded ``seed``."""
    return mix32((np.int64(seed) ^ np.int64(position)) & 0xFFFFFFFF) & 0xFFFF


def magnitude_bits(x):
    """The bits of float32 ``|x|`` as an int32: integer order is magnitude order (a NaN
    sorts above infinity), so a block's absmax is an integer max (warp shuffles)."""
    return np.int32(float_bits(x) & 0x7FFFFFFF)


def larger(a, b):
    """``max(a, b)`` of two integers (numba.cuda fails to type the builtin on int32)."""
    return a if a > b else b


def inverse(absmax):
    """``1 / absmax`` in float32, or 0 for an all-zero block (every value then takes the
    code of 0), as kernels/blockwise.inverse."""
    if absmax > np.float32(0.0):
        return np.float32(1.0) / absmax
    return np.float32(0.0)


def encode(x, lut, mid):
    """The code (uint8) of the map value nearest to float32 ``x`` (ties to the lower).

    The key of ``x``'s bucket is its sign, its exponent clamped to the 32 above 2^-31
    (biased 96 and below share one bucket) and its top 7 mantissa bits; ``lut`` holds
    the code of each bucket's lowest value, 4 to a uint32 word, and a bucket holds at
    most one threshold ``mid[c]`` (above it, code ``c + 1`` is the nearer)."""
    u = float_bits(x)
    exponent = (u >> 23) & 0xFF
    exponent = 0 if exponent < 96 else 31 if exponent > 127 else exponent - 96
    key = ((u >> 31) << 12) | (exponent << 7) | ((u >> 16) & 0x7F)
    c = (np.int64(lut[key >> 2]) >> ((key & 3) << 3)) & 0xFF
    if x > mid[c]:
        c += 1
    return np.uint8(c)


# The device functions a generated kernel may call, by the name it calls them.
FUNCTIONS = {fn.__name__: fn for fn in (float_bits, bits_float, half_to_float, float_to_half,
                                        bfloat16_to_float, float_to_bfloat16, _times, mix32,
                                        stochastic_noise, magnitude_bits, larger, inverse,
                                        encode)}
