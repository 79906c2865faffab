"""How the drivers are specialised: per element source, per flag setting, per reduction.

- :func:`source_tag`: a short hash of an element's source, part of every compiled
  driver's name, so an edited element never hits a stale on-disk cache entry.
- :func:`flags_of` and :func:`freezer`: the bool fields of an optimizer's scalars
  become compile-time constants of the CPU drivers.
- :func:`accumulate`: one addition that LLVM may reassociate (vectorised reductions
  without ``fastmath`` on the element's own arithmetic).
"""
from __future__ import annotations

import hashlib
import inspect

import numpy as np
from numba import types
from numba.extending import intrinsic

from .pieces import pieces_source


def source_tag(fn) -> str:
    """Short hash of ``fn``'s source (its bytecode where the source is unavailable) and of
    the element pieces it calls (kernels/pieces.py): a compiled driver inlines them all."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):  # pragma: no cover - functions without source
        src = fn.__code__.co_code.hex()
    if hasattr(fn, "__code__"):
        src += pieces_source(fn)
    return hashlib.sha1(src.encode()).hexdigest()[:10]


@intrinsic
def accumulate(typingctx, total, term):
    """``total + term`` carrying LLVM's ``reassoc`` flag on this one addition.

    A reduction loop vectorises only when its additions may be reassociated; setting the
    flag here, instead of compiling the whole driver with ``fastmath``, keeps the
    element's own arithmetic exact (a reassociated ``(c * g) * g`` overflows where
    torch's does not).
    """
    result = typingctx.unify_pairs(total, term)
    if not isinstance(result, types.Float):
        return None

    def codegen(context, builder, signature, args):
        a = context.cast(builder, args[0], signature.args[0], result)
        b = context.cast(builder, args[1], signature.args[1], result)
        return builder.fadd(a, b, flags=("reassoc",))

    return result(total, term), codegen


# -- compile-time flags -----------------------------------------------------------------
# The bool fields of an optimizer's scalars (maximize, nesterov, amsgrad, ...) select
# code paths. Passed at run time they stay branches or selects inside the vector loop
# (LLVM unswitches a few, not all), which costs NAdam or LAMB 5-10% of their time at
# the memory roof. So every driver is specialised on them, as fused CUDA kernels are
# on template bools: FREEZE(h) (see freezer) rebuilds h with its flags as constants,
# and LLVM folds the branches away. Numeric scalars (lr, betas, bias corrections)
# stay run time.

_FLAG_FIELDS: dict = {}


class Flags(tuple):
    """``(index, value)`` pairs of a scalars tuple's flags, carrying the names of all its
    fields. A driver is compiled for one field layout: Numba's disk cache knows a
    NamedTuple argument by its class's name and its field types, not by its field names,
    so a driver cached before a class's fields were reordered would otherwise be loaded
    for the new order and read the wrong fields. The names are part of the driver's
    cache name (:func:`flag_tag`) and of its key in memory."""

    def __new__(cls, pairs=(), fields=()):
        self = super().__new__(cls, pairs)
        self.fields = tuple(fields)
        self._hash = hash((tuple(self), self.fields))
        return self

    def __eq__(self, other):
        return tuple.__eq__(self, other) and self.fields == getattr(other, "fields", ())

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return self._hash


# One Flags object per (scalars class, flag values): a step asks for its flags every
# time, and a driver key that hashes an object made anew each step cost microseconds.
_FLAGS: dict = {}


def flags_of(h) -> tuple:
    """``h``'s bool fields as ``(index, value)`` pairs: what a driver is specialised on.

    Fields named in the scalars class's ``RUNTIME_FLAGS`` are left out: flags that
    change from one step to the next (SGD's first step, RAdam's rectification) would
    otherwise load or compile another driver in the middle of training.
    """
    cls = type(h)
    index = _FLAG_FIELDS.get(cls)
    if index is None:
        fields = getattr(h, "_fields", None)
        runtime = getattr(cls, "RUNTIME_FLAGS", ())
        index = tuple(i for i, x in enumerate(h) if isinstance(x, (bool, np.bool_))
                      and (fields is None or fields[i] not in runtime))
        if fields is None:          # a plain tuple: no class to remember its layout by
            return Flags(((i, bool(h[i])) for i in index), ())
        _FLAG_FIELDS[cls] = index
    key = (cls, tuple([h[i] for i in index]))
    flags = _FLAGS.get(key)
    if flags is None:
        flags = _FLAGS[key] = Flags(((i, bool(h[i])) for i in index), h._fields)
    return flags


def freezer(flags: tuple):
    """An intrinsic returning its tuple argument with fields ``flags`` made constants."""
    @intrinsic
    def freeze(typingctx, h):
        def codegen(context, builder, signature, args):
            value = args[0]
            for i, flag in flags:
                value = builder.insert_value(value, context.get_constant(types.boolean, flag), i)
            return value

        return h(h), codegen

    return freeze


def flag_tag(flags: tuple) -> str:
    """The flags as a name fragment ("tff", then a hash of the scalars' field names when
    known): part of a compiled driver's cache name."""
    tag = "".join("tf"[v] for _, v in flags)
    fields = getattr(flags, "fields", ())
    if fields:
        tag += "_" + hashlib.sha1(",".join(fields).encode()).hexdigest()[:6]
    return tag
