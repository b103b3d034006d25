"""Route 1 of graphopt with torch.compile: the optimized GraphModule run through inductor (see __init__.py)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


class InductorRunner:
    """`gm` compiled by `torch.compile(backend="inductor")` on the first call.

    A plain object, not a Module (the graph stays registered once, as the owner's
    `graph_module`). A deep copy (e.g. `graphopt.finetune`'s) compiles the copied graph
    afresh instead of sharing the original's compiled code and weights.
    """

    def __init__(self, gm: fx.GraphModule, dynamic_batch: bool) -> None:
        self.gm, self.dynamic_batch = gm, dynamic_batch
        self.compiled = torch.compile(gm, backend="inductor")
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls == 0 and self.dynamic_batch:
            args, kwargs = pytree.tree_map(_dynamic_batch_view, (args, kwargs))
        self.calls += 1
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "InductorRunner":
        return InductorRunner(copy.deepcopy(self.gm, memo), self.dynamic_batch)


def _dynamic_batch_view(leaf: Any) -> Any:
    """An alias of a tensor input with dimension 0 marked dynamic (the caller's tensor is not touched)."""
    if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
        return leaf
    alias = leaf.view_as(leaf)
    torch._dynamo.maybe_mark_dynamic(alias, 0)
    return alias
