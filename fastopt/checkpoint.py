"""Checkpoints: state dicts to and from ``.npz`` without pickle.

Arrays are stored as npz members; the structure around them (dicts with int or str keys,
lists, tuples, numbers, strings, None) is a JSON skeleton stored as one more member.
Loading parses each ``.npy`` member itself: object dtypes are refused before any data
is read (nothing is ever unpickled), the declared shape must match the member's size
before anything is allocated, and every member is read to its end so its CRC-32 is
checked. Saving writes a temporary file beside the target, fsyncs it and renames it, so
a crash never leaves half a file under the real name; the file gets the umask's mode when
new and keeps its mode when overwritten.
"""
from __future__ import annotations

import json
import os
import reprlib
import secrets
import stat
import struct
import zipfile

import numpy as np

from . import _validate

_SKELETON = "__fastopt_skeleton__"
FORMAT = 1


def _bfloat16():
    from .kernels.lowp import bfloat16_dtype
    return bfloat16_dtype()


def _key(k) -> str:
    return f"[{k!r}]"


def _encode(obj, arrays, where="state_dict"):
    """The JSON skeleton of ``obj``; arrays go to ``arrays``. ``where`` is the path of
    ``obj`` in the tree (``state_dict['state'][0]['exp_avg']``), for messages."""
    if isinstance(obj, dict):
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"save: {where} has a key {reprlib.repr(k)} of type {type(k).__name__}; "
                                "dict keys must be str or int")
            pairs.append([k, _encode(v, arrays, where + _key(k))])
        return {"dict": pairs}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return {"list": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, str)):
        return {"value": obj}
    if isinstance(obj, (int, float, np.integer, np.floating, np.bool_)) and np.ndim(obj) == 0 \
            and not isinstance(obj, np.ndarray):
        return {"value": obj.item() if hasattr(obj, "item") else obj}
    if hasattr(obj, "get") and hasattr(obj, "__cuda_array_interface__"):
        obj = obj.get()
    if isinstance(obj, np.ndarray):
        if obj.dtype == _bfloat16():
            # bfloat16 state (state_format="bfloat16"): its 16-bit patterns, marked as such
            name = f"a{len(arrays)}"
            arrays[name] = obj.view(np.uint16)
            return {"bfloat16": name}
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"save: {where} has dtype {obj.dtype}; checkpoints store numeric arrays "
                            "(bool, integer, float, bfloat16) only")
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {"array": name}
    if _validate.is_torch_tensor(obj):
        raise TypeError(f"save: {where} is a torch {type(obj).__name__} (shape {tuple(obj.shape)}); "
                        "fastopt checkpoints store NumPy arrays, never pickles. Save a torch state "
                        "dict with torch.save, or convert its tensors first "
                        "(t.detach().cpu().numpy()): fastopt optimizers load those")
    raise TypeError(f"save: {where} is of type {type(obj).__name__} ({reprlib.repr(obj)}), which "
                    "cannot be stored without pickle; checkpoints hold dicts, lists, tuples, "
                    "numbers, strings, None and numeric arrays")


def save(path, state_dict) -> None:
    """Write ``state_dict`` (an optimizer's, or any tree of them) to ``path`` (.npz).

    A new file gets the mode the umask gives any new file (0o644 under umask 022); an
    overwritten file keeps its mode.
    """
    arrays: dict = {}
    skeleton = json.dumps({"format": FORMAT, "tree": _encode(state_dict, arrays)})
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:                  # no file yet (or none we can stat): umask's mode
        old_mode = None
    fd, tmp = _create_temp(directory)
    try:
        if old_mode is not None:
            _chmod(fd, tmp, old_mode)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_SKELETON: np.array(skeleton)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _create_temp(directory):
    """A new ``.fastopt-*.npz.tmp`` beside the target, created with mode 0o666 so the
    kernel applies the umask (and a directory's default ACL) as to any new file;
    tempfile.mkstemp would make it 0o600 whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".fastopt-{secrets.token_hex(6)}.npz.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"save: no free temporary file name in {directory}")


def _chmod(fd, path, mode) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:                            # Windows
        os.chmod(path, mode)


def _fsync_directory(directory) -> None:
    """Make the rename durable too (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted or not a fastopt checkpoint."""


# Every member is read whole, so zipfile checks its CRC-32: a flipped byte anywhere in a
# member's header or data is an error, never a silently different array.
_READ_CHUNK = 1 << 20          # small reads stay in cache: as fast as np.load


def _members(zf):
    """{member name without .npy: ZipInfo} (other members are never read)."""
    return {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}


def _read_member(zf, info, path, archive_size, kinds):
    """One ``.npy`` member as an array, with its declared size checked before allocating."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: member {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        # save() writes stored members; a compressed one could inflate without bound.
        raise CheckpointError(f"{path}: member {name!r} is compressed; fastopt checkpoints are not")
    if info.header_offset + info.file_size > archive_size:
        raise CheckpointError(f"{path}: member {name!r} extends past the end of the file")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise CheckpointError(f"{path}: member {name!r} has unsupported .npy version {version}")
        except (CheckpointError, zipfile.BadZipFile):
            raise
        except Exception as exc:     # NumPy's header parser on bytes nobody vouches for
            raise CheckpointError(f"{path}: member {name!r} has a malformed .npy header "
                                  f"({type(exc).__name__}: {exc})") from exc
        if dtype.hasobject or dtype.kind not in kinds or dtype.itemsize == 0:
            raise CheckpointError(f"{path}: member {name!r} has dtype {dtype}, expected a numeric "
                                  "dtype (object arrays are never loaded)")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        header = f.tell()
        if header + nbytes != info.file_size:
            raise CheckpointError(f"{path}: member {name!r} declares shape {shape} of {dtype} "
                                  f"({nbytes} bytes) but holds {info.file_size - header} bytes")
        arr = np.empty(count, dtype=dtype)
        buf = memoryview(arr.view(np.uint8).reshape(-1))
        pos = 0
        while pos < nbytes:
            data = f.read(min(_READ_CHUNK, nbytes - pos))
            if not data:
                raise CheckpointError(f"{path}: member {name!r} is truncated")
            buf[pos:pos + len(data)] = data
            pos += len(data)
        if f.read(1):
            raise CheckpointError(f"{path}: member {name!r} has trailing bytes")
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _decode(node, read, path):
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{path}: malformed checkpoint structure")
    (kind, val), = node.items()
    if kind == "dict":
        if not isinstance(val, list):
            raise CheckpointError(f"{path}: malformed dict in checkpoint")
        out = {}
        for pair in val:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], (str, int)):
                raise CheckpointError(f"{path}: malformed dict entry in checkpoint")
            out[pair[0]] = _decode(pair[1], read, path)
        return out
    if kind in ("list", "tuple"):
        if not isinstance(val, list):
            raise CheckpointError(f"{path}: malformed {kind} in checkpoint")
        items = [_decode(v, read, path) for v in val]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        if not (val is None or isinstance(val, (bool, int, float, str))):
            raise CheckpointError(f"{path}: malformed value in checkpoint")
        return val
    if kind in ("array", "bfloat16"):
        if not isinstance(val, str) or val == _SKELETON:
            raise CheckpointError(f"{path}: checkpoint refers to a missing array {val!r}")
        a = read(val)
        if kind == "bfloat16":
            if a.dtype != np.uint16 or _bfloat16() is None:
                raise CheckpointError(f"{path}: a bfloat16 array must be stored as uint16 "
                                      "(and ml_dtypes installed to read it)")
            a = a.view(_bfloat16())
        return a
    raise CheckpointError(f"{path}: unknown node kind {kind!r} in checkpoint")


def load(path):
    """Read a checkpoint written by :func:`save` (never unpickles anything).

    Raises:
      CheckpointError: the file is truncated, corrupted (every member's CRC-32 is
        checked), crafted (object arrays, sizes that disagree with the data, a
        structure that is not fastopt's) or not a fastopt checkpoint.
    """
    path = os.fspath(path)
    try:
        archive_size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            members = _members(zf)
            if _SKELETON not in members:
                raise CheckpointError(f"{path}: not a fastopt checkpoint (no {_SKELETON} member)")
            text = _read_member(zf, members[_SKELETON], path, archive_size, "U")
            if text.shape != ():
                raise CheckpointError(f"{path}: malformed {_SKELETON} member")
            meta = json.loads(str(text))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tree" not in meta:
                found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
                raise CheckpointError(f"{path}: unsupported checkpoint format {found!r}")

            def read(name):
                info = members.get(name)
                if info is None:
                    raise CheckpointError(f"{path}: checkpoint refers to a missing array {name!r}")
                return _read_member(zf, info, path, archive_size, "biuf")

            return _decode(meta["tree"], read, path)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: checkpoint structure is nested too deeply") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError,
            OverflowError, NotImplementedError, RuntimeError, struct.error) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
