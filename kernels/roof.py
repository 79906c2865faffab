"""The roof: an element with an optimizer's exact memory access pattern and trivial math.

Run by the same driver with the same slot mask as the optimizer it stands beside, it
reads p, g and every present state slot and writes p and every present slot, so its time
is the memory-bandwidth floor for that optimizer's step.

Low-bit state (bfloat16, blockwise int8) has roofs of its own below (:func:`lowbit_roof`).

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


# -- low-bit state: the roofs of bfloat16 and blockwise int8 columns --------------------
# The CPU driver's 16-bit and blockwise loads and stores are the format's own math (a
# widening shift and a rounding; decoding, a block's absmax and the encoder's table
# look-ups), so a roof through it would time that math too. These loops move exactly the
# bytes such a step moves, over one contiguous buffer per array, with trivial math: each
# param gets scale * g added, each 16-bit or 8-bit state element one added (wrapping), and
# each absmax (one float32 per ``block`` elements of a blockwise column) is read and
# rewritten once per block (bfloat16: in blocks of 256, a loop per array). Each runs in
# chunks of ``chunk`` elements (whole blocks), one chunk per ``prange`` iteration, sliced
# first and looped from 0 as the driver's loops (the form LLVM vectorises). One function per number of state columns: generated, and
# cached on disk as the drivers are (kernels/codegen.py).
LOWBIT_KINDS = ("bfloat16", "int8")
# A multi-pass step's reduction over int8 state (LAMB's first pass): reads p, g, the codes
# and the absmax, writes nothing but a partial sum per chunk.
INT8_READ = "int8-read"
_LOWBIT: dict = {}


def _blockwise_chunks(cols, absmax, per_block, per_element, before=(), after=()) -> list:
    """The loop of an int8 roof over chunks of ``chunk`` elements (whole blocks): per
    chunk, ``before``, ``per_block`` over its blocks' absmax slices ``a<k>c``,
    ``per_element`` over its slices ``pc``, ``gc`` and the code slices, then ``after``."""
    return ["    n = p.size",
            "    n_blocks = (n + block - 1) // block",
            "    per_chunk = chunk // block",
            "    for c in prange((n + chunk - 1) // chunk):",
            "        lo = c * chunk",
            "        hi = min(lo + chunk, n)",
            "        b_lo = c * per_chunk",
            "        b_hi = min(b_lo + per_chunk, n_blocks)",
            *(f"        {line}" for line in before),
            *(f"        {a}c = {a}[b_lo:b_hi]" for a in absmax),
            *(["        for b in range(b_hi - b_lo):"] if per_block else []),
            *(f"            {line}" for line in per_block),
            *(f"        {x}c = {x}[lo:hi]" for x in ["p", "g", *cols]),
            "        for i in range(hi - lo):",
            *(f"            {line}" for line in per_element),
            *(f"        {line}" for line in after)]


def _roof_name(kind: str, k_slots: int) -> str:
    return f"roof_{kind.replace('-', '_')}_{k_slots}"


def _lowbit_source(kind: str, k_slots: int) -> str:
    cols = [f"s{k}" for k in range(k_slots)]
    name = _roof_name(kind, k_slots)
    if kind == "bfloat16":
        args = ", ".join(["p", "g", *cols, "scale", "chunk"])
        lines = [f"def {name}({args}):",
                 "    n = p.size",
                 "    one = np.uint16(1)",
                 "    for c in prange((n + chunk - 1) // chunk):",
                 "        lo = c * chunk",
                 "        hi = min(lo + chunk, n)",
                 # in blocks of 256, one loop per array width (the step's form,
                 # kernels/codegen.py; a loop mixing float32 and uint16 streams ran
                 # at about 0.6 of this on an AMD EPYC)
                 "        for start in range(lo, hi, 256):",
                 "            stop = min(start + 256, hi)",
                 *(f"            {x}c = {x}[start:stop]" for x in ["p", "g", *cols]),
                 "            for i in range(stop - start):",
                 "                pc[i] = pc[i] + scale * gc[i]",
                 *(line for x in cols for line in ("            for i in range(stop - start):",
                                                   f"                {x}c[i] = {x}c[i] + one"))]
    elif kind == "int8":
        absmax = [f"a{k}" for k in range(k_slots)]
        args = ", ".join(["p", "g", *cols, *absmax, "scale", "block", "chunk"])
        lines = [f"def {name}({args}):", "    one = np.uint8(1)",
                 *_blockwise_chunks(cols, absmax, [f"{a}c[b] = {a}c[b] + scale" for a in absmax],
                                    ["pc[i] = pc[i] + scale * gc[i]",
                                     *(f"{x}c[i] = {x}c[i] + one" for x in cols)])]
    elif kind == INT8_READ:
        absmax = [f"a{k}" for k in range(k_slots)]
        args = ", ".join(["p", "g", *cols, *absmax, "out", "block", "chunk"])
        terms = " + ".join(["pc[i] * gc[i]", *(f"np.float32({x}c[i])" for x in cols)])
        lines = [f"def {name}({args}):",
                 *_blockwise_chunks(cols, absmax, [f"acc += {a}c[b]" for a in absmax],
                                    [f"acc += {terms}"], ["acc = np.float32(0.0)"],
                                    ["out[c] = acc"])]
    else:
        raise ValueError(f"no low-bit roof for {kind!r}; expected one of "
                         f"{LOWBIT_KINDS + (INT8_READ,)}")
    # a sum vectorises only where its additions may be reordered (the read roof's)
    decorated = [f"@numba.njit(parallel=True, cache=True{', fastmath=True' if kind == INT8_READ else ''})",
                 *lines]
    return "# fastopt roof kernel (kernels/roof.py), generated\n" + "\n".join(decorated) + "\n"


def lowbit_roof(kind: str, k_slots: int):
    """The compiled roof of ``k_slots`` state columns stored as ``kind``: "bfloat16"
    (``fn(p, g, s0, ..., scale, chunk)``, uint16 columns), "int8"
    (``fn(p, g, s0, ..., a0, ..., scale, block, chunk)``: uint8 codes and float32 absmax),
    or "int8-read" (``fn(p, g, s0, ..., a0, ..., out, block, chunk)``: reads them all,
    writes a float32 partial sum per chunk into ``out``; 0 to 8 columns)."""
    key = (kind, int(k_slots))
    fn = _LOWBIT.get(key)
    if fn is None:
        if not (0 if kind == INT8_READ else 1) <= k_slots <= 8:
            raise ValueError(f"a low-bit roof needs 1 to 8 state columns, got {k_slots}")
        import numba
        import numpy as np

        from . import codegen
        module = codegen.load(_lowbit_source(kind, k_slots),
                              {"numba": numba, "np": np, "prange": numba.prange})
        fn = _LOWBIT[key] = getattr(module, _roof_name(kind, k_slots))
    return fn
