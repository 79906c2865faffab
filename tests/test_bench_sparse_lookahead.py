"""The SparseAdam and Lookahead benches (fastopt/benchmark/sparse_adam.py, lookahead.py)
and their ``fastopt bench --optimizers sparse-adam,lookahead`` output, at tiny sizes.

What is checked: the bytes counted (from the access pattern, worked out here), that the
roofs touch what the optimizer touches (SparseAdam's only the gradient's rows; the slow
pass p and the slow weights), the records' ratios, and the torch side left out with "-"
when its package is absent.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fastopt import cli
from fastopt.benchmark import lookahead as la_bench
from fastopt.benchmark import sparse_adam as sa_bench

from cases import needs, optional_module

torch = optional_module("torch")


# -- SparseAdam ----------------------------------------------------------------------------------
def test_touched_rows_are_distinct_sorted_and_a_fixed_fraction():
    idx = sa_bench.touched_rows(1000, 0.05, seed=3)
    assert idx.size == 50 and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 1000
    np.testing.assert_array_equal(idx, sa_bench.touched_rows(1000, 0.05, seed=3))
    assert sa_bench.touched_rows(10, 0.001).size == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            sa_bench.touched_rows(10, bad)


def test_sparse_bytes_per_row():
    # p, exp_avg, exp_avg_sq read and written, the gradient row read: 7 words; an int64 index
    assert sa_bench.bytes_per_row(np.float32, 256) == 7 * 4 * 256 + 8
    assert sa_bench.bytes_per_row(np.float64, 10) == 7 * 8 * 10 + 8


def test_sparse_roof_and_fastopt_touch_only_the_gradient_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 8)).astype(np.float32)
    index = np.array([3, 17, 29], np.int64)
    rows = rng.standard_normal((3, 8)).astype(np.float32)
    roof = sa_bench._roof_target(table, index, rows)
    roof.step()
    first_state = roof.keep[1][0]          # the roof adds each gradient row to its state row
    np.testing.assert_array_equal(np.flatnonzero(np.any(first_state != 0, axis=1)), index)
    np.testing.assert_array_equal(first_state[index], rows)
    ours = sa_bench._fastopt_target(table, index, rows)
    ours.step()
    p = ours.keep[0]
    np.testing.assert_array_equal(np.flatnonzero(np.any(p != table, axis=1)), index)


@needs(torch, "torch runs torch.optim.SparseAdam")
def test_sparse_record():
    rec = sa_bench.run(256 * 200, 0.1, repeats=1)
    assert rec["rows"] == 200 and rec["touched_rows"] == 20
    assert rec["bytes_per_step"] == 20 * (7 * 4 * 256 + 8)
    assert rec["fraction_of_roof"] == pytest.approx(rec["roof_ms"] / rec["fastopt_ms"])
    assert rec["speedup_vs_torch"] == pytest.approx(rec["torch_ms"] / rec["fastopt_ms"])
    assert rec["fastopt_gbs"] == pytest.approx(rec["bytes_per_step"] / rec["fastopt_ms"] / 1e6)
    text = sa_bench.lines([rec])
    assert len(text) == 3 and text[2].split()[:3] == ["10%", "=", "20"]


# -- Lookahead -----------------------------------------------------------------------------------
def test_lookahead_bytes_per_param():
    # AdamW: read p, g, m, v and write p, m, v (7 words); every k-th step read and write
    # p and the slow weights (4 words)
    assert la_bench.bytes_per_param("float32", 5) == pytest.approx(4 * (7 + 4 / 5))
    assert la_bench.bytes_per_param("float64", 2) == pytest.approx(8 * (7 + 2))


def test_lookahead_roof_runs_k_inner_passes_and_one_slow_pass():
    """The roof's tables: AdamW's (p, g and two moments) and the slow pass's (p as the
    gradient column, the slow weights as the one state column)."""
    from fastopt.benchmark.runner import LayoutData
    data = LayoutData("large", 1000, "float32")
    target = la_bench._roof_target(data, 3)
    inner, slow_pass, moments, slow = target.keep
    target.step()
    # the roof element adds g to every present state column: 3 times to each moment
    np.testing.assert_allclose(moments[0][0], 3 * data.grads, rtol=1e-6)
    assert moments[2] is None and slow[1] is None and slow[2] is None
    assert not np.array_equal(slow[0][0], data.params)       # the slow pass wrote it


def test_lookahead_fastopt_target_steps_k_times_per_call():
    from fastopt.benchmark.runner import LayoutData
    data = LayoutData("transformer", 20000, "float32")
    target = la_bench._fastopt_target(data, 4, 0.5)
    flat, opt = target.keep
    target.step()
    assert int(opt.optimizer.state[0]["step"]) == 4 and opt._counters == [0]


@needs(torch, "torch runs torch.optim.AdamW")
def test_lookahead_record_and_without_pytorch_optimizer(monkeypatch):
    optional = pytest.importorskip("pytorch_optimizer", reason="pytorch_optimizer is the torch side")
    assert optional is not None
    rec = la_bench.run("large", 20000, repeats=1, k=2)
    assert rec["params"] == 20000 and rec["bytes_per_param"] == pytest.approx(4 * (7 + 4 / 2))
    assert rec["fraction_of_roof"] == pytest.approx(rec["roof_ms"] / rec["fastopt_ms"])
    assert rec["speedup_vs_torch"] == pytest.approx(rec["torch_ms"] / rec["fastopt_ms"])
    assert rec["torch_mode"] in ("fused", "foreach")
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)       # import fails
    bare = la_bench.run("large", 20000, repeats=1, k=2)
    assert bare["torch_ms"] is None and bare["speedup_vs_torch"] is None
    assert la_bench.lines([bare])[2].split()[-2:] == ["-", "-"]


# -- the CLI ---------------------------------------------------------------------------------------
@needs(torch, "torch is the comparison")
def test_cli_prints_both_benches(capsys):
    pytest.importorskip("pytorch_optimizer", reason="pytorch_optimizer is Lookahead's torch side")
    rc = cli.main(["bench", "--size", "51200", "--optimizers", "sparse-adam,lookahead",
                   "--layouts", "large", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "SparseAdam vs torch.optim.SparseAdam: a 200 x 256 float32 embedding table" in out
    assert "Lookahead(AdamW, k=5, alpha=0.5) vs pytorch_optimizer.Lookahead" in out
    lines = out.splitlines()
    sparse = [ln for ln in lines if ln.split()[:1] in (["1%"], ["10%"])]
    assert len(sparse) == 2
    large = [ln for ln in lines if ln.startswith("large ")]
    assert len(large) == 1 and len(large[0].split()) == 10
