"""A tune run as a self-contained HTML page (the style of graphopt/report/html.py).

    result.to_html("tune.html")        # or: graphopt tune … --report tune.html

Order: the study (name, target, budget, trials by state) and the chosen config as JSON; the Pareto plot
(latency ratio against score of every timed trial, marker area by size, the Pareto front joined, the
budget's floor as a line, the chosen trial circled); parameter importance (Optuna's fANOVA on the
latency ratio, horizontal bars); the per-trial table (config, score, latency, size, state and why).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..report.html import _PAGE, _e, _png, _pyplot


def describe_config(config: dict[str, Any] | None, finetune: dict[str, Any] | None) -> str:
    """`O3 int8-dynamic prune 0.42 ft 2` in a few words (the progress line and the table)."""
    if not config:
        return "?"
    words = [str(config.get("level", "O1"))]
    if config.get("quantize"):
        words.append(str(config["quantize"]))
    prune = config.get("prune")
    if isinstance(prune, dict):
        words.append("prune " + ",".join(f"{k}:{v:.2f}" for k, v in prune.items()))
    elif prune is not None:
        words.append(f"prune {prune:.2f}")
    options = config.get("quantize_options") or {}
    alpha = options.get("alpha")
    if alpha is not None:
        words.append(f"α {alpha}" if isinstance(alpha, str) else f"α {alpha:.2f}")
    if options.get("smoothquant") is False:
        words.append("no-sq")
    if options.get("observer"):
        words.append(str(options["observer"]))
    if options.get("exclude"):
        words.append(f"float {len(options['exclude'])}")
    criterion = (config.get("prune_options") or {}).get("criterion")
    if criterion:
        words.append(criterion)
    if finetune:
        words.append(f"ft {finetune['epochs']}")
    return " ".join(words)


def write_html(result: Any, path: str | os.PathLike) -> Path:
    from ..outputs import write_atomic
    return write_atomic(path, render(result))


def render(result: Any) -> str:
    rows = result.trials
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    best = result.best_row
    timed = result.final[0] if result.final else best
    summary = (f"best: trial {best['trial']}, {timed['latency_ratio']:.3f}× the original's latency "
               f"({_e(timed['verdict'])}{', in the final' if result.final else ''}), score {best['score']:.4g} "
               f"vs {result.reference_score:.4g}" if best else "no trial was within budget")
    final = ("<p>Final: the fastest trials within each other's 95 % intervals, timed again together with the "
             "original in one interleaved run (the search's single measurements flatter their winner): "
             + "; ".join(f"trial {r['trial']} {r['latency_ratio']:.3f}× ({_e(r['verdict'])})" for r in result.final)
             + "</p>") if result.final else ""
    body = [f"<h1>graphopt tune: {_e(result.study.study_name)}</h1>",
            f"<p class='provenance'>target {_e(result.target)} · budget {result.accuracy_budget:g} "
            f"(floor {result.reference_score - result.accuracy_budget:.4g}) · "
            + ", ".join(f"{n} {s}" for s, n in states.items() if n) + "</p>",
            f"<p class='summary{'' if best else ' problem'}'>{summary}</p>", final,
            "<h2>Chosen config</h2><pre>" + _e(json.dumps(result.to_json(), indent=2)) + "</pre>"]
    for title, png in (("Pareto: latency against score", _pareto_plot(result)),
                       ("Parameter importance (latency ratio)", _importance_plot(result))):
        if png:
            body.append(f"<h2>{_e(title)}</h2><img alt='{_e(title)}' src='data:image/png;base64,{png}'>")
    if not result.importance:
        body.append("<p>Parameter importance needs three completed trials with parameters in common.</p>")
    body += ["<h2>Trials</h2>", _table(rows, result.best_trial)]
    return _PAGE.format(title=_e(f"graphopt tune: {result.study.study_name}"), body="\n".join(body))


def _table(rows: list[dict[str, Any]], best: int | None) -> str:
    head = ("<tr><th>trial</th><th>config</th><th>score</th><th>drop</th><th>latency × original</th>"
            "<th>latency ms</th><th>size</th><th>s</th><th>state</th><th>worker</th></tr>")

    def number(value: Any, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = []
    for r in rows:
        css = "changed" if r["trial"] == best else "rolled" if r["state"] in ("pruned", "fail") else ""
        state = r["state"] + (f": {r['note']}" if r.get("note") else "")
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1024:.0f} KiB"
        lines.append(
            f"<tr class='{css}'><td>{r['trial']}</td><td>{_e(describe_config(r['config'], r['finetune']))}</td>"
            f"<td>{number(r['score'], '.4g')}</td><td>{number(r['drop'], '+.3g')}</td>"
            f"<td>{number(r['latency_ratio'], '.3f')}</td><td>{number(r['latency_ms'], '.3f')}</td>"
            f"<td>{size}</td>"
            f"<td>{number(r['wall_s'], '.1f')}</td><td>{_e(state)}</td><td>{_e(r['worker'] or '')}</td></tr>")
    return "<table>" + head + "".join(lines) + "</table>"


def _pareto_plot(result: Any) -> str | None:
    from .tuner import pareto
    done = [r for r in result.trials if r["state"] == "complete" and r["latency_ratio"] is not None]
    if not done:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    largest = max(r["size_bytes"] for r in done) or 1
    ax.scatter([r["latency_ratio"] for r in done], [r["score"] for r in done],
               s=[30 + 200 * r["size_bytes"] / largest for r in done], alpha=0.5, color="#2980b9",
               label="trial within budget (area: size)")
    front = sorted(pareto(result.trials), key=lambda r: r["latency_ratio"])
    ax.plot([r["latency_ratio"] for r in front], [r["score"] for r in front], "-o", color="#2e8b57", ms=4,
            label="Pareto front (score, latency, size)")
    for r in done:
        ax.annotate(str(r["trial"]), (r["latency_ratio"], r["score"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(result.reference_score - result.accuracy_budget, color="#c0392b", ls="--", lw=1,
               label="budget floor")
    ax.axhline(result.reference_score, color="#555", ls=":", lw=1, label="original")
    best = result.best_row
    if best:
        ax.scatter([best["latency_ratio"]], [best["score"]], s=260, facecolors="none", edgecolors="#c0392b",
                   lw=2, label=f"chosen (trial {best['trial']})")
    ax.axvline(1.0, color="#999", lw=0.8)
    ax.set_xlabel(f"latency / original's on {result.target} (lower is faster)")
    ax.set_ylabel("score (evaluate)")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def _importance_plot(result: Any) -> str | None:
    if not result.importance:
        return None
    plt = _pyplot()
    names = list(result.importance)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.2))
    ax.barh(names, [result.importance[n] for n in names], color="#2980b9")
    ax.set_xlabel("importance for the latency ratio (Optuna fANOVA, sums to 1)")
    return _png(fig)
