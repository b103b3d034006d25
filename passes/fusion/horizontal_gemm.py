"""Merge parallel GEMMs that read the same input into one wider GEMM.

    y₁ = linear(x, W₁, b₁), …, yₙ = linear(x, Wₙ, bₙ)
        ⇒  y = linear(x, [W₁; …; Wₙ], [b₁; …; bₙ]);  yᵢ = y[..., oᵢ : oᵢ + nᵢ]
    (the same for convolutions with one geometry and groups = 1, e.g.
    inception-style 1×1 branches, split along the channel dim)

Math: row block i of the stacked weight produces exactly the columns of yᵢ, so
each slice equals the original output (a missing bias is a zero block). Q/K/V
projections become one GEMM that reads x once. The slices are views; a
`view` that reads one directly becomes `reshape` (same result, and valid on
the strided slice).

Linears whose weight or bias is not a constant, or whose dtype, input
features or geometry differ from the group's are left alone, with the reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Rule
from ._match import arg, call, constant_tensor

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)


class MergeGemmsRule(Rule):
    name = "gemm merge"
    anchors = (aten.linear, *_CONVS)

    def match(self, gm: fx.GraphModule, first: fx.Node) -> Bindings | Reject | None:
        x = first.args[0]
        siblings = [n for n in x.users if n.op == "call_function" and n.target == first.target and n.args[0] is x
                    and n is not first] if isinstance(x, fx.Node) else []
        if not siblings:
            return None
        key = _key(gm, first)
        if isinstance(key, Reject):
            return key
        same = [s for s in siblings if _key(gm, s) == key]
        if any(_before(s, first) for s in same):
            return None   # handled when the first of the group was visited
        group = [first] + sorted(same, key=_position)
        if len(group) < 2:
            return Reject(Reason.NO_PARTNER, f"no sibling reading {x.name} has the same shape, dtype and geometry")
        return {"x": x, "group": group}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        x, group = b["x"], b["group"]
        first = group[0]
        weights = [constant_tensor(gm, n.args[1]) for n in group]
        biases = [_bias(gm, n, w) for n, w in zip(group, weights)]
        # under the first layer's module (q of q, k, v): layer patterns and state_dict keys keep its path
        merged_w = ir.add_constant(gm, ir.owned_name(first.args[1], f"{first.name}_merged_weight"),
                                   torch.cat(weights, 0))
        merged_b = None
        if any(arg(n, 2, "bias") is not None for n in group):
            merged_b = ir.add_constant(gm, ir.owned_name(first.args[1], f"{first.name}_merged_bias"),
                                       torch.cat(biases, 0))
        args = [x, merged_w, merged_b, *first.args[3:]]
        merged = call(gm.graph, first.target, tuple(args), {}, before=first)
        dim = -1 if ir.is_op(first, aten.linear) else 1
        anchor, start = merged, 0
        for node, w in zip(group, weights):
            piece = call(gm.graph, aten.slice.Tensor, (merged, dim, start, start + w.shape[0]), after=anchor)
            start, anchor = start + w.shape[0], piece
            ir.replace_all_uses(node, piece)
            for user in list(piece.users):
                if user.target == aten.view.default:
                    user.target = aten.reshape.default
        return Match(f"merged {len(group)}× {ir.overload_packet(first.target).__name__}", group)


RULES = [MergeGemmsRule()]


def _position(node: fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _key(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | Reject:
    """What must agree for two GEMMs to merge, or why this one cannot."""
    weight = constant_tensor(gm, node.args[1])
    bias_arg = arg(node, 2, "bias")
    if weight is None or (bias_arg is not None and constant_tensor(gm, bias_arg) is None):
        return Reject(Reason.NOT_CONSTANT, "weight or bias is not a constant")
    if node.kwargs:
        return Reject(Reason.UNSUPPORTED_FORM, "keyword arguments")
    geometry = tuple(str(a) for a in node.args[3:])
    if not ir.is_op(node, aten.linear):
        if int(arg(node, 6, "groups", 1)) != 1:
            return Reject(Reason.UNSUPPORTED_FORM, "grouped convolution")
    return (node.target, weight.dtype, tuple(weight.shape[1:]), geometry)


def _bias(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> torch.Tensor:
    bias_arg = arg(node, 2, "bias")
    if bias_arg is None:
        return torch.zeros(weight.shape[0], dtype=weight.dtype)
    return constant_tensor(gm, bias_arg)
