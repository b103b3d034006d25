"""Dead-node elimination (O1, lossless): drop nodes and initializers no output depends on.

    node whose outputs reach no graph output ⇒ removed;  unused initializer ⇒ removed

onnx-graphsurgeon's `cleanup` walks back from the graph outputs; graph
inputs are kept (the model's signature does not change).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass


class DeadNodeElimination(OnnxPass):
    name = "onnx_dead_nodes"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        nodes, constants = len(graph.nodes), _constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        if len(graph.nodes) < nodes:
            log.matched("dead node", nodes - len(graph.nodes))
        if _constants(graph) < constants:
            log.matched("unused initializer", constants - _constants(graph))


def _constants(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
