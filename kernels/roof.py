"""The roof: an element with an optimizer's exact memory access pattern and trivial math.

Run by the same driver with the same slot mask as the optimizer it stands beside, it
reads p, g and every present state slot and writes p and every present slot, so its time
is the memory-bandwidth floor for that optimizer's step.

Steps of more than one pass (LAMB, LARS: a per-tensor reduction, then the update) have a
roof of as many passes, each with its pass's reads and writes: :func:`pass_reducer` for
a reduction (which may write state), :func:`pass_element` for an update. Their flags say
which arrays a pass reads; the drivers' write masks say which it writes.
"""
from __future__ import annotations

from typing import NamedTuple


class RoofScalars(NamedTuple):
    scale: float


def roof_element(p, g, s0, s1, s2, h):
    return p + h.scale * g, s0 + g, s1 + g, s2 + g


def roof_element4(p, g, s0, s1, s2, s3, h):
    """The roof of a four-column optimizer (Adan)."""
    return p + h.scale * g, s0 + g, s1 + g, s2 + g, s3 + g


ROOF_ELEMENTS = {3: roof_element, 4: roof_element4}
"""The roof element by the optimizer's number of state positions (the element's K)."""


def roof_scalars(cast):
    return RoofScalars(scale=cast(1e-12))


class PassScalars(NamedTuple):
    scale: float
    zero: float
    read_g: bool
    read0: bool
    read1: bool


def pass_element(p, g, s0, s1, s2, h):
    """An update pass: reads p and the flagged arrays (s2 is the driver's per-row value)."""
    t = (g if h.read_g else h.zero) + (s0 if h.read0 else h.zero) + (s1 if h.read1 else h.zero)
    d = h.scale * t
    return p + s2 * d, s0 + d, s1 + d, s2


def pass_reducer(p, g, s0, s1, s2, h):
    """A reduction pass: sums (p * t, t) of the flagged arrays' sum t; returns what the
    driver may store, as a state-writing reducer: (a, b, p, s0, s1, s2)."""
    t = (g if h.read_g else h.zero) + (s0 if h.read0 else h.zero) + (s1 if h.read1 else h.zero)
    d = h.scale * t
    return p * t, t, p, s0 + d, s1 + d, s2


def pass_scalars(reads: str, cast):
    """Flags for a pass reading ``reads`` (names among "g", "s0", "s1"; p is always read)."""
    names = set(reads.split())
    return PassScalars(scale=cast(1e-12), zero=cast(0.0), read_g="g" in names,
                       read0="s0" in names, read1="s1" in names)
