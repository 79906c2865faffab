"""8-bit blockwise state: dynamic quantization maps, and their fast encoder for the drivers.

A blockwise column stores each element as an 8-bit *code* and each block of ``B``
elements (256 by default) as one float32 *absmax*: element ``i`` of block ``b`` stands
for ``qmap[code[i]] * absmax[b]``. After the optimizer's math the block's new values are
scaled by ``1 / max|value|`` into [-1, 1] and each one takes the code of its nearest map
value (ties to the lower code). This is the scheme of Dettmers et al., "8-bit Optimizers
via Block-wise Quantization" (ICLR 2022), with the *dynamic* maps of Dettmers, "8-Bit
Approximations for Parallelism in Deep Learning" (ICLR 2016), as bitsandbytes uses them.

The dynamic map (:func:`dynamic_map`): 7 decades 10^-6 ... 10^0; decade ``i`` holds the
midpoints of ``2**i + 1`` (signed) or ``2**(i+1) + 1`` (unsigned) evenly spaced points
of [0.1, 1], times 10^(i - 6), and their negatives when signed; then 0 and 1. So a signed
map has 127 negative values, 0 and 128 positive; an unsigned one 0 and 255 positive,
twice as fine. Signed maps carry a first moment (momentum), unsigned ones a second
moment (non-negative by construction).

One deviation from the bare construction, as bitsandbytes' CPU quantizer makes it: the
signed map's first value, -0.99297, is replaced by -1.0, so that a block's largest
negative value is stored exactly, as its largest positive one is. The map's values are
computed as bitsandbytes computes them (float32 ``linspace``, float32 midpoints, then
the decade's power of ten in float64, rounded to float32), so codes are comparable bit
for bit.

Nearest-code search without a binary search: the top 16 bits of a float32 (sign,
exponent, 7 mantissa bits) split [-1, 1] into buckets each narrower than the gap
between two neighbouring map values, so a bucket holds at most one of the thresholds
between map values (where, in float32 arithmetic, the upper neighbour becomes the
nearer). Within a bucket the float's order is the order of its low 16 bits, so
:func:`encoder` stores per bucket one int32: the code at the bucket's start and the low
16 bits where the code steps; a value's code is one table read and integer arithmetic
(:func:`encode`; :func:`encode_block` encodes eight at a time with one AVX2 gather).
Exponents below 2^-30 (far below the maps' smallest magnitude, 5.5e-7) share one bucket
per sign, so the table has 2 x 32 x 128 entries (32 KB).
"""
from __future__ import annotations

import functools
import hashlib
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .lowp import _bits_float, _float_bits

SIGNED, UNSIGNED = "signed", "unsigned"

BLOCK = 256              # elements per block (bitsandbytes' optimizer block size)
MIN_SIZE = 4096          # tensors smaller than this keep float32 state (bitsandbytes' default)
_MAX_EXPONENT_BITS = 7
_LOWEST_EXPONENT = 96    # float32 biased exponents <= this (|x| < 2^-30) share one bucket
_KEYS = 2 * 32 * 128


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 on the CPU: a float32 step; the first half counted up
    from ``start``, the rest down from ``end``, each point one fused multiply-add (one
    rounding; float64 holds the exact product and sum here)."""
    start64, end64 = float(np.float32(start)), float(np.float32(end))
    step = float(np.float32((end64 - start64) / (steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    up = start64 + step * idx
    down = end64 - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> np.ndarray:
    values = []
    for i in range(_MAX_EXPONENT_BITS):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = _linspace_float32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (i - (_MAX_EXPONENT_BITS - 1)))
        values += list(decade * means)
        if signed:
            values += list(-decade * means)
    values += [0.0, 1.0]
    qmap = np.sort(np.array(values, dtype=np.float32))
    if qmap.size != 256:  # pragma: no cover - the construction above gives 256
        raise AssertionError(f"dynamic map has {qmap.size} values")
    if signed:
        qmap[0] = -1.0
    qmap.setflags(write=False)
    return qmap


def dynamic_map(kind: str = SIGNED) -> np.ndarray:
    """The 256 sorted float32 values of the signed or unsigned dynamic map (read-only)."""
    if kind not in (SIGNED, UNSIGNED):
        raise ValueError(f"map kind must be {SIGNED!r} or {UNSIGNED!r}, got {kind!r}")
    return _dynamic_map(kind == SIGNED)


def bucket_bounds() -> tuple:
    """The lowest and highest float32 value of every key's bucket (value order)."""
    key = np.arange(_KEYS, dtype=np.uint32)
    sign = key >> 12
    exponent = ((key >> 7) & 31) + _LOWEST_EXPONENT
    mantissa = key & 127
    low_bits = (exponent << 23) | (mantissa << 16)
    high_bits = low_bits | 0xFFFF
    # the merged lowest exponents cover every smaller magnitude, down to zero
    merged = exponent == _LOWEST_EXPONENT
    low_bits = np.where(merged, 0, low_bits)
    high_bits = np.where(merged, (np.uint32(_LOWEST_EXPONENT + 1) << 23) - 1, high_bits)
    small = low_bits.astype(np.uint32).view(np.float32)
    large = high_bits.astype(np.uint32).view(np.float32)
    lowest = np.where(sign == 1, -large, small)
    highest = np.where(sign == 1, -small, large)
    return lowest, highest


def thresholds(qmap: np.ndarray) -> np.ndarray:
    """For each pair of neighbours ``(q[c], q[c+1])``, the largest float32 ``t`` at which
    ``q[c]`` is still the nearer in float32 arithmetic, ``|t - q[c+1]| >= |t - q[c]|`` (a
    tie keeps the lower code): so ``x > t`` chooses ``c + 1`` exactly when the distances,
    as a float32 quantizer computes them, say so. Found by bisection on the float order."""
    lo_vals, hi_vals = qmap[:-1], qmap[1:]

    def order(v):                       # float32 -> int64 monotone in the value
        b = v.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(b < 0, -(b & 0x7FFFFFFF), b)

    def value(k):
        b = np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32)
        return b.view(np.float32)

    def lower_nearer(k):
        x = value(k)
        return np.abs(x - hi_vals) >= np.abs(x - lo_vals)

    lo, hi = order(lo_vals), order(hi_vals)       # lower_nearer(lo) holds, (hi) fails
    while np.any(hi - lo > 1):
        m = (lo + hi) // 2
        keep = lower_nearer(m)
        lo, hi = np.where(keep, m, lo), np.where(keep, hi, m)
    return value(lo)


@functools.lru_cache(maxsize=None)
def _encoder(kind: str) -> np.ndarray:
    qmap = dynamic_map(kind)
    # mid[c]: the largest float32 at which code c is still nearer than c + 1
    mid = thresholds(qmap)
    lowest, highest = bucket_bounds()
    negative = np.arange(_KEYS) >= _KEYS // 2
    # each bucket holds at most one threshold (its float32 values are closer together
    # than any two map values): the bucket's code at its zero-low-bits end, and where
    # inside the bucket the code steps
    first = np.searchsorted(mid, lowest, side="left")
    last = np.searchsorted(mid, highest, side="left")
    if np.max(last - first) > 1:  # pragma: no cover - holds for both dynamic maps (tested)
        raise AssertionError(f"a bucket of the {kind} map holds {np.max(last - first)} thresholds")
    inside = last > first
    # the threshold's low 16 bits (its high 16 bits are the bucket's)
    t_low = mid[np.minimum(first, mid.size - 1)].view(np.uint32).astype(np.int64) & 0xFFFF
    # positive buckets: code(x) = code(bucket start) + (x's low bits > the threshold's);
    # negative ones run the other way: from the code of -|bucket start| (their highest
    # value) down by one where |x| reaches the threshold's magnitude
    start_code = np.where(negative, last, first)
    step_at = np.where(inside, np.where(negative, t_low - 1, t_low), 0xFFFF)
    # a negative bucket whose threshold is its very start steps at once
    at_start = negative & inside & (t_low == 0)
    start_code = np.where(at_start, start_code - 1, start_code)
    step_at = np.where(at_start, 0xFFFF, step_at)
    table = ((start_code.astype(np.int64) << 16) | step_at).astype(np.int32)
    table.setflags(write=False)
    return table


def encoder(kind: str) -> np.ndarray:
    """The nearest-code table of the ``kind`` dynamic map: per bucket key, the code at the
    bucket's start (bits 16-23) and the low 16 bits at which it steps (bits 0-15)."""
    return _encoder(kind)


def _tag() -> str:
    digest = hashlib.sha1()
    for kind in (SIGNED, UNSIGNED):
        for a in (dynamic_map(kind), encoder(kind)):
            digest.update(a.tobytes())
    return digest.hexdigest()[:8]


# Part of every blockwise driver's name: the maps and tables are compiled in as constants.
TAG = _tag()


# -- the pieces the generated drivers call (inlined) ------------------------------------------

@numba.njit(inline="always", cache=True)
def magnitude_bits(x):
    """The bits of ``|x|`` as an unsigned integer: for floats that are not NaN, integer
    order is magnitude order, so a block's absmax is an integer max (which vectorises);
    a NaN sorts above infinity and becomes the block's absmax. Kept 32 bits wide (Numba
    widens ``&`` to 64 bits): a 64-bit max has no AVX2 instruction and ran 4 lanes wide."""
    return numba.uint32(_float_bits(numba.float32(x)) & numba.uint32(0x7FFFFFFF))


@numba.njit(inline="always", cache=True)
def absmax_of(bits):
    """The float32 whose bits :func:`magnitude_bits` gave."""
    return _bits_float(bits)


@numba.njit(inline="always", cache=True)
def inverse(absmax):
    """``1 / absmax``, or 0 for an all-zero block (every value then takes the code of 0)."""
    return numba.float32(1.0) / absmax if absmax > numba.float32(0.0) else numba.float32(0.0)


@numba.njit(inline="always", cache=True)
def encode(x, table):
    """The code of the map value nearest to ``x`` (ties to the lower code): one read of
    ``table`` (:func:`encoder`) and integer arithmetic, which vectorises."""
    u = _float_bits(x)
    sign = u >> numba.uint32(31)
    exponent = (u >> numba.uint32(23)) & numba.uint32(0xFF)
    exponent = max(exponent, numba.uint32(_LOWEST_EXPONENT)) - numba.uint32(_LOWEST_EXPONENT)
    exponent = min(exponent, numba.uint32(31))
    key = (sign << numba.uint32(12)) | (exponent << numba.uint32(7)) \
        | ((u >> numba.uint32(16)) & numba.uint32(0x7F))
    entry = numba.int32(table[key])
    # 1 when x's low bits pass the step (branch-free: both are 16-bit, so the
    # difference's sign bit says it)
    step = numba.uint32(((entry & numba.int32(0xFFFF)) - numba.int32(u & numba.uint32(0xFFFF)))
                        >> numba.int32(31)) & numba.uint32(1)
    return numba.uint8(numba.uint32(entry >> numba.int32(16)) + step - ((step * sign) << numba.uint32(1)))


# -- the encoder's loop with AVX2 gathers ---------------------------------------------------
# LLVM turns the table read of ``encode`` into a hardware gather only where its cost model
# calls gathers fast (Intel since Skylake); elsewhere (AMD Zen) it keeps the key
# arithmetic and the read scalar: 4x slower, measured on a Zen 3. encode_block writes
# the gather itself wherever the compile target has AVX2.
_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V8I8, _V8I32, _V8F32 = ir.VectorType(_I8, 8), ir.VectorType(_I32, 8), ir.VectorType(ir.FloatType(), 8)


def has_avx2() -> bool:
    """Whether Numba compiles for an x86-64 target with AVX2 (the host's features, or
    those set by NUMBA_CPU_FEATURES)."""
    from numba.core import codegen, config
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None \
        else codegen.get_host_cpu_features()
    return "+avx2" in features.split(",")


def _splat(value: int) -> ir.Constant:
    return ir.Constant(_V8I32, [value] * 8)


def _vector_call(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]),
                                        name)
    return builder.call(fn, args)


def _encode8(builder, u, table):
    """The codes (8 x i8) of eight scaled values' bits ``u`` (8 x i32): :func:`encode`'s
    arithmetic, with the table read as one gather."""
    sign = builder.lshr(u, _splat(31))
    exponent = builder.and_(builder.lshr(u, _splat(23)), _splat(0xFF))
    exponent = _vector_call(builder, "llvm.umax.v8i32", _V8I32, [exponent, _splat(_LOWEST_EXPONENT)])
    exponent = _vector_call(builder, "llvm.umin.v8i32", _V8I32,
                            [builder.sub(exponent, _splat(_LOWEST_EXPONENT)), _splat(31)])
    key = builder.or_(builder.or_(builder.shl(sign, _splat(12)), builder.shl(exponent, _splat(7))),
                      builder.and_(builder.lshr(u, _splat(16)), _splat(0x7F)))
    entry = _vector_call(builder, "llvm.x86.avx2.gather.d.d.256", _V8I32,
                         [_splat(0), table, key, _splat(-1), ir.Constant(_I8, 4)])
    step = builder.lshr(builder.sub(builder.and_(entry, _splat(0xFFFF)), builder.and_(u, _splat(0xFFFF))),
                        _splat(31))
    code = builder.sub(builder.add(builder.ashr(entry, _splat(16)), step),
                       builder.shl(builder.mul(step, sign), _splat(1)))
    return builder.trunc(code, _V8I8)


@intrinsic
def encode_block(typingctx, values, inv, table, codes, count):
    """``codes[i] = encode(values[i] * inv, table)`` for ``i`` below ``count`` rounded down
    to a multiple of 8, eight at a time with one AVX2 gather each; returns how many it
    encoded: that number, or 0 where the compile target has no AVX2 (the caller encodes
    the rest). ``values``: contiguous float32, ``codes``: contiguous uint8, ``table``:
    :func:`encoder`'s int32 table."""
    arrays = (values, table, codes)
    wanted = (types.float32, types.int32, types.uint8)
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == d
               for a, d in zip(arrays, wanted)) \
            or not isinstance(inv, types.Float) or not isinstance(count, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        n = context.cast(builder, args[4], signature.args[4], types.intp)
        zero = ir.Constant(n.type, 0)
        if not has_avx2():
            return zero
        data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 2, 3)]
        src, table_ptr, dst = data
        scale = builder.insert_element(ir.Constant(_V8F32, ir.Undefined),
                                       context.cast(builder, args[1], signature.args[1], types.float32),
                                       ir.Constant(_I32, 0))
        scale = builder.shuffle_vector(scale, scale, ir.Constant(_V8I32, [0] * 8))
        table_bytes = builder.bitcast(table_ptr, _I8.as_pointer())
        done = builder.and_(n, ir.Constant(n.type, -8))
        with cgutils.for_range_slice(builder, zero, done, ir.Constant(n.type, 8), n.type) as (j, _):
            x = builder.load(builder.bitcast(builder.gep(src, [j]), _V8F32.as_pointer()), align=4)
            u = builder.bitcast(builder.fmul(x, scale), _V8I32)
            builder.store(_encode8(builder, u, table_bytes),
                          builder.bitcast(builder.gep(dst, [j]), _V8I8.as_pointer()), align=1)
        return done

    return types.intp(values, inv, table, codes, count), codegen
