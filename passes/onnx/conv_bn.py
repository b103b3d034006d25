"""Conv + BatchNormalization folding (O1, lossless up to float rounding).

    Conv(x, W, b) → BatchNormalization(·, γ, β, μ, σ², ε)  ⇒  Conv(x, W', b')

    s  = γ / √(σ² + ε)          (one factor per output channel)
    W' = W · s[:, None, …]
    b' = (b − μ) · s + β        (b = 0 when the conv has no bias)

because BN(y) = (y − μ)·s + β is affine per channel and Conv is linear in
W and b. Folded in float64, stored in W's dtype. Needs constant W, b and BN
parameters, a Conv output read only by the BN, and BN in inference mode.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, bypass, constant, is_standard, only_consumer


class FoldConvBatchNorm(OnnxPass):
    name = "onnx_fold_conv_bn"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for bn in list(graph.nodes):
            if bn.op != "BatchNormalization" or not bn.inputs or not bn.inputs[0].inputs:
                continue
            conv = bn.inputs[0].inputs[0]
            reason = _why_not(conv, bn, graph)
            if reason:
                log.rejected("Conv+BatchNormalization", bn.name, reason)
                continue
            weight = constant(conv.inputs[1])
            bias = constant(conv.inputs[2]) if len(conv.inputs) > 2 else None
            gamma, beta, mean, var = (constant(t).astype(np.float64) for t in bn.inputs[1:5])
            scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            new_w = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            old_b = bias.astype(np.float64) if bias is not None else np.zeros_like(mean)
            new_b = (old_b - mean) * scale + beta
            w = gs.Constant(f"{conv.name}_bn_folded_weight", new_w.astype(weight.dtype))
            b = gs.Constant(f"{conv.name}_bn_folded_bias", new_b.astype(weight.dtype))
            conv.inputs[1] = w
            if len(conv.inputs) > 2:
                conv.inputs[2] = b
            else:
                conv.inputs.append(b)
            bypass(bn, conv.outputs[0], graph)
            log.matched("Conv+BatchNormalization")


def _why_not(conv: gs.Node, bn: gs.Node, graph: gs.Graph) -> str | None:
    if conv.op != "Conv":
        return f"input comes from {conv.op}, not Conv"
    if not (is_standard(conv) and is_standard(bn)):
        return "custom domain"
    if only_consumer(conv.outputs[0], graph) is not bn:
        return "the Conv output has other readers"
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if any(len(t.outputs) or t in graph.outputs for t in bn.outputs[1:]):
        return "running statistics outputs are used"
    if constant(conv.inputs[1]) is None or (len(conv.inputs) > 2 and constant(conv.inputs[2]) is None):
        return "Conv weight or bias is not a constant"
    if len(bn.inputs) < 5 or any(constant(t) is None for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    channels = constant(conv.inputs[1]).shape[0]
    if any(constant(t).shape != (channels,) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters do not match the Conv's output channels"
    return None
