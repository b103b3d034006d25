"""Op rules for tensor ops: element-wise ops, shape ops (view, permute, slice, cat, split …), pooling,
reductions, softmax, attention and batched matmul.

Each rule is `rule(walk, node, target)` (see `op_rules/__init__.py`); the index algebra that maps a
dimension through a reshape is in `index.py`.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from graphopt.engine import ir

from ..index import as_list, factor, static
from ..model import Seg, dims_of, flat

if TYPE_CHECKING:
    from ..groups import Walk

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
DIM_MAPS = {aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.roll}


def elementwise(walk: Walk, node: fx.Node, target: object) -> None:
    out_shape = ir.shape(node)
    if out_shape is None:
        return walk.block_node_inputs(node, f"{node.name}: no shape")
    rank = len(out_shape)
    per_dim: dict[int, list[tuple[object, tuple[Seg, ...] | None]]] = defaultdict(list)
    operands = [a for a in flat(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    annotated_dims = {d + rank - len(ir.shape(a) or ()) for a in operands for d in dims_of(walk.ann.get(a))}
    for a in operands:
        a_shape = ir.shape(a) or ()
        offset = rank - len(a_shape)
        a_ann = dims_of(walk.ann.get(a))
        for d in annotated_dims:
            ad = d - offset
            if ad < 0 or static(a_shape[ad]) == 1:
                continue
            per_dim[d].append((a, a_ann.get(ad)))
    out: dict[int, tuple[Seg, ...]] = {}
    for d, entries in per_dim.items():
        carried = [segs for _, segs in entries if segs]
        ref = carried[0]
        for segs in carried[1:]:
            walk.couple(ref, segs, node)
        for a, segs in entries:
            if segs:
                continue
            a_dim = d - (rank - len(ir.shape(a) or ()))
            if not walk.member(a, a_dim, ref, "param"):
                walk.block(ref, f"{node.name}: {ir.overload_packet(node.target)} with an unpruned "
                                f"operand {a.name} of full channel size")
        out[d] = ref
    walk.ann[node] = out


def reshape(walk: Walk, node: fx.Node, target: object) -> None:
    x = node.args[0]
    in_shape, out_shape = ir.shape(x), ir.shape(node)
    xin = dims_of(walk.ann.get(x))
    if in_shape is None or out_shape is None:
        return walk.block_node_inputs(node, f"{node.name}: no shape")
    if target is aten.expand:
        offset = len(out_shape) - len(in_shape)
        out = {d + offset: s for d, s in xin.items()}
        walk.check_size_args(node, out)
        walk.ann[node] = out
        return None
    mapping = factor(in_shape, out_shape)
    out: dict[int, tuple[Seg, ...]] = {}
    for d, segs in xin.items():
        found = next(((ins, outs) for ins, outs in mapping if d in ins), None)
        if found is None:
            walk.block(segs, f"{node.name}: reshape with symbolic sizes around a pruned dimension")
            continue
        ins, outs = found
        ins = [i for i in ins if static(in_shape[i]) != 1]
        outs = [o for o in outs if static(out_shape[o]) != 1]
        if not ins or ins[0] != d or not outs:
            walk.block(segs, f"{node.name}: reshape interleaves the pruned dimension with outer ones")
            continue
        if not all(isinstance(in_shape[i], int) for i in ins) or not all(
                isinstance(out_shape[i], int) for i in outs):
            walk.block(segs, f"{node.name}: reshape merges the pruned dimension with a symbolic one")
            continue
        inner_in = math.prod(in_shape[i] for i in ins[1:])
        o = outs[0]
        inner_out = math.prod(out_shape[i] for i in outs[1:])
        new: list[Seg] = []
        for seg in segs:
            start, block = seg.start * inner_in, seg.block * inner_in
            if start % inner_out:
                walk.block(segs, f"{node.name}: reshape splits the dimension off a unit boundary")
                break
            if block % inner_out:
                walk.coarsen(seg, inner_out // math.gcd(block, inner_out))
            new.append(Seg(seg.group, start // inner_out, block // inner_out, seg.count))
        else:
            out[o] = tuple(new)
    if target in RESHAPES:
        walk.check_size_args(node, out)
    walk.ann[node] = out
    return None


def dim_map(walk: Walk, node: fx.Node, target: object) -> None:
    x = node.args[0]
    rank = len(ir.shape(x) or ())
    xin = dims_of(walk.ann.get(x))
    if target is aten.permute:
        order = [d % rank for d in node.args[1]]
        walk.ann[node] = {order.index(d): s for d, s in xin.items()}
    elif target in (aten.transpose, aten.t):
        a, b = (node.args[1] % rank, node.args[2] % rank) if target is aten.transpose else (0, 1)
        walk.ann[node] = {(b if d == a else a if d == b else d): s for d, s in xin.items()}
    elif target is aten.unsqueeze:
        at = node.args[1] % (rank + 1)
        walk.ann[node] = {(d + 1 if d >= at else d): s for d, s in xin.items()}
    elif target is aten.squeeze:
        out_rank = len(ir.shape(node) or ())
        dropped = [d for d in range(rank) if ir.shape(x)[d] == 1 and out_rank < rank
                   and (len(node.args) < 2 or d in as_list(node.args[1], rank))]
        walk.ann[node] = {d - sum(1 for q in dropped if q < d): s for d, s in xin.items()}
    elif target is aten.roll:   # a cyclic shift (Swin's shifted windows) keeps the dimensions it does not roll
        for d in as_list(node.args[2] if len(node.args) > 2 else None, rank):
            if d in xin:
                walk.block(xin[d], f"{node.name}: roll along a pruned dimension")
        walk.ann[node] = {d: s for d, s in xin.items()}
    elif target is aten.select:
        at = node.args[1] % rank
        if at in xin:
            walk.block(xin[at], f"{node.name}: select on a pruned dimension")
        walk.ann[node] = {(d - 1 if d > at else d): s for d, s in xin.items() if d != at}
    else:  # slice
        at = node.args[1] % rank if len(node.args) > 1 else 0
        if at in xin and ir.shape(node)[at] != ir.shape(x)[at]:
            return _slice(walk, node, x, at, xin)
        walk.ann[node] = dict(xin)


def _slice(walk: Walk, node: fx.Node, x: fx.Node, at: int, xin: dict[int, tuple[Seg, ...]]) -> None:
    """A static step-1 slice of a pruned dimension keeps the units inside it, like one piece of a split."""
    size = ir.shape(x)[at]
    start, end, step = (list(node.args[2:5]) + [None, None, None][len(node.args[2:5]):])
    start, end, step = start or 0, size if end is None else end, step or 1
    piece = {d: s for d, s in xin.items() if d != at}
    if step != 1 or not all(isinstance(v, int) for v in (start, end, size)):
        walk.block(xin[at], f"{node.name}: slice of a pruned dimension with a step or symbolic bounds")
        walk.ann[node] = piece
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
            walk.block(xin[at], f"{node.name}: slice cuts a unit in two")
            continue
        for edge in edges:
            walk.cut(seg, (edge - seg.start) // seg.block)
        inside.append(Seg(seg.group, seg.start - start, seg.block, seg.count))
    if inside:
        piece[at] = tuple(inside)
    walk.rewrites.append(node)
    walk.ann[node] = piece


def pool(walk: Walk, node: fx.Node, target: object) -> None:
    rank = len(ir.shape(node.args[0]) or ())
    spatial = 2 if "2d" in str(node.target) else 1
    xin = dims_of(walk.ann.get(node.args[0]))
    for d, segs in xin.items():
        if d >= rank - spatial:
            walk.block(segs, f"{node.name}: pooling over a pruned dimension")
    kept = {d: s for d, s in xin.items() if d < rank - spatial}
    walk.ann[node] = [kept, kept] if isinstance(ir.val(node), (tuple, list)) else kept


def reduction(walk: Walk, node: fx.Node, target: object) -> None:
    x = node.args[0]
    rank = len(ir.shape(x) or ())
    dims = as_list(node.args[1] if len(node.args) > 1 else None, rank)
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    xin = dims_of(walk.ann.get(x))
    out = {}
    for d, segs in xin.items():
        if d in dims:
            walk.block(segs, f"{node.name}: {ir.overload_packet(node.target)} reduces the pruned dimension")
        else:
            out[d if keep else d - sum(1 for q in dims if q < d)] = segs
    walk.ann[node] = out


def softmax(walk: Walk, node: fx.Node, target: object) -> None:
    rank = len(ir.shape(node) or ())
    at = node.args[1] % rank
    xin = dims_of(walk.ann.get(node.args[0]))
    if at in xin:
        walk.block(xin[at], f"{node.name}: softmax over the pruned dimension")
    walk.ann[node] = {d: s for d, s in xin.items() if d != at}


def cat(walk: Walk, node: fx.Node, target: object) -> None:
    tensors = node.args[0]
    rank = len(ir.shape(node) or ())
    at = (node.args[1] if len(node.args) > 1 else 0) % rank
    segs: list[Seg] = []
    offset = 0
    others: dict[int, list[tuple[Seg, ...] | None]] = defaultdict(list)
    for t in tensors:
        t_ann = dims_of(walk.ann.get(t))
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
            walk.block(sum(carried, ()), f"{node.name}: cat of pruned and unpruned tensors")
            continue
        for e in carried[1:]:
            walk.couple(carried[0], e, node)
        out[d] = carried[0]
    walk.ann[node] = out


def split(walk: Walk, node: fx.Node, target: object) -> None:
    x = node.args[0]
    rank = len(ir.shape(x) or ())
    at = (node.args[2] if len(node.args) > 2 else 0) % rank
    outs = ir.val(node)
    sizes = [o.shape[at] for o in outs]
    xin = dims_of(walk.ann.get(x))
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
                    walk.block(xin[at], f"{node.name}: split cuts a unit in two")
                    continue
                walk.cut(seg, (edge - seg.start) // seg.block)
            inside.append(Seg(seg.group, seg.start - start, seg.block, seg.count))
        if inside:
            piece[at] = tuple(inside)
        result.append(piece)
        start += size
    if at in xin:
        walk.rewrites.append(node)
    walk.ann[node] = result


def getitem(walk: Walk, node: fx.Node, target: object) -> None:
    """One output of a multi-output op (a split's piece, a pooling's values)."""
    value = walk.ann.get(node.args[0])
    if isinstance(value, list):
        walk.ann[node] = value[node.args[1]]
    else:
        walk.block_node_inputs(node, f"getitem on {node.args[0].name}")


def sdpa(walk: Walk, node: fx.Node, target: object) -> None:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    qa, ka, va = (dims_of(walk.ann.get(t)) for t in (q, k, v))
    rank = len(ir.shape(q) or ())
    head = rank - 3
    for t_ann in (qa, ka, va):
        for d, segs in t_ann.items():
            if d != head:
                walk.block(segs, f"{node.name}: attention over a pruned sequence/feature dimension")
    hq, hk = ir.shape(q)[head], ir.shape(k)[head]
    q_segs, k_segs, v_segs = qa.get(head), ka.get(head), va.get(head)
    if not (q_segs and k_segs and v_segs):
        walk.block((q_segs or ()) + (k_segs or ()) + (v_segs or ()),
                   f"{node.name}: only some of Q, K, V heads are prunable")
        return
    mask_head = head - rank + len(ir.shape(mask) or ()) if isinstance(mask, fx.Node) else -1
    if mask_head >= 0 and static(ir.shape(mask)[mask_head]) != 1 and not walk.member(mask, mask_head, q_segs,
                                                                                        "param"):
        # a constant mask (a folded relative-position bias) is sliced with the heads; a computed one is not
        walk.block(q_segs + k_segs + v_segs, f"{node.name}: the attention mask has a head dimension "
                                             f"(computed at run time by {mask.name})")
        return
    walk.couple(k_segs, v_segs, node)
    walk.couple(q_segs, k_segs, node, ratio=hq // hk if hk and hq % hk == 0 else 1)
    walk.ann[node] = {head: q_segs}


def matmul(walk: Walk, node: fx.Node, target: object) -> None:
    a, b = node.args[:2]
    ra, rb = len(ir.shape(a) or ()), len(ir.shape(b) or ())
    rank = len(ir.shape(node) or ())
    aa, ba = dims_of(walk.ann.get(a)), dims_of(walk.ann.get(b))
    if ra < 2 or rb < 2:
        return walk.block_node_inputs(node, f"{node.name}: matmul of vectors over a pruned dimension")
    out: dict[int, tuple[Seg, ...]] = {}
    for d, segs in aa.items():
        if d == ra - 1:
            walk.block(segs, f"{node.name}: matmul contracts the pruned dimension")
        else:
            out[d + rank - ra] = segs
    for d, segs in ba.items():
        if d == rb - 2:
            walk.block(segs, f"{node.name}: matmul contracts the pruned dimension")
        elif d == rb - 1:
            out[rank - 1] = segs
        else:
            od = d + rank - rb
            if od in out:
                walk.couple(out[od], segs, node)
            elif static(ir.shape(a)[od - rank + ra] if od - rank + ra >= 0 else 1) != 1:
                walk.block(segs, f"{node.name}: matmul batch dimension pruned on one side only")
            else:
                out[od] = segs
    for d in list(out):
        if d < rank - 2:
            bd = d - rank + rb
            if bd >= 0 and bd not in ba and static(ir.shape(b)[bd]) != 1:
                walk.block(out.pop(d), f"{node.name}: matmul batch dimension pruned on one side only")
    walk.ann[node] = out
    return None


RULES = {
    **dict.fromkeys(ELEMENTWISE, elementwise),
    **dict.fromkeys(RESHAPES | {aten.flatten, aten.expand}, reshape),
    **dict.fromkeys(DIM_MAPS, dim_map),
    **dict.fromkeys(POOLS, pool),
    **dict.fromkeys(REDUCTIONS, reduction),
    **dict.fromkeys(SOFTMAX, softmax),
    aten.cat: cat,
    **dict.fromkeys(SPLITS, split),
    operator.getitem: getitem,
    aten.scaled_dot_product_attention: sdpa,
    aten.matmul: matmul, aten.bmm: matmul,
}
