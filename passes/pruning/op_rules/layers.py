"""Op rules for the layers: sources of channels (conv, linear, addmm/mm, embedding), consumers of them
(input channels and features) and the normalizations that carry or normalize them.

Each rule is `rule(walk, node, target)` (see `op_rules/__init__.py`): it reads the segments of the node's
inputs from `walk.ann`, records members, couplings, boundaries and requests on `walk`, and sets
`walk.ann[node]` to the segments of the node's output.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch
import torch.fx as fx

from graphopt.engine import ir

from ..index import grouped_layout
from ..model import Seg, dims_of, is_attr

if TYPE_CHECKING:
    from ..groups import Walk

aten = torch.ops.aten


def conv(walk: Walk, node: fx.Node, target: object) -> None:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else 1
    wshape = ir.shape(w)
    xin = dims_of(walk.ann.get(x))
    for d, segs in xin.items():
        if d != 1:
            walk.block(segs, f"{node.name}: conv over a pruned non-channel dimension")
    in_segs = xin.get(1, ())
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or wshape is None:
        walk.block(in_segs, f"{node.name}: conv weight computed at run time")
        return
    cout, cin_g = wshape[0], wshape[1]
    out_segs: tuple[Seg, ...]
    if groups > 1 and cin_g == 1:  # depthwise (channel multiplier m): the group carries through
        m = cout // groups
        out_segs = tuple(Seg(s.group, s.start * m, s.block * m, s.count) for s in in_segs)
        walk.member(w, 0, out_segs, "out")
        if bias is not None:
            walk.member(bias, 0, out_segs, "param")
        if in_segs:
            walk.rewrites.append(node)
        covered = sum(s.block * s.count for s in out_segs)
        if in_segs and covered != cout:
            walk.block(in_segs, f"{node.name}: depthwise conv input only partly prunable")
        walk.ann[node] = {1: out_segs} if out_segs else {}
        return
    if groups > 1:
        if in_segs and not grouped_layout(in_segs, groups, cin_g):
            walk.block(in_segs, f"{node.name}: grouped conv input channels not laid out per group")
        elif in_segs:
            walk.member(w, 1, (Seg(in_segs[0].group, 0, in_segs[0].block, in_segs[0].count),), "in")
    else:
        walk.member(w, 1, in_segs, "in")
    out_segs = walk.source(node, cout, str(w.target), (0,), groups)
    if bias is not None and not walk.member(bias, 0, out_segs, "param"):
        walk.block(out_segs, f"{node.name}: bias computed at run time")
    walk.ann[node] = {1: out_segs}


def linear(walk: Walk, node: fx.Node, target: object) -> None:
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    xin = dims_of(walk.ann.get(x))
    rank = len(ir.shape(x) or ())
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        walk.block(xin.get(rank - 1, ()), f"{node.name}: linear weight computed at run time")
        return
    walk.member(w, 1, xin.get(rank - 1, ()), "in")
    out = {d: s for d, s in xin.items() if d != rank - 1}
    segs = walk.source(node, ir.shape(w)[0], str(w.target), (0,))
    if bias is not None and not walk.member(bias, 0, segs, "param"):
        walk.block(segs, f"{node.name}: bias computed at run time")
    out[rank - 1] = segs
    walk.ann[node] = out


def addmm(walk: Walk, node: fx.Node, target: object) -> None:
    """addmm(b, x[M, K], W[K, N]) = x·W + b: a linear whose weight is stored transposed (Hugging Face's
    Conv1D in GPT-2): W's dim 0 reads x's features, its dim 1 makes N output channels."""
    if not is_attr(node.args[2 if target is aten.addmm else 1]):
        return walk.unknown(node)   # a product of two computed tensors: no weight to prune
    bias, x, w = (node.args[0], *node.args[1:3]) if target is aten.addmm else (None, *node.args[:2])
    xin = dims_of(walk.ann.get(x))
    if 0 in xin:
        walk.block(xin[0], f"{node.name}: {target} over pruned rows")
    walk.member(w, 0, xin.get(1, ()), "in")
    segs = walk.source(node, ir.shape(w)[1], str(w.target), (1,))
    if bias is not None and (len(ir.shape(bias) or ()) != 1 or not walk.member(bias, 0, segs, "param")):
        walk.block(segs, f"{node.name}: addmm bias computed at run time or not a vector")
    walk.ann[node] = {1: segs}


def embedding(walk: Walk, node: fx.Node, target: object) -> None:
    w, ids = node.args[0], node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return
    segs = walk.source(node, ir.shape(w)[1], str(w.target), (1,))
    walk.ann[node] = {len(ir.shape(ids) or ()): segs}


def norm_params(walk: Walk, node: fx.Node, params: Iterable[object]) -> None:
    xin = dims_of(walk.ann.get(node.args[0]))
    segs = xin.get(1, ())
    for p in params:
        if p is not None and not walk.member(p, 0, segs, "param"):
            walk.block(segs, f"{node.name}: normalization parameter computed at run time")
    walk.ann[node] = dict(xin)


def batch_norm(walk: Walk, node: fx.Node, target: object) -> None:
    norm_params(walk, node, node.args[1:5])


def group_norm(walk: Walk, node: fx.Node, target: object) -> None:
    x, num_groups = node.args[0], node.args[1]
    channels = (ir.shape(x) or (0, 0))[1]
    per = channels // num_groups
    xin = dims_of(walk.ann.get(x))
    for d, segs in xin.items():
        if d != 1:
            walk.block(segs, f"{node.name}: group_norm normalizes the pruned dimension {d}")
    segs = xin.get(1, ())
    for seg in segs:
        if seg.start % per:
            walk.block(segs, f"{node.name}: group_norm groups of {per} channels straddle a segment")
            return
        if seg.block % per:
            walk.coarsen(seg, per // math.gcd(per, seg.block))
    if segs:
        walk.rewrites.append(node)
    norm_params(walk, node, node.args[2:4])


def layer_norm(walk: Walk, node: fx.Node, target: object) -> None:
    x, normalized = node.args[0], node.args[1]
    rank = len(ir.shape(x) or ())
    xin = dims_of(walk.ann.get(x))
    for d, segs in xin.items():
        if d >= rank - len(normalized):
            walk.block(segs, f"{node.name}: layer_norm normalizes over the pruned dimension")
    walk.ann[node] = {d: s for d, s in xin.items() if d < rank - len(normalized)}


RULES = {
    aten.conv1d: conv, aten.conv2d: conv, aten.conv3d: conv,
    aten.linear: linear,
    aten.addmm: addmm, aten.mm: addmm,
    aten.embedding: embedding,
    aten.batch_norm: batch_norm,
    aten.group_norm: group_norm,
    aten.layer_norm: layer_norm,
}
