"""The data model of the channel analysis (groups.py): segments, members, groups, and the annotation of a node.

An annotation maps a node to `{dim: (Seg, …)}`, or to a list of those for an op with several outputs
(split, a pooling returning indices); `dims_of` reads either as one `{dim: segments}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class Seg:
    group: str
    start: int
    block: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.block * self.count


@dataclass(frozen=True)
class Member:
    """Dimension `dim` of parameter/buffer `attr` holds `seg`; role: out | in | param."""
    attr: str
    dim: int
    seg: Seg
    role: str


@dataclass
class Group:
    """Coupled channels pruned as one: `units` units of `block` channels at each source."""
    name: str
    units: int
    sources: list[str]                   # source node names
    modules: list[str]                   # module paths of the weights involved
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    gran: int = 1                        # channels per unit at the sources

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.units > 1


@dataclass
class Analysis:
    groups: dict[str, Group]
    ann: dict[fx.Node, Any]              # node -> {dim: (Seg, …)} (a list of those for tuple outputs)
    rewrites: list[fx.Node]              # nodes whose constants follow the new channel counts
    boundaries: list[str]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups.values() if g.prunable]

    def segs(self, node: fx.Node, dim: int) -> tuple[Seg, ...]:
        value = self.ann.get(node) or {}
        return value.get(dim, ()) if isinstance(value, dict) else ()


def dims_of(value: Any) -> dict[int, tuple[Seg, ...]]:
    """The annotated dimensions of a node's annotation (merged over the outputs of a multi-output op)."""
    if isinstance(value, list):
        merged: dict[int, tuple[Seg, ...]] = {}
        for v in value:
            for d, s in (v or {}).items():
                merged[d] = merged.get(d, ()) + s
        return merged
    return {d: s for d, s in (value or {}).items() if s}


def flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += flat(a)
        else:
            out.append(a)
    return out


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in flat(list(node.args) + list(node.kwargs.values())) if isinstance(a, fx.Node)]


def is_attr(arg: object) -> bool:
    """A parameter or buffer of the graph (a get_attr node)."""
    return isinstance(arg, fx.Node) and arg.op == "get_attr"

