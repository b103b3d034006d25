"""Which passes run, in which order, for a set of options.

    canonicalize → fuse → prune (O3) → quantize (O2) → canonicalize

Every candidate pass is listed (so enable=/disable= can name any of them);
the pass manager then keeps those at or below the requested level.
"""
from __future__ import annotations

from typing import Any

from .config import Options
from .errors import UnsupportedError
from .passes import canonicalize, fusion


def build_passes(options: Options) -> list[Any]:
    passes: list[Any] = [*canonicalize.passes(), *fusion.passes()]
    if options.prune is not None:
        raise UnsupportedError("prune= (structured pruning, level O3) is not available yet in this version")
    if options.quantize is not None:
        raise UnsupportedError(f"quantize={options.quantize!r} (int8, level O2) is not available yet in this version")
    passes += canonicalize.passes()
    return passes

