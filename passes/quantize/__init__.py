"""Int8 rewriting (level O2)."""
from __future__ import annotations

from typing import Any

from graphopt.errors import UnsupportedError


def passes(options: Any) -> list[Any]:
    """The int8 passes for `options.quantize` (a scheme name) and `options.quantize_options`."""
    raise UnsupportedError(f"quantize={options.quantize!r} (int8, level O2) is not available yet in this version")
