"""The ``fastopt`` command line and the benchmark package, at tiny sizes (a few seconds)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from fastopt import cli
from fastopt.benchmark import cases, runner
from fastopt.benchmark.coldstart import cold_start

RESULT_FIELDS = {
    "optimizer", "layout", "backend", "mode", "device", "dtype", "n_params", "n_tensors",
    "bytes_per_param", "times_s", "repeats", "ms_median", "ms_min", "ms_p25", "ms_p75", "spread",
    "params_per_s", "gb_per_s", "roof_fraction", "speedup_vs_numpy", "speedup_vs_torch",
    "first_call_s", "compiled", "peak_alloc_bytes", "peak_rss_bytes", "wall_s", "error",
    "uncertain", "state", "state_bytes_per_param", "speedup_vs_float32", "speedup_vs_bnb",
}


def _have(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------ cases
def test_bytes_per_param_follow_the_active_slots():
    by = {c.name: c for c in cases.available_optimizers("all")}
    expected = {"sgd": 12, "sgd-momentum": 20, "sgd-nesterov": 20, "adagrad": 20, "rmsprop": 20,
                "rmsprop-centered": 36, "adam": 28, "adamw": 28, "adam-amsgrad": 36}
    for name, nbytes in expected.items():
        assert by[name].bytes_per_param(np.float32) == nbytes, name
        assert by[name].bytes_per_param(np.float64) == 2 * nbytes, name
    assert by["adam"].slot_mask() == (True, True, False)
    assert by["sgd"].slot_mask() == (False, False, False)
    # two passes: LAMB reads p, g, m, v and writes m, v, then reads p, m, v and writes p;
    # LARS reads p, g, then reads p, g, trace and writes p, trace
    assert by["lamb"].bytes_per_param(np.float32) == 4 * (6 + 4)
    assert by["lars"].bytes_per_param(np.float32) == 4 * (2 + 5)
    for name in ("keras-sgd", "keras-adam", "keras-adadelta"):
        assert by[name].bytes_per_param(np.float32) == {"keras-sgd": 20}.get(name, 28), name


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_multi_pass_roof_reads_and_writes_what_the_optimizer_does(name):
    """The roof of a two-pass step runs both passes on the CPU drivers: it writes exactly
    the arrays the optimizer's passes write (LAMB: moments in pass 1, p in pass 2)."""
    from fastopt.benchmark.roof import roof_target
    case = cases.available_optimizers(name)[0]
    data = runner.LayoutData("large", 70_000, np.float32)
    roof = roof_target(case, data)
    table, slots = roof.keep
    p = table.refs[0][0]
    p[...] = 0              # the roof adds ~1e-12: visible on zeros, below an ulp of 1
    before = [p.copy()] + [s[0].copy() for s in slots if s is not None]
    roof.step()
    after = [p] + [s[0] for s in slots if s is not None]
    written = {a for one in case.passes for a in one.writes.split()}
    names = ["p"] + [f"s{k}" for k, s in enumerate(slots) if s is not None]
    for n, b, a in zip(names, before, after):
        assert (not np.array_equal(a, b)) == (n in written), n


def test_every_row_names_a_known_torch_class_or_none():
    """A torch row runs torch.optim's class, or a torch-based oracle's ("package:Class",
    for optimizers torch.optim lacks) whose package is importable here."""
    torch = pytest.importorskip("torch")
    import importlib.util
    for case in cases.OPTIMIZERS:
        if case.torch is None:
            continue
        module, _, name = case.torch.rpartition(":")
        if not module:
            assert hasattr(torch.optim, name), case.name
        elif importlib.util.find_spec(module) is not None:
            assert case.torch_class() is not None, case.name
            assert issubclass(case.torch_class(), torch.optim.Optimizer), case.name


def test_default_and_unknown_optimizer_names():
    # the default run: one row per access pattern torch also fuses, plus AdamW (about a
    # minute on 2 cores); every row with --optimizers all
    names = [c.name for c in cases.available_optimizers()]
    assert names == ["sgd", "sgd-momentum", "adam", "adamw"]
    assert len(cases.available_optimizers("all")) > 12
    with pytest.raises(ValueError, match="unknown optimizer 'nosuch'"):
        cases.available_optimizers("adam,nosuch")


@pytest.mark.parametrize("text,value", [("8M", 8_000_000), ("64m", 64_000_000), ("500k", 500_000),
                                        ("1.5G", 1_500_000_000), ("1000", 1000), (123, 123)])
def test_parse_size(text, value):
    assert cases.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "8X", "0", "-5"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        cases.parse_size(bad)


@pytest.mark.parametrize("size", [10_000, 1_000_000, 8_000_000, 64_000_000])
def test_transformer_layout_is_a_realistic_mix_of_the_requested_size(size):
    shapes = cases.transformer_shapes(size)
    total = sum(int(np.prod(s)) for s in shapes)
    assert abs(total - size) <= 0.01 * size
    ndims = {len(s) for s in shapes}
    assert ndims == {1, 2}                       # matrices plus biases / norm weights
    d = shapes[0][1]
    assert (d, 3 * d) in shapes and (4 * d, d) in shapes and (d,) in shapes
    assert len(shapes) >= 14


def test_layouts():
    assert cases.layout_shapes("large", 1234) == [(1234,)]
    small = cases.layout_shapes("small", 1)
    assert len(small) == 2000 and set(small) == {(512,)}
    assert cases.parse_layouts("one-large,many-small") == ["large", "small"]
    with pytest.raises(ValueError, match="unknown layout"):
        cases.parse_layouts("huge")


# --------------------------------------------------------------------------- timing
def test_time_steps_counts_samples_and_stops_early():
    calls = []
    times, k = runner.time_steps(lambda: calls.append(1), repeats=5, min_sample_s=1e-4)
    assert len(times) == 5 and k >= 1 and all(t > 0 for t in times)
    assert len(calls) >= 5 * k
    import time
    times, k = runner.time_steps(lambda: time.sleep(0.02), repeats=100, max_time_s=0.1)
    assert k == 1 and 3 <= len(times) < 10


def test_compare_sets_roof_fraction_and_speedups():
    def row(backend, ms, mode=""):
        r = runner.Result("adam", "large", backend, mode, "cpu", "float32", 1000, 1, 28)
        r.times_s = [ms / 1e3] * 3
        return r
    rows = [row("roof", 10), row("fastopt", 12.5, "flat"), row("torch", 25, "fused"), row("numpy", 100)]
    runner.compare(rows)
    roof, fast, torch, ref = rows
    assert roof.roof_fraction == pytest.approx(1.0)
    assert fast.roof_fraction == pytest.approx(0.8)
    assert fast.speedup_vs_torch == pytest.approx(2.0)
    assert fast.speedup_vs_numpy == pytest.approx(8.0)
    assert ref.speedup_vs_numpy == pytest.approx(1.0)
    assert fast.gb_per_s == pytest.approx(1000 * 28 / 0.0125 / 1e9)


# ------------------------------------------------------------------------------ bench
def test_bench_json_has_the_documented_fields(tmp_path, capsys):
    path = tmp_path / "bench.json"
    backends = "roof,fastopt,numpy" + (",torch" if _have("torch") else "")
    rc = cli.main(["bench", "--size", "200k", "--optimizers", "sgd,adam", "--layouts",
                   "large,transformer", "--backends", backends, "--repeats", "3",
                   "--numpy-repeats", "1", "--cold-start", "none", "--quiet", "--json", str(path),
                   "--state-formats", "float32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== one large tensor: 200k params in 1 tensor ==" in out
    assert "transformer-like" in out and "fastopt flat" in out and "numpy ref" in out
    # adam is among the optimizers: the clipping comparison is part of the run and report
    assert "== global-norm clipping + Adam: 200k params, FlatParams" in out
    assert out.index("global-norm clipping") < out.index("\ntotal ")
    record = json.loads(path.read_text())
    variants = [r["variant"] for r in record["clipping"]]
    assert variants == ["fused", "clip-then-step"] + (["torch clip + fused"] if _have("torch") else [])
    for r in record["clipping"]:
        assert r["ms"] > 0 and r["spread"] >= 0 and isinstance(r["uncertain"], bool)
    assert record["schema"] == "fastopt-bench/1"
    m = record["machine"]
    for key in ("cpu_model", "logical_cores", "threading_layer", "numba_threads", "versions", "gpu"):
        assert key in m
    assert m["versions"]["numba"] and m["versions"]["numpy"]
    assert record["config"]["size"] == 200_000 and record["config"]["optimizers"] == ["sgd", "adam"]
    assert record["config"]["state_formats"] == ["float32"]
    assert record["state_formats"] == {"sgd": ["float32"], "adam": ["float32"]}
    assert "lowbit_summary" not in record
    assert record["layouts"]["large"] == {"n_params": 200_000, "n_tensors": 1}
    results = record["results"]
    per_case = 4 + _have("torch")              # roof, flat, list, numpy (+ torch)
    assert len(results) == 2 * 2 * per_case
    for r in results:
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert r["error"] is None
        assert r["ms_median"] > 0 and r["gb_per_s"] > 0
        assert r["bytes_per_param"] == {"sgd": 12, "adam": 28}[r["optimizer"]]
        assert r["state"] == "float32" and r["speedup_vs_float32"] is None
        if r["backend"] != "roof":      # measured on the optimizer's state arrays
            assert r["state_bytes_per_param"] == pytest.approx({"sgd": 0, "adam": 8}[r["optimizer"]],
                                                               abs=0.01)
        assert r["gb_per_s"] == pytest.approx(r["n_params"] * r["bytes_per_param"] / r["ms_median"] / 1e6)
        assert r["speedup_vs_numpy"] > 0 and r["roof_fraction"] > 0
        if _have("torch"):
            assert r["speedup_vs_torch"] > 0
        itemsize_n = 4 * r["n_params"]
        if r["backend"] == "fastopt":
            # The step allocates nothing proportional to the parameter count.
            assert r["peak_alloc_bytes"] < itemsize_n / 8, r
        if r["backend"] == "numpy" and r["optimizer"] == "adam":
            assert r["peak_alloc_bytes"] >= itemsize_n / 2      # the reference's temporaries
    roofs = [r for r in results if r["backend"] == "roof"]
    assert all(r["roof_fraction"] == pytest.approx(1.0) for r in roofs)
    modes = {(r["backend"], r["mode"]) for r in results}
    assert {("fastopt", "flat"), ("fastopt", "list"), ("numpy", "ref")} <= modes


def test_a_failing_row_is_reported_and_the_others_still_run(monkeypatch):
    from fastopt.benchmark import suite
    real = suite.fastopt_target

    def flaky(case, data, mode, backend="cpu"):
        target = real(case, data, mode, backend)
        if mode == "list":
            def boom():
                raise RuntimeError("injected failure")
            target.step = boom
        return target

    monkeypatch.setattr(suite, "fastopt_target", flaky)
    config = suite.BenchConfig(optimizers=cases.available_optimizers("sgd"), layouts="large",
                               size=10_000, backends=("roof", "fastopt"), repeats=2, memory=False)
    run = suite.run_bench(config, progress=False)
    by = {r.label: r for r in run.results}
    assert set(by) == {"roof", "fastopt flat", "fastopt list"}
    assert by["fastopt list"].error == "RuntimeError: injected failure"
    assert by["roof"].ok and by["fastopt flat"].ok and by["fastopt flat"].roof_fraction > 0
    assert any("injected failure" in n for n in run.notes)


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    rc = cli.main(["bench", "--size", "50k", "--optimizers", "sgd", "--layouts", "large",
                   "--backends", "roof,fastopt", "--repeats", "2", "--cold-start", "none",
                   "--no-memory", "--quiet", "--plot", str(path)])
    assert rc == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    out = capsys.readouterr().out
    assert "clipping" not in out            # Adam's comparison: not run for --optimizers sgd
    assert "1 tensor ==" in out and f"wrote {path}" in out


# ------------------------------------------------- every flag checked before any work
@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the bench starts timing anything."""
    from fastopt.benchmark import suite

    def refuse(*a, **k):
        raise AssertionError("the bench ran although a flag was bad")
    monkeypatch.setattr(suite, "run_bench", refuse)
    monkeypatch.setattr(suite, "time_together", refuse)


def _bench(*extra):
    return ["bench", "--size", "1k", "--optimizers", "sgd", "--layouts", "large", "--backends",
            "roof,fastopt", "--repeats", "1", "--cold-start", "none", "--quiet", *extra]


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bad_output_paths_fail_before_the_run(flag, tmp_path, no_run, capsys):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    missing = tmp_path / "no" / "such" / "folder" / "out.x"
    assert cli.main(_bench(flag, str(missing))) == 2
    err = capsys.readouterr().err
    assert f"fastopt bench: error: {flag} {missing}: folder" in err and "does not exist" in err
    assert cli.main(_bench(flag, str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err


def test_plot_path_checks(tmp_path, no_run, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(_bench("--plot", str(tmp_path / "chart.xyz"))) == 2
    assert "matplotlib cannot write .xyz files" in capsys.readouterr().err
    same = str(tmp_path / "out.png")
    assert cli.main(_bench("--plot", same, "--json", same)) == 2
    assert "name the same file" in capsys.readouterr().err


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    """matplotlib blocked in a fresh process: a clear message, exit 2, no traceback, nothing
    timed (the bench prints nothing to stdout before its run)."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastopt.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *_bench("--plot", str(tmp_path / "c.png"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--plot needs matplotlib" in proc.stderr and "pip install 'fastopt[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("value", ["0", "-1", "100000", "two"])
def test_threads_out_of_range_is_refused(value, no_run, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_bench("--threads", value))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "fastopt bench: error: argument --threads:" in err
    assert ("must be between 1 and" in err) if value != "two" else ("whole number" in err)


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--numpy-repeats", "-2"),
                                        ("--max-time", "0")])
def test_counts_and_times_must_be_positive(flag, value, no_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(_bench(flag, value))
    assert f"argument {flag}:" in capsys.readouterr().err


def test_bench_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split() for line in lines[1:]}
    assert row["sgd"][2] == "12" and row["adam"][2] == "28" and row["adam-amsgrad"][2] == "36"
    text = {line.split()[0]: line for line in lines[1:]}
    assert text["adam"].endswith("low-bit 20 / 16.0625")          # bfloat16 / int8
    # LAMB's int8 passes: 20 B of p and g, six moment reads and writes of a code + absmax/256
    assert text["lamb"].endswith(f"low-bit 28 / {20 + 6 * (1 + 4 / 256):g}")
    assert text["sgd"].endswith("low-bit - / -")                   # no state


# ------------------------------------------------------------------ low-bit state rows
def test_bench_lowbit_rows_json_and_plot(tmp_path, capsys):
    """--state-formats: bfloat16 and int8 rows with their own bytes, roof and resident state
    bytes; int8 skips the many-small layout; bitsandbytes' 8-bit Adam beside int8 when it
    is importable (else a note)."""
    pytest.importorskip("matplotlib")
    path, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["bench", "--size", "25600", "--optimizers", "sgd,adam", "--layouts",
                   "large,small", "--backends", "roof,fastopt,bnb", "--state-formats",
                   "float32,bf16,int8", "--repeats", "2", "--numpy-repeats", "1", "--cold-start",
                   "none", "--no-clip", "--no-memory", "--quiet", "--json", str(path),
                   "--plot", str(chart)])
    assert rc == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "kernels-community" not in err                    # bitsandbytes imported cleanly
    assert "note: sgd bfloat16: no rows: it has no state" in out
    assert "note: small int8: no rows: every tensor is under 4096 elements" in out
    assert "adam (fastopt flat): speed-up per step over float32: bfloat16 " in out
    record = json.loads(path.read_text())
    assert record["config"]["state_formats"] == ["float32", "bfloat16", "int8"]
    assert record["state_formats"] == {"sgd": ["float32"], "adam": ["float32", "bfloat16", "int8"]}
    results = record["results"]
    rows = {(r["layout"], r["optimizer"], r["state"], r["backend"], r["mode"]): r for r in results}
    import importlib.util
    bnb_ok = importlib.util.find_spec("bitsandbytes") is not None
    for layout, states in (("large", ("float32", "bfloat16", "int8")), ("small", ("float32", "bfloat16"))):
        for state in states:
            for backend, mode in (("roof", ""), ("fastopt", "flat"), ("fastopt", "list")):
                r = rows[(layout, "adam", state, backend, mode)]
                assert RESULT_FIELDS <= set(r) and r["error"] is None, r
                assert r["roof_fraction"] > 0
                if backend == "fastopt" and state != "float32":
                    assert r["speedup_vs_float32"] > 0
    assert not any(k[0] == "small" and k[2] == "int8" for k in rows)
    assert not any(k[1] == "sgd" and k[2] != "float32" for k in rows)
    bpp = {(k[0], k[2]): r["bytes_per_param"] for k, r in rows.items() if k[1] == "adam"}
    assert bpp[("large", "bfloat16")] == 20 and bpp[("small", "bfloat16")] == 20
    assert bpp[("large", "int8")] == pytest.approx(12 + 2 * 2 * (1 + 4 / 256))  # 100 whole blocks
    resident = {(k[0], k[2], k[4]): r["state_bytes_per_param"] for k, r in rows.items()
                if k[1] == "adam" and k[3] == "fastopt"}
    for mode in ("flat", "list"):
        assert resident[("large", "float32", mode)] == pytest.approx(8.0)
        assert resident[("large", "bfloat16", mode)] == pytest.approx(4.0)
        assert resident[("large", "int8", mode)] == pytest.approx(2 + 8 / 256)
        assert resident[("small", "bfloat16", mode)] == pytest.approx(4.0)
    (summary,) = record["lowbit_summary"][:1]
    assert summary["layout"] == "large" and set(summary["speedup_vs_float32"]) == {"bfloat16", "int8"}
    if bnb_ok:
        bnb = rows[("large", "adam", "int8", "bnb", "8-bit")]
        assert bnb["error"] is None and bnb["bytes_per_param"] == bpp[("large", "int8")]
        assert 2.0 < bnb["state_bytes_per_param"] < 2.2       # codes, absmax, its two maps
        assert rows[("large", "adam", "int8", "fastopt", "flat")]["speedup_vs_bnb"] > 0
        assert summary["speedup_vs_bnb"] > 0 and "over bitsandbytes Adam8bit: int8 " in out
        assert "vs bnb" in out and "bnb 8-bit" in out
    else:
        assert "note: bnb 8-bit rows (adam int8) skipped:" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_state_formats_and_what_is_skipped():
    from fastopt.benchmark import suite
    config = suite.BenchConfig(optimizers=cases.available_optimizers(), layouts="large,small")
    assert {c.name: config.formats_for(c) for c in config.optimizers} == {
        "sgd": ["float32"], "sgd-momentum": ["float32"],
        "adam": ["float32", "bfloat16", "int8"], "adamw": ["float32"]}
    wide = suite.BenchConfig(optimizers=cases.available_optimizers(), dtype="float64")
    assert all(wide.formats_for(c) == ["float32"] for c in wide.optimizers)
    notes = []
    formats, skipped = suite.state_plan(suite.BenchConfig(
        optimizers=cases.available_optimizers("sgd,lamb,adam"), layouts="large,small",
        state_formats="int8,float32,int8"), notes)
    assert formats == {"sgd": ["float32"], "lamb": ["int8", "float32"], "adam": ["int8", "float32"]}
    assert skipped == {"int8": ["small"]}
    assert "sgd int8: no rows: it has no state" in notes
    # an optimizer that refuses a format gets a note with its reason, and no rows
    lamb = cases.available_optimizers("lamb")[0]
    refusing_case = type("Refusing", (type(lamb),), {
        "state_support": lambda self, fmt, dtype=np.float32: None if fmt == "float32"
        else "LAMB does not support it here"})
    refusing = refusing_case(**{**{f.name: getattr(lamb, f.name) for f in dataclasses.fields(lamb)},
                                "name": "lamb-refusing"})
    notes = []
    formats, _ = suite.state_plan(suite.BenchConfig(optimizers=[refusing], layouts="large",
                                                    state_formats="int8,float32"), notes)
    assert formats == {"lamb-refusing": ["float32"]}
    assert any(n.startswith("lamb-refusing int8: no rows: LAMB does not support") for n in notes)


@pytest.mark.parametrize("argv,message", [
    (["--state-formats", "int4"], "unknown state format 'int4'"),
    (["--state-formats", ","], "state formats must name at least one"),
    (["--state-formats", "int8", "--dtype", "float64"], "need float32 params"),
])
def test_bad_state_formats_fail_before_the_run(argv, message, no_run, capsys):
    assert cli.main(_bench(*argv)) == 2
    assert message in capsys.readouterr().err


def _arrays_in(x) -> list:
    """The NumPy arrays a roof target keeps: in lists and tuples, and a ChunkTable's
    params, grads and slots (its ``refs``)."""
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, (list, tuple)):
        return [a for y in x for a in _arrays_in(y)]
    return _arrays_in(x.refs) if hasattr(x, "refs") else []


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_lowbit_roof_moves_the_rows_bytes(fmt):
    """The low-bit roof writes p, every state column and (int8) every absmax, reads g, and
    its arrays hold the row's bytes per parameter; on a transformer-like layout int8 keeps
    its small tensors' state in float32, and so does the roof."""
    from fastopt.benchmark.roof import roof_bytes_per_param, roof_target
    case = cases.available_optimizers("adam")[0]
    data = runner.LayoutData("transformer", 70_000, np.float32)
    roof = roof_target(case, data, fmt)
    unique = list({id(a): a for a in _arrays_in(roof.keep)}.values())
    n = data.n_params

    def is_grad(a):
        return a.dtype == np.float32 and (np.array_equal(a, data.grads[:a.size])
                                          or np.array_equal(a, data.grads[n - a.size:]))
    grads = [a for a in unique if is_grad(a)]
    others = [a for a in unique if not is_grad(a)]
    assert sum(g.size for g in grads) == n            # the gradients, copied, read once
    for a in others:
        a[...] = 0
    before = [a.copy() for a in grads]
    roof.step()
    assert all(a.any() for a in others)               # p, every state column, every absmax
    assert all(np.array_equal(a, b) for a, b in zip(grads, before))
    # its arrays move the row's bytes: p and g read, p written, all state read and written
    moved = roof_bytes_per_param(case, np.float32, fmt, data.shapes) * n
    assert moved == case.bytes_per_param(np.float32, fmt, data.shapes) * n
    state = sum(a.nbytes for a in unique) - 2 * 4 * n
    assert 3 * 4 * n + 2 * state == pytest.approx(moved, rel=1e-3)
    dtypes = {a.dtype for a in others}
    if fmt == "int8":
        n_low, n_native = cases.lowbit_sizes("int8", data.shapes)
        assert n_native > 0 and n_low > 0             # both parts of the roof ran
        assert dtypes == {np.dtype(np.float32), np.dtype(np.uint8)}
    else:
        assert dtypes == {np.dtype(np.float32), np.dtype(np.uint16)}


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("k_slots", [1, 4])
def test_lowbit_roof_kernels_touch_every_column(kind, k_slots):
    from fastopt.kernels import roof
    n, block = 3000, 256                           # not a whole number of blocks
    p, g = np.zeros(n, np.float32), np.ones(n, np.float32)
    dtype = np.uint16 if kind == "bfloat16" else np.uint8
    cols = [np.full(n, 7, dtype) for _ in range(k_slots)]
    fn = roof.lowbit_roof(kind, k_slots)
    if kind == "int8":
        absmax = [np.zeros(-(-n // block), np.float32) for _ in range(k_slots)]
        fn(p, g, *cols, *absmax, np.float32(0.5), block, 1024)
        assert all(np.all(a == 0.5) for a in absmax)
    else:
        fn(p, g, *cols, np.float32(0.5), 1024)
    assert np.all(p == 0.5) and np.all(g == 1)
    assert all(np.all(c == 8) for c in cols)
    with pytest.raises(ValueError, match="no low-bit roof"):
        roof.lowbit_roof("float16", 1)


def test_int8_passes_of_lamb_and_lars():
    """With int8 state LAMB's first pass stores nothing and its step recomputes and stores
    the moments (fastopt/_passes.py): the step reads g and both moments and writes them;
    LARS's first pass stores nothing anyway. Bytes per parameter follow: a code and a
    float32 absmax per 256 elements for each state column read or written."""
    lamb, lars = cases.available_optimizers("lamb,lars")
    (red, step), = [lamb.passes_for("int8")]
    assert red.reduce and set(red.reads.split()) == {"p", "g", "s0", "s1"} and red.writes == ""
    assert not step.reduce and set(step.reads.split()) == {"p", "g", "s0", "s1"}
    assert set(step.writes.split()) == {"p", "s0", "s1"}
    assert lars.passes_for("int8") == lars.passes == lars.passes_for("bfloat16")
    assert lamb.passes_for("float32") == lamb.passes
    code = 1 + 4 / 256
    # pass 1: p, g, two moments read; pass 2: p, g, two moments read, p and two written
    assert lamb.bytes_per_param(np.float32, "int8", [(1 << 20,)]) == pytest.approx(4 * 5 + 6 * code)
    # a tensor under 4096 elements keeps float32 state and LAMB's float32 passes (40 B)
    mixed = [(1 << 20,), (1000,)]
    want = ((4 * 5 + 6 * code) * (1 << 20) + 40 * 1000) / ((1 << 20) + 1000)
    assert lamb.bytes_per_param(np.float32, "int8", mixed) == pytest.approx(want)


def test_int8_read_roof_reads_every_column():
    from fastopt.kernels import roof
    n, block, chunk = 3000, 256, 1024
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    cols = [rng.integers(0, 256, n).astype(np.uint8) for _ in range(2)]
    absmax = [rng.random(-(-n // block)).astype(np.float32) for _ in range(2)]
    before = [a.copy() for a in (p, g, *cols, *absmax)]
    out = np.zeros(-(-n // chunk), np.float32)
    roof.lowbit_roof(roof.INT8_READ, 2)(p, g, *cols, *absmax, out, block, chunk)
    for c in range(out.size):
        lo, hi = c * chunk, min(c * chunk + chunk, n)
        b = slice(lo // block, -(-hi // block))
        want = (p[lo:hi].astype(np.float64) * g[lo:hi] + cols[0][lo:hi] + cols[1][lo:hi]).sum() \
            + absmax[0][b].sum() + absmax[1][b].sum()
        assert out[c] == pytest.approx(want, rel=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip((p, g, *cols, *absmax), before))
    out[...] = 0
    roof.lowbit_roof(roof.INT8_READ, 0)(p, g, out, block, chunk)      # LARS's: p and g only
    assert out[0] == pytest.approx((p[:chunk].astype(np.float64) * g[:chunk]).sum(), rel=1e-5)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_int8_multipass_roof_writes_what_the_step_writes(name):
    """The roof of LAMB's and LARS's int8 step: every code and absmax array of the state
    written, the gradients only read; a layout with small tensors runs the float32
    passes' roof over them too."""
    from fastopt.benchmark.roof import roof_target
    case = cases.available_optimizers(name)[0]
    data = runner.LayoutData("transformer", 70_000, np.float32)
    target = roof_target(case, data, "int8")
    arrays = _arrays_in(target.keep)
    codes = [a for a in arrays if a.dtype == np.uint8]
    assert codes and len(codes) == sum(case.slot_mask())
    for a in codes:
        a[...] = 0
    grads = [a.copy() for a in arrays if a.dtype == np.float32 and a.size and
             np.array_equal(a, data.grads[:a.size])]
    target.step()
    assert all(a.all() for a in codes)          # each code stepped once (0 -> 1)
    assert grads and all(np.array_equal(a, data.grads[:a.size]) for a in grads)


def test_state_nbytes_counts_the_state_buffers():
    import fastopt as fo
    params = [np.ones(4096 * 2, np.float32), np.ones(100, np.float32)]
    opt = fo.Adam([p.copy() for p in params], lr=1e-3, state_format="int8")
    opt.step([np.full_like(p, 1e-2) for p in params])
    # codes (1 B) and absmax (4 B per 256) of the large tensor; float32 for the small one
    assert runner.state_nbytes(opt) == 2 * (8192 + 4 * 32) + 2 * 4 * 100
    torch = pytest.importorskip("torch")
    t = [torch.nn.Parameter(torch.ones(1000))]
    t[0].grad = torch.ones(1000)
    topt = torch.optim.Adam(t, lr=1e-3)
    topt.step()
    assert runner.state_nbytes(topt) in (8000 + 4, 8000 + 8)        # moments + step counter


def test_bitsandbytes_imports_cleanly_from_the_source_tree():
    """Run from the repository root (whose top-level kernels/ package bitsandbytes would
    take for the kernel hub's): no stray 'kernels' module from the source tree (the hub's
    own package, which transformers brings, may be imported), no warning about it."""
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    code = ("import sys; sys.path.insert(0, '')\n"
            "from fastopt.benchmark.runner import import_bitsandbytes\n"
            "bnb = import_bitsandbytes(); k = sys.modules.get('kernels')\n"
            "import os; ours = k is not None and os.path.isfile(os.path.join(os.path.dirname("
            "getattr(k, '__file__', '') or ''), 'blockwise.py'))\n"
            "print(bnb.optim.Adam8bit.__name__, ours)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Adam8bit", "False"]
    assert "kernels-community" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["bench", "--optimizers", "nosuch"], "unknown optimizer"),
    (["bench", "--size", "lots"], "size must look like"),
    (["bench", "--backends", "gpu9"], "unknown backends"),
    (["bench", "--layouts", "huge"], "unknown layout"),
])
def test_bench_bad_flags(argv, message, capsys):
    assert cli.main(argv + ["--quiet", "--cold-start", "none"]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- info
def test_info_text_and_json(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastopt ")
    for needle in ("numba:", "threading layer", "backends:", "cpu ", "numpy ", "cuda ", "gpu:",
                   "cpu features:"):
        assert needle in out, needle
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["cpu"].startswith("available")
    assert info["optimizers"]["adam"] == 28
    assert info["logical_cores"] >= 1


# ----------------------------------------------------------------------------- warmup
def _fastopt(args, env):
    code = "import sys; from fastopt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_warmup_fills_the_cache_and_the_next_process_loads_it(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    args = ["warmup", "--optimizers", "sgd", "--dtypes", "float32", "--no-roof"]
    first = _fastopt(args, env)
    assert first.returncode == 0, first.stderr
    assert "sgd" in first.stdout and "compiled" in first.stdout
    # what it does, how much and how long, said before it starts
    head = first.stdout.splitlines()[0]
    assert head.startswith("fastopt warmup: 1 CPU driver (1 optimizer setting x 1 dtype)")
    assert str(tmp_path) in head and "s per driver on 2 cores" in head
    assert list(tmp_path.rglob("*.nbi")), "warmup wrote nothing to NUMBA_CACHE_DIR"
    second = _fastopt(args, env)
    assert second.returncode == 0, second.stderr
    assert ": cache in" in second.stdout and "(0 compiled, 1 loaded from the cache)" in second.stdout


def test_warmup_compiles_every_driver_the_table_settings_use():
    """After warmup, stepping each warmed (optimizer, settings) pair compiles nothing new:
    Adam and AdamW (same element, other flags) each get their own driver."""
    from fastopt.benchmark.coldstart import warmup, warmup_cases
    from fastopt.kernels import cpu
    names = "adam,adamw,sgd-momentum,sgd-nesterov,lamb"
    warmup(names, dtypes=("float32",), roof=False)
    before = set(cpu._DRIVERS)
    for case, overrides in warmup_cases(names):
        case.make([np.ones(8, np.float32)], backend="cpu", **overrides).step(
            [np.full(8, 1e-3, np.float32)])
    assert set(cpu._DRIVERS) == before
    assert {c.name for c, _ in warmup_cases(names)} == set(names.split(","))


def test_cold_start_times_an_empty_then_a_warm_cache():
    # Which is faster is the bench's to measure (its cold-start table), not a test's.
    rows = cold_start(cases.available_optimizers("sgd"), n=1000)
    assert [r["cache"] for r in rows] == ["empty", "warm"]
    for r in rows:
        assert "error" not in r, r
        assert all(r[k] > 0 for k in ("import_s", "first_step_s", "second_step_s")), r


# ------------------------------------------------------------------------------- demo
def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    real = cli.importlib.import_module

    def fake(name, *a, **k):
        if name == "fastopt.demo":
            raise ModuleNotFoundError("No module named 'fastopt.demo'", name="fastopt.demo")
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    assert cli.main(["demo", "--steps", "3"]) == 2
    assert "no demo" in capsys.readouterr().err


def test_demo_passes_its_arguments(monkeypatch):
    seen = []
    module = types.ModuleType("fastopt.demo")
    module.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "fastopt.demo", module)
    assert cli.main(["demo", "--steps", "3", "-h"]) == 0
    assert seen == [["--steps", "3", "-h"]]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "bench" in capsys.readouterr().out


# --------------------------------------------------------------------- cuda plumbing
_SIM_CHECK = r"""
import numpy as np
from fastopt.benchmark import cases, gpu, runner
from fastopt.benchmark.roof import copy_cuda_target, roof_cuda_target
assert gpu.gpu_available()[0] is False          # the simulator is never timed
case = cases.available_optimizers("adam")[0]
data = runner.LayoutData("transformer", 300, np.float32)
for mode in ("flat", "list"):
    dev = gpu.fastopt_cuda_target(case, data, mode)
    host = runner.fastopt_target(case, data, mode)
    for _ in range(2):
        dev.step(); dev.sync(); host.step()
    flat = lambda t: t.keep[0].data if mode == "flat" else np.concatenate([a.ravel() for a in t.keep[0]])
    assert not np.array_equal(flat(dev), data.params), mode
    np.testing.assert_allclose(flat(dev), flat(host), rtol=1e-6, atol=1e-7)
roof = roof_cuda_target(case, data)
roof.step(); roof.sync()
assert np.allclose(roof.keep[2][0][0], data.grads)      # s0 += g
copy = copy_cuda_target(case, data)
copy.step()
assert copy.keep[1].nbytes == case.bytes_per_param() * data.n_params // 2 and copy.keep[1].all()
for name in ("lamb", "lars"):                    # two-pass roofs: reduction + per-row step
    two = roof_cuda_target(cases.available_optimizers(name)[0], data)
    two.keep[0][...] = 0
    two.step(); two.sync()
    assert np.asarray(two.keep[0]).any(), name               # pass 2 wrote p
print("ok")
"""


def test_cuda_rows_build_and_step_under_the_simulator():
    """The CUDA targets' plumbing (device FlatParams and lists, the roof through the CUDA
    driver, the copy) under Numba's CUDA simulator; timings need a real GPU."""
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _SIM_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
