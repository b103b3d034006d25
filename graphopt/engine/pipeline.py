"""Which passes run, in which order, for a set of options.

    canonicalize → fuse → prune (O3) → skip padding → quantize (O2) → canonicalize

Skip padding runs after the rewrites that read the whole graph's shapes (fusion, pruning) and
before int8, so the int8 layers inside its segments quantize and multiply the real rows only.

Every candidate pass is listed (so enable=/disable= can name any of them);
the pass manager then keeps those at or below the requested level. The
closing canonicalization runs under its own names (`cse (final)`, …), so
`report["cse"]` is the first one and `report["cse (final)"]` the last.
"""
from __future__ import annotations

from typing import Any

from ..passes import canonicalize, fusion, padding, pruning, quantize
from .config import Options


#: Suffix of the closing canonicalization passes' names.
FINAL_SUFFIX = " (final)"


def build_passes(options: Options) -> list[Any]:
    passes: list[Any] = [*canonicalize.passes(), *fusion.passes()]
    if options.prune is not None:
        passes += pruning.passes(options)
    passes += padding.passes()
    if options.quantize is not None:
        passes += quantize.passes(options)
    passes += [p.renamed(FINAL_SUFFIX) for p in canonicalize.passes()]
    return passes
