"""Constant folding (O1, lossless): evaluate nodes whose inputs are all constants.

    f(c₁, …, cₙ) ⇒ c      (evaluated once by ONNX Runtime through onnx-graphsurgeon)
    Shape(x) ⇒ c          when x's shape is static

Size guard: a generator (`ConstantOfShape`, `Tile`, `Expand`, `Range`) is
never materialized when its output would be more than `max_growth_bytes`
larger than its inputs (a broadcast mask of batch × heads × seq² floats
belongs in the graph, not in the file). Custom-domain nodes are not
evaluated. Values are computed by the same runtime that runs the model, so
the folded constants are exactly what the graph computed.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, constant, is_standard

GENERATORS = ("ConstantOfShape", "Tile", "Expand", "Range")


class ConstantFolding(OnnxPass):
    name = "onnx_constant_folding"

    def __init__(self, max_growth_bytes: int = 1 << 20) -> None:
        self.max_growth_bytes = max_growth_bytes

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        before = len(graph.nodes)

        def exclude(node: gs.Node) -> bool:
            if not is_standard(node):
                log.rejected("fold", node.name, f"custom domain {node.domain!r} is not evaluated")
                return True
            growth = _growth_bytes(node)
            if growth is not None and growth > self.max_growth_bytes:
                log.rejected("fold", node.name, f"{node.op} would add {growth / 2**20:.1f} MiB of constants "
                                                f"(guard: {self.max_growth_bytes / 2**20:.1f} MiB)")
                return True
            return False

        graph.fold_constants(should_exclude_node=exclude, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False)
        if len(graph.nodes) < before:
            log.matched("folded node", before - len(graph.nodes))


def _growth_bytes(node: gs.Node) -> int | None:
    """Bytes a generator's folded output would add over its inputs; None if not a generator or unknown."""
    if node.op not in GENERATORS:
        return None
    values = [constant(t) for t in node.inputs]
    if any(v is None for v in values[:2]):
        return None
    inputs = sum(np.asarray(v).nbytes for v in values if v is not None)
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        itemsize = value.values.itemsize if isinstance(value, gs.Constant) else 4
        out = int(np.prod(values[0])) * itemsize
    elif node.op == "Tile":
        out = np.asarray(values[0]).nbytes * int(np.prod(values[1]))
    elif node.op == "Expand":
        data = np.asarray(values[0])
        out = int(np.prod(np.broadcast_shapes(data.shape, tuple(int(d) for d in values[1])))) * data.itemsize
    else:  # Range(start, limit, delta)
        if len(values) < 3 or values[2] is None or float(values[2]) == 0:
            return None
        count = max(0, int(np.ceil((float(values[1]) - float(values[0])) / float(values[2]))))
        out = count * np.asarray(values[0]).itemsize
    return out - inputs
