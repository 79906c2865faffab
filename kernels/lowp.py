"""16-bit storage: float16 and bfloat16 <-> float32 conversions for the CPU driver.

Low-precision arrays reach the kernels as their raw 16-bit patterns (uint16), because
Numba has no float16 or bfloat16 arithmetic on the CPU. Conversions are integer bit
manipulation only (no dependence on F16C or on C runtime helpers). float16 narrowing rounds to nearest even with subnormals,
overflow to infinity and quiet NaN; widening is exact. bfloat16 is the top half of a
float32: widening is a shift; narrowing rounds to nearest even on the dropped 16 bits,
or stochastically when given random bits.

Kinds (compile-time constants of the generated drivers, kernels/codegen.py):
  FLOAT16 = 1, BFLOAT16 = 2, BFLOAT16 with stochastic rounding = 3.
State columns stored in 16 bits go through :func:`load` and :func:`store`; the model
column of master weights through :func:`round_to_bits`.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

FLOAT16, BFLOAT16, BFLOAT16_STOCHASTIC = 1, 2, 3


def bfloat16_dtype():
    """NumPy's bfloat16 dtype from ml_dtypes, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def kind_of(dtype) -> int:
    """The kind constant for a 16-bit storage dtype (0 for float32/float64)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return FLOAT16
    if dtype == bfloat16_dtype():
        return BFLOAT16
    return 0


@intrinsic
def _float_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@numba.njit(inline="always", cache=True)
def _half_to_float(bits):
    h = numba.uint32(bits)
    sign = (h & numba.uint32(0x8000)) << numba.uint32(16)
    exponent = (h >> numba.uint32(10)) & numba.uint32(0x1F)
    mantissa = h & numba.uint32(0x3FF)
    if exponent == 0:
        # zero or subnormal: mantissa * 2^-24, exact in float32
        magnitude = _bits_float(mantissa | numba.uint32(0x4B000000)) - _bits_float(numba.uint32(0x4B000000))
        magnitude = magnitude * _bits_float(numba.uint32(0x33800000))          # 2^-24
        return _bits_float(_float_bits(magnitude) | sign)
    if exponent == 31:
        return _bits_float(sign | numba.uint32(0x7F800000) | (mantissa << numba.uint32(13)))
    return _bits_float(sign | ((exponent + numba.uint32(112)) << numba.uint32(23))
                       | (mantissa << numba.uint32(13)))


@numba.njit(inline="always", cache=True)
def _float_to_half(value):
    u = _float_bits(value)
    sign = (u >> numba.uint32(16)) & numba.uint32(0x8000)
    a = u & numba.uint32(0x7FFFFFFF)
    if a >= numba.uint32(0x47800000):                   # >= 2^16: infinity (or NaN)
        out = numba.uint32(0x7E00) if a > numba.uint32(0x7F800000) else numba.uint32(0x7C00)
    elif a < numba.uint32(0x38800000):                  # below 2^-14: subnormal or zero
        # Adding 0.5 (2^-1) aligns the 10 mantissa bits at the bottom; the float
        # addition rounds to nearest even, and subtracting its bits leaves the result.
        magic = numba.uint32(0x3F000000)
        out = _float_bits(_bits_float(a) + _bits_float(magic)) - magic
    else:
        odd = (a >> numba.uint32(13)) & numba.uint32(1)
        # rebias the exponent (127 -> 15) and round to nearest even on the 13 dropped bits
        out = (a - numba.uint32(0x38000000) + numba.uint32(0xFFF) + odd) >> numba.uint32(13)
    return numba.uint16(out | sign)


@numba.njit(inline="always", cache=True)
def widen(bits, kind):
    """16-bit pattern -> float32."""
    if kind == FLOAT16:
        return _half_to_float(bits)
    return _bits_float(numba.uint32(bits) << numba.uint32(16))


@numba.njit(inline="always", cache=True)
def mix32(x):
    """A 32-bit integer hash (lowbias32): the random bits of stochastic rounding."""
    x ^= x >> numba.uint32(16)
    x *= numba.uint32(0x7FEB352D)
    x ^= x >> numba.uint32(15)
    x *= numba.uint32(0x846CA68B)
    x ^= x >> numba.uint32(16)
    return x


@numba.njit(inline="always", cache=True)
def round_to_bits(value, kind, seed, position):
    """float32 -> 16-bit pattern of ``kind``; stochastic rounding draws its bits from a
    hash of ``seed`` and the element's ``position`` (deterministic, thread-independent)."""
    noise = numba.uint32(0)
    if kind == BFLOAT16_STOCHASTIC:
        noise = mix32(numba.uint32(seed) ^ numba.uint32(position))
    return narrow(value, kind, noise)


@numba.njit(inline="always", cache=True)
def narrow(value, kind, noise):
    """float32 -> 16-bit pattern. Round to nearest even, or stochastically for
    BFLOAT16_STOCHASTIC using the low 16 bits of ``noise``."""
    if kind == FLOAT16:
        return _float_to_half(value)
    # int64 arithmetic on the float's bits (Numba's native integer width).
    u = numba.int64(_float_bits(value))
    if value != value:
        # NaN: kept a (quiet) NaN, its dropped bits cleared so that rounding cannot carry
        # into the exponent. A select on the 32-bit lanes before rounding: a select on the
        # 16-bit results after it cost the vectorised loop two more shuffles per column.
        u = (u | 0x400000) & 0xFFFF0000
    if kind == BFLOAT16_STOCHASTIC:
        u = u + (numba.int64(noise) & 0xFFFF)
    else:
        u = u + 0x7FFF + ((u >> 16) & 1)
    return numba.uint16(u >> 16)


@intrinsic
def as_type_of(typingctx, value, like):
    """``value`` converted to the type of ``like`` (no instruction when they agree)."""
    if not isinstance(value, types.Float) or not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], signature.return_type)

    return like(value, like), codegen


@numba.njit(inline="always", cache=True)
def load(bits, kind, like):
    """A 16-bit state value in the math type of ``like`` (float32; float64 params get
    the float32 value widened exactly)."""
    return as_type_of(widen(bits, kind), like)


@numba.njit(inline="always", cache=True)
def store(value, kind):
    """A math value stored as a 16-bit pattern, rounded to nearest even (a float64 value
    is rounded to float32 first)."""
    return narrow(numba.float32(value), kind, numba.uint32(0))
