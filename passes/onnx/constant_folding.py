"""Constant folding (O1, lossless): evaluate nodes whose inputs are all constants.

    f(c₁, …, cₙ) ⇒ c      (evaluated once by ONNX Runtime through onnx-graphsurgeon)
    Shape(x) ⇒ c          when x's shape is static

Size guard (as the FX pass's): the model may grow by at most `max_growth_bytes`
in all, over the whole pass. A generator (`ConstantOfShape`, `Tile`, `Expand`,
`Range`) is the one kind of node whose folded output can be much larger than
its inputs; each one's growth (output bytes, from its constant inputs or the
inferred output shape, minus its constant inputs' bytes) is charged to that one
budget in graph order, and a generator that would exceed what is left stays in
the graph. A per-node limit alone is not enough: graphs whose weights are made
at run time by `ConstantOfShape` (the onnx package's "light" model-zoo graphs:
one generator per weight, each under any sensible per-node limit) grew 46–370×.
Folding a generator buys no run-time work (ONNX Runtime folds it when the
session starts); it only lets later passes see constant weights. Other nodes
(casts, transposes, arithmetic on weights) replace constants by results of the
same order of size and are folded. Custom-domain nodes are not evaluated.
Values are computed by the same runtime that runs the model, so the folded
constants are exactly what the graph computed.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, constant, is_standard

GENERATORS = ("ConstantOfShape", "Tile", "Expand", "Range")


class ConstantFolding(OnnxPass):
    name = "onnx_constant_folding"

    def __init__(self, max_growth_bytes: int = 1 << 20) -> None:
        self.max_growth_bytes = max_growth_bytes

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        before = len(graph.nodes)
        admitted: dict[str, int] = {}     # generator (by its output's name) → growth charged to the budget
        refused: set[str] = set()

        def exclude(node: gs.Node) -> bool:
            if not is_standard(node):
                log.rejected("fold", node.name, Reject(Reason.CUSTOM_DOMAIN, f"custom domain {node.domain!r} is not evaluated"))
                return True
            key = node.outputs[0].name if node.outputs else node.name
            if key in admitted or key in refused:    # onnx-graphsurgeon asks about a node more than once
                return key in refused
            growth = _growth_bytes(node)
            if growth is None:
                return False
            spent = sum(admitted.values())
            if growth > 0 and spent + growth > self.max_growth_bytes:
                log.rejected("fold", node.name, Reject(Reason.SIZE_LIMIT,
                                                       f"{node.op} would add {growth / 2**20:.2f} MiB of constants, "
                                                       f"{spent / 2**20:.2f} MiB of the pass's "
                                                       f"{self.max_growth_bytes / 2**20:.2f} MiB already spent"))
                refused.add(key)
                return True
            admitted[key] = growth
            return False

        graph.fold_constants(should_exclude_node=exclude, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False)
        if len(graph.nodes) < before:
            log.matched("folded node", before - len(graph.nodes))


def _growth_bytes(node: gs.Node) -> int | None:
    """Bytes a generator's folded output would add over its constant inputs; None if not a generator."""
    if node.op not in GENERATORS:
        return None
    values = [constant(t) for t in node.inputs]
    inputs = sum(np.asarray(v).nbytes for v in values if v is not None)
    out = _known_bytes(node.outputs[0]) if node.outputs else None
    if out is None:
        out = _bytes_from_inputs(node, values)
    if out is None:                       # neither inferred nor computable: charge nothing we cannot see,
        return None                       # but such a node's inputs are not constants yet either
    return out - inputs


def _known_bytes(tensor: gs.Tensor) -> int | None:
    """Bytes of `tensor` from its inferred static shape and dtype, if both are known."""
    shape, dtype = tensor.shape, tensor.dtype
    if shape is None or dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return None
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _bytes_from_inputs(node: gs.Node, values: list) -> int | None:
    if any(v is None for v in values[:2]):
        return None
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        itemsize = value.values.itemsize if isinstance(value, gs.Constant) else 4
        return int(np.prod(values[0])) * itemsize
    if node.op == "Tile":
        return np.asarray(values[0]).nbytes * int(np.prod(values[1]))
    if node.op == "Expand":
        data = np.asarray(values[0])
        return int(np.prod(np.broadcast_shapes(data.shape, tuple(int(d) for d in values[1])))) * data.itemsize
    if len(values) < 3 or values[2] is None or float(values[2]) == 0:    # Range(start, limit, delta)
        return None
    count = max(0, int(np.ceil((float(values[1]) - float(values[0])) / float(values[2]))))
    return count * np.asarray(values[0]).itemsize
