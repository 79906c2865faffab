"""Pieces several optimizers share, written once.

Host side: :func:`lerp_fields`, the scalars of torch's ``lerp`` in an element.

Element side: functions marked :func:`piece` (plain Python, so an element still runs as
Python under the CUDA simulator and in tests). An element calls them by their global
name; :func:`bind` gives each compile target a copy of the element whose globals name
that target's compiled form of every piece it reaches (``numba.njit(inline="always")``
on the CPU, ``cuda.jit(device=True)`` on CUDA), so one source serves both targets and
no device is asked anything at compile time (numba's ``register_jitable`` asks the
current GPU for its compute capability, which fails where PTX is built without one).
:func:`pieces_source` is the text a driver's cache key must include with the element's.
"""
from __future__ import annotations

import inspect
import types


def piece(fn):
    """Mark ``fn`` as an element piece: bound per target by :func:`bind`."""
    fn.fastopt_piece = True
    return fn


def _pieces_called(fn) -> list:
    """The pieces ``fn`` names among its globals, in the order its code names them."""
    found = []
    for name in fn.__code__.co_names:
        obj = fn.__globals__.get(name)
        if isinstance(obj, types.FunctionType) and getattr(obj, "fastopt_piece", False) \
                and obj not in found:
            found.append(obj)
    return found


def bind(fn, compile_piece):
    """``fn`` with every piece it calls replaced by ``compile_piece(piece)``, the target's
    compiled form (which binds the pieces that piece calls in turn); ``fn`` itself when it
    calls none."""
    called = _pieces_called(fn)
    if not called:
        return fn
    scope = dict(fn.__globals__)
    for obj in called:
        scope[obj.__name__] = compile_piece(obj)
    bound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    bound.__qualname__, bound.__doc__, bound.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return bound


def pieces_source(fn) -> str:
    """The source of every piece ``fn`` reaches, for cache keys (empty when none)."""
    seen, stack, texts = set(), [fn], []
    while stack:
        for obj in _pieces_called(stack.pop()):
            if obj not in seen:
                seen.add(obj)
                texts.append(inspect.getsource(obj))
                stack.append(obj)
    return "".join(texts)


# -- host side ---------------------------------------------------------------------------------

def lerp_fields(beta1, cast) -> dict:
    """The scalars of torch's ``lerp(m, g, 1 - beta1)`` in an element: the weight
    ``1 - beta1``, ``1 - weight`` in the math precision (the factor of torch's second
    form, ``g - (g - m) * (1 - weight)``, taken when the weight is >= 0.5) and which
    form torch takes."""
    weight = cast(1.0 - beta1)
    return dict(one_minus_beta1=weight, lerp_back=cast(cast(1.0) - weight),
                lerp_from_end=bool(1.0 - beta1 >= 0.5))


# -- element side ------------------------------------------------------------------------------

@piece
def lerp(start, end, weight, back, from_end):
    """torch.lerp(start, end, weight) in both of its forms (they differ for infinite
    inputs): ``end - (end - start) * back`` (``back = 1 - weight``) when the weight is
    >= 0.5, ``start + weight * (end - start)`` otherwise."""
    if from_end:
        return end - (end - start) * back
    return start + weight * (end - start)


@piece
def ascent_and_decay(p, g, h):
    """torch's prologue: the gradient negated under ``maximize``, then decoupled weight
    decay on ``p`` (``decay_factor = 1 - lr wd``) or L2 decay added to ``g``."""
    if h.maximize:
        g = -g
    if h.decoupled:
        p = p * h.decay_factor
    elif h.l2:
        g = g + h.weight_decay * p
    return p, g


@piece
def adam_moments(p, g, m, v, h):
    """The prologue and both moments of Adam, NAdam and RAdam: ``m`` lerps towards ``g``
    by ``1 - beta1``; ``v = beta2 v + ((1 - beta2) g) g``. Returns (p, g, m, v)."""
    p, g = ascent_and_decay(p, g, h)
    m = lerp(m, g, h.one_minus_beta1, h.lerp_back, h.lerp_from_end)
    v = h.beta2 * v + (h.one_minus_beta2 * g) * g
    return p, g, m, v


@piece
def keras_prologue(p, g, h):
    """Keras's prologue: ``clipvalue`` clamps the gradient, then weight decay
    ``w -= w * wd * lr`` (Keras's ``_apply_weight_decay``). Returns (p, g)."""
    if h.clip:
        g = h.clip_hi if g > h.clip_hi else (h.clip_lo if g < h.clip_lo else g)
    if h.decay:
        p = p - p * h.weight_decay * h.lr
    return p, g
