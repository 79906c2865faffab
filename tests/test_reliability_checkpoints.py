"""Checkpoints under damage and attack: clear errors, no code run, nothing changed.

- Truncated files and files with random byte flips: ``fo.load`` raises CheckpointError,
  or (a flip in bytes no reader uses: zip timestamps, version fields) returns exactly
  the original; never a silently different checkpoint (every member's CRC is checked;
  a ``.npy`` header whose shape or dtype disagrees with its size is refused).
- Hand-crafted files: pickled object arrays (whose ``__reduce__`` would create a marker
  file: it never appears), wrong dtypes, huge declared shapes (refused before anything
  is allocated), a skeleton that is not JSON, not fastopt's, nested too deeply or
  pointing at missing arrays, a compressed bomb member: CheckpointError.
- Well-formed files with the wrong content load, and ``load_state_dict`` refuses them
  leaving every byte of the optimizer as it was.
- Saving is atomic: a child process killed (SIGKILL) at random moments while saving a
  large checkpoint leaves the target path absent or a complete old or new checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastopt as fo
from fastopt.checkpoint import CheckpointError

from reliability_cases import STATS, assert_unchanged, snapshot

SKELETON = "__fastopt_skeleton__"


# -- fixtures ---------------------------------------------------------------------------
def stepped(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(5, 3), (4,), (), (0, 2)]]
    opt = fo.Adam(params, lr=0.01, amsgrad=True)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return params, opt


def same_tree(a, b) -> bool:
    """Equal structure, types, dtypes, shapes and bytes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b or (a != a and b != b)


@pytest.fixture
def saved(tmp_path):
    params, opt = stepped()
    path = tmp_path / "ckpt.npz"
    sd = opt.state_dict()
    fo.save(path, sd)
    return path, sd, path.read_bytes()


# -- round trip (the positive control) -----------------------------------------------------
def test_round_trip_is_exact_and_resumes_bit_for_bit(saved, tmp_path):
    path, sd, _ = saved
    loaded = fo.load(path)
    assert same_tree(loaded, sd)
    params, opt = stepped()
    twin_params, twin = stepped()
    twin.load_state_dict(loaded)
    g = [np.full(p.shape, 0.5, np.float32) for p in params]
    opt.step(g)
    twin.step(g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, twin_params))


def test_fortran_order_and_big_endian_arrays_round_trip(tmp_path):
    tree = {"f": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
            "be": np.arange(5, dtype=">f4"), "i": np.arange(3, dtype=np.int16),
            "b": np.array([True, False]), "scalar": np.float32(2.5), "t": (1, "x", None)}
    fo.save(tmp_path / "x.npz", tree)
    back = fo.load(tmp_path / "x.npz")
    for k in ("f", "be", "i", "b"):
        assert back[k].dtype == tree[k].dtype and np.array_equal(back[k], tree[k]), k
    assert back["scalar"] == 2.5 and back["t"] == (1, "x", None)


def test_step_counts_beyond_float32_round_trip(tmp_path):
    params, opt = stepped()
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = np.float64(2 ** 24 + 1)
    opt.load_state_dict(sd)
    fo.save(tmp_path / "big.npz", opt.state_dict())
    params2, opt2 = stepped()
    opt2.load_state_dict(fo.load(tmp_path / "big.npz"))
    assert [int(s) for s in opt2._steps] == [2 ** 24 + 1] * len(params2)


# -- truncation and byte flips ----------------------------------------------------------------
def test_truncated_files_fail_cleanly(saved, tmp_path):
    path, _, data = saved
    rng = np.random.default_rng(1)
    cuts = sorted({0, 1, 4, 22, 30, len(data) // 2, len(data) - 22, len(data) - 1}
                  | set(rng.integers(1, len(data), 40).tolist()))
    bad = tmp_path / "cut.npz"
    for n in cuts:
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError):
            fo.load(bad)
        STATS["checkpoint_truncations"] += 1


def test_random_byte_flips_never_load_different_data(saved, tmp_path):
    path, sd, data = saved
    rng = np.random.default_rng(2)
    bad = tmp_path / "flipped.npz"
    outcomes = {"error": 0, "identical": 0}
    for trial in range(400):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), int(rng.integers(1, 4))):
            buf[pos] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(buf))
        try:
            back = fo.load(bad)
        except CheckpointError:
            outcomes["error"] += 1
            continue
        # Only bytes no reader uses (zip timestamps, "version made by", extra fields)
        # may go unnoticed, and then the data is exactly the original.
        assert same_tree(back, sd), f"trial {trial}: a corrupted file loaded different data"
        outcomes["identical"] += 1
    STATS["checkpoint_byte_flip_files"] += sum(outcomes.values())
    STATS["checkpoint_byte_flips_detected"] += outcomes["error"]
    assert outcomes["error"] > 300, outcomes


def test_flips_in_npy_headers_are_detected(saved, tmp_path):
    """Single-bit flips in the members' .npy headers (magic, version, dtype, shape,
    order): a flip that yields a valid smaller shape or dtype would read part of the
    data. Every bit of the first array's header, and 600 random ones elsewhere."""
    path, sd, data = saved
    headers = []
    start = data.find(b"\x93NUMPY")
    while start >= 0:
        headers.append((start, 10 + int.from_bytes(data[start + 8:start + 10], "little")))
        start = data.find(b"\x93NUMPY", start + 1)
    assert len(headers) >= 8          # the skeleton and the state arrays
    rng = np.random.default_rng(4)
    first = next(h for h in headers if b"'shape': (5, 3)" in data[h[0]:h[0] + h[1]])
    flips = [(pos, bit) for pos in range(first[0], first[0] + first[1]) for bit in range(8)]
    for _ in range(600):
        h0, hl = headers[int(rng.integers(len(headers)))]
        flips.append((h0 + int(rng.integers(hl)), int(rng.integers(8))))
    bad = tmp_path / "hdr.npz"
    for pos, bit in flips:
        buf = bytearray(data)
        buf[pos] ^= 1 << bit
        bad.write_bytes(bytes(buf))
        with pytest.raises(CheckpointError):
            fo.load(bad)
    STATS["checkpoint_header_bit_flips"] += len(flips)


# -- hand-crafted files ---------------------------------------------------------------------
class Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def npy_bytes(arr, allow_pickle=False) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=allow_pickle)
    return b.getvalue()


def skeleton(tree, fmt=1) -> bytes:
    return npy_bytes(np.array(json.dumps({"format": fmt, "tree": tree})))


def write_zip(path, members, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def malicious_files(tmp_path, marker):
    """{name: path} of crafted files, each of which must fail to load."""
    evil = np.empty(2, dtype=object)
    evil[0] = Marker(marker)
    evil[1] = 1.0
    pickled = npy_bytes(evil, allow_pickle=True)
    arr = npy_bytes(np.arange(10, dtype=np.float64))
    ref = {"dict": [["x", {"array": "a0"}]]}
    out = {
        "pickled_object_array": {SKELETON + ".npy": skeleton(ref), "a0.npy": pickled},
        "pickled_skeleton": {SKELETON + ".npy": npy_bytes(np.array([Marker(marker)], dtype=object),
                                                          allow_pickle=True)},
        "complex_array": {SKELETON + ".npy": skeleton(ref), "a0.npy": npy_bytes(np.zeros(3, np.complex64))},
        "string_array": {SKELETON + ".npy": skeleton(ref), "a0.npy": npy_bytes(np.array(["abc"]))},
        "structured_array": {SKELETON + ".npy": skeleton(ref),
                             "a0.npy": npy_bytes(np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]))},
        "datetime_array": {SKELETON + ".npy": skeleton(ref),
                           "a0.npy": npy_bytes(np.array(["2020-01-01"], dtype="M8[D]"))},
        "huge_shape": {SKELETON + ".npy": skeleton(ref),
                       "a0.npy": arr.replace(b"(10,)", b"(10000000000000,)")},
        "huge_2d_shape": {SKELETON + ".npy": skeleton(ref),
                          "a0.npy": arr.replace(b"(10,)", b"(1000000, 1000000)")},
        "shape_smaller_than_data": {SKELETON + ".npy": skeleton(ref),
                                    "a0.npy": arr.replace(b"(10,)", b"(5,)   ")},
        "dtype_smaller_than_data": {SKELETON + ".npy": skeleton(ref),
                                    "a0.npy": arr.replace(b"'<f8'", b"'<f4'")},
        "missing_array": {SKELETON + ".npy": skeleton({"array": "a7"}), "a0.npy": arr},
        "array_is_skeleton": {SKELETON + ".npy": skeleton({"array": SKELETON})},
        "no_skeleton": {"a0.npy": arr},
        "skeleton_not_json": {SKELETON + ".npy": npy_bytes(np.array("{not json"))},
        "skeleton_wrong_format": {SKELETON + ".npy": skeleton(ref, fmt=99), "a0.npy": arr},
        "skeleton_is_a_list": {SKELETON + ".npy": npy_bytes(np.array("[1, 2]"))},
        "skeleton_array_of_strings": {SKELETON + ".npy": npy_bytes(np.array(["{}", "{}"]))},
        "skeleton_numeric": {SKELETON + ".npy": npy_bytes(np.zeros(3))},
        "node_unknown_kind": {SKELETON + ".npy": skeleton({"pickle": "x"})},
        "node_two_kinds": {SKELETON + ".npy": skeleton({"value": 1, "list": []})},
        "dict_not_a_list": {SKELETON + ".npy": skeleton({"dict": 5})},
        "dict_bad_pair": {SKELETON + ".npy": skeleton({"dict": [["a"]]})},
        "dict_unhashable_key": {SKELETON + ".npy": skeleton({"dict": [[["k"], {"value": 1}]]})},
        "value_is_object": {SKELETON + ".npy": skeleton({"value": {"__class__": "os.system"}})},
        "list_not_a_list": {SKELETON + ".npy": skeleton({"list": "abc"})},
        "deeply_nested": {SKELETON + ".npy": npy_bytes(np.array(
            '{"format": 1, "tree": ' + '{"list": [' * 50000 + '{"value": 1}' + ']}' * 50000 + "}"))},
        "deeply_nested_json": {SKELETON + ".npy": npy_bytes(np.array("[" * 200000 + "]" * 200000))},
        "npy_v3_header": {SKELETON + ".npy": skeleton(ref),
                          "a0.npy": arr.replace(b"\x93NUMPY\x01\x00", b"\x93NUMPY\x03\x00")},
        "not_npy_member": {SKELETON + ".npy": skeleton(ref), "a0.npy": pickle.dumps(Marker(marker))},
    }
    paths = {name: write_zip(tmp_path / f"{name}.npz", members) for name, members in out.items()}
    # Not zip files at all.
    (tmp_path / "raw_pickle.npz").write_bytes(pickle.dumps(Marker(marker)))
    paths["raw_pickle"] = tmp_path / "raw_pickle.npz"
    (tmp_path / "npy_not_npz.npz").write_bytes(pickled)
    paths["npy_not_npz"] = tmp_path / "npy_not_npz.npz"
    (tmp_path / "empty.npz").write_bytes(b"")
    paths["empty"] = tmp_path / "empty.npz"
    paths["directory"] = tmp_path
    return paths


def test_crafted_files_fail_with_checkpoint_error_and_run_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    paths = malicious_files(tmp_path, marker)
    params, opt = stepped()
    before = snapshot(opt, params)
    tracemalloc.start()
    try:
        for name, path in paths.items():
            tracemalloc.reset_peak()
            with pytest.raises(CheckpointError) as info:
                fo.load(path)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 32 << 20, f"{name}: loading allocated {peak} bytes"
            assert str(path) in str(info.value), f"{name}: the error does not name the file"
            assert not marker.exists(), f"{name}: loading ran code from the file"
            STATS["checkpoint_crafted_files"] += 1
    finally:
        tracemalloc.stop()
    assert_unchanged(before, snapshot(opt, params), "optimizer after failed loads")
    # The marker mechanism works: unpickling one of these does create the file.
    pickle.loads(pickle.dumps(Marker(marker))).close()
    assert marker.exists()


def test_unreferenced_members_are_never_read(tmp_path):
    """A pickled member or a compressed bomb that the skeleton does not reference is
    ignored: the file loads, nothing is unpickled or inflated."""
    marker = tmp_path / "PWNED"
    evil = np.empty(1, dtype=object)
    evil[0] = Marker(marker)
    path = tmp_path / "extra.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(SKELETON + ".npy", skeleton({"dict": [["a", {"array": "a0"}]]}))
        z.writestr("a0.npy", npy_bytes(np.arange(3.0)))
        z.writestr("evil.npy", npy_bytes(evil, allow_pickle=True))
        z.writestr("bomb.npy", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        back = fo.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(back["a"], np.arange(3.0))
    assert peak < 8 << 20 and not marker.exists()


def test_compressed_bomb_member_is_refused_without_inflating(tmp_path):
    header = npy_bytes(np.zeros(0, np.float64)).replace(b"(0,)", b"(8388608,)")
    bomb = header + b"\0" * (64 << 20)          # a consistent 64 MiB array, deflated to ~64 KiB
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(SKELETON + ".npy", skeleton({"array": "a0"}))
        z.writestr("a0.npy", bomb, compress_type=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="compressed"):
            fo.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # refused from the header: the 64 MiB was never inflated


def test_member_larger_than_the_file_is_refused(saved, tmp_path):
    """A central directory that declares a stored member bigger than the archive."""
    path, _, data = saved
    buf = bytearray(data)
    cd = buf.rfind(b"PK\x01\x02")         # the last central directory entry
    # compressed and uncompressed sizes at offsets 20 and 24 of the entry
    buf[cd + 20:cd + 28] = (10 ** 9).to_bytes(4, "little") * 2
    bad = tmp_path / "big.npz"
    bad.write_bytes(bytes(buf))
    with pytest.raises(CheckpointError):
        fo.load(bad)


# -- well-formed files with the wrong content: load_state_dict refuses, nothing changes -------
def _mutations(sd):
    def st0(d):
        return d["state"][0]
    yield "int_state", lambda d: st0(d).__setitem__("exp_avg", st0(d)["exp_avg"].astype(np.int32))
    yield "bool_state", lambda d: st0(d).__setitem__("exp_avg", st0(d)["exp_avg"] > 0)
    yield "wrong_shape", lambda d: st0(d).__setitem__("exp_avg", np.zeros((3, 5), np.float32))
    yield "flat_shape", lambda d: st0(d).__setitem__("exp_avg", st0(d)["exp_avg"].ravel())
    yield "missing_key", lambda d: st0(d).pop("max_exp_avg_sq")
    yield "unknown_key", lambda d: st0(d).__setitem__("evil", np.zeros(1))
    yield "nan_step", lambda d: st0(d).__setitem__("step", np.float32(np.nan))
    yield "negative_step", lambda d: st0(d).__setitem__("step", np.float32(-3))
    yield "huge_step", lambda d: st0(d).__setitem__("step", np.float64(1e30))
    yield "fractional_step", lambda d: st0(d).__setitem__("step", 2.5)
    yield "string_step", lambda d: st0(d).__setitem__("step", "2")
    yield "nan_lr", lambda d: d["param_groups"][0].__setitem__("lr", float("nan"))
    yield "negative_eps", lambda d: d["param_groups"][0].__setitem__("eps", -1.0)
    yield "string_flag", lambda d: d["param_groups"][0].__setitem__("amsgrad", "true")
    yield "betas_triple", lambda d: d["param_groups"][0].__setitem__("betas", [0.9, 0.99, 0.5])
    yield "missing_hyperparameter", lambda d: d["param_groups"][0].pop("betas")
    yield "extra_group", lambda d: d["param_groups"].append(dict(d["param_groups"][0], params=[9]))
    yield "duplicate_ids", lambda d: d["param_groups"][0].__setitem__("params", [0, 0, 1, 2])
    yield "unknown_param", lambda d: d["state"].__setitem__(42, dict(st0(d)))
    yield "state_is_list", lambda d: d.__setitem__("state", [st0(d)])
    yield "groups_not_list", lambda d: d.__setitem__("param_groups", {"0": d["param_groups"][0]})
    yield "bad_iterations", lambda d: d.__setitem__("iterations", -5)


MUTATIONS = [name for name, _ in _mutations({})]


@pytest.mark.parametrize("which", MUTATIONS)
def test_loaded_bad_state_is_refused_and_optimizer_unchanged(which, tmp_path):
    params, opt = stepped()
    twin_params, twin = stepped()
    sd = opt.state_dict()
    dict(_mutations(sd))[which](sd)
    path = tmp_path / "bad.npz"
    fo.save(path, sd)
    loaded = fo.load(path)                   # a well-formed file
    before = snapshot(opt, params)
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(loaded)
    assert_unchanged(before, snapshot(opt, params), which)
    g = [np.full(p.shape, 0.25, np.float32) for p in params]
    opt.step(g)
    twin.step(g)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, twin_params))
    STATS["checkpoint_bad_states"] += 1


# -- atomic saving ----------------------------------------------------------------------------
N_ARRAYS, ARRAY_SIZE = 4, 4 << 20          # 4 x 16 MiB float32: 64 MiB per checkpoint


def _tree(version, arrays):
    return {"version": version, "fill": version % 2, "arrays": arrays[version % 2]}


def _check_complete(path, what):
    """A complete checkpoint: every array whole and filled with its version's value."""
    back = fo.load(path)
    assert set(back) == {"version", "fill", "arrays"}, what
    assert back["fill"] == back["version"] % 2, what
    assert len(back["arrays"]) == N_ARRAYS, what
    for a in back["arrays"]:
        assert a.shape == (ARRAY_SIZE,) and a.dtype == np.float32, what
        assert a[0] == back["fill"] + 1 and np.all(a == a[0]), f"{what}: mixed data"
    return back["version"]


def _saver_child(path, ready_w):
    """Save versions 1, 2, 3, ... forever (killed by the parent)."""
    arrays = [[np.full(ARRAY_SIZE, f + 1, np.float32) for _ in range(N_ARRAYS)] for f in (0, 1)]
    os.write(ready_w, b"r")
    version = 1
    while True:
        fo.save(path, _tree(version, arrays))
        version += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_save_is_atomic_under_sigkill(tmp_path):
    arrays = [[np.full(ARRAY_SIZE, f + 1, np.float32) for _ in range(N_ARRAYS)] for f in (0, 1)]
    t0 = time.perf_counter()
    fo.save(tmp_path / "calibrate.npz", _tree(0, arrays))
    t_save = time.perf_counter() - t0
    (tmp_path / "calibrate.npz").unlink()
    rng = np.random.default_rng(3)
    trials, versions = 10, []
    for trial in range(trials):
        path = tmp_path / f"ckpt{trial}.npz"
        with_old = trial % 2 == 0
        if with_old:
            fo.save(path, _tree(0, arrays))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                           # the child
            try:
                os.close(r)
                _saver_child(str(path), w)
            finally:
                os._exit(1)
        os.close(w)
        try:
            assert os.read(r, 1) == b"r"
            time.sleep(float(rng.uniform(0.0, 2.5 * t_save)))  # mid-save, at a random moment
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
        if path.exists():
            versions.append(_check_complete(path, f"trial {trial}"))
        else:
            assert not with_old, f"trial {trial}: the old checkpoint vanished"
            versions.append(None)
        for leftover in tmp_path.glob(".fastopt-*.npz.tmp"):   # a killed save's temp file
            leftover.unlink()
        STATS["sigkill_trials"] += 1
    # The kills really landed at different points (before the first save completed,
    # after some): not all outcomes are the same.
    assert len(set(versions)) >= 2, versions


def test_failed_save_leaves_the_old_file_and_no_temp_file(saved, tmp_path, monkeypatch):
    path, sd, data = saved

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        fo.save(path, sd)
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert not list(tmp_path.glob(".fastopt-*"))
    with pytest.raises(TypeError):
        fo.save(path, {"x": object()})          # unencodable: fails before any file is made
    assert path.read_bytes() == data and not list(tmp_path.glob(".fastopt-*"))
