"""The dynamo backend named "graphopt", and the subgraphs it compiled in this process.

`torch.compile(model, backend="graphopt", options={...})` finds `graphopt_backend` through the
`torch_dynamo_backends` entry point in pyproject.toml, when the name is first used: nothing is
registered with dynamo when graphopt is imported.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch.fx as fx

from ..report import Report
from .backend import GraphoptBackend, Subgraph


#: Subgraphs compiled through the registered name "graphopt", oldest first (see `reports`).
_REGISTERED: list[Subgraph] = []


def graphopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                     options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """`torch.compile(model, backend="graphopt", options={...})`: see the module docstring."""
    return GraphoptBackend(options, _REGISTERED)(gm, example_inputs)


def subgraphs() -> list[Subgraph]:
    """Every subgraph the registered "graphopt" backend compiled in this process, oldest first."""
    return list(_REGISTERED)


def reports() -> list[Report]:
    """The reports of the subgraphs the registered "graphopt" backend optimized, oldest first."""
    return [s.report for s in _REGISTERED if s.report is not None]


def clear() -> None:
    """Forget the subgraphs of the registered backend (e.g. after `torch._dynamo.reset()`)."""
    _REGISTERED.clear()
