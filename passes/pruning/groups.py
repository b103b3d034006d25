"""Dependency analysis: which channels of the captured ATen graph must be pruned together.

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
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

from graphopt import ir

aten = torch.ops.aten

ELEMENTWISE = {
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.hardtanh, aten.hardswish,
    aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish, aten.softplus, aten.relu6, aten.dropout,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to, aten.abs, aten.neg,
    aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.clamp, aten.clamp_min, aten.clamp_max, aten.erf,
    aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where, aten.pow,
    aten.type_as, aten.square, aten.sin, aten.cos, aten.reciprocal, aten.feature_dropout,
}
RESHAPES = {aten.view, aten.reshape, aten._unsafe_view}
POOLS = {aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten.avg_pool2d, aten.avg_pool1d,
         aten.max_pool2d, aten.max_pool1d, aten.adaptive_max_pool2d}
REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin}
SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
SPLITS = {aten.split, aten.split_with_sizes, aten.chunk}
MAX_ROUNDS = 16


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


class _Walk:
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
        for arg in _tensor_args(node):
            for segs in _dims_of(self.ann.get(arg)).values():
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
                for arg in _flat(node.args):
                    if isinstance(arg, fx.Node):
                        for segs in _dims_of(self.ann.get(arg)).values():
                            self.block(segs, "reaches a graph output (outputs keep their shape)")
                continue
            if node.op != "call_function":
                if node.op == "call_module" and node.target not in ir.GUARD_MODULES:
                    self.block_node_inputs(node, f"call_module {node.target} (unknown to the analysis)")
                continue
            if not any(_dims_of(self.ann.get(a)) for a in _tensor_args(node)) and not _is_source(node):
                continue
            self.visit(node)

    # the op rules
    def visit(self, node: fx.Node) -> None:
        target = _functional(ir.overload_packet(node.target))
        if target in (aten.conv1d, aten.conv2d, aten.conv3d):
            return self.conv(node)
        if target is aten.linear:
            return self.linear(node)
        if target in (aten.addmm, aten.mm) and _is_attr(node.args[2 if target is aten.addmm else 1]):
            return self.addmm(node, target)
        if target is aten.embedding:
            return self.embedding(node)
        if target is aten.batch_norm:
            return self.norm_params(node, node.args[1:5])
        if target is aten.group_norm:
            return self.group_norm(node)
        if target is aten.layer_norm:
            return self.layer_norm(node)
        if target in ELEMENTWISE:
            return self.elementwise(node)
        if target in RESHAPES or target is aten.flatten or target is aten.expand:
            return self.reshape(node, target)
        if target in (aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.select,
                      aten.slice, aten.roll):
            return self.dim_map(node, target)
        if target in POOLS:
            return self.pool(node)
        if target in REDUCTIONS:
            return self.reduction(node)
        if target in SOFTMAX:
            return self.softmax(node)
        if target is aten.cat:
            return self.cat(node)
        if target in SPLITS:
            return self.split(node, target)
        if node.target is operator.getitem:
            value = self.ann.get(node.args[0])
            if isinstance(value, list):
                self.ann[node] = value[node.args[1]]
            else:
                self.block_node_inputs(node, f"getitem on {node.args[0].name}")
            return None
        if target is aten.scaled_dot_product_attention:
            return self.sdpa(node)
        if target in (aten.matmul, aten.bmm):
            return self.matmul(node)
        self.block_node_inputs(node, f"unknown op {ir.overload_packet(node.target)} ({node.name})")
        return None

    def conv(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        groups = node.args[6] if len(node.args) > 6 else 1
        wshape = ir.shape(w)
        xin = _dims_of(self.ann.get(x))
        for d, segs in xin.items():
            if d != 1:
                self.block(segs, f"{node.name}: conv over a pruned non-channel dimension")
        in_segs = xin.get(1, ())
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or wshape is None:
            self.block(in_segs, f"{node.name}: conv weight computed at run time")
            return
        cout, cin_g = wshape[0], wshape[1]
        out_segs: tuple[Seg, ...]
        if groups > 1 and cin_g == 1:  # depthwise (channel multiplier m): the group carries through
            m = cout // groups
            out_segs = tuple(Seg(s.group, s.start * m, s.block * m, s.count) for s in in_segs)
            self.member(w, 0, out_segs, "out")
            if bias is not None:
                self.member(bias, 0, out_segs, "param")
            if in_segs:
                self.rewrites.append(node)
            covered = sum(s.block * s.count for s in out_segs)
            if in_segs and covered != cout:
                self.block(in_segs, f"{node.name}: depthwise conv input only partly prunable")
            self.ann[node] = {1: out_segs} if out_segs else {}
            return
        if groups > 1:
            if in_segs and not _grouped_layout(in_segs, groups, cin_g):
                self.block(in_segs, f"{node.name}: grouped conv input channels not laid out per group")
            elif in_segs:
                self.member(w, 1, (Seg(in_segs[0].group, 0, in_segs[0].block, in_segs[0].count),), "in")
        else:
            self.member(w, 1, in_segs, "in")
        out_segs = self.source(node, cout, str(w.target), (0,), groups)
        if bias is not None and not self.member(bias, 0, out_segs, "param"):
            self.block(out_segs, f"{node.name}: bias computed at run time")
        self.ann[node] = {1: out_segs}

    def linear(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        xin = _dims_of(self.ann.get(x))
        rank = len(ir.shape(x) or ())
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            self.block(xin.get(rank - 1, ()), f"{node.name}: linear weight computed at run time")
            return
        self.member(w, 1, xin.get(rank - 1, ()), "in")
        out = {d: s for d, s in xin.items() if d != rank - 1}
        segs = self.source(node, ir.shape(w)[0], str(w.target), (0,))
        if bias is not None and not self.member(bias, 0, segs, "param"):
            self.block(segs, f"{node.name}: bias computed at run time")
        out[rank - 1] = segs
        self.ann[node] = out

    def addmm(self, node: fx.Node, target: object) -> None:
        """addmm(b, x[M, K], W[K, N]) = x·W + b: a linear whose weight is stored transposed (Hugging Face's
        Conv1D in GPT-2): W's dim 0 reads x's features, its dim 1 makes N output channels."""
        bias, x, w = (node.args[0], *node.args[1:3]) if target is aten.addmm else (None, *node.args[:2])
        xin = _dims_of(self.ann.get(x))
        if 0 in xin:
            self.block(xin[0], f"{node.name}: {target} over pruned rows")
        self.member(w, 0, xin.get(1, ()), "in")
        segs = self.source(node, ir.shape(w)[1], str(w.target), (1,))
        if bias is not None and (len(ir.shape(bias) or ()) != 1 or not self.member(bias, 0, segs, "param")):
            self.block(segs, f"{node.name}: addmm bias computed at run time or not a vector")
        self.ann[node] = {1: segs}

    def embedding(self, node: fx.Node) -> None:
        w, ids = node.args[0], node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return
        segs = self.source(node, ir.shape(w)[1], str(w.target), (1,))
        self.ann[node] = {len(ir.shape(ids) or ()): segs}

    def norm_params(self, node: fx.Node, params: Iterable[object]) -> None:
        xin = _dims_of(self.ann.get(node.args[0]))
        segs = xin.get(1, ())
        for p in params:
            if p is not None and not self.member(p, 0, segs, "param"):
                self.block(segs, f"{node.name}: normalization parameter computed at run time")
        self.ann[node] = dict(xin)

    def group_norm(self, node: fx.Node) -> None:
        x, num_groups = node.args[0], node.args[1]
        channels = (ir.shape(x) or (0, 0))[1]
        per = channels // num_groups
        xin = _dims_of(self.ann.get(x))
        for d, segs in xin.items():
            if d != 1:
                self.block(segs, f"{node.name}: group_norm normalizes the pruned dimension {d}")
        segs = xin.get(1, ())
        for seg in segs:
            if seg.start % per:
                self.block(segs, f"{node.name}: group_norm groups of {per} channels straddle a segment")
                return
            if seg.block % per:
                self.coarsen(seg, per // math.gcd(per, seg.block))
        if segs:
            self.rewrites.append(node)
        self.norm_params(node, node.args[2:4])

    def layer_norm(self, node: fx.Node) -> None:
        x, normalized = node.args[0], node.args[1]
        rank = len(ir.shape(x) or ())
        xin = _dims_of(self.ann.get(x))
        for d, segs in xin.items():
            if d >= rank - len(normalized):
                self.block(segs, f"{node.name}: layer_norm normalizes over the pruned dimension")
        self.ann[node] = {d: s for d, s in xin.items() if d < rank - len(normalized)}

    def elementwise(self, node: fx.Node) -> None:
        out_shape = ir.shape(node)
        if out_shape is None:
            return self.block_node_inputs(node, f"{node.name}: no shape")
        rank = len(out_shape)
        per_dim: dict[int, list[tuple[object, tuple[Seg, ...] | None]]] = defaultdict(list)
        operands = [a for a in _flat(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        annotated_dims = {d + rank - len(ir.shape(a) or ()) for a in operands for d in _dims_of(self.ann.get(a))}
        for a in operands:
            a_shape = ir.shape(a) or ()
            offset = rank - len(a_shape)
            a_ann = _dims_of(self.ann.get(a))
            for d in annotated_dims:
                ad = d - offset
                if ad < 0 or _static(a_shape[ad]) == 1:
                    continue
                per_dim[d].append((a, a_ann.get(ad)))
        out: dict[int, tuple[Seg, ...]] = {}
        for d, entries in per_dim.items():
            carried = [segs for _, segs in entries if segs]
            ref = carried[0]
            for segs in carried[1:]:
                self.couple(ref, segs, node)
            for a, segs in entries:
                if segs:
                    continue
                a_dim = d - (rank - len(ir.shape(a) or ()))
                if not self.member(a, a_dim, ref, "param"):
                    self.block(ref, f"{node.name}: {ir.overload_packet(node.target)} with an unpruned "
                                    f"operand {a.name} of full channel size")
            out[d] = ref
        self.ann[node] = out

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

    def reshape(self, node: fx.Node, target: object) -> None:
        x = node.args[0]
        in_shape, out_shape = ir.shape(x), ir.shape(node)
        xin = _dims_of(self.ann.get(x))
        if in_shape is None or out_shape is None:
            return self.block_node_inputs(node, f"{node.name}: no shape")
        if target is aten.expand:
            offset = len(out_shape) - len(in_shape)
            out = {d + offset: s for d, s in xin.items()}
            self.check_size_args(node, out)
            self.ann[node] = out
            return None
        mapping = _factor(in_shape, out_shape)
        out: dict[int, tuple[Seg, ...]] = {}
        for d, segs in xin.items():
            found = next(((ins, outs) for ins, outs in mapping if d in ins), None)
            if found is None:
                self.block(segs, f"{node.name}: reshape with symbolic sizes around a pruned dimension")
                continue
            ins, outs = found
            ins = [i for i in ins if _static(in_shape[i]) != 1]
            outs = [o for o in outs if _static(out_shape[o]) != 1]
            if not ins or ins[0] != d or not outs:
                self.block(segs, f"{node.name}: reshape interleaves the pruned dimension with outer ones")
                continue
            if not all(isinstance(in_shape[i], int) for i in ins) or not all(
                    isinstance(out_shape[i], int) for i in outs):
                self.block(segs, f"{node.name}: reshape merges the pruned dimension with a symbolic one")
                continue
            inner_in = math.prod(in_shape[i] for i in ins[1:])
            o = outs[0]
            inner_out = math.prod(out_shape[i] for i in outs[1:])
            new: list[Seg] = []
            for seg in segs:
                start, block = seg.start * inner_in, seg.block * inner_in
                if start % inner_out:
                    self.block(segs, f"{node.name}: reshape splits the dimension off a unit boundary")
                    break
                if block % inner_out:
                    self.coarsen(seg, inner_out // math.gcd(block, inner_out))
                new.append(Seg(seg.group, start // inner_out, block // inner_out, seg.count))
            else:
                out[o] = tuple(new)
        if target in RESHAPES:
            self.check_size_args(node, out)
        self.ann[node] = out
        return None

    def check_size_args(self, node: fx.Node, out: dict[int, tuple[Seg, ...]]) -> None:
        sizes = node.args[1]
        for d, segs in out.items():
            if isinstance(sizes[d], fx.Node):
                self.block(segs, f"{node.name}: size of a pruned dimension computed at run time")
        if out:
            self.rewrites.append(node)

    def dim_map(self, node: fx.Node, target: object) -> None:
        x = node.args[0]
        rank = len(ir.shape(x) or ())
        xin = _dims_of(self.ann.get(x))
        if target is aten.permute:
            order = [d % rank for d in node.args[1]]
            self.ann[node] = {order.index(d): s for d, s in xin.items()}
        elif target in (aten.transpose, aten.t):
            a, b = (node.args[1] % rank, node.args[2] % rank) if target is aten.transpose else (0, 1)
            self.ann[node] = {(b if d == a else a if d == b else d): s for d, s in xin.items()}
        elif target is aten.unsqueeze:
            at = node.args[1] % (rank + 1)
            self.ann[node] = {(d + 1 if d >= at else d): s for d, s in xin.items()}
        elif target is aten.squeeze:
            out_rank = len(ir.shape(node) or ())
            dropped = [d for d in range(rank) if ir.shape(x)[d] == 1 and out_rank < rank
                       and (len(node.args) < 2 or d in _as_list(node.args[1], rank))]
            self.ann[node] = {d - sum(1 for q in dropped if q < d): s for d, s in xin.items()}
        elif target is aten.roll:   # a cyclic shift (Swin's shifted windows) keeps the dimensions it does not roll
            for d in _as_list(node.args[2] if len(node.args) > 2 else None, rank):
                if d in xin:
                    self.block(xin[d], f"{node.name}: roll along a pruned dimension")
            self.ann[node] = {d: s for d, s in xin.items()}
        elif target is aten.select:
            at = node.args[1] % rank
            if at in xin:
                self.block(xin[at], f"{node.name}: select on a pruned dimension")
            self.ann[node] = {(d - 1 if d > at else d): s for d, s in xin.items() if d != at}
        else:  # slice
            at = node.args[1] % rank if len(node.args) > 1 else 0
            if at in xin and ir.shape(node)[at] != ir.shape(x)[at]:
                return self.slice(node, x, at, xin)
            self.ann[node] = dict(xin)

    def slice(self, node: fx.Node, x: fx.Node, at: int, xin: dict[int, tuple[Seg, ...]]) -> None:
        """A static step-1 slice of a pruned dimension keeps the units inside it, like one piece of a split."""
        size = ir.shape(x)[at]
        start, end, step = (list(node.args[2:5]) + [None, None, None][len(node.args[2:5]):])
        start, end, step = start or 0, size if end is None else end, step or 1
        piece = {d: s for d, s in xin.items() if d != at}
        if step != 1 or not all(isinstance(v, int) for v in (start, end, size)):
            self.block(xin[at], f"{node.name}: slice of a pruned dimension with a step or symbolic bounds")
            self.ann[node] = piece
            return
        start, end = (v + size if v < 0 else v for v in (start, end))
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        inside: list[Seg] = []
        for seg in xin[at]:
            lo, hi = max(seg.start, start), min(seg.end, end)
            if lo >= hi:
                continue
            edges = {lo, hi} - {seg.start, seg.end}
            if any((edge - seg.start) % seg.block for edge in edges):
                self.block(xin[at], f"{node.name}: slice cuts a unit in two")
                continue
            for edge in edges:
                self.cut(seg, (edge - seg.start) // seg.block)
            inside.append(Seg(seg.group, seg.start - start, seg.block, seg.count))
        if inside:
            piece[at] = tuple(inside)
        self.rewrites.append(node)
        self.ann[node] = piece

    def pool(self, node: fx.Node) -> None:
        rank = len(ir.shape(node.args[0]) or ())
        spatial = 2 if "2d" in str(node.target) else 1
        xin = _dims_of(self.ann.get(node.args[0]))
        for d, segs in xin.items():
            if d >= rank - spatial:
                self.block(segs, f"{node.name}: pooling over a pruned dimension")
        kept = {d: s for d, s in xin.items() if d < rank - spatial}
        self.ann[node] = [kept, kept] if isinstance(ir.val(node), (tuple, list)) else kept

    def reduction(self, node: fx.Node) -> None:
        x = node.args[0]
        rank = len(ir.shape(x) or ())
        dims = _as_list(node.args[1] if len(node.args) > 1 else None, rank)
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        xin = _dims_of(self.ann.get(x))
        out = {}
        for d, segs in xin.items():
            if d in dims:
                self.block(segs, f"{node.name}: {ir.overload_packet(node.target)} reduces the pruned dimension")
            else:
                out[d if keep else d - sum(1 for q in dims if q < d)] = segs
        self.ann[node] = out

    def softmax(self, node: fx.Node) -> None:
        rank = len(ir.shape(node) or ())
        at = node.args[1] % rank
        xin = _dims_of(self.ann.get(node.args[0]))
        if at in xin:
            self.block(xin[at], f"{node.name}: softmax over the pruned dimension")
        self.ann[node] = {d: s for d, s in xin.items() if d != at}

    def cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        rank = len(ir.shape(node) or ())
        at = (node.args[1] if len(node.args) > 1 else 0) % rank
        segs: list[Seg] = []
        offset = 0
        others: dict[int, list[tuple[Seg, ...] | None]] = defaultdict(list)
        for t in tensors:
            t_ann = _dims_of(self.ann.get(t))
            segs += [Seg(s.group, s.start + offset, s.block, s.count) for s in t_ann.get(at, ())]
            offset += ir.shape(t)[at]
            for d in set(range(rank)) - {at}:
                others[d].append(t_ann.get(d))
        out: dict[int, tuple[Seg, ...]] = {at: tuple(segs)} if segs else {}
        for d, entries in others.items():
            carried = [e for e in entries if e]
            if not carried:
                continue
            if len(carried) < len(entries):
                self.block(sum(carried, ()), f"{node.name}: cat of pruned and unpruned tensors")
                continue
            for e in carried[1:]:
                self.couple(carried[0], e, node)
            out[d] = carried[0]
        self.ann[node] = out

    def split(self, node: fx.Node, target: object) -> None:
        x = node.args[0]
        rank = len(ir.shape(x) or ())
        at = (node.args[2] if len(node.args) > 2 else 0) % rank
        outs = ir.val(node)
        sizes = [o.shape[at] for o in outs]
        xin = _dims_of(self.ann.get(x))
        result: list[dict[int, tuple[Seg, ...]]] = []
        start = 0
        for size in sizes:
            piece = {d: s for d, s in xin.items() if d != at}
            inside: list[Seg] = []
            for seg in xin.get(at, ()):
                lo, hi = max(seg.start, start), min(seg.end, start + size)
                if lo >= hi:
                    continue
                if (lo, hi) != (seg.start, seg.end):
                    edge = lo if lo != seg.start else hi
                    if (edge - seg.start) % seg.block:
                        self.block(xin[at], f"{node.name}: split cuts a unit in two")
                        continue
                    self.cut(seg, (edge - seg.start) // seg.block)
                inside.append(Seg(seg.group, seg.start - start, seg.block, seg.count))
            if inside:
                piece[at] = tuple(inside)
            result.append(piece)
            start += size
        if at in xin:
            self.rewrites.append(node)
        self.ann[node] = result

    def sdpa(self, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        qa, ka, va = (_dims_of(self.ann.get(t)) for t in (q, k, v))
        rank = len(ir.shape(q) or ())
        head = rank - 3
        for t_ann in (qa, ka, va):
            for d, segs in t_ann.items():
                if d != head:
                    self.block(segs, f"{node.name}: attention over a pruned sequence/feature dimension")
        hq, hk = ir.shape(q)[head], ir.shape(k)[head]
        q_segs, k_segs, v_segs = qa.get(head), ka.get(head), va.get(head)
        if not (q_segs and k_segs and v_segs):
            self.block((q_segs or ()) + (k_segs or ()) + (v_segs or ()),
                       f"{node.name}: only some of Q, K, V heads are prunable")
            return
        mask_head = head - rank + len(ir.shape(mask) or ()) if isinstance(mask, fx.Node) else -1
        if mask_head >= 0 and _static(ir.shape(mask)[mask_head]) != 1 and not self.member(mask, mask_head, q_segs,
                                                                                            "param"):
            # a constant mask (a folded relative-position bias) is sliced with the heads; a computed one is not
            self.block(q_segs + k_segs + v_segs, f"{node.name}: the attention mask has a head dimension "
                                                 f"(computed at run time by {mask.name})")
            return
        self.couple(k_segs, v_segs, node)
        self.couple(q_segs, k_segs, node, ratio=hq // hk if hk and hq % hk == 0 else 1)
        self.ann[node] = {head: q_segs}

    def matmul(self, node: fx.Node) -> None:
        a, b = node.args[:2]
        ra, rb = len(ir.shape(a) or ()), len(ir.shape(b) or ())
        rank = len(ir.shape(node) or ())
        aa, ba = _dims_of(self.ann.get(a)), _dims_of(self.ann.get(b))
        if ra < 2 or rb < 2:
            return self.block_node_inputs(node, f"{node.name}: matmul of vectors over a pruned dimension")
        out: dict[int, tuple[Seg, ...]] = {}
        for d, segs in aa.items():
            if d == ra - 1:
                self.block(segs, f"{node.name}: matmul contracts the pruned dimension")
            else:
                out[d + rank - ra] = segs
        for d, segs in ba.items():
            if d == rb - 2:
                self.block(segs, f"{node.name}: matmul contracts the pruned dimension")
            elif d == rb - 1:
                out[rank - 1] = segs
            else:
                od = d + rank - rb
                if od in out:
                    self.couple(out[od], segs, node)
                elif _static(ir.shape(a)[od - rank + ra] if od - rank + ra >= 0 else 1) != 1:
                    self.block(segs, f"{node.name}: matmul batch dimension pruned on one side only")
                else:
                    out[od] = segs
        for d in list(out):
            if d < rank - 2:
                bd = d - rank + rb
                if bd >= 0 and bd not in ba and _static(ir.shape(b)[bd]) != 1:
                    self.block(out.pop(d), f"{node.name}: matmul batch dimension pruned on one side only")
        self.ann[node] = out
        return None


def analyze(gm: fx.GraphModule, ignored: Iterable[str] = ()) -> Analysis:
    """Channel groups of `gm` (see the module docstring)."""
    gran: dict[str, int] = {}          # channels per unit, by group
    cuts: dict[str, set[int]] = {}     # channel offsets where a source splits into groups
    for _ in range(MAX_ROUNDS):
        walk = _Walk(gm, gran, cuts, list(ignored))
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


def _finish(walk: _Walk) -> Analysis:
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


# helpers

def _is_source(node: fx.Node) -> bool:
    return (ir.is_op(node, aten.conv1d, aten.conv2d, aten.conv3d, aten.linear, aten.embedding)
            or (ir.is_op(node, aten.addmm) and _is_attr(node.args[2]))
            or (ir.is_op(node, aten.mm) and _is_attr(node.args[1])))


def _is_attr(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _functional(packet: object) -> object:
    """`aten.add_` -> `aten.add`: an in-place element-wise op keeps its first operand's layout, so its
    channels follow the same rule (torch.export keeps `x += y` and `nn.SiLU(inplace=True)` in place)."""
    name = getattr(packet, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        functional = getattr(aten, name[:-1], None)
        if functional in ELEMENTWISE:
            return functional
    return packet


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        else:
            out.append(a)
    return out


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in _flat(list(node.args) + list(node.kwargs.values())) if isinstance(a, fx.Node)]


def _dims_of(value: Any) -> dict[int, tuple[Seg, ...]]:
    if isinstance(value, list):
        merged: dict[int, tuple[Seg, ...]] = {}
        for v in value:
            for d, s in (v or {}).items():
                merged[d] = merged.get(d, ()) + s
        return merged
    return {d: s for d, s in (value or {}).items() if s}


def _static(size: object) -> int | None:
    return size if isinstance(size, int) else None


def _as_list(dims: object, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        return [dims % rank]
    return [d % rank for d in dims]  # type: ignore[union-attr]


def _grouped_layout(segs: tuple[Seg, ...], groups: int, per: int) -> bool:
    ordered = sorted(segs, key=lambda s: s.start)
    return (len(ordered) == groups and len({s.group for s in ordered}) == 1
            and all(s.start == g * per and s.block * s.count == per for g, s in enumerate(ordered)))


def _size_expr(size: object) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else size.node.expr  # type: ignore[union-attr]


def _factor(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal size.

    Sizes are compared as sympy products, so a symbolic batch merged with a static
    dimension ([s0, 7, C] -> [7·s0, C]) pairs up. Dims that cannot be paired are left
    out; the caller treats them as unmapped."""
    def key(shape: tuple, dims: list[int]) -> sympy.Expr:
        return sympy.Mul(*(_size_expr(shape[k]) for k in dims))
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        ins, outs = [i], [j]
        while (ratio := sympy.simplify(key(out_shape, outs) / key(in_shape, ins))) != 1:
            num, den = ratio.as_numer_denom()
            if num.free_symbols and den.free_symbols:
                return groups                      # unrelated symbols: opaque
            grow_in = bool(num.free_symbols) or (not den.free_symbols and bool(ratio > 1))
            if grow_in and ins[-1] + 1 < len(in_shape):
                ins.append(ins[-1] + 1)
            elif not grow_in and outs[-1] + 1 < len(out_shape):
                outs.append(outs[-1] + 1)
            else:
                return groups
        i, j = ins[-1] + 1, outs[-1] + 1
        groups.append((ins, outs))
    if groups:  # trailing size-1 dims join the last run
        groups[-1][0].extend(range(i, len(in_shape)))
        groups[-1][1].extend(range(j, len(out_shape)))
    return groups


def matching_groups(analysis: Analysis, pattern: str) -> list[Group]:
    """Prunable groups whose modules (or sources) match `pattern` (fnmatch)."""
    return [g for g in analysis.prunable()
            if any(fnmatch(m, pattern) for m in g.modules) or any(fnmatch(s, pattern) for s in g.sources)]
