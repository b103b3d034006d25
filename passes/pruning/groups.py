"""Dependency analysis, the driver: which channels of the captured ATen graph must be pruned together.

A *source* is an op that creates a channel dimension from weights: the
output channels of `conv2d`/`conv1d`/`linear` (weight dim 0) and the
features of `embedding` (weight dim 1). The analysis walks the graph in
order and annotates every tensor dimension that carries source channels with
*segments*: `Seg(group, start, block, count)` says that unit `u` of `group`
(u < count) occupies elements `[start + u·block, start + (u+1)·block)` of
that dimension. A unit is the smallest thing pruned: one channel, or one
attention head (`block = head_dim`) once a `view` splits the dimension.

Ops map segments from inputs to outputs:

- element-wise ops, BatchNorm, pooling, dropout, `getitem`: same dimension;
  a broadcast operand with the full channel size couples its channels (a
  residual `add` merges the groups of both sides: union-find), a constant
  operand is sliced with them;
- `cat`: offsets shift; `split`/`chunk`/static `slice`: offsets shift, and a
  segment cut in two splits its source into parts (so fused QKV becomes three
  groups, whether split or sliced);
- `view`/`reshape`/`flatten`/`permute`/`transpose`/`unsqueeze`/`expand`:
  dimensions are factored; a merged dimension multiplies `block`
  (conv → flatten → linear), a split one divides it and, when a unit would be
  cut, makes the group's units coarser (channels → heads);
- consumers (`conv` input channels, `linear` input features) record their
  weight's dim 1 as *members*; depthwise convolutions carry the group through
  (their `groups` constant is rewritten), grouped convolutions prune the
  same channels in every group; GroupNorm keeps whole norm groups;
- `scaled_dot_product_attention` and batched `matmul` couple the head
  dimension of Q, K and V (grouped-query K/V heads by group).

Anything else that touches an annotated dimension — an unknown op, a
reduction or softmax over it, a LayerNorm normalizing it, a graph output, a
shape constant computed at run time — is a *boundary*: the groups there are
not pruned and the reason names the op. Coarser units and source cuts are
found by re-running the walk (a few rounds at most).

Where things are: the data model (Seg, Member, Group, Analysis) in `model.py`; this module walks the
graph, keeps the union-find over groups and settles the rounds; each op's rule is in the registry
`op_rules/` (`{aten op: rule}`); the index algebra of reshapes in `index.py`.
"""
from __future__ import annotations

from collections import defaultdict
from fnmatch import fnmatch
from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.engine import ir

from .model import Analysis, Group, Member, Seg, dims_of, flat, is_attr, tensor_args
from .op_rules import ELEMENTWISE, RULES

aten = torch.ops.aten

MAX_ROUNDS = 16


class Walk:
    """One pass over the graph under the current unit sizes and source cuts; rules record on it."""

    def __init__(self, gm: fx.GraphModule, gran: dict[str, int], cuts: dict[str, set[int]],
                 ignored: list[str]) -> None:
        self.gm, self.gran, self.cuts, self.ignored = gm, gran, cuts, ignored
        self.ann: dict[fx.Node, Any] = {}
        self.parent: dict[str, str] = {}
        self.info: dict[str, tuple[str, int, int, int]] = {}  # group -> (source node, elem start, gran, units)
        self.members: list[Member] = []
        self.blocked: dict[str, list[str]] = defaultdict(list)
        self.modules: dict[str, set[str]] = defaultdict(set)
        self.rewrites: list[fx.Node] = []
        self.new_gran: dict[str, int] = {}
        self.new_cuts: dict[str, set[int]] = defaultdict(set)

    # union-find over groups
    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def block(self, segs: Iterable[Seg], reason: str) -> None:
        for seg in segs:
            self.blocked[seg.group].append(reason)

    def block_node_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in tensor_args(node):
            for segs in dims_of(self.ann.get(arg)).values():
                self.block(segs, reason)

    # requests for coarser units or source cuts: the walk is then run again
    def coarsen(self, seg: Seg, factor: int) -> None:
        """Make the units of `seg.group` `factor` times coarser (e.g. channels -> heads)."""
        coupled = [o for o in self.info if self.find(o) == self.find(seg.group)]
        for other in coupled:
            _, _, g, units = self.info[other]
            if (g * units) % (g * factor) or self.blocked.get(other):
                self.block([seg], f"units of {g * factor} channels do not divide the {g * units} of {other}")
                return
        for other in coupled:
            g = self.info[other][2]
            self.new_gran[other] = max(self.new_gran.get(other, g), g * factor)

    def cut(self, seg: Seg, unit: int) -> None:
        for other, (src, start, gran, _) in self.info.items():
            if self.find(other) == self.find(seg.group):
                self.new_cuts[src].add(start + unit * gran)

    # sources
    def source(self, node: fx.Node, channels: int, weight: str, dims: tuple[int, ...],
               groups: int = 1) -> tuple[Seg, ...]:
        """Segments of a new source of `channels` channels (split in `groups` equal conv groups)."""
        name = node.name
        module = weight.rpartition(".")[0]
        per = channels // groups
        ignored = any(fnmatch(module, p) or fnmatch(weight, p) for p in self.ignored)
        bounds = sorted({0, per, *(c for c in self.cuts.get(name, ()) if 0 < c < per)}) if groups == 1 else [0, per]
        segs: list[Seg] = []
        for start, end in zip(bounds, bounds[1:]):
            gid = f"{name}" if (start, end) == (0, per) else f"{name}[{start}:{end}]"
            gran = self.gran.get(gid, 1)
            if (end - start) % gran:
                gran = end - start
            units, block = (end - start) // gran, gran
            self.parent[gid] = gid
            self.info[gid] = (name, start, gran, units)
            self.modules[gid].add(module)
            if (end - start) % gran:
                self.blocked[gid].append(f"{name}: {end - start} channels do not split into units of {gran}")
            if ignored:
                self.blocked[gid].append(f"{module} is in ignored")
            for g in range(groups):
                segs.append(Seg(gid, g * per + start, block, units))
        segs_t = tuple(segs)
        for d in dims:
            for seg in segs_t:
                self.members.append(Member(weight, d, seg, "out"))
        return segs_t

    def member(self, arg: object, dim: int, segs: Iterable[Seg], role: str) -> bool:
        if not isinstance(arg, fx.Node):
            return True
        if arg.op != "get_attr":
            return False
        for seg in segs:
            self.members.append(Member(str(arg.target), dim, seg, role))
            self.modules[seg.group].add(str(arg.target).rpartition(".")[0])
        return True

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for arg in flat(node.args):
                    if isinstance(arg, fx.Node):
                        for segs in dims_of(self.ann.get(arg)).values():
                            self.block(segs, "reaches a graph output (outputs keep their shape)")
                continue
            if node.op != "call_function":
                if node.op == "call_module" and node.target not in ir.GUARD_MODULES:
                    self.block_node_inputs(node, f"call_module {node.target} (unknown to the analysis)")
                continue
            if not any(dims_of(self.ann.get(a)) for a in tensor_args(node)) and not _is_source(node):
                continue
            self.visit(node)


    def visit(self, node: fx.Node) -> None:
        target = _functional(ir.overload_packet(node.target))
        rule = RULES.get(target)
        if rule is None:
            return self.unknown(node)
        return rule(self, node, target)

    def unknown(self, node: fx.Node) -> None:
        """An op the analysis has no rule for: a boundary for every channel it reads."""
        self.block_node_inputs(node, f"unknown op {ir.overload_packet(node.target)} ({node.name})")

    def couple(self, a: tuple[Seg, ...], b: tuple[Seg, ...], node: fx.Node, ratio: int = 1) -> None:
        """Channels `a` and `b` meet element by element (b's blocks are `ratio` times smaller)."""
        if len(a) != len(b) or any(x.start != y.start * ratio or x.end != y.end * ratio for x, y in zip(a, b)):
            self.block(a + b, f"{node.name}: operands carry differently laid out channels")
            return
        for x, y in zip(a, b):
            if x.count != y.count:
                small, big = (x, y) if x.count > y.count else (y, x)
                self.coarsen(small, small.count // big.count if small.count % big.count == 0 else small.count)
            self.union(x.group, y.group)

    def check_size_args(self, node: fx.Node, out: dict[int, tuple[Seg, ...]]) -> None:
        sizes = node.args[1]
        for d, segs in out.items():
            if isinstance(sizes[d], fx.Node):
                self.block(segs, f"{node.name}: size of a pruned dimension computed at run time")
        if out:
            self.rewrites.append(node)


def analyze(gm: fx.GraphModule, ignored: Iterable[str] = ()) -> Analysis:
    """Channel groups of `gm` (see the module docstring)."""
    gran: dict[str, int] = {}          # channels per unit, by group
    cuts: dict[str, set[int]] = {}     # channel offsets where a source splits into groups
    for _ in range(MAX_ROUNDS):
        walk = Walk(gm, gran, cuts, list(ignored))
        walk.run()
        changed = False
        for gid, g in walk.new_gran.items():
            if gran.get(gid, 1) != g:
                gran[gid], changed = g, True
        for src, c in walk.new_cuts.items():
            if not c <= cuts.get(src, set()):
                cuts[src], changed = cuts.get(src, set()) | c, True
        if changed:
            continue
        return _finish(walk)
    for gid in walk.info:   # requests kept coming: prune nothing rather than guess
        walk.blocked[gid].append("channel analysis did not settle")
    return _finish(walk)


def _finish(walk: Walk) -> Analysis:
    # a weight read by several layers (ALBERT's shared layers, tied weights) couples their channels where
    # the layouts agree: the shared tensor is sliced once for all its readers; conflicting layouts block below
    first: dict[tuple[str, int, int, int, int], str] = {}
    for m in walk.members:
        key = (m.attr, m.dim, m.seg.start, m.seg.block, m.seg.count)
        walk.union(first.setdefault(key, m.seg.group), m.seg.group)
    find = walk.find
    groups: dict[str, Group] = {}
    for gid, (src, _, gran, units) in walk.info.items():
        root = find(gid)
        group = groups.setdefault(root, Group(root, units, [], [], gran=gran))
        group.sources.append(src)
        if group.units != units:
            group.blocked.append(f"coupled sources with different unit counts ({group.units} vs {units})")
    modules: dict[str, set[str]] = defaultdict(set)
    for gid, mods in walk.modules.items():
        modules[find(gid)] |= mods
    for gid, reasons in walk.blocked.items():
        groups[find(gid)].blocked += [r for r in reasons if r not in groups[find(gid)].blocked]
    remap = lambda s: Seg(find(s.group), s.start, s.block, s.count)  # noqa: E731
    seen: dict[tuple[str, int], list[Seg]] = defaultdict(list)
    for m in walk.members:
        member = Member(m.attr, m.dim, remap(m.seg), m.role)
        if member.seg not in seen[(m.attr, m.dim)]:
            seen[(m.attr, m.dim)].append(member.seg)
            groups[member.seg.group].members.append(member)
    for (attr, dim), segs in seen.items():   # a tensor shared by two places must agree on its layout
        ordered = sorted(segs, key=lambda s: s.start)
        if any(x.end > y.start for x, y in zip(ordered, ordered[1:])):
            for s in segs:
                groups[s.group].blocked.append(f"{attr} dim {dim} is shared with conflicting channel layouts")
    for root, group in groups.items():
        group.modules = sorted(m for m in modules[root] if m)
        group.sources = sorted(set(group.sources))
    ann = {node: _remap_ann(value, remap) for node, value in walk.ann.items()}
    boundaries = sorted({r for g in groups.values() for r in g.blocked})
    rewrites = list(dict.fromkeys(walk.rewrites))
    return Analysis(groups, ann, rewrites, boundaries)


def _remap_ann(value: Any, remap: Any) -> Any:
    if isinstance(value, list):
        return [_remap_ann(v, remap) for v in value]
    return {d: tuple(remap(s) for s in segs) for d, segs in (value or {}).items()}




def _is_source(node: fx.Node) -> bool:
    return (ir.is_op(node, aten.conv1d, aten.conv2d, aten.conv3d, aten.linear, aten.embedding)
            or (ir.is_op(node, aten.addmm) and is_attr(node.args[2]))
            or (ir.is_op(node, aten.mm) and is_attr(node.args[1])))


def _functional(packet: object) -> object:
    """`aten.add_` -> `aten.add`: an in-place element-wise op keeps its first operand's layout, so its
    channels follow the same rule (torch.export keeps `x += y` and `nn.SiLU(inplace=True)` in place)."""
    name = getattr(packet, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        functional = getattr(aten, name[:-1], None)
        if functional in ELEMENTWISE:
            return functional
    return packet


def matching_groups(analysis: Analysis, pattern: str) -> list[Group]:
    """Prunable groups whose modules (or sources) match `pattern` (fnmatch)."""
    return [g for g in analysis.prunable()
            if any(fnmatch(m, pattern) for m in g.modules) or any(fnmatch(s, pattern) for s in g.sources)]
