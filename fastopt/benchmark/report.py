"""Reporting a benchmark run: the aligned text table and the JSON record.

JSON record (``fastopt bench --json PATH``), ``schema: "fastopt-bench/1"``:

- ``created`` (ISO time), ``command`` (argv), ``total_s`` (wall time of the run).
- ``machine``: ``cpu_model``, ``cpu`` (LLVM CPU name and vector features),
  ``logical_cores``, ``physical_cores``, ``usable_cores``, ``memory_gb``,
  ``numba_threads``, ``threading_layer``, ``versions`` (fastopt, numpy, numba, llvmlite,
  tbb, torch, cupy, numba_cuda), ``torch`` (version, threads), ``gpu`` (name or null),
  ``platform``, ``python``.
- ``config``: the run's settings (optimizers, layouts, size, dtype, backends, modes,
  repeats, numpy_repeats, ...).
- ``layouts``: ``{layout: {n_params, n_tensors}}``.
- ``results``: one object per row with ``optimizer``, ``layout``, ``backend`` (roof,
  fastopt, numpy, torch, roof-cuda, copy-cuda, fastopt-cuda, torch-cuda), ``mode``
  (flat, list, fused, foreach, ref or ""), ``device``, ``dtype``, ``n_params``,
  ``n_tensors``, ``bytes_per_param``, ``times_s`` (per-step seconds of each sample),
  ``steps_per_sample``, ``repeats``, ``ms_median``, ``ms_min``, ``ms_p25``, ``ms_p75``,
  ``spread`` (half IQR / median), ``params_per_s``, ``gb_per_s``, ``roof_fraction``
  (this GB/s / the roof's GB/s = the roof's time / this time), ``speedup_vs_numpy``, ``speedup_vs_torch``, ``first_call_s``,
  ``compiled`` (fastopt CPU drivers: compiled / cache / process), ``peak_alloc_bytes``
  (tracemalloc), ``peak_rss_bytes``, ``wall_s`` (the whole group the row was timed in: roof and
  fastopt rows are timed together, interleaved), ``error`` (null when
  the row ran), ``uncertain`` (the ratios among ``roof_fraction``, ``speedup_vs_numpy``,
  ``speedup_vs_torch`` that are within the noise, printed with a ``~``: the two rows'
  spreads combined exceed 15 %, or the ratio is within that combined spread of 1).
- ``cold_start``: per optimizer and cache state (empty, warm): ``import_s`` (import
  numpy and fastopt), ``setup_s`` (build the FlatParams and the optimizer),
  ``first_step_s``, ``second_step_s``, ``process_s`` (the whole child), ``n_params``,
  ``dtype``; ``error`` if the child failed.
- ``notes``: rows skipped and why.
- ``clipping`` (when the run included the clipping comparison): per variant
  ``variant``, ``bytes_per_param``, ``ms``, ``spread``, ``gb_per_s``, ``reset_ms``,
  ``fused_speedup`` (its time over the fused variant's), ``uncertain``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys

from .cases import LAYOUT_TITLES, format_count
from .runner import NOISY_SPREAD

SCHEMA = "fastopt-bench/1"

_ORDER = {"roof": 0, "fastopt": 1, "torch": 2, "numpy": 3, "roof-cuda": 4, "copy-cuda": 5,
          "fastopt-cuda": 6, "torch-cuda": 7}
_NAMES = {"roof": "roof", "fastopt": "fastopt", "numpy": "numpy", "torch": "torch",
          "roof-cuda": "cuda roof", "copy-cuda": "cuda d2d copy", "fastopt-cuda": "fastopt cuda",
          "torch-cuda": "torch cuda"}


def row_label(r) -> str:
    return f"{_NAMES.get(r.backend, r.backend)} {r.mode}".strip()


def _bytes(n) -> str:
    """Bytes in binary units, as counts are written: 843, 32.4k, 30.5M."""
    return "-" if n is None else format_count(n, 1024, ("", "k", "M", "G", "T"))


UNCERTAIN_MARK = "~"
UNCERTAIN_NOTE = (f"{UNCERTAIN_MARK}: a ratio within the noise, not a firm figure: its two rows' "
                  f"spreads (+-) combined exceed {NOISY_SPREAD:.0%}, or it is within their "
                  "combined spread of 1 (no measurable difference); rerun on a quieter machine "
                  "before quoting it.")


def _mark(text: str, uncertain: bool) -> str:
    return UNCERTAIN_MARK + text if uncertain and text != "-" else text


def _num(x, fmt) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ratio(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}x" if x < 100 else f"{x:.0f}x"


def _ms(x) -> str:
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _table(header, rows, align) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(cells, widths, align))
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def machine_line(m: dict) -> str:
    torch = m.get("torch") or {}
    parts = [m.get("cpu_model") or "?", f"{m.get('usable_cores')} cores",
             f"numba {m['versions']['numba']} ({m.get('threading_layer')}, {m.get('numba_threads')} threads)",
             f"numpy {m['versions']['numpy']}"]
    if torch.get("available"):
        parts.append(f"torch {torch['version']} ({torch['threads']} threads)")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    return ", ".join(parts)


def format_run(run) -> str:
    """The text report: one table per layout, then first calls, cold start and notes."""
    cfg = run.config
    out = [f"fastopt bench: {cfg.dtype}, {format_count(cfg.size)} params "
           f"(many-small: 2000 x 512), {len(cfg.optimizers)} optimizers",
           f"machine: {machine_line(run.machine)}",
           "ms/step: median of the samples; +-: half the interquartile range; GB/s at the "
           "optimizer's bytes per parameter (B/p);",
           "roof: GB/s over the roof kernel's GB/s; vs numpy / vs torch: their time / this time; "
           "alloc, RSS+: step's peak tracemalloc and RSS increase.", ""]
    header = ["optimizer", "B/p", "backend", "ms/step", "+-", "Mparam/s", "GB/s", "roof",
              "vs numpy", "vs torch", "alloc", "RSS+"]
    align = "<><>>>>>>>>>"
    marked = 0
    for layout in cfg.layouts:
        rows = [r for r in run.results if r.layout == layout]
        if not rows:
            continue
        li = run.layout_info.get(layout, {})
        out.append(f"== {LAYOUT_TITLES[layout]}: {format_count(li.get('n_params', 0))} params in "
                   f"{li.get('n_tensors', '?')} tensor{'' if li.get('n_tensors') == 1 else 's'} ==")
        table = []
        order = {c.name: i for i, c in enumerate(cfg.optimizers)}
        rows.sort(key=lambda r: (order.get(r.optimizer, 99), _ORDER.get(r.backend, 9), r.mode))
        for r in rows:
            if not r.ok:
                table.append([r.optimizer, str(r.bytes_per_param), row_label(r), "error", "", "",
                              "", "", "", "", "", ""])
                continue
            unsure = set(r.uncertain)
            marked += bool(unsure)
            table.append([r.optimizer, str(r.bytes_per_param), row_label(r), _ms(r.median_s * 1e3),
                          f"{r.spread * 100:.0f}%", f"{r.params_per_s / 1e6:.0f}",
                          f"{r.gb_per_s:.1f}",
                          _mark(_num(r.roof_fraction, ".2f"), "roof_fraction" in unsure),
                          _mark(_ratio(r.speedup_vs_numpy), "speedup_vs_numpy" in unsure),
                          _mark(_ratio(r.speedup_vs_torch), "speedup_vs_torch" in unsure),
                          _bytes(r.peak_alloc_bytes), _bytes(r.peak_rss_bytes)])
        out += _table(header, table, align) + [""]
    clip_rows = run.extra.get("clipping")
    if clip_rows:
        from .clipping import format_clip_rows
        out += [format_clip_rows(clip_rows, cfg.size), ""]
        marked += any(r.get("uncertain") for r in clip_rows)
    if marked:
        out += [UNCERTAIN_NOTE, ""]

    firsts = [r for r in run.results if r.compiled in ("compiled", "cache")]
    if firsts:
        out.append("First call per driver in this process (outside the timings): "
                   "compiled now, or loaded from Numba's on-disk cache")
        out += _table(["optimizer", "row", "driver", "seconds"],
                      [[r.optimizer, row_label(r), r.compiled, f"{r.first_call_s:.2f}"] for r in firsts],
                      "<<<>") + [""]
    if run.cold_start:
        out.append(f"Cold start: first step in a fresh process, FlatParams of "
                   f"{format_count(run.cold_start[0]['n_params'])} params "
                   "(NUMBA_CACHE_DIR empty, then warm)")
        table = []
        for c in run.cold_start:
            if "error" in c:
                table.append([c["optimizer"], c["cache"], "error", "", "", "", ""])
            else:
                table.append([c["optimizer"], c["cache"], f"{c['import_s']:.2f}", f"{c['setup_s']:.2f}",
                              f"{c['first_step_s']:.3f}", f"{c['second_step_s'] * 1e3:.2f}",
                              f"{c['process_s']:.2f}"])
        out += _table(["optimizer", "cache", "import s", "setup s", "first step s", "next step ms",
                       "process s"], table, "<<>>>>>") + [""]
    for note in run.notes:
        out.append(f"note: {note}")
    first = sum(r.first_call_s or 0.0 for r in run.results)
    out.append(f"total {run.total_s:.1f} s, {first:.1f} s of it in first calls (compiling or "
               "loading drivers, torch's first steps)")
    return "\n".join(out)


def to_json(run, argv=None) -> dict:
    return dict(
        schema=SCHEMA,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=list(sys.argv if argv is None else argv),
        total_s=run.total_s,
        machine=run.machine,
        config=run.config.to_dict(),
        layouts=run.layout_info,
        results=[r.to_dict() for r in run.results],
        cold_start=run.cold_start,
        notes=run.notes,
        **run.extra,
    )


def write_json(run, path, argv=None) -> None:
    """Write the JSON record atomically (a temporary file renamed into place)."""
    record = _finite(to_json(run, argv))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=_jsonable, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _finite(x):
    """NaN and infinities become null: the record stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
    except ImportError:  # pragma: no cover
        pass
    return str(x)
