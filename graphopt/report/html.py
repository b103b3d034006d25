"""The report as a self-contained HTML page, written for the person who runs the optimizer.

    opt.report.to_html("report.html")        # or: graphopt optimize … --report report.html

Order: which model, when, with what (versions, machine); a summary (size,
latency with its p10–p90 spread, fidelity, what changed, and any requested
step that did not happen, in red); the run's settings in words; the per-pass
table; plots (matplotlib, embedded as PNG so the file stands alone):

- size and latency after each kept pass (horizontal bars, so long pass names
  never overlap; latency error bars are the p10–p90 spread);
- per layer: int8 error or sensitivity (module names as labels, float layers
  in orange only when there are some), or the channels each pruning group kept;
- accuracy against latency of each level (`report.meta["levels"]`, a list of
  {"level", "latency_ms", and "accuracy" or "max_rel_err"}) or of each kept pass;

then what stayed float and why, every rejected match with its reason, rolled
back passes and skipped work. Every size is shown in one unit.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .formatting import format_bytes, format_latency

if TYPE_CHECKING:   # annotations only: the package's __init__ imports this module (Report.to_html)
    from . import PassRecord, Report

#: Per-layer numbers the int8 passes record, in order of preference, and how to say them.
LAYER_METRICS = {"sensitivity": "sensitivity (output error when this layer alone is int8)",
                 "error_share": "share of the output error", "weight_rel_err": "relative weight error after int8"}
#: Meta keys shown in the summary or their own sections rather than in the settings table.
SHOWN_ELSEWHERE = {"levels", "skipped", "model", "model_source", "model_form", "date", "versions", "machine",
                   "outcome", "source", "output"}
INT8, FLOAT = "#2980b9", "#e67e22"


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write `report` as HTML to `path` (atomically, with the umask's mode); returns the path."""
    from ..outputs import write_atomic
    return write_atomic(path, render(report))


def render(report: Report) -> str:
    figures = [("Size and latency after each pass", _steps_plot(report)),
               ("Per layer", _layers_plot(report)),
               ("Fidelity and latency", _tradeoff_plot(report))]
    model = report.meta.get("model") or Path(str(report.meta.get("source") or "model")).stem
    body = [f"<h1>graphopt report: {_e(model)}</h1>", _provenance(report.meta), _summary(report),
            "<h2>Settings</h2>", _settings(report), "<h2>Passes</h2>", _pass_table(report)]
    for title, png in figures:
        if png:
            body.append(f"<h2>{_e(title)}</h2><img alt='{_e(title)}' src='data:image/png;base64,{png}'>")
    body += [_float_layers(report), _rejections(report)]
    rolled = [f"<li><b>{_e(r.name)}</b>: {_e(r.reason or '')}</li>" for r in report.rolled_back]
    if rolled:
        body.append("<h2>Rolled back</h2><ul>" + "".join(rolled) + "</ul>")
    skipped = report.meta.get("skipped") or []
    if skipped:
        body.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{_e(s)}</li>" for s in skipped) + "</ul>")
    return _PAGE.format(title=_e(f"graphopt report: {model}"), body="\n".join(b for b in body if b))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
tr.rolled td {{ background: #fde8e8; }}
tr.changed td {{ background: #eef8ee; }}
.provenance {{ color: #555; font-size: 13px; }}
.summary {{ font-size: 15px; background: #f6f8fa; padding: .6em 1em; border-left: 4px solid #2e8b57; }}
.summary.problem {{ border-left-color: #c0392b; }}
.problem b {{ color: #c0392b; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
details {{ margin: .3em 0; }} summary {{ cursor: pointer; }}
</style></head><body>
{body}
</body></html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _provenance(meta: dict[str, Any]) -> str:
    parts = []
    if meta.get("model_source") or meta.get("source"):
        form = f" ({meta['model_form']})" if meta.get("model_form") else ""
        parts.append(f"from <code>{_e(meta.get('model_source') or meta.get('source'))}</code>{_e(form)}")
    if meta.get("output"):
        parts.append(f"written to <code>{_e(meta['output'])}</code>")
    if meta.get("date"):
        parts.append(f"on {_e(meta['date'])}")
    versions = meta.get("versions") or {}
    if versions:
        parts.append(", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()))
    if meta.get("machine"):
        parts.append(_e(meta["machine"]))
    return f"<p class='provenance'>{' · '.join(parts)}</p>" if parts else ""


def _summary(report: Report) -> str:
    b, f = report.baseline, report.final
    unit = report.size_unit
    items = []
    if b and f:
        items.append(f"<b>size</b>: parameters {format_bytes(b.param_bytes, unit)} → {format_bytes(f.param_bytes, unit)}"
                     + _ratio(b.param_bytes, f.param_bytes, "smaller", "LARGER"))
        if b.latency_ms and f.latency_ms:
            timing = report.meta.get("timing") or {}
            context = (f" — timed interleaved on the example inputs, {timing['threads']} threads, load "
                       f"{timing['load_1min']} on {timing['cores']} cores") if timing else ""
            items.append(f"<b>latency</b> (median, p10–p90 in brackets): {format_latency(b)} → {format_latency(f)} ms"
                         + _ratio(b.latency_ms, f.latency_ms, "faster", "SLOWER") + _e(context))
            if report.meta.get("speed"):
                items.append(f"<b>speed check</b>: {_e(report.meta['speed'])}")
        if f.min_cosine is not None or f.max_rel_err is not None:
            fidelity = [f"min cosine {f.min_cosine:.5f}" if f.min_cosine is not None else "",
                        f"max relative error {f.max_rel_err:.2e}" if f.max_rel_err is not None else "",
                        f"max absolute error {f.max_abs_err:.2e}" if f.max_abs_err is not None else ""]
            items.append("<b>fidelity</b> against the original on the verification inputs: "
                         + ", ".join(x for x in fidelity if x))
    meta = report.meta
    if meta.get("source_bytes") and meta.get("file_bytes"):
        items.append(f"<b>file</b>: {format_bytes(meta['source_bytes'], unit)} → {format_bytes(meta['file_bytes'], unit)}")
    elif meta.get("file_bytes"):
        items.append(f"<b>file</b>: {format_bytes(meta['file_bytes'], unit)}")
    changed = [r for r in report.records if r.modified and not r.rolled_back]
    if changed:
        items.append("<b>what changed</b>: " + "; ".join(
            _e(r.name) + (f" ({_e(', '.join(f'{k} ×{v}' for k, v in r.matches.items()))})" if r.matches else "")
            for r in changed))
    else:
        items.append("<b>what changed</b>: nothing")
    problems = [p for p in meta.get("outcome") or [] if p != "as requested"]
    items += [f"<b>not done</b>: {_e(p)}" for p in problems]
    items += [f"<b>rolled back</b>: {_e(r.name)}: {_e(r.reason or '')}" for r in report.rolled_back]
    cls = "summary problem" if problems or report.rolled_back else "summary"
    return f"<div class='{cls}'><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"


def _ratio(before: float, after: float, better: str, worse: str) -> str:
    if not before or not after:
        return ""
    return f" ({before / after:.2f}× {better})" if after <= before else f" ({after / before:.2f}× {worse})"


def _settings(report: Report) -> str:
    unit = report.size_unit
    rows = []
    for key, value in report.meta.items():
        if key in SHOWN_ELSEWHERE or value in (None, [], {}, "") and key not in ("quantize", "prune"):
            continue
        rows.append(f"<tr><th>{_e(_LABELS.get(key, key.replace('_', ' ')))}</th><td>{_e(_value(key, value, unit))}"
                    f"</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


_LABELS = {"quantize": "int8 scheme", "prune": "pruning", "verify": "verified after every pass",
           "dynamic_batch": "any batch size", "notes": "capture notes", "total_s": "total time",
           "file_bytes": "output file", "source_bytes": "input file(s)", "opset": "opset in", "opset_out": "opset out"}


def _value(key: str, value: Any, unit: str) -> str:
    if key == "quantize" and value is None:
        return "none (float)"
    if key == "prune" and value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "export_passes" and isinstance(value, list):
        return "; ".join(_export_pass(p) for p in value if isinstance(p, dict))
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return format_bytes(value, unit)
    if key.endswith("_s") and isinstance(value, (int, float)):
        return f"{value:.1f} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _export_pass(row: dict[str, Any]) -> str:
    """One of export_onnx's cleanup passes (report.meta["export_passes"]) as a phrase."""
    if row.get("rolled_back"):
        return f"{row.get('name')}: rolled back ({row.get('reason')})"
    if row.get("modified"):
        matches = ", ".join(f"{k}×{v}" for k, v in (row.get("matches") or {}).items())
        return f"{row.get('name')}: changed" + (f" ({matches})" if matches else "")
    return f"{row.get('name')}: no change"


def _pass_table(report: Report) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in report.HEADER) + "</tr>"
    records = ([report.baseline] if report.baseline else []) + report.records
    rows = []
    for record, cells in zip(records, report.rows()):
        cls = "rolled" if record.rolled_back else "changed" if record.modified else ""
        rows.append(f"<tr class='{cls}'>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _layer_rows(report: Report) -> list[dict[str, Any]]:
    """Per-layer rows of the kept int8 passes (a list of dicts in their stats)."""
    rows = []
    for record in report.records:
        layers = record.stats.get("layers")
        if record.rolled_back or not isinstance(layers, list):
            continue
        rows += [dict(layer, pass_name=record.name) for layer in layers if isinstance(layer, dict)]
    return rows


def _pruned_groups(report: Report) -> list[tuple[str, int, int]]:
    """(modules, units kept, units) of each channel group of the kept pruning passes (a dict in their stats)."""
    groups = []
    for record in report.records:
        layers = record.stats.get("layers")
        if record.rolled_back or not isinstance(layers, dict):
            continue
        for name, group in layers.items():
            if isinstance(group, dict) and group.get("units"):
                modules = group.get("modules") or [name]
                label = ", ".join(map(str, modules[:2])) + (f" +{len(modules) - 2}" if len(modules) > 2 else "")
                units = int(group["units"])
                groups.append((label, units - int(group.get("pruned_units", 0)), units))
    return groups


def _float_layers(report: Report) -> str:
    rows = [r for r in _layer_rows(report) if r.get("scheme") == "float"]
    if not rows:
        return ""
    items = "".join(f"<tr><td>{_e(_layer_label(r))}</td><td>{_e(r.get('op', ''))}</td><td>{_e(r.get('reason', ''))}"
                    f"</td></tr>" for r in rows)
    return (f"<h2>Stayed float ({len(rows)})</h2><table><tr><th>layer</th><th>op</th><th>why</th></tr>"
            + items + "</table>")


def _rejections(report: Report) -> str:
    parts = []
    for record in report.records:
        rejected = record.stats.get("rejected") or []
        if rejected:
            items = "".join(f"<li>{_e(r)}</li>" for r in rejected)
            parts.append(f"<details><summary><b>{_e(record.name)}</b>: {len(rejected)} match(es) rejected"
                         f"</summary><ul>{items}</ul></details>")
    return "<h2>Rejected matches and why</h2>" + "".join(parts) if parts else ""


def _layer_label(row: dict[str, Any]) -> str:
    return str(row.get("module") or row.get("layer") or "?")


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _steps(report: Report) -> list[PassRecord]:
    """Baseline, then the passes that changed the model and were kept."""
    kept = [r for r in report.records if r.modified and not r.rolled_back]
    return ([report.baseline] if report.baseline else []) + kept


def _steps_plot(report: Report) -> str | None:
    steps = _steps(report)
    if report.baseline is None:
        return None
    plt = _pyplot()
    unit = report.size_unit
    divisor = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    panels = [(f"parameters ({unit})", [r.param_bytes / divisor for r in steps], None)]
    if all(r.latency_ms is not None for r in steps):
        errors = None
        if all(r.latency_p10_ms is not None and r.latency_p90_ms is not None for r in steps):
            errors = [[r.latency_ms - r.latency_p10_ms for r in steps], [r.latency_p90_ms - r.latency_ms for r in steps]]
        panels.append(("latency (ms, median; bars p10–p90)" if errors else "latency (ms, median)",
                       [r.latency_ms for r in steps], errors))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(steps) + 1.6), squeeze=False,
                             sharey=True)
    labels = [r.name for r in steps]
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=9)
    axes[0][0].invert_yaxis()          # the y axis is shared: first pass on top, in both panels
    for ax, (title, values, errors) in zip(axes[0], panels):
        colors = ["#777777"] + ["#2e8b57" if after <= before else "#c0392b" for before, after in zip(values, values[1:])]
        ax.barh(range(len(values)), values, xerr=errors, color=colors, capsize=3)
        ax.set_title(f"{title}: {values[0]:.4g} → {values[-1]:.4g}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _layers_plot(report: Report) -> str | None:
    groups = _pruned_groups(report)
    rows = [(r, next((m for m in LAYER_METRICS if isinstance(r.get(m), (int, float))), None))
            for r in _layer_rows(report)]
    rows = [(r, m) for r, m in rows if m]
    if not rows and not groups:
        return None
    plt = _pyplot()
    panels = [p for p in (rows, groups) if p]
    heights = [max(2.0, 0.24 * len(p) + 1.0) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    if rows:
        ax = axes.pop(0)
        floats = [r.get("scheme") == "float" for r, _ in rows]
        ax.barh(range(len(rows)), [float(r[m]) for r, m in rows], color=[FLOAT if f else INT8 for f in floats])
        ax.set_yticks(range(len(rows)), [_layer_label(r) for r, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("; ".join(LAYER_METRICS[m] for m in sorted({m for _, m in rows})))
        if any(floats):
            from matplotlib.patches import Patch
            ax.legend(handles=[Patch(color=INT8, label="int8"), Patch(color=FLOAT, label="kept in float")],
                      loc="lower right", fontsize=8)
        ax.set_title("int8 layers", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    if groups:
        ax = axes.pop(0)
        ax.barh(range(len(groups)), [k for _, k, _ in groups], color="#2e8b57", label="kept")
        ax.barh(range(len(groups)), [u - k for _, k, u in groups], left=[k for _, k, _ in groups], color="#cccccc",
                label="pruned")
        ax.set_yticks(range(len(groups)), [g for g, _, _ in groups], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("channel units per pruning group")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("structured pruning", fontsize=10)
    return _png(fig)


def _tradeoff_plot(report: Report) -> str | None:
    levels = report.meta.get("levels")
    spread: list[tuple[float, float] | None]
    if levels:
        key = "accuracy" if all("accuracy" in p for p in levels) else "max_rel_err"
        points = [(p["level"], p.get("latency_ms"), p.get(key)) for p in levels]
        spread = [None] * len(points)
        ylabel = "accuracy" if key == "accuracy" else "max relative error vs original"
    else:
        steps = [r for r in _steps(report) if r.latency_ms is not None and r.max_rel_err is not None]
        points = [(r.name, r.latency_ms, r.max_rel_err) for r in steps]
        spread = [(r.latency_ms - r.latency_p10_ms, r.latency_p90_ms - r.latency_ms)
                  if r.latency_p10_ms is not None and r.latency_p90_ms is not None else None for r in steps]
        ylabel = "max relative error vs original"
    keep = [i for i, p in enumerate(points) if p[1] is not None and p[2] is not None]
    if not keep:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    cmap = plt.get_cmap("tab10")
    for n, i in enumerate(keep):   # a legend names the points: labels never overlap
        label, x, y = points[i]
        xerr = [[spread[i][0]], [spread[i][1]]] if spread[i] else None
        ax.errorbar([x], [y], xerr=xerr, fmt="o", color=cmap(n % 10), capsize=3, label=f"{n + 1}. {label}")
        ax.annotate(str(n + 1), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(ylabel)
    if ylabel.startswith("max") and any(points[i][2] > 0 for i in keep):
        ax.set_yscale("symlog", linthresh=1e-7)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return _png(fig)
