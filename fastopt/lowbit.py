"""Low-bit optimizer state: the ``state_format`` option and its host-side conversions.

``state_format`` (every optimizer's keyword) stores the state columns:

- ``"float32"`` (default): in the params' own dtype, as torch does.
- ``"bfloat16"``: 16-bit patterns widened to float32 for the math and rounded to
  nearest even when stored (4 B of Adam state per parameter instead of 8).
- ``"int8"``: blockwise 8-bit codes of the dynamic maps with one float32 absmax per
  ``block_size`` elements (kernels/blockwise.py; about 2.03 B of Adam state per
  parameter). Tensors under ``min_8bit_size`` elements keep float32 state, as
  bitsandbytes does: their blocks' absmax would cost more than it saves, and small
  tensors (norms, biases) are the ones most sensitive to quantization.

State keys: a column keeps its torch name (``exp_avg``); an int8 column holds its codes
there (uint8, the param's shape) and its absmax in ``<name>_absmax``; state dicts also
carry the map as ``<name>_qmap`` and the option as ``state_dict()["state_format"]``.
Loading converts: a float32 state (fastopt's or torch's) into an int8 or bfloat16
optimizer is quantized, an int8 state into a float32 one is expanded, an int8 state with
another map (bitsandbytes') is decoded with its own map and encoded with fastopt's.
:func:`from_bitsandbytes` turns a bitsandbytes 8-bit state dict into fastopt's.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .kernels import blockwise
from .kernels.layout import BFLOAT16, INT8_SIGNED, INT8_UNSIGNED, NATIVE

FLOAT32, BF16, INT8 = "float32", "bfloat16", "int8"
STATE_FORMATS = (FLOAT32, BF16, INT8)
ABSMAX, QMAP = "_absmax", "_qmap"
_KIND = {INT8_SIGNED: blockwise.SIGNED, INT8_UNSIGNED: blockwise.UNSIGNED}


@dataclasses.dataclass(frozen=True)
class StateFormat:
    """An optimizer's ``state_format``, ``block_size`` and ``min_8bit_size``."""

    name: str = FLOAT32
    block_size: int = blockwise.BLOCK
    min_8bit_size: int = blockwise.MIN_SIZE

    @classmethod
    def checked(cls, name, block_size, min_8bit_size) -> "StateFormat":
        if name not in STATE_FORMATS:
            raise ValueError(f"state_format must be one of {', '.join(map(repr, STATE_FORMATS))}, "
                             f"got {name!r}")
        for label, value in (("block_size", block_size), ("min_8bit_size", min_8bit_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}")
        block_size, min_8bit_size = int(block_size), int(min_8bit_size)
        if not 16 <= block_size <= 1 << 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two from 16 to 65536, got {block_size}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
        return cls(name, block_size, min_8bit_size)

    @property
    def is_default(self) -> bool:
        return self.name == FLOAT32

    def storage(self, column, size: int) -> str:
        """The storage format (kernels/layout.py) of state ``column`` (a spec Column)
        for a param of ``size`` elements."""
        if self.name == BF16:
            return BFLOAT16
        if self.name == INT8 and size >= self.min_8bit_size and size > 0:
            return INT8_UNSIGNED if column.unsigned else INT8_SIGNED
        return NATIVE

    def record(self) -> dict:
        return {"format": self.name, "block_size": self.block_size,
                "min_8bit_size": self.min_8bit_size}


def bfloat16():
    from .kernels.lowp import bfloat16_dtype
    dtype = bfloat16_dtype()
    if dtype is None:  # pragma: no cover - ml_dtypes is a dependency
        raise ImportError("state_format='bfloat16' needs ml_dtypes (pip install ml_dtypes)")
    return dtype


def n_blocks(size: int, block: int) -> int:
    return -(-int(size) // int(block))


def qmap(storage: str) -> np.ndarray:
    return blockwise.dynamic_map(_KIND[storage])


# -- host conversions (loads, initial fills): the encoder the drivers compile, in NumPy ----------
def encode(values, storage: str, block: int):
    """``(codes, absmax)`` of float32 ``values`` in an int8 ``storage`` (its shape kept)."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    flat = x.reshape(-1)
    nb = n_blocks(flat.size, block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:flat.size] = flat
    blocks = padded.reshape(nb, block)
    # the largest magnitude by its bits: a NaN sorts above infinity, as in the drivers
    top = (blocks.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1) if nb else \
        np.zeros(0, np.uint32)
    absmax = top.astype(np.uint32).view(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(absmax > 0, np.float32(1.0) / np.where(absmax > 0, absmax, 1),
                       np.float32(0)).astype(np.float32)
        scaled = (blocks * inv[:, None]).reshape(-1)[:flat.size]
    table = blockwise.encoder(_KIND[storage]).astype(np.int64)
    u = scaled.view(np.uint32).astype(np.int64)
    sign = u >> 31
    exponent = np.clip(((u >> 23) & 0xFF) - 96, 0, 31)
    entry = table[(sign << 12) | (exponent << 7) | ((u >> 16) & 0x7F)]
    step = ((u & 0xFFFF) > (entry & 0xFFFF)).astype(np.int64)
    codes = ((entry >> 16) + step - 2 * step * sign).astype(np.uint8)
    return codes.reshape(x.shape), absmax.astype(np.float32)


def decode(codes, absmax, block: int, table) -> np.ndarray:
    """float32 values of ``codes`` with their blocks' ``absmax`` under map ``table``."""
    codes = np.asarray(codes)
    flat = codes.reshape(-1)
    scale = np.repeat(np.asarray(absmax, dtype=np.float32), block)[:flat.size]
    return (np.asarray(table, dtype=np.float32)[flat] * scale).reshape(codes.shape)


def constant(storage: str, fill: float) -> tuple:
    """``(code, absmax)`` of a block of an int8 ``storage`` holding ``fill`` everywhere
    (a new column's initial value): ``fill`` is its own absmax, and its code that of 1.0
    (or of 0 for a zero fill)."""
    codes, absmax = encode(np.full(1, fill, np.float32), storage, 1)
    return int(codes[0]), float(absmax[0])


def from_float32(values, storage: str, block: int, dtype) -> dict:
    """A column's arrays ``{"": ..., ABSMAX: ...}`` holding float32 ``values``."""
    if storage in _KIND:
        codes, absmax = encode(values, storage, block)
        return {"": codes, ABSMAX: absmax}
    if storage == BFLOAT16:
        return {"": np.asarray(values, dtype=np.float32).astype(bfloat16())}
    return {"": np.asarray(values).astype(dtype)}


# -- state dicts ----------------------------------------------------------------------------------
def saved_arrays(opt, i, st) -> dict:
    """Param ``i``'s state arrays for a state dict: host copies, plus each int8 column's
    map as ``<name>_qmap``."""
    from ._state import _host
    out = {name: _host(a) for name, a in st.items()}
    for name in opt.slot_names:
        if name + ABSMAX in st:
            out[name + QMAP] = qmap(opt._storage(name, st[name])).copy()
    return out


def _checked_record(record, where) -> int | None:
    """The block size a state dict's ``state_format`` record declares (None: no record)."""
    if record is None:
        return None
    if not isinstance(record, dict) or "block_size" not in record:
        raise ValueError(f"{where} must be a dict with 'format' and 'block_size', got {record!r}")
    block = record["block_size"]
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise ValueError(f"{where}['block_size'] must be a positive int, got {block!r}")
    return int(block)


def loaded_arrays(opt, p, st, keys, record, where) -> dict:
    """The arrays to store for param ``p`` from a saved state ``st`` (its ``keys``):
    every column converted to this optimizer's storage, everything checked first."""
    from . import _validate
    saved_block = _checked_record(record, "state_dict['state_format']")
    out = {}
    suffixed = {k for k in keys if k.endswith(ABSMAX) or k.endswith(QMAP)}
    for key in suffixed:
        base = key[:-len(ABSMAX)] if key.endswith(ABSMAX) else key[:-len(QMAP)]
        if base not in keys:
            raise ValueError(f"{where}[{key!r}] belongs to a state column {base!r} it lacks")
    for name in keys - suffixed:
        label = f"{where}[{name!r}]"
        src = st[name]
        if not hasattr(src, "dtype"):
            src = np.asarray(src)
        dtype = np.dtype(src.dtype)
        shape = tuple(np.shape(src))
        if shape != tuple(p.shape):
            raise ValueError(f"{label} has shape {shape}, expected {tuple(p.shape)} like the param")
        storage = opt._storage(name, p) if name in opt.slot_names else NATIVE
        if dtype == np.uint8:
            values = _saved_codes(opt, name, p, st, saved_block, storage, label, where, out)
            if values is None:
                continue
        elif dtype == bfloat16() or dtype.kind == "f":
            if name + ABSMAX in st:
                raise ValueError(f"{label} is {dtype} but has an absmax: int8 codes are uint8")
            if storage == NATIVE:
                _validate.state_array(src, p, label, "the param")
                out[name] = src
                continue
            values = np.asarray(src, dtype=np.float32)
        else:
            raise TypeError(f"{label} has dtype {dtype}, expected a floating dtype, bfloat16 "
                            "or uint8 codes (int8 state)")
        for suffix, a in from_float32(values, storage, opt.state_format.block_size,
                                      np.dtype(np.float32) if storage != NATIVE else
                                      _state_dtype(p)).items():
            out[name + suffix] = a
    return out


def _state_dtype(p):
    return np.dtype(np.float32) if np.dtype(p.dtype).itemsize == 2 else np.dtype(p.dtype)


def _saved_codes(opt, name, p, st, block, storage, label, where, out):
    """Saved int8 codes of column ``name``: checked; copied into ``out`` as they are when
    they are already this optimizer's (same map and block: bit for bit), else returned
    as float32 values to convert."""
    if name + ABSMAX not in st:
        raise ValueError(f"{label} holds uint8 codes but {where} lacks {name + ABSMAX!r}")
    if block is None:
        raise ValueError(f"{label} holds int8 codes, but the state dict has no 'state_format' "
                         "record saying their block_size")
    codes = np.asarray(st[name])
    absmax = np.asarray(st[name + ABSMAX])
    want = n_blocks(p.size, block)
    if absmax.ndim != 1 or absmax.size != want or absmax.dtype.kind != "f":
        raise ValueError(f"{where}[{name + ABSMAX!r}] has shape {absmax.shape} and dtype "
                         f"{absmax.dtype}, expected {want} floats (one per block of {block} of "
                         f"the param's {p.size} elements)")
    column = opt.spec.column(name) if name in opt.slot_names else None
    kind = INT8_UNSIGNED if column is not None and column.unsigned else INT8_SIGNED
    table = st.get(name + QMAP)
    if table is None:
        table = qmap(kind)
    table = np.asarray(table)
    if table.shape != (256,) or table.dtype.kind != "f" or not np.all(np.isfinite(table)) \
            or np.any(np.diff(table.astype(np.float64)) < 0) or np.abs(table).max() > 1:
        raise ValueError(f"{where}[{name + QMAP!r}] must be 256 finite, sorted values in [-1, 1]")
    table = table.astype(np.float32)
    if storage == kind and block == opt.state_format.block_size and \
            np.array_equal(table.view(np.uint32), qmap(kind).view(np.uint32)):
        out[name], out[name + ABSMAX] = codes.copy(), absmax.astype(np.float32)
        return None
    return decode(codes, absmax.astype(np.float32), block, table)


# bitsandbytes' state<k> where it stacks several of fastopt's columns (rows in this order)
_BNB_STACKED = {"AdEMAMix": (("exp_avg", "exp_avg_slow"), ("exp_avg_sq",))}
# fastopt's name of bitsandbytes' betas[0] where fastopt has no betas
_BNB_BETA1 = {"SGD": "momentum", "RMSprop": "alpha"}
# fastopt's hyperparameters that bitsandbytes' update implies
_BNB_IMPLIED = {"AdEMAMix": {"weight_decouple": True, "fixed_decay": False}}


def _bnb_columns(opt) -> tuple:
    """fastopt's column names held by bitsandbytes' state1, state2, ... (several: stacked)."""
    stacked = _BNB_STACKED.get(opt.spec.name)
    return stacked if stacked else tuple((c.name,) for c in opt.spec.columns)


def _param_shape(state_dict, opt, pid, where):
    """The shape of the param ``pid`` names (through the saved groups' param ids)."""
    for saved, mine in zip(state_dict["param_groups"], opt.param_groups):
        ids = list(saved.get("params", ()))
        if pid in ids and ids.index(pid) < len(mine["params"]):
            return tuple(np.shape(mine["params"][ids.index(pid)]))
    raise ValueError(f"{where} refers to no param in state_dict['param_groups']")


def _bnb_rows(state_dict, opt, pid, key, value, targets) -> list:
    """``value`` of bitsandbytes' ``key`` split among fastopt's columns ``targets``: a
    stacked state (``len(targets)`` rows of the param's shape) or absmax (rows of
    blocks) by rows; a map is every target's."""
    where = f"state_dict['state'][{pid!r}]"
    if len(targets) == 1 or key.startswith("qmap"):
        return [value] * len(targets)
    n = len(targets)
    if key.startswith("state"):
        shape = _param_shape(state_dict, opt, pid, where)
        if tuple(value.shape) != (n, *shape):
            raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, expected "
                             f"{(n, *shape)}: {type(opt).__name__}'s {', '.join(targets)} "
                             f"stacked on the param's shape {shape}")
    elif value.ndim != 2 or value.shape[0] != n:
        raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, expected ({n}, "
                         f"blocks): one row of block maxima for each of {', '.join(targets)}")
    return list(value)


def _bnb_group(saved, mine, gi, name) -> dict:
    """fastopt's group ``mine`` (without params) with the values of bitsandbytes' group
    ``saved`` where the two share a hyperparameter."""
    where = f"state_dict['param_groups'][{gi}]"
    group = {k: v for k, v in mine.items() if k != "params"}
    for k, v in saved.items():
        if k in group and k != "params":
            group[k] = v
    if "betas" in saved and "betas" in group:
        group["betas"] = tuple(saved["betas"])[:len(mine["betas"])]
    if "betas" in saved and name in _BNB_BETA1:
        group[_BNB_BETA1[name]] = saved["betas"][0]
    if "t_alpha_beta3" in group and ("t_alpha" in saved or "t_beta3" in saved):
        t_alpha, t_beta3 = saved.get("t_alpha") or None, saved.get("t_beta3") or None
        if t_alpha != t_beta3:
            raise ValueError(f"{where} has t_alpha={t_alpha!r} and t_beta3={t_beta3!r}: "
                             f"{name} warms both up over one t_alpha_beta3")
        group["t_alpha_beta3"] = t_alpha
    group.update(_BNB_IMPLIED.get(name, {}))
    return group


def from_bitsandbytes(state_dict: dict, opt) -> dict:
    """A bitsandbytes 8-bit optimizer's state dict (tensors as NumPy arrays) as a state
    dict ``opt`` (a fastopt optimizer of the same kind, same params) loads.

    bitsandbytes names its columns ``state1``/``state2`` (codes or float32 values),
    ``absmax1``/``absmax2`` and ``qmap1``/``qmap2``; they become ``opt``'s first and
    second state columns, with its block size (256); AdEMAMix's ``state1`` stacks
    ``exp_avg`` and ``exp_avg_slow`` (shape ``(2, *p.shape)``, ``absmax1`` two rows of
    block maxima, one ``qmap1``) and its ``state2`` is ``exp_avg_sq``; other shapes
    are refused, naming the key. Since 0.49.2 its ``state_dict()``
    nests them under ``"__bnb_optimizer_quant_state__"`` (hidden from FSDP); both forms
    load. Codes saved with another map than fastopt's (bitsandbytes' signed map keeps
    -0.99297 as code 0 where fastopt has -1.0) are decoded with the saved map and encoded
    with fastopt's. ``unorm_vec`` and ``gnorm_vec`` (norm scratch buffers) are dropped;
    ``max1``/``new_max1`` (non-blockwise 8-bit state, ``block_wise=False``) are refused.
    Group hyperparameters bitsandbytes shares with ``opt`` (lr, betas, eps,
    weight_decay, alpha, ...) are taken, and those its update implies: ``betas[0]`` is
    RMSprop's ``alpha`` and SGD's ``momentum``; AdEMAMix's ``t_alpha`` and ``t_beta3``
    are ``t_alpha_beta3`` (refused where they differ), its decay decoupled
    (``weight_decouple=True``). The others keep ``opt``'s values. Note bitsandbytes'
    Adam8bit decays weights decoupled, as AdamW.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a bitsandbytes state dict with 'state' and 'param_groups'")
    wrapper = "__bnb_optimizer_quant_state__"   # Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
    columns = _bnb_columns(opt)
    state = {}
    for pid, st in state_dict["state"].items():
        if not isinstance(st, dict):
            raise ValueError(f"state_dict['state'][{pid!r}] must be a dict")
        st = dict(st)
        wrapped = st.pop(wrapper, None)
        if wrapped is not None:
            if not isinstance(wrapped, dict):
                raise ValueError(f"state_dict['state'][{pid!r}][{wrapper!r}] must be a dict")
            st.update(wrapped)
        d = {}
        for key, value in st.items():
            if key == "step":
                d["step"] = value
                continue
            if key in ("unorm_vec", "gnorm_vec"):
                continue
            for bnb, ours in (("state", ""), ("absmax", ABSMAX), ("qmap", QMAP)):
                if key.startswith(bnb) and key[len(bnb):].isdigit():
                    k = int(key[len(bnb):]) - 1
                    if not 0 <= k < len(columns):
                        raise ValueError(f"state_dict['state'][{pid!r}] has {key!r}, but "
                                         f"bitsandbytes' {type(opt).__name__} has "
                                         f"{len(columns)} states")
                    rows = _bnb_rows(state_dict, opt, pid, key, np.asarray(value), columns[k])
                    for name, row in zip(columns[k], rows):
                        d[name + ours] = row
                    break
            else:
                if key.startswith(("max", "new_max")):
                    raise ValueError(f"state_dict['state'][{pid!r}] has {key!r}: non-blockwise "
                                     "8-bit state (bitsandbytes' block_wise=False) does not load; "
                                     "only blockwise state does")
                raise ValueError(f"state_dict['state'][{pid!r}] has {key!r}, not a "
                                 "bitsandbytes optimizer state key")
        state[pid] = d
    groups = []
    for gi, (saved, mine) in enumerate(zip(state_dict["param_groups"], opt.param_groups)):
        group = _bnb_group(saved, mine, gi, opt.spec.name)
        group["params"] = list(saved.get("params", ()))
        groups.append(group)
    return {"state": state, "param_groups": groups,
            "state_format": {"format": INT8, "block_size": blockwise.BLOCK,
                             "min_8bit_size": blockwise.MIN_SIZE}}
