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

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Op, Rule, Var
from ._match import arg, call, constant_tensor, interior, permutation, scalar

aten = torch.ops.aten

_PERMUTES = (aten.permute, aten.transpose)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)
_SCALES = (aten.mul, aten.div)


class PermuteChain(Rule):
    name = "algebraic"
    pattern = Op(_PERMUTES, Op(_PERMUTES, Var("source"), name="inner"))

    def check(self, gm: fx.GraphModule, b: Bindings) -> Reject | None:
        if ir.is_mutated(b["root"]) or ir.is_mutated(b["inner"]):
            return Reject(Reason.MUTATED, "a permuted value is modified in place")
        p, q = permutation(b["inner"]), permutation(b["root"])
        if p is None or q is None:
            return Reject(Reason.UNKNOWN_SHAPE, "rank unknown")
        b["composed"] = [p[j] for j in q]
        return None

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        node, composed, source = b["root"], b["composed"], b["source"]
        if composed == list(range(len(composed))):
            ir.replace_all_uses(node, source)
            return Match("permute chain → identity", [node, b["inner"]])
        new = call(gm.graph, aten.permute.default, (source, composed), before=node)
        ir.replace_all_uses(node, new)
        return Match("permute chain", [node, b["inner"]])


class ReshapeChain(Rule):
    name = "algebraic"
    pattern = Op(_RESHAPES, Op(_RESHAPES, Var("source"), name="inner"), Var("shape"))

    def check(self, gm: fx.GraphModule, b: Bindings) -> Reject | None:
        if ir.is_mutated(b["root"]) or ir.is_mutated(b["inner"]):
            return Reject(Reason.MUTATED, "a reshaped value is modified in place")
        return None

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        node = b["root"]
        new = call(gm.graph, aten.reshape.default, (b["source"], b["shape"]), before=node)
        ir.replace_all_uses(node, new)
        return Match("reshape chain", [node, b["inner"]])


class MatmulToLinear(Rule):
    name = "algebraic"
    anchors = (aten.matmul, aten.mm, aten.addmm)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Bindings | Reject | None:
        bias_node = None
        if ir.is_op(node, aten.addmm):
            if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
                return Reject(Reason.UNSUPPORTED_FORM, "addmm with beta/alpha ≠ 1")
            bias_node, x, w_node = node.args[0], node.args[1], node.args[2]
        else:
            x, w_node = node.args[0], node.args[1]
        weight = constant_tensor(gm, w_node)
        if weight is None:
            return None
        if weight.dim() != 2:
            return Reject(Reason.SHAPE_MISMATCH, "the right operand is not a 2-D weight")
        if ir.dtype(x) != weight.dtype:
            return Reject(Reason.DTYPE_MISMATCH, "input and weight dtypes differ")
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
            return Reject(Reason.SHAPE_MISMATCH, "bias is not a constant of the output features' shape")
        return {"x": x, "w_node": w_node, "weight": weight, "bias_node": bias_node, "bias": bias, "out": out,
                "dead": dead}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        weight, bias, bias_node = b["weight"], b["bias"], b["bias_node"]
        w_t = ir.add_constant(gm, ir.owned_name(b["w_node"], f"{b['w_node'].name}_t"), weight.t().contiguous())
        new_bias = None
        if bias is not None:
            new_bias = bias_node if list(bias.shape) == [weight.shape[1]] \
                else ir.add_constant(gm, ir.owned_name(bias_node, f"{bias_node.name}_v"), bias)
        new = call(gm.graph, aten.linear.default, (b["x"], w_t, new_bias), before=b["out"])
        ir.replace_all_uses(b["out"], new)
        return Match("matmul + bias → linear" if new_bias is not None else "matmul → linear", b["dead"])


def _as_bias(gm: fx.GraphModule, node: object, weight: torch.Tensor) -> torch.Tensor | None:
    """A constant that broadcasts only along the output features, as a 1-D tensor."""
    tensor = constant_tensor(gm, node)
    if tensor is None or tensor.dtype != weight.dtype or tensor.dim() == 0:
        return None
    if tensor.shape[-1] != weight.shape[1] or any(d != 1 for d in tensor.shape[:-1]):
        return None
    return tensor.reshape(-1)


class ScaleIntoLinear(Rule):
    """linear(x) · c ⇒ linear with c·W, c·b;  linear(x · c) ⇒ linear with c·W."""
    name = "algebraic"
    anchors = _SCALES

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Bindings | Reject | None:
        c = scalar(node.args[1]) if len(node.args) > 1 else None
        source = node.args[0]
        if c is None or not isinstance(source, fx.Node):
            return None
        if ir.is_op(node, aten.div) and c == 0:
            return Reject(Reason.NOT_THE_FORMULA, "division by zero")
        if ir.is_op(source, aten.linear):      # linear(x) · c
            if not interior(source, node):
                return Reject(Reason.OTHER_USERS, "the linear output has other users")
            linear, side = source, "output"
        else:
            user = next(iter(node.users)) if len(node.users) == 1 else None
            if user is None or not ir.is_op(user, aten.linear) or user.args[0] is not node:
                return None
            linear, side = user, "input"                # linear(x · c)
        params = _linear_params(gm, linear)
        if isinstance(params, Reject):
            return params
        return {"node": node, "source": source, "linear": linear, "side": side, "w": params[0], "b": params[1]}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        node, linear, w, bias = b["node"], b["linear"], b["w"], b["b"]
        if b["side"] == "output":
            _retarget(gm, linear, _scaled(node, w), _scaled(node, bias) if bias is not None else None)
            ir.replace_all_uses(node, linear)
        else:
            _retarget(gm, linear, _scaled(node, w), bias)
            linear.args = (b["source"], *linear.args[1:])
        return Match(f"scalar → linear ({b['side']})", [node])


RULES = [PermuteChain(), ReshapeChain(), MatmulToLinear(), ScaleIntoLinear()]


def _linear_params(gm: fx.GraphModule, linear: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | Reject:
    w = constant_tensor(gm, linear.args[1])
    b_arg = arg(linear, 2, "bias")
    b = constant_tensor(gm, b_arg) if b_arg is not None else None
    if w is None or (b_arg is not None and b is None):
        return Reject(Reason.NOT_CONSTANT, "linear weight or bias is not a constant")
    return w, b


def _scaled(node: fx.Node, tensor: torch.Tensor) -> torch.Tensor:
    c = scalar(node.args[1])
    return tensor * c if ir.is_op(node, aten.mul) else tensor / c


def _retarget(gm: fx.GraphModule, linear: fx.Node, w: torch.Tensor, b: torch.Tensor | None) -> None:
    w_node = ir.add_constant(gm, ir.owned_name(linear.args[1], f"{linear.name}_scaled_weight"), w)
    b_node = ir.add_constant(gm, ir.owned_name(linear.args[1], f"{linear.name}_scaled_bias"), b) \
        if b is not None else None
    linear.args = (linear.args[0], w_node, b_node)
    linear.kwargs = {}
