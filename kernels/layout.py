"""What a driver is generated from: the columns of a step, and what each one does.

A step reads and writes *columns*, arrays aligned element for element: the param, the
gradient, any number of state columns, and with master weights a 16-bit model copy of
the param. An element function takes ``(p, g, s0, ..., s{K-1}, h)`` and returns
``(p, s0, ..., s{K-1})``, all in its math precision (float32, or float64 for float64
params); ``K`` is the number of state positions of its optimizer, any number.

A :class:`Layout` says, for one compiled driver, which state columns are present (read),
which are stored (written), in which storage format each one lives, and what the
per-row value and model columns are. Drivers (``kernels/cpu.py``, ``kernels/cuda.py``)
generate their loop from it: they know columns, formats, chunks and launches, never
optimizer math.

Storage formats (``FORMATS``): ``"native"`` is the param's own float dtype (float32 or
float64; the math runs in it); ``"float16"`` and ``"bfloat16"`` are 16-bit patterns
widened to float32 on load and rounded to nearest even on store; ``"int8-signed"`` and
``"int8-unsigned"`` are blockwise 8-bit codes of the dynamic maps (kernels/blockwise.py)
with one float32 absmax per block of ``Layout.block`` elements: a chunk holds whole
blocks, and a block's values are decoded, stepped, and re-encoded with their new absmax
within the chunk's work (float32 math only).
"""
from __future__ import annotations

from typing import NamedTuple

NATIVE, FLOAT16, BFLOAT16 = "native", "float16", "bfloat16"
INT8_SIGNED, INT8_UNSIGNED = "int8-signed", "int8-unsigned"
BLOCKWISE = (INT8_SIGNED, INT8_UNSIGNED)
FORMATS = (NATIVE, FLOAT16, BFLOAT16) + BLOCKWISE

# Per-row modes: one value per row of a merge=False table (kernels/per_tensor.py).
ROW_NONE, ROW_GRAD, ROW_SLOT = 0, 1, 2
ROW_MODES = {None: ROW_NONE, "grad": ROW_GRAD, "slot": ROW_SLOT, "slot2": ROW_SLOT}

# Model columns of master weights: the 16-bit format of the gradients and model copy.
# "pure-*": no master weights: the param column itself is 16-bit (loaded widened, the
# update rounded stochastically, or kept exact with a 16-bit Kahan compensation column).
PURE_STOCHASTIC = "pure-bfloat16-stochastic"
PURE_KAHAN = ("pure-bfloat16-kahan", "pure-float16-kahan")
MODELS = ("", FLOAT16, BFLOAT16, "bfloat16-stochastic", PURE_STOCHASTIC) + PURE_KAHAN


def parse_row_mode(row_mode) -> tuple:
    """``(mode, slot)`` for a drivers' ``row_mode`` argument: None, "grad", or
    "slot<k>" (row r's value is state argument k; "slot" alone means "slot2", the
    position LAMB and LARS use)."""
    if row_mode is None or row_mode == "grad":
        return ROW_MODES[row_mode], 0
    if isinstance(row_mode, str) and row_mode.startswith("slot"):
        digits = row_mode[4:] or "2"
        if digits.isdigit():
            return ROW_SLOT, int(digits)
    raise ValueError(f"row_mode must be None, 'grad' or 'slot<k>' (k a state position), "
                     f"got {row_mode!r}")


class Layout(NamedTuple):
    """One driver's columns (hashable: part of the compiled driver's cache key).

    reads:   per state position, whether that column is present (loaded). An absent
             position gets the gradient as its argument and is never stored.
    writes:  per state position, whether the result is stored (implies reads).
    formats: per state position, its storage format (FORMATS).
    row_mode: ROW_NONE; ROW_GRAD, row r's value multiplies its gradients; ROW_SLOT, row
             r's value is the element's state argument ``row_slot`` (read-only; that
             column must be absent).
    row_slot: the state position ROW_SLOT fills.
    model:   "" (no model column), or "float16"/"bfloat16"/"bfloat16-stochastic": the
             param column holds float32 master weights, the gradients are 16-bit in
             this format and every updated weight is also stored, rounded, in the
             model column. Or "pure-...": the param column holds the 16-bit params
             themselves (no master weights), rounded stochastically or compensated by
             a 16-bit Kahan column (the extra column after the state columns).
    block:   elements per block of the blockwise columns (0 when there are none).
    """

    reads: tuple
    writes: tuple
    formats: tuple
    row_mode: int = ROW_NONE
    row_slot: int = 0
    model: str = ""
    block: int = 0

    @property
    def n_slots(self) -> int:
        return len(self.reads)

    @property
    def pure(self) -> bool:
        """The param column is 16-bit: no master weights."""
        return self.model.startswith("pure-")

    @property
    def extra_columns(self) -> int:
        """Table columns after the state columns before the absmax ones: the model copy
        of master weights, or the Kahan compensation of pure 16-bit params."""
        return int(bool(self.model) and self.model != PURE_STOCHASTIC)

    @property
    def blockwise(self) -> tuple:
        """The state positions stored blockwise, in order (their absmax columns' order)."""
        return tuple(k for k, f in enumerate(self.formats) if f in BLOCKWISE and self.reads[k])

    @classmethod
    def of(cls, reads, writes=None, formats=None, row_mode=ROW_NONE, row_slot=0, model="",
           block=0):
        """A checked layout; ``writes`` defaults to ``reads``, ``formats`` to native."""
        reads = tuple(bool(r) for r in reads)
        writes = reads if writes is None else tuple(bool(w) and r for w, r in zip(writes, reads))
        formats = (NATIVE,) * len(reads) if formats is None else tuple(formats)
        if len(writes) != len(reads) or len(formats) != len(reads):
            raise ValueError(f"reads, writes and formats must have one entry per state position, "
                             f"got {len(reads)}, {len(writes)}, {len(formats)}")
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown storage format {bad[0]!r}; expected one of {FORMATS}")
        if row_mode == ROW_SLOT:
            if not 0 <= row_slot < len(reads) or reads[row_slot]:
                raise ValueError(f"row_slot {row_slot} must name an absent state position")
        if model not in MODELS:
            raise ValueError(f"unknown model column {model!r}; expected one of {MODELS}")
        blocked = any(f in BLOCKWISE and r for f, r in zip(formats, reads))
        if blocked != (int(block) > 0):
            raise ValueError(f"block must be positive exactly when a blockwise column is read, "
                             f"got block={block} for formats {formats}")
        if blocked and any(r and not w for r, w, f in zip(reads, writes, formats) if f in BLOCKWISE):
            raise ValueError("a blockwise column is re-encoded with its block's new absmax: "
                             "it cannot be read without being written")
        return cls(reads, writes, formats, int(row_mode), int(row_slot), str(model), int(block))

    def tag(self) -> str:
        """A short name fragment: part of the generated driver's name and cache entry."""
        bits = "".join("w" if w else ("r" if r else "-") for r, w in zip(self.reads, self.writes))
        fmt = "".join({NATIVE: "n", FLOAT16: "h", BFLOAT16: "b", INT8_SIGNED: "s",
                       INT8_UNSIGNED: "u"}[f] for f in self.formats)
        row = f"_row{self.row_mode}{self.row_slot}" if self.row_mode else ""
        model = f"_m{self.model.replace('-', '')}" if self.model else ""
        block = f"_B{self.block}" if self.block else ""
        return f"{bits}_{fmt}{row}{model}{block}"
