"""MatMul + Add → Gemm (O1, lossless up to float rounding).

    Add(MatMul(A, B), C)  ⇒  Gemm(A, B, C)       A: [M, K], B: constant [K, N], C: constant [N] or [1, N]

Gemm computes A·B + C in one kernel (bias in the epilogue). Gemm is 2-D
only: a MatMul on a rank-3 activation (transformers' [batch, seq, hidden])
is rejected with that reason rather than wrapped in reshapes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, bypass, constant, is_standard, only_consumer


class MatMulAddToGemm(OnnxPass):
    name = "onnx_matmul_add_to_gemm"
    min_opset = 7

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for matmul in list(graph.nodes):
            if matmul.op != "MatMul":
                continue
            add = only_consumer(matmul.outputs[0], graph)
            reason = _why_not(matmul, add, graph)
            if reason:
                log.rejected("MatMul+Add", matmul.name, reason)
                continue
            bias = next(t for t in add.inputs if t is not matmul.outputs[0])
            gemm = gs.Node("Gemm", name=f"{matmul.name}_gemm", inputs=[matmul.inputs[0], matmul.inputs[1], bias],
                           outputs=[gs.Variable(f"{matmul.name}_gemm_out", dtype=add.outputs[0].dtype,
                                                shape=add.outputs[0].shape)])
            graph.nodes.append(gemm)
            bypass(add, gemm.outputs[0], graph)
            matmul.outputs.clear()
            matmul.inputs.clear()
            log.matched("MatMul+Add")


def _why_not(matmul: gs.Node, add: gs.Node | None, graph: gs.Graph) -> str | None:
    if not is_standard(matmul):
        return "custom domain"
    if add is None or add.op != "Add" or not is_standard(add):
        return "output is not read by a single Add"
    a, b = matmul.inputs
    weight = constant(b)
    if weight is None or weight.ndim != 2:
        return "B is not a constant 2-D matrix"
    if a.shape is None or len(a.shape) != 2:
        return f"A has rank {len(a.shape) if a.shape is not None else 'unknown'}; Gemm is 2-D only"
    others = [t for t in add.inputs if t is not matmul.outputs[0]]
    if len(others) != 1:
        return "Add adds the product to itself"
    bias = constant(others[0])
    if bias is None:
        return "the added tensor is not a constant"
    if bias.shape not in ((weight.shape[1],), (1, weight.shape[1])):
        return f"bias shape {bias.shape} is not [N] or [1, N] with N={weight.shape[1]}"
    if np.dtype(bias.dtype) != np.dtype(weight.dtype):
        return "bias and weight dtypes differ"
    return None
