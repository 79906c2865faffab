"""Weight initialisers: He (Kaiming) and Xavier (Glorot), uniform and normal, and a
truncated normal, with torch.nn.init's fan modes, gains and formulas.

Samples come from a NumPy ``Generator`` straight into the array's float32/float64
memory (``rng.random(dtype=..., out=...)``, ``rng.standard_normal(dtype=..., out=...)``),
so filling a large tensor is one generation pass plus one in-place scale, with no
float64 temporaries for float32 weights. Every function takes ``rng=`` (a Generator)
or ``seed=``; without either it draws from a module generator that :func:`manual_seed`
reseeds.

In-place variants end in ``_`` and return their array (torch's names); the returning
variants take a shape and a ``dtype`` (float32 by default).

References:
  torch.nn.init (torch 2.13): calculate_gain, _calculate_fan_in_and_fan_out,
  xavier_uniform_/normal_, kaiming_uniform_/normal_, trunc_normal_.
  Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural
  networks", AISTATS 2010. He et al., "Delving Deep into Rectifiers", ICCV 2015.
  Robert, "Simulation of truncated normal variables", Statistics and Computing 1995
  (the exponential proposal for one-sided tails).
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d")
_default_rng = np.random.default_rng()


def manual_seed(seed) -> None:
    """Reseed the generator used when neither ``rng`` nor ``seed`` is given."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def _generator(rng, seed) -> np.random.Generator:
    if rng is not None and seed is not None:
        raise ValueError("pass rng= or seed=, not both")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                            f"got {type(rng).__name__}")
        return rng
    if seed is not None:
        return np.random.default_rng(seed)
    return _default_rng


# -- gains and fans ------------------------------------------------------------------------------
def calculate_gain(nonlinearity: str, param=None) -> float:
    """The recommended gain for ``nonlinearity`` (torch's table).

    linear, conv*, sigmoid: 1; tanh: 5/3; relu: sqrt(2); leaky_relu: sqrt(2 / (1 + slope^2))
    with ``param`` the negative slope (default 0.01); selu: 3/4.
    """
    if nonlinearity in _LINEAR or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, numbers.Real) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


def _shape(array_or_shape) -> tuple:
    if hasattr(array_or_shape, "shape"):
        return tuple(int(s) for s in array_or_shape.shape)
    if isinstance(array_or_shape, numbers.Integral):
        return (int(array_or_shape),)
    return tuple(int(s) for s in array_or_shape)


def fan_in_and_fan_out(array_or_shape) -> tuple[int, int]:
    """torch's fans: ``shape[1] * receptive``, ``shape[0] * receptive`` with ``receptive``
    the product of ``shape[2:]`` (weights laid out ``(out, in, *kernel)``)."""
    shape = _shape(array_or_shape)
    if len(shape) < 2:
        raise ValueError("Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(shape, mode) -> int:
    if not isinstance(mode, str) or mode.lower() not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of ['fan_in', 'fan_out']")
    fan_in, fan_out = fan_in_and_fan_out(shape)
    return fan_in if mode.lower() == "fan_in" else fan_out


def xavier_std(array_or_shape, gain=1.0) -> float:
    """``gain * sqrt(2 / (fan_in + fan_out))``; the uniform bound is ``sqrt(3)`` times it."""
    fan_in, fan_out = fan_in_and_fan_out(array_or_shape)
    return _real("gain", gain) * math.sqrt(2.0 / float(fan_in + fan_out))


def kaiming_std(array_or_shape, a=0, mode="fan_in", nonlinearity="leaky_relu") -> float:
    """``calculate_gain(nonlinearity, a) / sqrt(fan)``; the uniform bound is ``sqrt(3)`` times it."""
    fan = _fan(_shape(array_or_shape), mode)
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def _real(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _bound(name, value) -> float:
    """A real number, infinities allowed (truncation bounds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number (inf allowed), got {value!r}")
    return float(value)


# -- sampling into arrays ----------------------------------------------------------------------
def _target(array):
    """(flat float32/float64 buffer to sample into, write-back or None)."""
    try:
        dt = np.dtype(array.dtype)
        tuple(array.shape)
    except (AttributeError, TypeError):
        raise TypeError(f"expected a NumPy or CuPy array, got {type(array).__name__}") from None
    if dt.kind != "f":
        raise TypeError(f"initialisers fill floating-point arrays, got dtype {dt}")
    if isinstance(array, np.ndarray):
        if not array.flags.writeable:
            raise ValueError("the array is read-only")
        if dt in (np.float32, np.float64) and array.flags.c_contiguous:
            return array.reshape(-1), None
    work = np.empty(int(np.prod(array.shape, dtype=np.int64)),
                    dtype=np.float64 if dt == np.float64 else np.float32)
    return work, lambda: _write_back(array, work)


def _write_back(array, work):
    values = work.reshape(array.shape)
    if isinstance(array, np.ndarray):
        array[...] = values
    elif hasattr(array, "set") and array.flags.c_contiguous:        # CuPy
        array.set(values.astype(array.dtype, copy=False))
    else:
        array[...] = values


def _fill(array, rng, draw):
    buf, finish = _target(array)
    if buf.size:
        draw(buf, rng)
    if finish is not None:
        finish()
    return array


def _uniform_into(buf, rng, low, high):
    rng.random(dtype=buf.dtype, out=buf)
    # low + (high - low) * u, as torch's uniform_.
    buf *= buf.dtype.type(high - low)
    buf += buf.dtype.type(low)


def _normal_into(buf, rng, mean, std):
    rng.standard_normal(dtype=buf.dtype, out=buf)
    buf *= buf.dtype.type(std)
    if mean != 0:
        buf += buf.dtype.type(mean)


def _zero_size(array, what) -> bool:
    if 0 in tuple(array.shape):
        warnings.warn(f"{what}: initializing zero-element tensors is a no-op", stacklevel=3)
        return True
    return False


def uniform_(array, a=0.0, b=1.0, *, rng=None, seed=None):
    """Fill ``array`` with U(a, b) samples in place."""
    a, b = _real("a", a), _real("b", b)
    gen = _generator(rng, seed)
    return _fill(array, gen, lambda buf, r: _uniform_into(buf, r, a, b))


def normal_(array, mean=0.0, std=1.0, *, rng=None, seed=None):
    """Fill ``array`` with N(mean, std^2) samples in place."""
    mean, std = _real("mean", mean), _real("std", std)
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    gen = _generator(rng, seed)
    return _fill(array, gen, lambda buf, r: _normal_into(buf, r, mean, std))


def xavier_uniform_(array, gain=1.0, *, rng=None, seed=None):
    """Glorot uniform: U(-a, a) with ``a = gain * sqrt(6 / (fan_in + fan_out))``."""
    gen = _generator(rng, seed)
    fan_in_and_fan_out(array)                  # checks the shape first
    if _zero_size(array, "xavier_uniform_"):
        return array
    bound = math.sqrt(3.0) * xavier_std(array, gain)
    return _fill(array, gen, lambda buf, r: _uniform_into(buf, r, -bound, bound))


def xavier_normal_(array, gain=1.0, *, rng=None, seed=None):
    """Glorot normal: N(0, std^2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""
    gen = _generator(rng, seed)
    fan_in_and_fan_out(array)
    if _zero_size(array, "xavier_normal_"):
        return array
    std = xavier_std(array, gain)
    return _fill(array, gen, lambda buf, r: _normal_into(buf, r, 0.0, std))


def kaiming_uniform_(array, a=0, mode="fan_in", nonlinearity="leaky_relu", *, rng=None, seed=None):
    """He uniform: U(-bound, bound) with ``bound = gain * sqrt(3 / fan_mode)``.

    ``a`` is leaky_relu's negative slope; ``mode`` picks ``fan_in`` (preserve forward
    variance) or ``fan_out`` (backward). torch's default ``nonlinearity='leaky_relu'``
    with ``a=0`` gives the ReLU gain sqrt(2).
    """
    gen = _generator(rng, seed)
    _fan(_shape(array), mode)                  # checks shape, mode and gain first
    calculate_gain(nonlinearity, a)
    if _zero_size(array, "kaiming_uniform_"):
        return array
    bound = math.sqrt(3.0) * kaiming_std(array, a, mode, nonlinearity)
    return _fill(array, gen, lambda buf, r: _uniform_into(buf, r, -bound, bound))


def kaiming_normal_(array, a=0, mode="fan_in", nonlinearity="leaky_relu", *, rng=None, seed=None):
    """He normal: N(0, std^2) with ``std = gain / sqrt(fan_mode)``."""
    gen = _generator(rng, seed)
    _fan(_shape(array), mode)
    calculate_gain(nonlinearity, a)
    if _zero_size(array, "kaiming_normal_"):
        return array
    std = kaiming_std(array, a, mode, nonlinearity)
    return _fill(array, gen, lambda buf, r: _normal_into(buf, r, 0.0, std))


# -- truncated normal ------------------------------------------------------------------------------
def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _standard_truncated(n, alpha, beta, rng) -> np.ndarray:
    """``n`` float64 samples of N(0, 1) restricted to [alpha, beta], by rejection."""
    mass = _norm_cdf(beta) - _norm_cdf(alpha)
    flip = False
    if mass > 0.3:
        def propose(k):
            z = rng.standard_normal(k)
            return z, (z >= alpha) & (z <= beta)
    else:
        if beta <= 0:                          # mirror a left tail onto the right
            alpha, beta, flip = -beta, -alpha, True
        if alpha >= 0 and (math.isinf(beta) or (beta - alpha) * (alpha + beta) > 4.0):
            # Wide right tail: Robert's exponential proposal, rate lam, shifted to alpha.
            lam = 0.5 * (alpha + math.sqrt(alpha * alpha + 4.0))

            def propose(k):
                z = alpha + rng.standard_exponential(k) / lam
                ok = (rng.random(k) <= np.exp(-0.5 * (z - lam) ** 2)) & (z <= beta)
                return z, ok
        else:
            # Narrow interval: uniform proposal, accepted with the density relative to its peak.
            peak = min(max(0.0, alpha), beta)

            def propose(k):
                z = alpha + (beta - alpha) * rng.random(k)
                ok = rng.random(k) <= np.exp(-0.5 * (z * z - peak * peak))
                return z, ok
    out = np.empty(n)
    pending = np.arange(n)
    while pending.size:
        z, ok = propose(pending.size)
        out[pending[ok]] = z[ok]
        pending = pending[~ok]
    return -out if flip else out


def trunc_normal_(array, mean=0.0, std=1.0, a=-2.0, b=2.0, *, rng=None, seed=None):
    """Fill ``array`` with N(mean, std^2) samples restricted to [a, b] (absolute bounds, as
    torch's ``trunc_normal_``), by exact rejection sampling."""
    mean, std = _real("mean", mean), _real("std", std)
    a, b = _bound("a", a), _bound("b", b)
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if not a < b:
        raise ValueError(f"need a < b, got a={a}, b={b}")
    if mean < a - 2 * std or mean > b + 2 * std:
        warnings.warn("mean is more than 2 std from [a, b] in trunc_normal_. "
                      "The distribution of values may be incorrect.", stacklevel=2)
    gen = _generator(rng, seed)
    alpha, beta = (a - mean) / std, (b - mean) / std

    def draw(buf, r):
        if _norm_cdf(beta) - _norm_cdf(alpha) > 0.3:
            # The common case, in the storage dtype without temporaries: redraw the outliers.
            _normal_into(buf, r, mean, std)
            lo, hi = buf.dtype.type(a), buf.dtype.type(b)
            bad = np.flatnonzero((buf < lo) | (buf > hi))
            while bad.size:
                z = r.standard_normal(bad.size, dtype=buf.dtype) * buf.dtype.type(std) + buf.dtype.type(mean)
                buf[bad] = z
                bad = bad[(z < lo) | (z > hi)]
            return
        z = _standard_truncated(buf.size, alpha, beta, r)
        z *= std
        z += mean
        # Rounding to the storage dtype must not leave the interval.
        np.clip(z.astype(buf.dtype), buf.dtype.type(a), buf.dtype.type(b), out=buf)

    return _fill(array, gen, draw)


# -- returning variants ----------------------------------------------------------------------------
def _new(shape, dtype):
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"dtype must be floating point, got {dt}")
    return np.empty(_shape(shape), dtype=dt)


def xavier_uniform(shape, gain=1.0, *, dtype=np.float32, rng=None, seed=None) -> np.ndarray:
    """A new array of ``shape`` filled by :func:`xavier_uniform_`."""
    return xavier_uniform_(_new(shape, dtype), gain, rng=rng, seed=seed)


def xavier_normal(shape, gain=1.0, *, dtype=np.float32, rng=None, seed=None) -> np.ndarray:
    """A new array of ``shape`` filled by :func:`xavier_normal_`."""
    return xavier_normal_(_new(shape, dtype), gain, rng=rng, seed=seed)


def kaiming_uniform(shape, a=0, mode="fan_in", nonlinearity="leaky_relu", *, dtype=np.float32,
                    rng=None, seed=None) -> np.ndarray:
    """A new array of ``shape`` filled by :func:`kaiming_uniform_`."""
    return kaiming_uniform_(_new(shape, dtype), a, mode, nonlinearity, rng=rng, seed=seed)


def kaiming_normal(shape, a=0, mode="fan_in", nonlinearity="leaky_relu", *, dtype=np.float32,
                   rng=None, seed=None) -> np.ndarray:
    """A new array of ``shape`` filled by :func:`kaiming_normal_`."""
    return kaiming_normal_(_new(shape, dtype), a, mode, nonlinearity, rng=rng, seed=seed)


def trunc_normal(shape, mean=0.0, std=1.0, a=-2.0, b=2.0, *, dtype=np.float32, rng=None,
                 seed=None) -> np.ndarray:
    """A new array of ``shape`` filled by :func:`trunc_normal_`."""
    return trunc_normal_(_new(shape, dtype), mean, std, a, b, rng=rng, seed=seed)


# torch's private name, for code ported from torch.nn.init.
_calculate_fan_in_and_fan_out = fan_in_and_fan_out
