"""Rewrite: physically remove pruned units, or mask them (the reference twin).

    W[out=kept, in=kept]  b[kept]  γ, β, μ, σ²[kept]          slice every member tensor
    view(x, [B, T, H, D]) ⇒ view(x, [B, T, H', D])            shape constants follow
    conv(x, groups=C) ⇒ conv(x, groups=C')                    depthwise
    group_norm(x, G) ⇒ group_norm(x, G')   chunk/split ⇒ split_with_sizes(new sizes)

Unit `u` of a segment `Seg(group, start, block, count)` is the elements
`start + u·block … start + (u+1)·block - 1` of its dimension. Masking zeroes
the *consumer* columns (role "in") of the pruned units instead: the
consumers then ignore those channels, which is what removing them computes,
so a masked model and a sliced one agree to float32 rounding.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
import torch.fx as fx

from graphopt.engine import ir

from .model import Analysis, Seg, dims_of

aten = torch.ops.aten
Pruned = Mapping[str, Sequence[int]]   # group name -> pruned unit indices


def seg_elements(seg: Seg, units: Sequence[int]) -> list[int]:
    return [seg.start + u * seg.block + j for u in units for j in range(seg.block)]


def removed_count(segs: Sequence[Seg], pruned: Pruned) -> int:
    return sum(seg.block * len(pruned.get(seg.group, ())) for seg in segs)


def _removed_by_tensor(analysis: Analysis, pruned: Pruned, roles: tuple[str, ...]) -> dict[tuple[str, int], set[int]]:
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for name, units in pruned.items():
        for m in analysis.groups[name].members:
            if m.role in roles and units:
                removed[(m.attr, m.dim)].update(seg_elements(m.seg, units))
    return removed


def _set_tensor(root: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    owner_path, _, name = attr.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = value


def mask(module: torch.nn.Module, analysis: Analysis, pruned: Pruned) -> None:
    """Zero the consumer columns of the pruned units in `module` (in place)."""
    with torch.no_grad():
        for (attr, dim), elements in _removed_by_tensor(analysis, pruned, ("in",)).items():
            tensor = ir.attr_path(module, attr)
            index = torch.tensor(sorted(elements), dtype=torch.long)
            tensor.index_fill_(dim, index, 0.0)


def apply(gm: fx.GraphModule, analysis: Analysis, pruned: Pruned) -> None:
    """Slice the pruned units out of `gm`'s tensors and rewrite its shape constants (in place)."""
    pruned = {g: sorted(set(u)) for g, u in pruned.items() if u}
    with torch.no_grad():
        for (attr, dim), elements in _removed_by_tensor(analysis, pruned, ("out", "in", "param")).items():
            tensor = ir.attr_path(gm, attr)
            keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in elements], dtype=torch.long)
            _set_tensor(gm, attr, tensor.index_select(dim, keep).contiguous())
    for node in analysis.rewrites:
        _rewrite_constants(node, analysis, pruned)
    ir.lint(gm)
    ir.refresh_meta(gm)


def _rewrite_constants(node: fx.Node, analysis: Analysis, pruned: Pruned) -> None:
    ann = analysis.ann.get(node)
    if ir.is_op(node, aten.split, aten.split_with_sizes, aten.chunk):
        rank = len(ir.shape(node.args[0]))
        at = (node.args[2] if len(node.args) > 2 else 0) % rank
        sizes = [out.shape[at] - removed_count(piece.get(at, ()), pruned)
                 for out, piece in zip(ir.val(node), ann)]
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, at)
        return
    if ir.is_op(node, aten.slice):   # static, step 1 (groups.py): drop the removed units before and inside
        x = node.args[0]
        at = node.args[1] % len(ir.shape(x))
        segs, size = dims_of(analysis.ann.get(x)).get(at, ()), ir.shape(x)[at]
        start = (node.args[2] if len(node.args) > 2 else None) or 0
        start = min(max(start + size if start < 0 else start, 0), size)
        start -= removed_count([s for s in segs if s.end <= start], pruned)
        end = start + ir.shape(node)[at] - removed_count(ann.get(at, ()) if ann else (), pruned)
        node.args = (x, at, start, end, *node.args[5:])
        return
    old = ir.shape(node)
    if ir.is_op(node, aten.conv1d, aten.conv2d, aten.conv3d):   # depthwise: groups = channels / multiplier
        args = list(node.args)
        multiplier = old[1] // args[6]
        args[6] = (old[1] - removed_count(ann.get(1, ()), pruned)) // multiplier
        node.args = tuple(args)
        return
    if ir.is_op(node, aten.group_norm):
        args = list(node.args)
        per = old[1] // args[1]
        args[1] = (old[1] - removed_count(ann.get(1, ()), pruned)) // per
        node.args = tuple(args)
        return
    sizes = list(node.args[1])   # view / reshape / expand
    for d, segs in ann.items():
        if isinstance(sizes[d], int) and sizes[d] != -1:
            sizes[d] = old[d] - removed_count(segs, pruned)
    node.args = (node.args[0], sizes, *node.args[2:])
