"""4-bit weights stored as 4-bit initializers (export, lossless).

    DequantizeLinear(q, s, z, axis, block_size)     q, z constant uint8 codes in [0, 15] (int8 in [−8, 7])
        ⇒ DequantizeLinear(uint4 q, s, uint4 z, axis, block_size)          two codes a byte in the file

The export writes `graphopt::w4a16_linear` as a block-wise DequantizeLinear of
its unpacked codes (graphopt/onnx/translations.py); constant folding turns the
unpacking into uint8 codes [N, K], a byte each. Storing them (and the zero
points: DequantizeLinear needs both of one type) as UINT4 changes no value and
halves them again, to the packed weight's size. The weight stays [N, K] with its
Transpose: moved into the constants (blocks down axis 0 feeding MatMul), it is the
form ONNX Runtime's extended optimizations replace by MatMulNBits, which also
quantizes the activations (4e-3 relative error measured on a 256-wide layer), so
the file would no longer run what the module computes at ORT's default level. Opset
21 is the first whose DequantizeLinear takes 4-bit types; earlier models are
left alone (with the reason), never upgraded for it.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, constant, is_standard

#: First opset whose DequantizeLinear takes INT4/UINT4.
FOUR_BIT_OPSET = 21
#: 8-bit code dtype ⇒ (its 4-bit type, the 4-bit range).
NARROW = {np.dtype(np.uint8): (ml_dtypes.uint4, 0, 15), np.dtype(np.int8): (ml_dtypes.int4, -8, 7)}


class Int4Weights(OnnxPass):
    name = "onnx_int4_weights"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for node in list(graph.nodes):
            if node.op != "DequantizeLinear" or not is_standard(node):
                continue
            reason = _why_not(node, model.opset)
            if reason:
                log.rejected(node.op, node.name, reason)
                continue
            codes, zeros = constant(node.inputs[0]), constant(node.inputs[2])
            node.inputs[0] = _four_bit(f"{node.name}_codes4", codes)
            node.inputs[2] = _four_bit(f"{node.name}_zeros4", zeros)
            log.matched("4-bit weight")
        graph.cleanup(remove_unused_graph_inputs=False)


def _four_bit(name: str, values: np.ndarray) -> gs.Constant:
    """The values as an INT4/UINT4 constant (OnnxModel.to_proto writes it two values a byte)."""
    return gs.Constant(name, np.ascontiguousarray(values).astype(NARROW[values.dtype][0]))


def _why_not(node: gs.Node, opset: int) -> Reject | None:
    if opset < FOUR_BIT_OPSET:
        return Reject(Reason.OPSET, f"opset {opset} < {FOUR_BIT_OPSET}: DequantizeLinear has no 4-bit types")
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return Reject(Reason.UNSUPPORTED_FORM, "no zero point input")
    codes, zeros = constant(node.inputs[0]), constant(node.inputs[2])
    if codes is None or zeros is None:
        return Reject(Reason.NOT_CONSTANT, "codes or zero points are computed at run time")
    codes, zeros = np.asarray(codes), np.asarray(zeros)
    if codes.dtype not in NARROW or zeros.dtype != codes.dtype:
        return Reject(Reason.DTYPE_MISMATCH, f"codes are {codes.dtype}, zero points {zeros.dtype}: not 8-bit codes")
    _, low, high = NARROW[codes.dtype]
    if codes.size == 0 or min(codes.min(), zeros.min()) < low or max(codes.max(), zeros.max()) > high:
        return Reject(Reason.NOT_ELIGIBLE, f"codes or zero points outside the 4-bit range [{low}, {high}]")
    return None

