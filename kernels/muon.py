"""Muon: momentum, then the update direction orthogonalised by a Newton-Schulz iteration.

References:
  Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
  https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM
  Training" (2025, the "match_rms_adamw" lr adjustment). Semantics of torch.optim.Muon
  (torch 2.13, ``torch/optim/_muon.py``), for each 2-D param with gradient ``g``:

  ``buf = lerp(buf, g, 1 - momentum)`` (= momentum buf + (1 - momentum) g),
  ``u = lerp(g, buf, momentum)`` with Nesterov, else ``u = buf``,
  ``O = NS(u)``: ``X = u / max(||u||_F, eps)`` (transposed when taller than wide), then
  ``ns_steps`` times ``A = X X^T``, ``B = b A + c A A``, ``X = a X + B X``,
  ``p = p (1 - lr weight_decay) - lr ratio(shape) O`` with ``ratio``
  ``sqrt(max(1, rows / cols))`` ("original", the default) or ``0.2 sqrt(max(rows, cols))``
  ("match_rms_adamw").

A step is three pieces (fastopt/muon.py composes them):

1. :func:`muon_momentum`, one fused pass over every matrix (the drivers' reduction with
   writes: kernels/cpu.py ``reduce_chunks``, one row per tensor): updates the momentum
   buffer, writes the direction ``u`` into a workspace that stacks the matrices of one
   shape, and sums ``u^2`` per matrix (the Frobenius norms NS starts from).
2. :func:`newton_schulz` over each stack ``(k, m, n)``: batched matmuls of the array
   module (NumPy's on the host: a multithreaded BLAS; CuPy's on a GPU: cuBLAS), with
   four buffers per stack reused from step to step and no other temporaries. Tall
   matrices are not transposed: ``A = X^T X`` and ``X = a X + X B^T`` is the same
   iteration on ``X^T``. The lr adjustment of the stack's shape is folded into the last
   iteration's ``B`` and ``a``.
3. :func:`muon_update`, one fused pass: ``p = p (1 - lr wd) - lr O``.

Precision: torch.optim.Muon runs NS in bfloat16 (``grad.bfloat16()``) whatever the
param's dtype; fastopt runs it in the param's dtype (float32 for float32, float64 for
float64). NS's result then differs from torch's by bfloat16's rounding, which NS's
quintic amplifies along small singular directions: measured ``||O - O_torch||_F /
||O_torch||_F`` median 2-3%, up to 10% for an 8x8 matrix (tests/test_muon.py). With
torch's NS made to run in the param's dtype, the two agree to rounding (float64: 1e-15
after 100 steps). fastopt's is the more exact of the two, and on CPUs float32 matmuls
are the fast ones (a 1024^3 float32 product took 7 ms in NumPy, bfloat16 13 ms in torch
on the 2-core development machine).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

# torch.optim.Muon's constants (Keller Jordan's post): NS coefficients, steps, eps.
DEFAULT_A, DEFAULT_B, DEFAULT_C = 3.4445, -4.7750, 2.0315
DEFAULT_NS_STEPS = 5
EPS = 1e-7
MAX_NS_STEPS = 100          # torch refuses ns_steps >= 100
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class MuonScalars(NamedTuple):
    """Host scalars of the momentum pass. torch computes both lerps in the param's dtype
    with weight ``w`` as ``a + w (b - a)`` when ``|w| < 0.5``, else ``b - (b - a)(1 - w)``
    with ``1 - w`` rounded in that dtype: the same forms here, chosen on the host."""

    buf_weight: float        # 1 - momentum (the gradient's weight in the buffer's lerp)
    buf_weight_c: float      # 1 - buf_weight, in the dtype
    nesterov_weight: float   # momentum (the buffer's weight in Nesterov's lerp)
    nesterov_weight_c: float
    grad_scale: float        # the step's gradient multiplier (the reduction reads raw grads)
    zero: float
    buf_low: bool            # |1 - momentum| < 0.5: the first form of the buffer's lerp
    nesterov_low: bool
    nesterov: bool
    scaled: bool             # grad_scale != 1


class MuonUpdateScalars(NamedTuple):
    decay: float             # 1 - lr * weight_decay
    lr: float
    decayed: bool            # decay != 1


def muon_momentum(u, g, buf, h):
    """The momentum pass for one element, as a reduction that writes: returns
    ``(u^2, 0, u, buf)``; the driver stores the direction ``u`` (the table's param column,
    a workspace view) and the buffer, and sums ``u^2`` per matrix."""
    if h.scaled:
        g = g * h.grad_scale
    if h.buf_low:
        buf = buf + h.buf_weight * (g - buf)
    else:
        buf = g - (g - buf) * h.buf_weight_c
    if h.nesterov:
        if h.nesterov_low:
            u = g + h.nesterov_weight * (buf - g)
        else:
            u = buf - (buf - g) * h.nesterov_weight_c
    else:
        u = buf
    return u * u, h.zero, u, buf


def muon_element(u, g, buf, h):
    """The momentum pass as a plain element (the spec's): ``(u, buf)`` from ``(g, buf)``;
    the same operations as :func:`muon_momentum`, without the norm."""
    if h.scaled:
        g = g * h.grad_scale
    if h.buf_low:
        buf = buf + h.buf_weight * (g - buf)
    else:
        buf = g - (g - buf) * h.buf_weight_c
    if h.nesterov:
        if h.nesterov_low:
            u = g + h.nesterov_weight * (buf - g)
        else:
            u = buf - (buf - g) * h.nesterov_weight_c
    else:
        u = buf
    return u, buf


def muon_update(p, o, h):
    """The param update for one element: ``o`` is NS's result with the lr adjustment of
    its shape folded in; decoupled weight decay first, as torch. Returns ``(p,)`` (the
    drivers' tuple of the param and no state)."""
    if h.decayed:
        p = p * h.decay
    return (p - h.lr * o,)


def muon_scalars(group, step, cast, grad_scale=1.0):
    """The momentum pass's scalars (float64 math, then ``cast``; ``step`` is unused:
    Muon has no step-dependent term)."""
    mu = float(group["momentum"])
    w = cast(1.0 - mu)
    m = cast(mu)
    one = cast(1.0)
    return MuonScalars(
        buf_weight=w, buf_weight_c=cast(one - w), nesterov_weight=m,
        nesterov_weight_c=cast(one - m), grad_scale=cast(grad_scale), zero=cast(0.0),
        buf_low=bool(abs(float(w)) < 0.5), nesterov_low=bool(abs(float(m)) < 0.5),
        nesterov=bool(group["nesterov"]), scaled=bool(grad_scale != 1.0))


def update_scalars(group, cast):
    decay = 1.0 - float(group["lr"]) * float(group["weight_decay"])
    return MuonUpdateScalars(decay=cast(decay), lr=cast(group["lr"]), decayed=bool(decay != 1.0))


def lr_ratio(shape, adjust_lr_fn) -> float:
    """torch's ``_adjust_lr`` factor for a ``(rows, cols)`` param."""
    rows, cols = int(shape[0]), int(shape[1])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


# -- Newton-Schulz over a stack of same-shape matrices ---------------------------------------
class Stack:
    """The workspace of ``k`` matrices of shape ``(m, n)``: the direction (then NS's
    iterate) ``x``, its ping-pong partner ``y``, and the ``(k, s, s)`` Gram matrix and
    polynomial with ``s = min(m, n)``. Allocated once, with the params' array module."""

    __slots__ = ("shape", "x", "y", "gram", "poly", "tall")

    def __init__(self, k, shape, dtype, xp=np):
        m, n = shape
        s = min(m, n)
        self.shape = (m, n)
        self.tall = m > n
        self.x = xp.zeros((k, m, n), dtype=dtype)
        self.y = xp.zeros((k, m, n), dtype=dtype)
        self.gram = xp.empty((k, s, s), dtype=dtype)
        self.poly = xp.empty((k, s, s), dtype=dtype)

    def result(self, ns_steps):
        """The array NS leaves its result in (it alternates between ``x`` and ``y``)."""
        return self.x if ns_steps % 2 == 0 else self.y


def newton_schulz(stack: Stack, inv_norms, coefficients, ns_steps, ratio, xp=np):
    """Orthogonalise every matrix of ``stack.x`` in place (its result in
    ``stack.result(ns_steps)``), times ``ratio``.

    ``inv_norms``: ``1 / max(||u||_F, eps)`` per matrix (an array of the array module, in
    the stack's dtype). torch's iteration on ``X`` (``X^T`` when tall): ``A = X X^T``,
    ``B = b A + c A A``, ``X = a X + B X``; for a tall ``X`` the same on ``X^T``, written
    as ``A = X^T X``, ``X = a X + X B^T``. Two products per iteration are computed as
    others equal to them in exact arithmetic, to take less time:

    - ``A A`` as ``A A^T`` (``A`` is symmetric): NumPy's matmul takes a product of a
      matrix and its own transpose to BLAS's ``syrk``, which computes half of it;
    - ``a X + B X`` as ``(B + a I) X``: one product, and no pass over ``X`` to scale and
      add it (torch's ``addmm`` adds ``a X`` inside the product likewise).

    The last iteration multiplies ``a, b, c`` by ``ratio``. Every product goes to
    ``xp.matmul`` over the whole stack with ``out=`` one of the stack's buffers; the
    elementwise work is on the ``(k, s, s)`` matrices only.
    """
    x, y, gram, poly = stack.x, stack.y, stack.gram, stack.poly
    dtype = x.dtype.type
    k, s = gram.shape[0], gram.shape[1]
    x *= inv_norms.reshape(-1, 1, 1)
    if ns_steps == 0:
        if ratio != 1.0:
            x *= dtype(ratio)
        return x
    diagonal = poly.reshape(k, s * s)[:, ::s + 1]        # a view: B's diagonal
    for it in range(ns_steps):
        r = ratio if it == ns_steps - 1 else 1.0
        a, b, c = (dtype(v * r) for v in coefficients)
        xt = x.transpose(0, 2, 1)
        if stack.tall:
            xp.matmul(xt, x, out=gram)
        else:
            xp.matmul(x, xt, out=gram)
        xp.matmul(gram, gram.transpose(0, 2, 1), out=poly)
        poly *= c
        gram *= b
        poly += gram
        diagonal += a                        # B + a I, with B = b A + c A A
        if stack.tall:
            xp.matmul(x, poly.transpose(0, 2, 1), out=y)
        else:
            xp.matmul(poly, x, out=y)
        x, y = y, x
    return x


# -- the declaration -----------------------------------------------------------------------------
from .. import _validate as _v  # noqa: E402
from .. import spec as _s  # noqa: E402
from . import reference_muon as _reference  # noqa: E402


def _coefficients():
    def make(name):
        def check(value, where):
            prefix = f"{where}: " if where else ""
            values = None
            if not isinstance(value, (str, bytes)):
                try:
                    values = tuple(value)
                except TypeError:
                    pass
            if values is None or len(values) != 3:
                raise ValueError(f"{prefix}{name} must be a tuple of exactly 3 numbers (a, b, c), "
                                 f"got {value!r}")
            return tuple(_v.number(f"{name}[{k}]", x, where=where) for k, x in enumerate(values))
        return check
    return make


def _steps():
    def make(name):
        def check(value, where):
            prefix = f"{where}: " if where else ""
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
            if not 0 <= int(value) < MAX_NS_STEPS:
                raise ValueError(f"{prefix}{name} must be in [0, {MAX_NS_STEPS}) (torch refuses "
                                 f"{MAX_NS_STEPS} or more), got {value}")
            return int(value)
        return check
    return make


def _adjust():
    def make(name):
        def check(value, where):
            if not any(value is f or (isinstance(value, str) and value == f) for f in ADJUST_LR_FNS):
                prefix = f"{where}: " if where else ""
                raise ValueError(f"{prefix}{name} must be None, 'original' or 'match_rms_adamw', "
                                 f"got {value!r}")
            return value
        return check
    return make


SPEC = _s.Spec(
    name="Muon", functional="", element=muon_element, scalars=muon_scalars,
    hypers=(_s.lr(1e-3), _s.weight_decay(0.1),
            _s.hyper("momentum", 0.95, _s.real(low=0.0)),
            _s.hyper("nesterov", True, _s.flag()),
            _s.hyper("ns_coefficients", (DEFAULT_A, DEFAULT_B, DEFAULT_C), _coefficients(),
                     bad=((1.0, 2.0), (1.0, 2.0, 3.0, 4.0), "abc", (1.0, float("nan"), 2.0), 3.0)),
            _s.eps(EPS),
            _s.hyper("ns_steps", DEFAULT_NS_STEPS, _steps(), bad=(-1, MAX_NS_STEPS, 2.5, True, "5")),
            _s.hyper("adjust_lr_fn", None, _adjust(), bad=("Original", "", 1, "rms"))),
    columns=(_s.Column("momentum_buffer"),), step_state=False,
    reference=_reference.muon, oracle="torch.optim.Muon",
    doc="""Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D params, as torch.optim.Muon.

    References:
      Jordan et al. (2024), https://kellerjordan.github.io/posts/muon/; Liu et al.,
      "Muon is Scalable for LLM Training" (2025); torch.optim.Muon (torch 2.13).
    Every param must be a matrix (2-D); use AdamW for the others, or
    :class:`fastopt.MuonWithAuxAdam` for both in one optimizer. Defaults as torch:
    ``lr=1e-3, weight_decay=0.1`` (decoupled), ``momentum=0.95, nesterov=True``,
    ``ns_coefficients=(3.4445, -4.775, 2.0315)``, ``eps=1e-7``, ``ns_steps=5``,
    ``adjust_lr_fn=None`` ("original": ``sqrt(max(1, rows / cols))``; or
    "match_rms_adamw": ``0.2 sqrt(max(rows, cols))``).
    State: ``momentum_buffer`` (no ``step``, as torch).
    Newton-Schulz runs in the param's dtype (torch: bfloat16), batched over same-shape
    matrices through the array module's matmul (BLAS on the CPU, cuBLAS via CuPy).
    """,
)
