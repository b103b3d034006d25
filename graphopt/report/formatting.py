"""How a report shows its numbers: sizes in binary units, latency with its spread, error in a few characters.

Shared by the text table (`Report`, in this package's `__init__`), the HTML page (`html.py`) and the command line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: the package's __init__ imports this module
    from . import PassRecord


def format_number(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or `-` when not measured."""
    return "-" if value is None else format(value, spec)


UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def size_unit(n: float) -> str:
    """The largest binary unit in which `n` bytes is at least 1."""
    return next((u for u in ("GiB", "MiB", "KiB") if n >= UNITS[u]), "B")


def format_bytes(n: float, unit: str | None = None) -> str:
    """`n` bytes in `unit` (default: the unit that fits `n`)."""
    unit = unit or size_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / UNITS[unit]:.2f} {unit}"


def format_latency(record: PassRecord) -> str:
    """Median latency in ms, with its p10–p90 spread when measured: `12.3 (11.9–13.0)`."""
    if record.latency_ms is None:
        return "-"
    if record.latency_p10_ms is None or record.latency_p90_ms is None:
        return f"{record.latency_ms:.2f}"
    return f"{record.latency_ms:.2f} ({record.latency_p10_ms:.2f}–{record.latency_p90_ms:.2f})"


def format_error(record: PassRecord) -> str:
    """The error against the original in a few characters: `cos 0.99912 rel 3.1e-03`, or `-`."""
    parts = []
    if record.min_cosine is not None:
        parts.append(f"cos {record.min_cosine:.5f}")
    if record.max_rel_err is not None:
        parts.append(f"rel {record.max_rel_err:.1e}")
    return " ".join(parts) or "-"
