"""Algebraic cleanups around GEMMs and layout ops.

    permute(permute(x, p), q)        ⇒  permute(x, p∘q)   (x itself when p∘q is the identity;
                                                          transpose is a permute of two dims)
    reshape(reshape(x, s₁), s₂)      ⇒  reshape(x, s₂)    (view/reshape/_unsafe_view alike)
    matmul(x, W) [+ b]               ⇒  linear(x, Wᵀ, b)  (W, b constants: Wᵀ is pre-transposed once)
    addmm(b, x, W)                   ⇒  linear(x, Wᵀ, b)
    linear(x, W, b) · c  (or / c)    ⇒  linear(x, c·W, c·b)
    linear(x · c, W, b)              ⇒  linear(x, c·W, b)

Math: permutations compose (z_j = y_{q_j} = x_{p_{q_j}}); a reshape depends
only on the element order, which a reshape does not change; x·W = x·(Wᵀ)ᵀ is
what linear computes; a scalar commutes with the matmul and distributes over
the bias add. Only rounding changes (c·W is exact for powers of two).
Turning matmuls into `linear` lets BatchNorm folding, GEMM merging and the
int8 passes see them. Chains whose values are modified in place, and
operands that are not constants where they must be, are left alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt import ir

from ._match import FusionPass, Match, arg, call, constant_tensor, interior, permutation, scalar

aten = torch.ops.aten

_PERMUTES = (aten.permute, aten.transpose)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)
_SCALES = (aten.mul, aten.div)


class AlgebraicCleanup(FusionPass):
    name = "algebraic_cleanup"
    fixed_point = True   # a new linear can take a scale in the next sweep
    anchors = (*_PERMUTES, *_RESHAPES, aten.matmul, aten.mm, aten.addmm, *_SCALES)
    label = "algebraic"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> Match | str | None:
        if ir.is_op(node, *_PERMUTES):
            return _permute_chain(gm, node)
        if ir.is_op(node, *_RESHAPES):
            return _reshape_chain(gm, node)
        if ir.is_op(node, aten.matmul, aten.mm, aten.addmm):
            return _matmul_to_linear(gm, node)
        return _scale_into_linear(gm, node)


def _permute_chain(gm: fx.GraphModule, node: fx.Node) -> Match | str | None:
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or not ir.is_op(inner, *_PERMUTES):
        return None
    if ir.is_mutated(node) or ir.is_mutated(inner):
        return "a permuted value is modified in place"
    p, q = permutation(inner), permutation(node)
    if p is None or q is None:
        return "rank unknown"
    composed = [p[j] for j in q]
    source = inner.args[0]
    if composed == list(range(len(composed))):
        ir.replace_all_uses(node, source)
        return Match("permute chain → identity", [node, inner])
    new = call(gm.graph, aten.permute.default, (source, composed), before=node)
    ir.replace_all_uses(node, new)
    return Match("permute chain", [node, inner])


def _reshape_chain(gm: fx.GraphModule, node: fx.Node) -> Match | str | None:
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or not ir.is_op(inner, *_RESHAPES):
        return None
    if ir.is_mutated(node) or ir.is_mutated(inner):
        return "a reshaped value is modified in place"
    new = call(gm.graph, aten.reshape.default, (inner.args[0], node.args[1]), before=node)
    ir.replace_all_uses(node, new)
    return Match("reshape chain", [node, inner])


def _matmul_to_linear(gm: fx.GraphModule, node: fx.Node) -> Match | str | None:
    bias_node = None
    if ir.is_op(node, aten.addmm):
        if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
            return "addmm with beta/alpha ≠ 1"
        bias_node, x, w_node = node.args[0], node.args[1], node.args[2]
    else:
        x, w_node = node.args[0], node.args[1]
    weight = constant_tensor(gm, w_node)
    if weight is None or weight.dim() != 2:
        return None if weight is None else "the right operand is not a 2-D weight"
    if ir.dtype(x) != weight.dtype:
        return "input and weight dtypes differ"
    out, dead = node, [node]
    if bias_node is None:
        add = next(iter(node.users)) if len(node.users) == 1 else None
        if add is not None and ir.is_op(add, aten.add) and add.kwargs.get("alpha", 1) == 1:
            other = add.args[1] if add.args[0] is node else add.args[0]
            if _as_bias(gm, other, weight) is not None:
                bias_node, out = other, add
                dead.append(add)
    bias = _as_bias(gm, bias_node, weight) if bias_node is not None else None
    if bias_node is not None and bias is None:
        return "bias is not a constant of the output features' shape"
    w_t = ir.add_constant(gm, f"{w_node.name}_t", weight.t().contiguous())
    b = None
    if bias is not None:
        b = bias_node if list(bias.shape) == [weight.shape[1]] else ir.add_constant(gm, f"{bias_node.name}_v", bias)
    new = call(gm.graph, aten.linear.default, (x, w_t, b), before=out)
    ir.replace_all_uses(out, new)
    return Match("matmul + bias → linear" if b is not None else "matmul → linear", dead)


def _as_bias(gm: fx.GraphModule, node: object, weight: torch.Tensor) -> torch.Tensor | None:
    """A constant that broadcasts only along the output features, as a 1-D tensor."""
    tensor = constant_tensor(gm, node)
    if tensor is None or tensor.dtype != weight.dtype or tensor.dim() == 0:
        return None
    if tensor.shape[-1] != weight.shape[1] or any(d != 1 for d in tensor.shape[:-1]):
        return None
    return tensor.reshape(-1)


def _scale_into_linear(gm: fx.GraphModule, node: fx.Node) -> Match | str | None:
    c = scalar(node.args[1]) if len(node.args) > 1 else None
    source = node.args[0]
    if c is None or not isinstance(source, fx.Node):
        return None
    if ir.is_op(node, aten.div) and c == 0:
        return "division by zero"
    if ir.is_op(source, aten.linear):      # linear(x) · c
        if not interior(source, node):
            return "the linear output has other users"
        params = _linear_params(gm, source)
        if isinstance(params, str):
            return params
        w, b = params
        new_b = _scaled(node, b) if b is not None else None
        _retarget(gm, source, _scaled(node, w), new_b)
        ir.replace_all_uses(node, source)
        return Match("scalar → linear (output)", [node])
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if user is not None and ir.is_op(user, aten.linear) and user.args[0] is node:   # linear(x · c)
        params = _linear_params(gm, user)
        if isinstance(params, str):
            return params
        w, b = params
        _retarget(gm, user, _scaled(node, w), b)
        user.args = (source, *user.args[1:])
        return Match("scalar → linear (input)", [node])
    return None


def _linear_params(gm: fx.GraphModule, linear: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    w = constant_tensor(gm, linear.args[1])
    b_arg = arg(linear, 2, "bias")
    b = constant_tensor(gm, b_arg) if b_arg is not None else None
    if w is None or (b_arg is not None and b is None):
        return "linear weight or bias is not a constant"
    return w, b


def _scaled(node: fx.Node, tensor: torch.Tensor) -> torch.Tensor:
    c = scalar(node.args[1])
    return tensor * c if ir.is_op(node, aten.mul) else tensor / c


def _retarget(gm: fx.GraphModule, linear: fx.Node, w: torch.Tensor, b: torch.Tensor | None) -> None:
    w_node = ir.add_constant(gm, f"{linear.name}_scaled_weight", w)
    b_node = ir.add_constant(gm, f"{linear.name}_scaled_bias", b) if b is not None else None
    linear.args = (linear.args[0], w_node, b_node)
    linear.kwargs = {}
