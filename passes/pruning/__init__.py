"""Structured pruning (level O3)."""
from __future__ import annotations

from typing import Any

from graphopt.errors import UnsupportedError


def passes(options: Any) -> list[Any]:
    """The pruning passes for `options.prune` (a ratio or {pattern: ratio}) and `options.prune_options`."""
    raise UnsupportedError("prune= (structured pruning, level O3) is not available yet in this version")
