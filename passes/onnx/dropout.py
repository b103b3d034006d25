"""Inference dropout elimination (O1, lossless): graphopt's own, because onnxscript's
dropout rules match only an explicit ratio 0 or training_mode=False input, not the
default (absent) training_mode that exporters write.

    Dropout(x[, ratio][, training_mode]) ⇒ x      training_mode absent or a constant False;
                                                   (opset < 7) is_test = 1

A Dropout whose mask output is read, whose training_mode is not a
constant False, or (opset < 7) whose is_test is not 1, is kept (with the reason).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, constant, is_standard, replace_input


class EliminateInferenceDropout(OnnxPass):
    name = "onnx_inference_dropout"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for node in list(graph.nodes):
            if node.op != "Dropout" or not node.inputs:
                continue
            if not is_standard(node):
                log.rejected(node.op, node.name, Reject(Reason.CUSTOM_DOMAIN, f"custom domain {node.domain!r}"))
                continue
            reason = _why_not(node, graph)
            if reason:
                log.rejected(node.op, node.name, reason)
                continue
            source = node.inputs[0]
            if node.outputs[0] in graph.outputs and (source in graph.inputs or source in graph.outputs
                                                     or isinstance(source, gs.Constant)):
                log.rejected(node.op, node.name, Reject(Reason.UNSUPPORTED_FORM,
                                                        "graph output that copies an input, constant or another output"))
                continue
            bypass(node, source, graph)
            log.matched(node.op)


def _why_not(node: gs.Node, graph: gs.Graph) -> Reject | None:
    if graph.opset < 7 and node.attrs.get("is_test", 0) != 1:
        return Reject(Reason.TRAINING_MODE, "is_test is not 1 (opset < 7: training-mode dropout)")
    if len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1] in graph.outputs):
        return Reject(Reason.OTHER_USERS, "its mask output is used")
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = constant(node.inputs[2])
        if training is None or bool(np.asarray(training)):
            return Reject(Reason.TRAINING_MODE, "training_mode is not a constant False")
    return None


def bypass(node: gs.Node, source: gs.Tensor, graph: gs.Graph) -> None:
    """Make every reader of `node`'s (single) output read `source`; `node` becomes dead.

    When the output is a graph output, the producer of `source` is made to
    write the graph output tensor instead, so graph output names are kept.
    """
    out = node.outputs[0]
    if out in graph.outputs and source.inputs and source not in graph.outputs and source not in graph.inputs:
        producer = source.inputs[0]
        producer.outputs[producer.outputs.index(source)] = out
        for consumer in list(source.outputs):
            replace_input(consumer, source, out)
        node.outputs.clear()
        node.inputs.clear()
        return
    if out in graph.outputs:
        node.op, node.attrs = "Identity", {}
        del node.inputs[1:]
        node.inputs[0] = source
        return
    for consumer in list(out.outputs):
        replace_input(consumer, out, source)
    node.outputs.clear()
    node.inputs.clear()
