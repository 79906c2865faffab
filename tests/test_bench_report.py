"""The bench report's numbers and chart on synthetic rows (no timing): counts, the noise
flag, the clipping section's place in the run, and the chart's colours and legend."""
from __future__ import annotations

import io

import numpy as np
import pytest

from fastopt.benchmark import cases, report, runner, suite
from fastopt.benchmark.runner import Result, compare, ratio_is_uncertain


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("n,text", [
    (0, "0"), (7, "7"), (999, "999"), (1000, "1k"), (12_345, "12.3k"), (512_000, "512k"),
    (999_700, "1M"),            # rounds into the next unit: not "1e+03k"
    (1_000_000, "1M"), (1 << 20, "1.05M"), (1_500_000, "1.5M"), (8_000_000, "8M"),
    (64_000_000, "64M"), (1_500_000_000, "1.5G"),
])
def test_format_count(n, text):
    assert cases.format_count(n) == text


@pytest.mark.parametrize("size", ["1M", "64M", "512k", "1.5M"])
def test_every_layout_size_prints_in_the_same_human_form(size):
    n = cases.parse_size(size)
    for layout in cases.LAYOUTS:
        total = sum(int(np.prod(s)) for s in cases.layout_shapes(layout, n))
        text = cases.format_count(total)
        assert "e+" not in text and len(text) <= 5, (layout, total, text)
    assert cases.format_count(n) == size.upper().replace("K", "k")


def test_byte_columns_use_the_same_form():
    assert report._bytes(843) == "843"
    assert report._bytes(32.4 * 1024) == "32.4k"
    assert report._bytes(30.5 * 2**20) == "30.5M"
    assert report._bytes(None) == "-"


# -------------------------------------------------------------------------- noise flag
def _row(backend, ms, spread, mode="", optimizer="adam", layout="large", state="float32",
         nbytes=28):
    """A row whose samples have the given median (ms) and half-IQR spread (fraction)."""
    r = Result(optimizer, layout, backend, mode, "cpu", "float32", 1000, 1, nbytes, state=state)
    m = ms / 1e3
    # five samples: quartiles at m(1 -+ spread) (numpy's linear percentiles)
    r.times_s = [m * (1 - 2 * spread), m * (1 - spread), m, m * (1 + spread), m * (1 + 2 * spread)]
    assert r.spread == pytest.approx(spread)
    return r


def test_ratio_is_uncertain_rules():
    assert not ratio_is_uncertain(2.0, 0.02, 0.03)        # clear and quiet
    assert ratio_is_uncertain(2.0, 0.43, 0.02)            # one row too noisy
    assert ratio_is_uncertain(2.0, 0.11, 0.11)            # combined 15.6% > 15%
    assert ratio_is_uncertain(1.04, 0.05, 0.03)           # within the spread of parity
    assert not ratio_is_uncertain(1.20, 0.05, 0.03)


def test_noisy_rows_get_their_ratios_marked_and_a_footnote():
    rows = [_row("roof", 5.0, 0.02), _row("fastopt", 5.5, 0.03, "flat"),
            _row("fastopt", 5.5, 0.43, "list"), _row("torch", 8.0, 0.02, "fused"),
            _row("numpy", 50.0, 0.01, "ref")]
    compare(rows)
    roof, flat, noisy, torch, ref = rows
    assert flat.uncertain == [] and roof.uncertain == []
    assert flat.speedup_vs_torch == pytest.approx(8 / 5.5)
    assert set(noisy.uncertain) == {"roof_fraction", "speedup_vs_numpy", "speedup_vs_torch"}
    assert "speedup_vs_torch" not in torch.uncertain and "speedup_vs_numpy" not in ref.uncertain

    run = suite.BenchRun(suite.BenchConfig(optimizers=cases.available_optimizers("adam"),
                                           layouts="large", size=1000),
                         rows, [], {"versions": {"numba": "x", "numpy": "y"}}, [], 1.0,
                         {"large": dict(n_params=1000, n_tensors=1)})
    text = report.format_run(run)
    lines = {(line.split()[3], line.split()[4]): line for line in text.splitlines()
             if line.startswith("adam ") and len(line.split()) > 4}
    assert "~" not in lines[("fastopt", "flat")]
    assert "~1.45x" in lines[("fastopt", "list")] and "~0.91" in lines[("fastopt", "list")]
    assert report.UNCERTAIN_NOTE in text

    quiet = [_row("roof", 5.0, 0.02), _row("fastopt", 6.5, 0.03, "flat")]
    compare(quiet)
    run.results = quiet
    assert "~" not in report.format_run(run)         # no marks, no footnote


def test_uncertain_ratios_are_in_the_json_record():
    rows = [_row("roof", 5.0, 0.30), _row("fastopt", 5.5, 0.03, "flat")]
    compare(rows)
    d = rows[1].to_dict()
    assert d["uncertain"] == ["roof_fraction"]


# ---------------------------------------------------------------- low-bit state rows
def _lowbit_rows():
    """adam on one layout: float32 (roof, flat, list, torch, numpy), bfloat16 (roof, flat),
    int8 (roof, flat, list, bnb), each with its bytes moved and resident state bytes."""
    rows = [_row("roof", 4.0, 0.01), _row("fastopt", 5.0, 0.01, "flat"),
            _row("fastopt", 6.0, 0.01, "list"), _row("torch", 10.0, 0.01, "fused"),
            _row("numpy", 40.0, 0.01, "ref"),
            _row("roof", 3.0, 0.01, state="bfloat16", nbytes=20.0),
            _row("fastopt", 4.0, 0.01, "flat", state="bfloat16", nbytes=20.0),
            _row("roof", 2.0, 0.01, state="int8", nbytes=16.0625),
            _row("fastopt", 2.5, 0.01, "flat", state="int8", nbytes=16.0625),
            _row("fastopt", 3.0, 0.01, "list", state="int8", nbytes=16.0625),
            _row("bnb", 30.0, 0.01, "8-bit", state="int8", nbytes=16.0625)]
    for r, resident in zip(rows, [None, 8.0, 8.0, 8.0, 8.0, None, 4.0, None, 2.03125, 2.03125,
                                  2.0333]):
        r.state_bytes_per_param = resident
    return rows


def test_lowbit_rows_compare_with_their_own_roof_float32_and_bitsandbytes():
    rows = compare(_lowbit_rows())
    by = {(r.state, r.backend, r.mode): r for r in rows}
    flat8, list8, bnb = by[("int8", "fastopt", "flat")], by[("int8", "fastopt", "list")], \
        by[("int8", "bnb", "8-bit")]
    assert flat8.roof_fraction == pytest.approx(0.8)                 # the int8 roof, not float32's
    assert list8.roof_fraction == pytest.approx(2.0 / 3.0)
    assert by[("bfloat16", "fastopt", "flat")].roof_fraction == pytest.approx(0.75)
    assert flat8.speedup_vs_float32 == pytest.approx(5.0 / 2.5)       # flat against flat
    assert list8.speedup_vs_float32 == pytest.approx(6.0 / 3.0)       # list against list
    assert flat8.speedup_vs_bnb == pytest.approx(12.0) and bnb.speedup_vs_bnb == pytest.approx(1.0)
    assert flat8.speedup_vs_torch == pytest.approx(4.0)               # torch's float32 row
    assert flat8.speedup_vs_numpy == pytest.approx(16.0)
    f32 = by[("float32", "fastopt", "flat")]
    assert f32.speedup_vs_float32 is None and f32.speedup_vs_bnb is None
    assert by[("bfloat16", "fastopt", "flat")].speedup_vs_bnb is None  # bnb is int8's only
    assert by[("int8", "roof", "")].speedup_vs_float32 == pytest.approx(4.0 / 2.0)
    # the GB/s of a low-bit row count its own bytes
    assert flat8.gb_per_s == pytest.approx(1000 * 16.0625 / 2.5e-3 / 1e9)
    d = flat8.to_dict()
    assert d["state"] == "int8" and d["state_bytes_per_param"] == pytest.approx(2.03125)
    assert d["speedup_vs_bnb"] == pytest.approx(12.0) and d["speedup_vs_float32"] == pytest.approx(2.0)


def _cells(lines) -> list[dict]:
    """The first table of a report as dicts by column (cells split at two spaces)."""
    import re
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    header = re.split(r"\s{2,}", lines[start].strip())
    out = []
    for line in lines[start + 2:]:
        if not line.strip() or not line.startswith(("adam", "sgd")) or "(fastopt" in line:
            break
        out.append(dict(zip(header, re.split(r"\s{2,}", line.strip()))))
    return out


def _lowbit_run(rows):
    config = suite.BenchConfig(optimizers=cases.available_optimizers("adam"), layouts="large",
                               size=1000)
    run = suite.BenchRun(config, rows, [], {"versions": {"numba": "x", "numpy": "y"}}, [], 1.0,
                         {"large": dict(n_params=1000, n_tensors=1)})
    run.extra["lowbit_summary"] = suite.lowbit_summary(rows, config)
    return run


def test_lowbit_rows_in_the_table_and_the_summary_line():
    rows = compare(_lowbit_rows())
    run = _lowbit_run(rows)
    (summary,) = run.extra["lowbit_summary"]
    assert summary["mode"] == "flat" and summary["optimizer"] == "adam"
    assert summary["speedup_vs_float32"] == pytest.approx({"bfloat16": 1.25, "int8": 2.0})
    assert summary["speedup_vs_bnb"] == pytest.approx(12.0)
    assert summary["state_bytes_per_param"] == pytest.approx(
        {"float32": 8.0, "bfloat16": 4.0, "int8": 2.03125})
    assert summary["bnb"]["optimizer"] == "Adam8bit"
    text = report.format_run(run)
    lines = text.splitlines()
    table = _cells(lines)
    assert list(table[0])[:4] == ["optimizer", "state", "B/p", "backend"]
    assert {"vs bnb", "state B/p"} <= set(table[0])
    by = {(t["state"], t["backend"]): t for t in table}
    int8 = by[("int8", "fastopt flat")]
    assert (int8["B/p"], int8["state B/p"], int8["roof"], int8["vs bnb"]) == ("16.06", "2.03", "0.80", "12x")
    assert (by[("float32", "fastopt flat")]["B/p"], by[("float32", "fastopt flat")]["state B/p"]) == ("28", "8.00")
    assert (by[("bfloat16", "fastopt flat")]["B/p"], by[("bfloat16", "fastopt flat")]["state B/p"]) == ("20", "4.00")
    assert by[("int8", "roof")]["state B/p"] == "-" and by[("int8", "bnb 8-bit")]["state B/p"] == "2.03"
    assert by[("float32", "fastopt flat")]["vs bnb"] == "-"
    # rows sorted float32, bfloat16, int8; the roof first in each
    assert [(t["state"], t["backend"]) for t in table[:2]] == [("float32", "roof"), ("float32", "fastopt flat")]
    assert [t["state"] for t in table] == sorted((t["state"] for t in table),
                                                 key=["float32", "bfloat16", "int8"].index)
    line = next(line for line in lines if line.startswith("adam (fastopt flat): speed-up"))
    assert "bfloat16 1.25x, int8 2x" in line and "over bitsandbytes Adam8bit: int8 12x" in line
    assert "state B/param: float32 8.00, bfloat16 4.00, int8 2.03, bitsandbytes 2.03" in line
    assert text.index("adam (fastopt flat)") < text.index("\ntotal ")
    # without a bitsandbytes row: no vs bnb column, and the summary says so
    rows = compare([r for r in _lowbit_rows() if r.backend != "bnb"])
    text = report.format_run(_lowbit_run(rows))
    assert "vs bnb" not in text and "over bitsandbytes: no row (see the notes)" in text


def test_float32_only_run_keeps_its_table():
    rows = compare([_row("roof", 5.0, 0.01), _row("fastopt", 6.0, 0.01, "flat")])
    text = report.format_run(_lowbit_run(rows))
    assert "vs bnb" not in text and "Low-bit rows" not in text and "speed-up per step" not in text
    row = next(line for line in text.splitlines() if line.startswith("adam ") and "flat" in line)
    assert row.split()[1:3] == ["float32", "28"]


# --------------------------------------------------- clipping: where it runs, and when
class _Bar:
    """Records what run_bench tells its progress bar."""
    made = []

    def __init__(self, total=0, **kw):
        self.total, self.n, self.stages = total, 0, []
        _Bar.made.append(self)

    def set_postfix_str(self, text, refresh=True):
        self.stages.append(text)

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed_at = self.n


@pytest.mark.parametrize("names,clips", [("sgd", False), ("adam", True), ("sgd,adam", True)])
def test_clipping_comparison_runs_inside_the_bar_only_for_adam(names, clips, monkeypatch):
    import tqdm
    calls = []

    def fake_clip(n_params, dtype, torch=True):
        calls.append((n_params, dtype, torch))
        return [dict(variant="fused", bytes_per_param=32, ms=1.0, spread=0.0, gb_per_s=1.0,
                     reset_ms=0.1, fused_speedup=1.0, uncertain=False)]

    _Bar.made = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    monkeypatch.setattr(suite, "run_clip_comparison", fake_clip)
    monkeypatch.setattr(suite, "_run_group", lambda config, layout, case, rows, data, notes,
                        state="float32": [])
    config = suite.BenchConfig(optimizers=cases.available_optimizers(names), layouts="large",
                               size=1000, backends=("roof", "fastopt"), memory=False)
    assert config.clip_applies is clips
    run = suite.run_bench(config, progress=True)
    bar, = _Bar.made
    assert bar.closed_at == bar.total                    # every stage counted in the total
    assert bool(calls) is clips and ("clipping" in run.extra) is clips
    if clips:
        assert calls == [(1000, "float32", False)]       # torch not among the backends
        assert any(s.startswith("clipping") for s in bar.stages)
    assert not suite.BenchConfig(optimizers=cases.available_optimizers("adam"), clip=False).clip_applies
    assert not suite.BenchConfig(optimizers=cases.available_optimizers("adam"),
                                 dtype="float64").clip_applies


# ------------------------------------------------------------------ notes at the start
def test_the_no_torch_note_comes_before_any_timing(monkeypatch):
    import sys
    events = []
    monkeypatch.setitem(sys.modules, "torch", None)          # torch not importable
    monkeypatch.setattr(suite, "time_together", lambda *a, **k: events.append("timing"))
    monkeypatch.setattr(suite, "run_clip_comparison", lambda *a, **k: [])
    config = suite.BenchConfig(optimizers=cases.available_optimizers("sgd"), layouts="large",
                               size=1000, backends=("roof", "fastopt", "torch"), memory=False,
                               clip=False)
    suite.run_bench(config, progress=False, log=events.append)
    assert events[0].startswith("note: torch rows skipped: torch is not importable"), events
    assert "timing" in events and events.index("timing") > 0


# ------------------------------------------------------------------------------ chart
def _synthetic_run(names, modes=("flat", "list")):
    opts = cases.available_optimizers(names)
    config = suite.BenchConfig(optimizers=opts, layouts="large,small", size=1000, modes=modes)
    rng = np.random.default_rng(0)
    results = []
    for layout in config.layouts:
        for c in opts:
            for backend, mode in (("roof", ""), *(("fastopt", m) for m in modes), ("torch", "fused")):
                r = Result(c.name, layout, backend, mode, "cpu", "float32", 1000, 1, 28)
                r.times_s = list(rng.uniform(1e-3, 2e-3, 5))
                results.append(r)
    compare(results)
    return suite.BenchRun(config, results, [], {"cpu_model": "test cpu"}, [], 1.0,
                          {lay: dict(n_params=1000, n_tensors=1) for lay in config.layouts})


@pytest.mark.parametrize("names", ["sgd,sgd-momentum,adam,adamw", "all"])
def test_chart_gives_every_optimizer_its_own_look_and_keeps_the_legend_off_the_bars(names):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from fastopt.benchmark import plot
    run = _synthetic_run(names)
    n = len(run.config.optimizers)
    fig = plot.make_figure(run)
    ax = fig.axes[0]
    looks = {}
    for patch in ax.patches:
        gid = patch.get_gid() or ""
        if gid.startswith("fastopt:"):
            _, name, layout = gid.split(":")
            look = (to_rgba(patch.get_facecolor()), patch.get_hatch() or "")
            assert looks.setdefault(name, look) == look, name     # the same in every layout
    assert len(looks) == n and len(set(looks.values())) == n       # all distinct
    if n <= 10:
        assert all(hatch == "" for _, hatch in looks.values())
    # the fastopt bars are the FlatParams rows, and the figure says so
    flat = {r.optimizer: r.gb_per_s for r in run.results
            if r.backend == "fastopt" and r.mode == "flat" and r.layout == "large"}
    heights = {p.get_gid().split(":")[1]: p.get_height() for p in ax.patches
               if (p.get_gid() or "").endswith(":large")}
    assert heights == pytest.approx(flat)
    assert "FlatParams" in fig._suptitle.get_text()
    # the legend lies outside the axes: it covers no bar
    fig.savefig(io.BytesIO(), format="png")
    legend = ax.get_legend()
    assert legend is not None
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1
    assert {t.get_text() for t in legend.get_texts()} >= {c.name for c in run.config.optimizers}


def test_chart_says_list_mode_when_there_are_no_flatparams_rows():
    pytest.importorskip("matplotlib")
    from fastopt.benchmark import plot
    fig = plot.make_figure(_synthetic_run("adam", modes=("list",)))
    assert "list mode" in fig._suptitle.get_text() and "FlatParams" not in fig._suptitle.get_text()


def test_chart_gives_low_bit_rows_bars_of_their_own():
    pytest.importorskip("matplotlib")
    from fastopt.benchmark import plot
    rows = compare(_lowbit_rows())
    fig = plot.make_figure(_lowbit_run(rows))
    ax = fig.axes[0]
    heights = {p.get_gid(): p.get_height() for p in ax.patches
               if (p.get_gid() or "").startswith("fastopt:")}
    want = {r.state: r.gb_per_s for r in rows if r.backend == "fastopt" and r.mode == "flat"}
    assert heights == pytest.approx({"fastopt:adam:large": want["float32"],
                                     "fastopt:adam bfloat16:large": want["bfloat16"],
                                     "fastopt:adam int8:large": want["int8"]})
    # each bar's outline is its own format's roof
    outlines = sorted(p.get_height() for p in ax.patches if not p.get_gid() and not p.get_fill())
    assert outlines == pytest.approx(sorted(r.gb_per_s for r in rows if r.backend == "roof"))
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"adam", "adam bfloat16", "adam int8"} <= labels
