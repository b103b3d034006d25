"""The op-rule registry of the channel analysis: `{ATen op packet: rule}`.

A rule is `rule(walk, node, target) -> None`: `target` is the node's functional op packet (`aten.add_`
is looked up as `aten.add`). It maps the segments of the node's inputs to its output (`walk.ann[node]`)
and records on `walk` what must be pruned together (`member`, `couple`, `source`), where pruning stops
(`block`, with the reason) and what needs another round (`coarsen`, `cut`). An op with no rule is a
boundary (`Walk.unknown`).

To teach the analysis a new op, write its rule in `layers.py` (ops with weights, normalizations) or
`tensors.py` (everything else) and add it to that module's `RULES`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch.fx as fx

from . import layers, tensors

if TYPE_CHECKING:
    from ..groups import Walk

Rule = Callable[["Walk", fx.Node, object], None]

RULES: dict[object, Rule] = {**layers.RULES, **tensors.RULES}
ELEMENTWISE = tensors.ELEMENTWISE

__all__ = ["RULES", "ELEMENTWISE", "Rule"]
