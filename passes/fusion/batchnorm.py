"""Fold an inference-mode BatchNorm into the convolution or linear before it.

    conv(x, W, b) → batch_norm(·, γ, β, μ, σ², training=False, eps)  ⇒  conv(x, W', b')
    linear(x, W, b) → batch_norm(·, …)   (BatchNorm1d on [N, C])      ⇒  linear(x, W', b')

Math: batch_norm(y)_c = s_c · (y_c − μ_c) + β_c with s_c = γ_c / sqrt(σ²_c + eps).
Output channel c of a conv or linear is y_c = W_c · x + b_c, so

    W'_c = s_c · W_c          b'_c = s_c · (b_c − μ_c) + β_c

(γ = 1, β = 0 when the BN has no affine parameters; b = 0 when the conv has no
bias). W_c is the slice holding output channel c: dim 0 of a conv or linear
weight; for a transposed conv, whose weight is [C_in, C_out/groups, k…], the
slice [g, :, j] of the weight viewed as [groups, C_in/groups, C_out/groups, k…]
for c = g·C_out/groups + j. Folding is done in float64 and rounded once.

Skipped (with the reason) when the BN is in training mode, lacks running
statistics, the conv/linear output has other users, the parameters are not
constants, or the BN's channel axis is not the layer's output-feature axis.

This is graphopt's one BatchNorm fold on FX graphs: the O1 fusion runs it, and
fine-tuning folds its train-time norms back with it (`passes/renorm.py`,
`fold_norms`). ONNX graphs get the same W', b' from onnxscript's
fuse_batchnorm_into_{conv,conv_transpose,gemm} rules (`passes/onnx/onnxscript_rules.py`,
`fold_conv_batchnorm`); no other module folds BatchNorm.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Rule
from ._match import arg, constant_tensor, rank

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d,
          aten.conv_transpose3d, aten.convolution)


class FoldBatchNormRule(Rule):
    name = "batchnorm fold"
    anchors = (aten.batch_norm,)

    def match(self, gm: fx.GraphModule, bn: fx.Node) -> Bindings | Reject:
        layer = bn.args[0]
        if not isinstance(layer, fx.Node) or not ir.is_op(layer, aten.linear, *_CONVS):
            return Reject(Reason.WRONG_PRODUCER, "input is not a conv or linear")
        return {"bn": bn, "layer": layer}

    def check(self, gm: fx.GraphModule, b: Bindings) -> Reject | None:
        bn, layer = b["bn"], b["layer"]
        if arg(bn, 5, "training", False) is not False:
            return Reject(Reason.TRAINING_MODE, "BatchNorm is in training mode")
        if len(layer.users) != 1:
            return Reject(Reason.OTHER_USERS, f"{_kind(layer)} output has {len(layer.users)} users")
        if ir.is_mutated(layer):
            return Reject(Reason.MUTATED, f"{_kind(layer)} output is modified in place")
        gamma, beta, mean, var = (constant_tensor(gm, a) if a is not None else None for a in bn.args[1:5])
        if mean is None or var is None:
            return Reject(Reason.NOT_CONSTANT, "running statistics are missing or not constant")
        if any(a is not None and s is None for a, s in zip(bn.args[1:3], (gamma, beta))):
            return Reject(Reason.NOT_CONSTANT, "BatchNorm affine parameters are not constant")
        weight = constant_tensor(gm, layer.args[1])
        bias_arg = arg(layer, 2, "bias")
        bias = constant_tensor(gm, bias_arg) if bias_arg is not None else None
        if weight is None or (bias_arg is not None and bias is None):
            return Reject(Reason.NOT_CONSTANT, f"{_kind(layer)} weight or bias is not constant")
        if ir.is_op(layer, aten.linear) and rank(layer) != 2:
            return Reject(Reason.WRONG_AXIS,
                          "BatchNorm1d on a 3-D linear output normalizes the sequence axis, not the features")
        b.update(gamma=gamma, beta=beta, mean=mean, var=var, weight=weight, bias=bias)
        return None

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        bn, layer, weight = b["bn"], b["layer"], b["weight"]
        groups, transposed = _geometry(layer)
        new_weight, new_bias = fold_affine(weight, b["bias"], b["gamma"], b["beta"], b["mean"], b["var"],
                                           float(arg(bn, 7, "eps", 1e-5)), groups, transposed)
        w_node = ir.add_constant(gm, ir.owned_name(layer.args[1], f"{layer.name}_bn_weight"), new_weight)
        b_node = ir.add_constant(gm, ir.owned_name(layer.args[1], f"{layer.name}_bn_bias"), new_bias)
        args = list(layer.args) + [None] * max(0, 3 - len(layer.args))
        args[1], args[2] = w_node, b_node
        kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}
        layer.args, layer.kwargs = tuple(args), kwargs
        ir.replace_all_uses(bn, layer)
        return Match(f"batchnorm→{_kind(layer)}", [bn])


RULES = [FoldBatchNormRule()]


def fold_affine(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                beta: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, eps: float,
                groups: int = 1, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the module docstring's fold, computed in float64 and rounded once to W's dtype.

    The FX graphs' one BatchNorm fold (conv, conv-transpose and linear); ONNX graphs take onnxscript's
    fold of the same formula for Conv, ConvTranspose and Gemm (`graphopt.passes.onnx.onnxscript_rules`)."""
    scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(var.double() + eps)
    shift = (beta.double() if beta is not None else 0.0) - mean.double() * scale
    new_weight = _scale_out_channels(weight.double(), scale, groups, transposed).to(weight.dtype)
    old_bias = bias.double() if bias is not None else torch.zeros_like(scale)
    return new_weight, (old_bias * scale + shift).to(weight.dtype)


def _kind(layer: fx.Node) -> str:
    return ir.overload_packet(layer.target).__name__


def _geometry(layer: fx.Node) -> tuple[int, bool]:
    """(groups, transposed) of a conv or linear node."""
    packet = ir.overload_packet(layer.target)
    if packet is aten.linear:
        return 1, False
    if packet is aten.convolution:
        return int(layer.args[8]), bool(layer.args[6])
    if packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d):
        return int(arg(layer, 6, "groups", 1)), True
    return int(arg(layer, 6, "groups", 1)), False


def _scale_out_channels(weight: torch.Tensor, scale: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    kernel = (1,) * (weight.dim() - 2)
    if not transposed:
        return weight * scale.view(-1, 1, *kernel)
    c_in, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.view(groups, c_in // groups, per_group, *weight.shape[2:])
    return (grouped * scale.view(groups, 1, per_group, *kernel)).view_as(weight)
