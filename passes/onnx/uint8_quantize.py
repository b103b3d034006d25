"""Quantize straight to uint8 where int8 codes are only shifted to uint8 (lossless).

    q  = QuantizeLinear(x, s, z)            z: int8 zeros (a constant, or Expand of a scalar 0)
    u  = Cast(Add(Cast(q, int32), 128), uint8)
  ⇒ u  = QuantizeLinear(x, s, z')           z': uint8 128, the same shape as z

QuantizeLinear computes saturate(round(x / s) + zero point). With zero point
0 into int8 the codes are clip(round(x / s), −128, 127); adding 128 gives
clip(round(x / s) + 128, 0, 255), which is QuantizeLinear into uint8 with
zero point 128: the same bytes, in one op instead of four. graphopt's export
writes the first form (the int8 op's translation, then the uint8 × uint8
MatMulInteger's shift); this pass removes three passes over every quantized
activation. A match is rejected when the int8 codes are read elsewhere too
(both forms would then be computed) or the zero point is not all zeros.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, constant, is_standard, only_consumer

_INT32, _UINT8 = onnx.TensorProto.INT32, onnx.TensorProto.UINT8


class QuantizeToUint8(OnnxPass):
    name = "onnx_quantize_to_uint8"
    min_opset = 13          # QuantizeLinear with a per-axis zero point

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        zero_points: dict[str, gs.Tensor] = {}     # int8 zero point name → its uint8 twin (made once)
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or not is_standard(node) or len(node.inputs) < 3:
                continue
            shift, reason = _uint8_shift(node, graph)
            if reason:
                log.rejected("QuantizeLinear", node.name, reason)
                continue
            name = node.inputs[2].name
            if name not in zero_points:
                zero_points[name] = _uint8_zero_point(node.inputs[2], graph)
            uint8 = shift.outputs[0]
            shift.outputs.clear()
            graph.nodes.append(gs.Node("QuantizeLinear", name=f"{uint8.name}_quantize", attrs=dict(node.attrs),
                                       inputs=[node.inputs[0], node.inputs[1], zero_points[name]], outputs=[uint8]))
            log.matched("QuantizeLinear → uint8")
        graph.cleanup()


def _uint8_shift(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node | None, str | None]:
    """The final Cast of Cast(int32) → Add(128) → Cast(uint8) reading `node`'s codes, or why not."""
    widen = only_consumer(node.outputs[0], graph)
    if widen is None or widen.op != "Cast" or widen.attrs.get("to") != _INT32:
        return None, "int8 codes not read by one Cast to int32 only"
    add = only_consumer(widen.outputs[0], graph)
    other = [t for t in add.inputs if t is not widen.outputs[0]] if add is not None and add.op == "Add" else []
    value = constant(other[0]) if len(other) == 1 else None
    if value is None or np.asarray(value).size != 1 or int(np.asarray(value).reshape(())) != 128:
        return None, "int32 codes not shifted by a constant 128 (read once)"
    narrow = only_consumer(add.outputs[0], graph)
    if narrow is None or narrow.op != "Cast" or narrow.attrs.get("to") != _UINT8:
        return None, "shifted codes not cast to uint8"
    if not _int8_zeros(node.inputs[2]):
        return None, "int8 zero point is not all zeros"
    return narrow, None


def _int8_zeros(zero_point: gs.Tensor) -> bool:
    """Whether `zero_point` is int8 zeros: a constant, or Expand of a constant."""
    value = constant(zero_point)
    if value is None and len(zero_point.inputs) == 1 and zero_point.inputs[0].op == "Expand":
        value = constant(zero_point.inputs[0].inputs[0])
    return value is not None and np.asarray(value).dtype == np.int8 and not np.any(np.asarray(value) != 0)


def _uint8_zero_point(zero_point: gs.Tensor, graph: gs.Graph) -> gs.Tensor:
    """A uint8 128 zero point of the same shape: a constant, or an Expand to the same shape."""
    value = constant(zero_point)
    if value is not None:
        return gs.Constant(f"{zero_point.name}_uint8", np.full(np.shape(value), 128, np.uint8))
    expand = zero_point.inputs[0]
    scalar = gs.Constant(f"{zero_point.name}_uint8_scalar", np.full(np.shape(constant(expand.inputs[0])), 128,
                                                                       np.uint8))
    expanded = gs.Variable(f"{zero_point.name}_uint8", dtype=np.uint8)
    graph.nodes.append(gs.Node("Expand", name=f"{expanded.name}_expand", inputs=[scalar, expand.inputs[1]],
                               outputs=[expanded]))
    return expanded
