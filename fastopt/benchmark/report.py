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
  fastopt, numpy, torch, bnb, roof-cuda, copy-cuda, fastopt-cuda, torch-cuda), ``mode``
  (flat, list, fused, foreach, ref, 8-bit or ""), ``device``, ``dtype``, ``state`` (the
  optimizer state's format: float32 = the params' dtype, bfloat16 or int8), ``n_params``,
  ``n_tensors``, ``bytes_per_param`` (moved by a step; a float for low-bit state),
  ``state_bytes_per_param`` (resident bytes of the optimizer's state arrays per
  parameter, measured after its first step; null for roofs), ``times_s`` (per-step seconds of each sample),
  ``steps_per_sample``, ``repeats``, ``ms_median``, ``ms_min``, ``ms_p25``, ``ms_p75``,
  ``spread`` (half IQR / median), ``params_per_s``, ``gb_per_s``, ``roof_fraction``
  (this GB/s / the roof's GB/s = the roof's time / this time; a low-bit row against its
  format's roof), ``speedup_vs_numpy``, ``speedup_vs_torch`` (low-bit rows: against the
  float32 NumPy and torch rows), ``speedup_vs_float32`` (low-bit rows: the same backend
  and mode with float32 state), ``speedup_vs_bnb`` (int8 rows: bitsandbytes' 8-bit
  row), ``first_call_s``,
  ``compiled`` (fastopt CPU drivers: compiled / cache / process), ``peak_alloc_bytes``
  (tracemalloc), ``peak_rss_bytes``, ``wall_s`` (the whole group the row was timed in: roof and
  fastopt rows are timed together, interleaved), ``error`` (null when
  the row ran), ``uncertain`` (the ratios among ``roof_fraction``, ``speedup_vs_numpy``,
  ``speedup_vs_torch``, ``speedup_vs_float32``, ``speedup_vs_bnb`` that are within the noise, printed with a ``~``: the two rows'
  spreads combined exceed 15 %, or the ratio is within that combined spread of 1).
- ``cold_start``: per optimizer and cache state (empty, warm): ``import_s`` (import
  numpy and fastopt), ``setup_s`` (build the FlatParams and the optimizer),
  ``first_step_s``, ``second_step_s``, ``process_s`` (the whole child), ``n_params``,
  ``dtype``; ``error`` if the child failed.
- ``notes``: rows skipped and why.
- ``state_formats``: the optimizer state formats each optimizer ran with (``config``'s
  ``state_formats`` is what was asked: a list, or null for the default: float32, and
  bfloat16 and int8 for adam).
- ``lowbit_summary`` (when the run had low-bit rows): per layout and optimizer
  ``layout``, ``optimizer``, ``mode`` (the fastopt mode compared: flat when it ran),
  ``speedup_vs_float32`` and ``uncertain`` per low-bit format, ``speedup_vs_bnb``
  (int8), ``state_bytes_per_param`` per format, ``bnb`` (``ms``,
  ``state_bytes_per_param``, ``optimizer``; null without a bitsandbytes row).
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

_ORDER = {"roof": 0, "fastopt": 1, "torch": 2, "numpy": 3, "bnb": 4, "roof-cuda": 5,
          "copy-cuda": 6, "fastopt-cuda": 7, "torch-cuda": 8}
_NAMES = {"roof": "roof", "fastopt": "fastopt", "numpy": "numpy", "torch": "torch",
          "bnb": "bnb", "roof-cuda": "cuda roof", "copy-cuda": "cuda d2d copy",
          "fastopt-cuda": "fastopt cuda", "torch-cuda": "torch cuda"}
_STATE_ORDER = {"float32": 0, "bfloat16": 1, "int8": 2}


def row_label(r) -> str:
    return f"{_NAMES.get(r.backend, r.backend)} {r.mode}".strip()


def state_label(r) -> str:
    """The state column: the format, with the params' dtype for the default one."""
    state = getattr(r, "state", "float32")
    return r.dtype if state == "float32" else state


def _bpp(x) -> str:
    """Bytes per parameter: whole numbers as they are, others to two decimals."""
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


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
    """The text report: one table per layout (and the low-bit summary under it), then
    first calls, cold start and notes."""
    cfg = run.config
    lowbit = any(getattr(r, "state", "float32") != "float32" for r in run.results)
    with_bnb = any(getattr(r, "speedup_vs_bnb", None) is not None for r in run.results)
    out = [f"fastopt bench: {cfg.dtype}, {format_count(cfg.size)} params "
           f"(many-small: 2000 x 512), {len(cfg.optimizers)} optimizers",
           f"machine: {machine_line(run.machine)}",
           "ms/step: median of the samples; +-: half the interquartile range; GB/s at the "
           "optimizer's bytes moved per parameter (B/p);",
           "roof: GB/s over the roof kernel's GB/s (same access pattern and state format); "
           "vs numpy / vs torch: their time / this time;",
           "state: the optimizer state's storage; state B/p: resident bytes of the state "
           "arrays per parameter (measured); alloc, RSS+: step's peak tracemalloc and RSS "
           "increase."]
    if lowbit:
        out.append("Low-bit rows: int8 = blockwise 8-bit codes + a float32 absmax per 256 "
                   "elements (tensors under 4096 elements keep float32 state); their vs numpy "
                   "/ vs torch: against the float32 rows (neither has low-bit state)"
                   + ("; vs bnb: bitsandbytes' 8-bit optimizer's time / this time." if with_bnb
                      else "."))
    out.append("")
    header = ["optimizer", "state", "B/p", "backend", "ms/step", "+-", "Mparam/s", "GB/s",
              "roof", "vs numpy", "vs torch", *(["vs bnb"] if with_bnb else []), "state B/p",
              "alloc", "RSS+"]
    align = "<<><>>>>>>>" + (">" if with_bnb else "") + ">>>"
    marked = 0
    summaries = run.extra.get("lowbit_summary") or []
    for layout in cfg.layouts:
        rows = [r for r in run.results if r.layout == layout]
        if not rows:
            continue
        li = run.layout_info.get(layout, {})
        out.append(f"== {LAYOUT_TITLES[layout]}: {format_count(li.get('n_params', 0))} params in "
                   f"{li.get('n_tensors', '?')} tensor{'' if li.get('n_tensors') == 1 else 's'} ==")
        table = []
        order = {c.name: i for i, c in enumerate(cfg.optimizers)}
        rows.sort(key=lambda r: (order.get(r.optimizer, 99),
                                 _STATE_ORDER.get(getattr(r, "state", "float32"), 9),
                                 _ORDER.get(r.backend, 9), r.mode))
        for r in rows:
            head = [r.optimizer, state_label(r), _bpp(r.bytes_per_param), row_label(r)]
            if not r.ok:
                table.append(head + ["error"] + [""] * (len(header) - len(head) - 1))
                continue
            unsure = set(r.uncertain)
            marked += bool(unsure)
            bnb = ([_mark(_ratio(getattr(r, "speedup_vs_bnb", None)), "speedup_vs_bnb" in unsure)]
                   if with_bnb else [])
            table.append(head + [_ms(r.median_s * 1e3),
                                 f"{r.spread * 100:.0f}%", f"{r.params_per_s / 1e6:.0f}",
                                 f"{r.gb_per_s:.1f}",
                                 _mark(_num(r.roof_fraction, ".2f"), "roof_fraction" in unsure),
                                 _mark(_ratio(r.speedup_vs_numpy), "speedup_vs_numpy" in unsure),
                                 _mark(_ratio(r.speedup_vs_torch), "speedup_vs_torch" in unsure),
                                 *bnb, _num(getattr(r, "state_bytes_per_param", None), ".2f"),
                                 _bytes(r.peak_alloc_bytes), _bytes(r.peak_rss_bytes)])
        out += _table(header, table, align)
        lines = [summary_line(s) for s in summaries if s["layout"] == layout]
        marked += sum(UNCERTAIN_MARK in line for line in lines)
        out += lines + [""]
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
                      [[_with_state(r), row_label(r), r.compiled, f"{r.first_call_s:.2f}"]
                       for r in firsts], "<<<>") + [""]
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


def _with_state(r) -> str:
    state = getattr(r, "state", "float32")
    return r.optimizer if state == "float32" else f"{r.optimizer} {state}"


def summary_line(s: dict) -> str:
    """One line of the low-bit summary (:func:`fastopt.benchmark.suite.lowbit_summary`):
    each format's speed-up per step over float32 fastopt, int8's over bitsandbytes, and
    the state's resident bytes per parameter."""
    def ratio(x, unsure):
        return "-" if x is None else _mark(_ratio(x), unsure)

    vs32 = s["speedup_vs_float32"]
    unsure = s.get("uncertain", {})
    parts = [f"{s['optimizer']} (fastopt {s['mode']}): speed-up per step over float32: "
             + ", ".join(f"{fmt} {ratio(x, 'speedup_vs_float32' in unsure.get(fmt, ()))}"
                         for fmt, x in vs32.items())]
    if "int8" in vs32:
        bnb = s.get("bnb")
        if bnb is None or s.get("speedup_vs_bnb") is None:
            parts.append("over bitsandbytes: no row (see the notes)")
        else:
            parts.append(f"over bitsandbytes {bnb['optimizer']}: int8 "
                         f"{ratio(s['speedup_vs_bnb'], 'speedup_vs_bnb' in unsure.get('int8', ()))}")
    sizes = [f"{fmt} {_num(x, '.2f')}" for fmt, x in s["state_bytes_per_param"].items()]
    if s.get("bnb") and s["bnb"].get("state_bytes_per_param") is not None:
        sizes.append(f"bitsandbytes {s['bnb']['state_bytes_per_param']:.2f}")
    parts.append("state B/param: " + ", ".join(sizes))
    return "; ".join(parts)


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
