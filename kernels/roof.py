"""The roof: an element with an optimizer's exact memory access pattern and trivial math.

Run by the same driver with the same slot mask as the optimizer it stands beside, it
reads p, g and every present state slot and writes p and every present slot, so its time
is the memory-bandwidth floor for that optimizer's step.
"""
from __future__ import annotations

from typing import NamedTuple


class RoofScalars(NamedTuple):
    scale: float


def roof_element(p, g, s0, s1, s2, h):
    return p + h.scale * g, s0 + g, s1 + g, s2 + g


def roof_scalars(cast):
    return RoofScalars(scale=cast(1e-12))
