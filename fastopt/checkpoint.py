"""Checkpoints: state dicts to and from ``.npz`` without pickle.

Arrays are stored as npz members; the structure around them (dicts with int or str keys,
lists, tuples, numbers, strings, None) is a JSON skeleton stored as one more member.
Loading uses ``allow_pickle=False``, so a file can never execute code. Saving writes a
temporary file beside the target and renames it, so a crash never leaves half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

_SKELETON = "__fastopt_skeleton__"
FORMAT = 1


def _encode(obj, arrays):
    if isinstance(obj, dict):
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save: dict keys must be str or int, got {type(k).__name__} {k!r}")
            pairs.append([k, _encode(v, arrays)])
        return {"dict": pairs}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return {"list": [_encode(v, arrays) for v in obj]}
    if obj is None or isinstance(obj, (bool, str)):
        return {"value": obj}
    if isinstance(obj, (int, float, np.integer, np.floating, np.bool_)) and np.ndim(obj) == 0 \
            and not isinstance(obj, np.ndarray):
        return {"value": obj.item() if hasattr(obj, "item") else obj}
    if hasattr(obj, "get") and hasattr(obj, "__cuda_array_interface__"):
        obj = obj.get()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"save: arrays must be numeric, got dtype {obj.dtype}")
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {"array": name}
    raise TypeError(f"save: cannot store {type(obj).__name__} {obj!r} without pickle")


def save(path, state_dict) -> None:
    """Write ``state_dict`` (an optimizer's, or any tree of them) to ``path`` (.npz)."""
    arrays: dict = {}
    skeleton = json.dumps({"format": FORMAT, "tree": _encode(state_dict, arrays)})
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastopt-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_SKELETON: np.array(skeleton)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted or not a fastopt checkpoint."""


def _decode(node, npz, path):
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{path}: malformed checkpoint structure")
    (kind, val), = node.items()
    if kind == "dict":
        out = {}
        for pair in val:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], (str, int)):
                raise CheckpointError(f"{path}: malformed dict entry in checkpoint")
            out[pair[0]] = _decode(pair[1], npz, path)
        return out
    if kind in ("list", "tuple"):
        if not isinstance(val, list):
            raise CheckpointError(f"{path}: malformed {kind} in checkpoint")
        items = [_decode(v, npz, path) for v in val]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        if not (val is None or isinstance(val, (bool, int, float, str))):
            raise CheckpointError(f"{path}: malformed value in checkpoint")
        return val
    if kind == "array":
        if not isinstance(val, str) or val not in npz.files or val == _SKELETON:
            raise CheckpointError(f"{path}: checkpoint refers to a missing array {val!r}")
        arr = npz[val]
        if arr.dtype.kind not in "biuf":
            raise CheckpointError(f"{path}: array {val!r} has non-numeric dtype {arr.dtype}")
        return arr
    raise CheckpointError(f"{path}: unknown node kind {kind!r} in checkpoint")


def load(path):
    """Read a checkpoint written by :func:`save` (never unpickles anything)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _SKELETON not in npz.files:
                raise CheckpointError(f"{path}: not a fastopt checkpoint (no {_SKELETON} member)")
            meta = json.loads(str(npz[_SKELETON]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tree" not in meta:
                raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
            return _decode(meta["tree"], npz, path)
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
