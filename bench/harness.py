"""Benchmark harness shared by every `bench/*.py`.

- `time_call(fn)`: graphopt's one timer (warm-up, repeats, median and spread)
  with torch pinned to the machine's cores, so every anchor in a table is
  timed the same way in the same run; `interleaved(calls, rounds)`: graphopt's
  interleaved timer (the pass manager's speed check) under the same pinning.
- `write_results(name, title, rows, notes)`: writes bench/results/<name>.md
  (a table a person reads) and <name>.json (the same rows, for tools), both
  stamped with the machine and package versions.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from graphopt.report import cpu_name
from graphopt.engine.speed import interleaved_timer
from graphopt.engine.timing import Timing, measure

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "triton", "transformers", "numpy",
            "torch-pruning", "onnxsim")


def pin_threads() -> int:
    """Use every core of the machine for intra-op work, one inter-op thread; returns the count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def time_call(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, max_seconds: float = 30.0) -> Timing:
    """Median wall time of `fn()` under no_grad, threads pinned."""
    pin_threads()
    with torch.inference_mode():
        return measure(fn, warmup=warmup, repeats=repeats, max_seconds=max_seconds)


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    """Round-robin timing with graphopt's interleaved timer (`graphopt.engine.speed.interleaved_timer`: one call of
    each function per round, order rotating, `rounds` rounds after a warm-up call of each), so load on a
    shared machine hits every candidate alike. Threads pinned, autograd off."""
    pin_threads()
    timed = interleaved_timer(calls, rounds)
    return {name: timed.timing(name) for name in calls}


def rows_against(timings: dict[str, Timing], anchor: str, label: str, ratio: str,
                 **columns: Any) -> list[dict[str, Any]]:
    """A table row per timed candidate: `columns`, its name under `label`, its median and p10–p90 in ms, and its
    time over the `anchor`'s under `ratio` (< 1 is faster)."""
    base = timings[anchor].median_s
    return [{**columns, label: name, "ms (median)": 1e3 * timing.median_s,
             "ms p10–p90": f"{1e3 * timing.p10_s:.3f}–{1e3 * timing.p90_s:.3f}", ratio: timing.median_s / base}
            for name, timing in timings.items()]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_vector_isa": torch.backends.cpu.get_cpu_capability(),   # which of ATen's kernels run (AVX2, AVX512)
        "cores": pin_threads(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        info["graphopt_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                 text=True, cwd=RESULTS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def write_results(name: str, title: str, rows: list[dict[str, Any]], notes: str = "") -> Path:
    """Write bench/results/<name>.md and .json; returns the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"# {title}", "", _table(columns, rows), ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["Machine and versions: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None), ""]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines))
    (RESULTS / f"{name}.json").write_text(json.dumps({"title": title, "machine": info, "rows": rows,
                                                       "notes": notes}, indent=2, default=str))
    return md


def earlier_rows(name: str, running: list[str]) -> list[dict[str, Any]]:
    """The rows of an earlier run's bench/results/NAME.json for models not in `running` (their "model" column),
    tagged in a "run" column with the commit and date they came from: a run of some models keeps the others."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    stamp = f"{earlier['machine'].get('graphopt_commit', '?')} {earlier['machine'].get('date', '?')}"
    return [{**row, "run": row.get("run", stamp)} for row in earlier["rows"] if row["model"] not in running]


def _table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "\\|")
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])
