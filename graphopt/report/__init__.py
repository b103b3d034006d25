"""The optimization report: what each pass bought and what it cost.

One `PassRecord` per pass run (plus the captured baseline and the final
module): wall time of the pass, compute nodes, parameter bytes, latency on
the example inputs, error against the original model, whether it was rolled
back and why, and the pass's own statistics (matches, rejections, layers).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .formatting import format_bytes, format_latency, format_number, size_unit


@dataclass
class PassRecord:
    name: str
    wall_s: float
    nodes: int
    param_bytes: int
    latency_ms: float | None = None
    latency_p10_ms: float | None = None     # spread of the latency samples (10th / 90th percentile)
    latency_p90_ms: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    min_cosine: float | None = None
    modified: bool = False
    rolled_back: bool = False
    reason: str | None = None
    code: str | None = None                 # graphopt.engine.rules.Reason of a rollback (reason is its prose)
    reproducer: str | None = None
    speed: str | None = None                # speed check verdict against the graph before the pass
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def matches(self) -> dict[str, int]:
        return dict(self.stats.get("matches", {}))

    @property
    def reasons(self) -> dict[str, int]:
        """{rejection code: count} of the candidates this pass looked at and did not rewrite."""
        return dict(self.stats.get("reasons", {}))


@dataclass
class Report:
    records: list[PassRecord] = field(default_factory=list)
    baseline: PassRecord | None = None
    final: PassRecord | None = None
    meta: dict[str, Any] = field(default_factory=dict)   # level, options, capture notes, accuracy …

    def __getitem__(self, name: str) -> PassRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no pass named {name!r} in the report; passes: {[r.name for r in self.records]}")

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.rolled_back]

    def matches(self) -> dict[str, int]:
        """Total matches of every rewrite pattern over all passes."""
        total: dict[str, int] = {}
        for record in self.records:
            if record.rolled_back:
                continue
            for pattern, count in record.matches.items():
                total[pattern] = total.get(pattern, 0) + count
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "baseline": asdict(self.baseline) if self.baseline else None,
            "passes": [asdict(r) for r in self.records],
            "final": asdict(self.final) if self.final else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_html(self, path: str) -> Any:
        """Write the report as a self-contained HTML page with plots (see graphopt.report.html)."""
        from .html import write_html
        return write_html(self, path)

    @property
    def size_unit(self) -> str:
        """The one unit every size of this report is shown in (the one that fits the largest)."""
        sizes = [r.param_bytes for r in self._all() if r is not None]
        sizes += [v for k, v in self.meta.items() if k.endswith("_bytes") and isinstance(v, (int, float))]
        return size_unit(max(sizes, default=0))

    def _all(self) -> list[PassRecord]:
        return ([self.baseline] if self.baseline else []) + self.records + ([self.final] if self.final else [])

    def rows(self) -> list[list[str]]:
        unit = self.size_unit
        rows = []
        for r in ([self.baseline] if self.baseline else []) + self.records:
            status = "rolled back" if r.rolled_back else ("changed" if r.modified else "-")
            rows.append([r.name, f"{r.wall_s * 1e3:.0f}", str(r.nodes), format_bytes(r.param_bytes, unit),
                         format_latency(r), format_number(r.max_abs_err, ".2e"), format_number(r.max_rel_err, ".2e"),
                         format_number(r.min_cosine, ".5f"), status, _summary(r)])
        return rows

    HEADER = ["pass", "time ms", "nodes", "params", "latency ms", "max abs err", "max rel err", "min cosine",
              "status", "notes"]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows()]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def summary(self) -> str:
        if not (self.baseline and self.final):
            return "no passes run"
        b, f = self.baseline, self.final
        unit = self.size_unit
        parts = [f"nodes {b.nodes} → {f.nodes}",
                 f"params {format_bytes(b.param_bytes, unit)} → {format_bytes(f.param_bytes, unit)}"]
        if b.latency_ms and f.latency_ms:
            parts.append(f"latency {format_latency(b)} → {format_latency(f)} ms ({b.latency_ms / f.latency_ms:.2f}×)")
        if f.min_cosine is not None:
            parts.append(f"min cosine {f.min_cosine:.5f}")
        if f.max_rel_err is not None:
            parts.append(f"max rel err {f.max_rel_err:.2e}")
        if self.rolled_back:
            parts.append(f"{len(self.rolled_back)} pass(es) rolled back")
        if self.meta.get("speed"):
            parts.append(self.meta["speed"])
        timing = self.meta.get("timing")
        if timing and b.latency_ms:
            parts.append(f"timed on the example inputs, {timing['threads']} threads, load {timing['load_1min']} "
                         f"on {timing['cores']} cores; latency: median (p10–p90)")
        return "; ".join(parts)

    def __str__(self) -> str:
        rows = [self.HEADER] + self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER))]
        widths[-1] = min(widths[-1], 60)
        def fmt(row: list[str]) -> str:
            return "  ".join(cell[:widths[i]].ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        lines = [fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]]
        for r in self.rolled_back:
            lines.append(f"! {r.name}: {r.reason}" + (f" (reproducer: {r.reproducer})" if r.reproducer else ""))
        lines.append(self.summary())
        return "\n".join(lines)

    __repr__ = __str__


def _summary(record: PassRecord) -> str:
    if record.rolled_back:
        return record.reason or ""
    parts = [f"{k}×{v}" for k, v in record.matches.items()]
    rejected = record.stats.get("rejected") or []
    if rejected:
        parts.append(f"{len(rejected)} rejected")
    if record.speed:
        parts.append(record.speed)
    return ", ".join(parts)


def environment() -> dict[str, Any]:
    """Date, package versions and machine of this run, for a report's header."""
    import datetime
    import platform
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for package in ("graphopt", "torch", "onnx", "onnxruntime", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "versions": versions,
            "machine": f"{cpu_name()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the benchmarks' machine stamp uses it too)."""
    import platform
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_report(path: str | os.PathLike) -> Report:
    """A `Report` from the JSON that `Report.to_json()` wrote (`--report` saves it beside the HTML)."""
    from ..errors import InputError   # errors is light; kept local so report stays the import floor
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
