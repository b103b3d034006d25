"""The optimization report: what each pass bought and what it cost.

One `PassRecord` per pass run (plus the captured baseline and the final
module): wall time of the pass, compute nodes, parameter bytes, latency on
the example inputs, error against the original model, whether it was rolled
back and why, and the pass's own statistics (matches, rejections, layers).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassRecord:
    name: str
    wall_s: float
    nodes: int
    param_bytes: int
    latency_ms: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    min_cosine: float | None = None
    modified: bool = False
    rolled_back: bool = False
    reason: str | None = None
    reproducer: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def matches(self) -> dict[str, int]:
        return dict(self.stats.get("matches", {}))


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
        """Write the report as a self-contained HTML page with plots (see graphopt.report_html)."""
        from .report_html import write_html
        return write_html(self, path)

    def rows(self) -> list[list[str]]:
        rows = []
        for r in ([self.baseline] if self.baseline else []) + self.records:
            status = "rolled back" if r.rolled_back else ("changed" if r.modified else "-")
            rows.append([r.name, f"{r.wall_s * 1e3:.0f}", str(r.nodes), _bytes(r.param_bytes),
                         _num(r.latency_ms, ".2f"), _num(r.max_abs_err, ".2e"), _num(r.max_rel_err, ".2e"),
                         status, _summary(r)])
        return rows

    HEADER = ["pass", "time ms", "nodes", "params", "latency ms", "max abs err", "max rel err", "status", "notes"]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows()]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def summary(self) -> str:
        if not (self.baseline and self.final):
            return "no passes run"
        b, f = self.baseline, self.final
        parts = [f"nodes {b.nodes} → {f.nodes}", f"params {_bytes(b.param_bytes)} → {_bytes(f.param_bytes)}"]
        if b.latency_ms and f.latency_ms:
            parts.append(f"latency {b.latency_ms:.2f} → {f.latency_ms:.2f} ms ({b.latency_ms / f.latency_ms:.2f}×)")
        if f.max_rel_err is not None:
            parts.append(f"max rel err {f.max_rel_err:.2e}")
        if self.rolled_back:
            parts.append(f"{len(self.rolled_back)} pass(es) rolled back")
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


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(record: PassRecord) -> str:
    if record.rolled_back:
        return record.reason or ""
    parts = [f"{k}×{v}" for k, v in record.matches.items()]
    rejected = record.stats.get("rejected") or []
    if rejected:
        parts.append(f"{len(rejected)} rejected")
    return ", ".join(parts)
