"""The report as a self-contained HTML page: the per-pass table and plots a person would rather look at.

    opt.report.to_html("report.html")        # or: graphopt optimize … --report report.html

Plots (matplotlib, embedded as PNG so the file stands alone):

- a waterfall of model size and latency after each pass (what each pass bought);
- per-layer quantization error or sensitivity, from the int8 passes' `stats["layers"]`;
- the accuracy/latency point of each level (`report.meta["levels"]`, a list of
  {"level", "latency_ms", and "accuracy" or "max_rel_err"}), or of each pass when
  the run has only one level.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from .report import PassRecord, Report

#: Per-layer numbers the int8 passes record, in order of preference.
LAYER_METRICS = ("sensitivity", "error_share", "weight_rel_err")


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write `report` as HTML to `path` (atomically); returns the path."""
    path = Path(path)
    text = render(report)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render(report: Report) -> str:
    figures = [("Size and latency after each pass", _waterfall(report)),
               ("Per-layer quantization error", _layers(report)),
               ("Accuracy and latency", _tradeoff(report))]
    body = [f"<h1>graphopt report</h1><p class='summary'>{_e(report.summary())}</p>",
            _meta_table(report.meta), "<h2>Passes</h2>", _pass_table(report)]
    for title, png in figures:
        if png:
            body.append(f"<h2>{_e(title)}</h2><img alt='{_e(title)}' src='data:image/png;base64,{png}'>")
    rolled = [f"<li><b>{_e(r.name)}</b>: {_e(r.reason or '')}</li>" for r in report.rolled_back]
    if rolled:
        body.append("<h2>Rolled back</h2><ul>" + "".join(rolled) + "</ul>")
    skipped = report.meta.get("skipped") or []
    if skipped:
        body.append("<h2>Skipped</h2><ul>" + "".join(f"<li>{_e(s)}</li>" for s in skipped) + "</ul>")
    return _PAGE.format(body="\n".join(body))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graphopt report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
tr.rolled td {{ background: #fde8e8; }}
tr.changed td {{ background: #eef8ee; }}
.summary {{ font-size: 15px; background: #f6f8fa; padding: .6em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
{body}
</body></html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _meta_table(meta: dict[str, Any]) -> str:
    rows = [f"<tr><th>{_e(k)}</th><td>{_e(v if not isinstance(v, (list, dict)) else json.dumps(v, default=str))}"
            f"</td></tr>" for k, v in meta.items() if k not in ("levels", "skipped")]
    return "<table>" + "".join(rows) + "</table>" if rows else ""


def _pass_table(report: Report) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in Report.HEADER) + "</tr>"
    records = ([report.baseline] if report.baseline else []) + report.records
    rows = []
    for record, cells in zip(records, report.rows()):
        cls = "rolled" if record.rolled_back else "changed" if record.modified else ""
        rows.append(f"<tr class='{cls}'>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return "<table>" + head + "".join(rows) + "</table>"


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


def _waterfall(report: Report) -> str | None:
    steps = _steps(report)
    if len(steps) < 1 or report.baseline is None:
        return None
    plt = _pyplot()
    metrics = [("parameter size (KiB)", [r.param_bytes / 1024 for r in steps])]
    if all(r.latency_ms is not None for r in steps):
        metrics.append(("latency (ms)", [r.latency_ms for r in steps]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 3.8), squeeze=False)
    labels = [r.name for r in steps] + ["final"]
    for ax, (title, values) in zip(axes[0], metrics):
        bottoms, heights, colors = [0.0], [values[0]], ["#777777"]
        for before, after in zip(values, values[1:]):
            bottoms.append(min(before, after))
            heights.append(abs(after - before) or values[0] * 1e-3)
            colors.append("#2e8b57" if after <= before else "#c0392b")
        bottoms.append(0.0)
        heights.append(values[-1])
        colors.append("#34495e")
        ax.bar(range(len(labels)), heights, bottom=bottoms, color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}: {values[0]:.4g} → {values[-1]:.4g}")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _layers(report: Report) -> str | None:
    rows = []
    for record in report.records:
        if record.rolled_back:
            continue
        for layer in record.stats.get("layers") or []:
            metric = next((m for m in LAYER_METRICS if isinstance(layer.get(m), (int, float))), None)
            if metric:
                rows.append((str(layer.get("layer")), float(layer[metric]), metric, layer.get("scheme") == "float"))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.28 * len(rows) + 1)))
    names = [r[0] for r in rows]
    ax.barh(range(len(rows)), [r[1] for r in rows], color=["#e67e22" if r[3] else "#2980b9" for r in rows])
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(", ".join(sorted({r[2] for r in rows})) + "  (orange: kept in float)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _tradeoff(report: Report) -> str | None:
    levels = report.meta.get("levels")
    if levels:
        key = "accuracy" if all("accuracy" in p for p in levels) else "max_rel_err"
        points = [(p["level"], p["latency_ms"], p.get(key)) for p in levels]
        ylabel = "accuracy" if key == "accuracy" else "max relative error vs original"
    else:
        steps = [r for r in _steps(report) if r.latency_ms is not None and r.max_rel_err is not None]
        points = [(r.name, r.latency_ms, r.max_rel_err) for r in steps]
        ylabel = "max relative error vs original"
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="#8e44ad", alpha=0.6)
    for label, x, y in points:
        ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(ylabel)
    if ylabel.startswith("max") and any(p[2] > 0 for p in points):
        ax.set_yscale("symlog", linthresh=1e-7)
    ax.grid(alpha=0.3)
    return _png(fig)


def load_report(path: str | os.PathLike) -> Report:
    """A `Report` from the JSON that `Report.to_json()` wrote (`--report` saves it beside the HTML)."""
    from .errors import InputError
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a saved graphopt run: {exc}") from exc
    if not isinstance(data, dict) or "passes" not in data:
        raise InputError(f"{path}: not a saved graphopt run (no 'passes')")
    fields = set(PassRecord.__dataclass_fields__)

    def record(d: dict | None) -> PassRecord | None:
        return PassRecord(**{k: v for k, v in d.items() if k in fields}) if d else None
    return Report(records=[record(d) for d in data["passes"]], baseline=record(data.get("baseline")),
                  final=record(data.get("final")), meta=data.get("meta") or {})
