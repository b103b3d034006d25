"""Identity and dropout elimination (O1, lossless).

    Identity(x) ⇒ x
    Dropout(x, ratio, training_mode=False) ⇒ x      (inference: dropout is the identity)
    Cast(x, to=dtype(x)) ⇒ x

A Dropout whose mask output is read, whose training_mode is not a
constant False, or (opset < 7) whose is_test is not 1, is kept (with the reason).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, bypass, constant, is_standard


class EliminateIdentity(OnnxPass):
    name = "onnx_eliminate_identity"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout", "Cast") or not node.inputs:
                continue
            if not is_standard(node):
                log.rejected(node.op, node.name, f"custom domain {node.domain!r}")
                continue
            reason = _why_not(node, graph)
            if reason:
                log.rejected(node.op, node.name, reason)
                continue
            source = node.inputs[0]
            if node.outputs[0] in graph.outputs and (source in graph.inputs or source in graph.outputs
                                                     or isinstance(source, gs.Constant)):
                log.rejected(node.op, node.name, "graph output that copies an input, constant or another output")
                continue
            bypass(node, source, graph)
            log.matched(node.op)


def _why_not(node: gs.Node, graph: gs.Graph) -> str | None:
    if node.op == "Dropout":
        if graph.opset < 7 and node.attrs.get("is_test", 0) != 1:
            return "is_test is not 1 (opset < 7: training-mode dropout)"
        if len(node.outputs) > 1 and node.outputs[1].outputs or (len(node.outputs) > 1 and node.outputs[1] in graph.outputs):
            return "its mask output is used"
        if len(node.inputs) > 2 and node.inputs[2].name:
            training = constant(node.inputs[2])
            if training is None or bool(np.asarray(training)):
                return "training_mode is not a constant False"
    if node.op == "Cast":
        dtype = node.inputs[0].dtype
        try:
            same = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) == node.attrs.get("to")
        except TypeError:
            return "input dtype unknown"
        if not same:
            return "changes the dtype"
    return None
