"""Consecutive Transpose / Reshape collapse (O1, exact: data movement only).

    Transpose(Transpose(x, p₁), p₂)  ⇒  Transpose(x, p)    p[i] = p₁[p₂[i]];  ⇒ x when p is the identity
    Reshape(Reshape(x, s₁), s₂)      ⇒  Reshape(x, s₂)     s₂ constant with no 0 entry (or allowzero=1)
    Reshape(x, s) ⇒ x                                     x's static shape already is s

A reshape only re-reads the row-major element order, so only the last target
shape matters — unless it copies a dimension (0) from the intermediate.
Nodes are visited in topological order, so chains collapse in one walk.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog

from .base import OnnxPass, bypass, constant, is_standard


class CollapseTransposeReshape(OnnxPass):
    name = "onnx_collapse_transpose_reshape"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        graph.toposort()
        for node in list(graph.nodes):
            if node.op not in ("Transpose", "Reshape") or not node.outputs:
                continue
            if not is_standard(node):
                log.rejected(node.op, node.name, f"custom domain {node.domain!r}")
                continue
            if node.op == "Transpose":
                _transpose(node, graph, log)
            else:
                _reshape(node, graph, log)


def _transpose(node: gs.Node, graph: gs.Graph, log: RewriteLog) -> None:
    source = node.inputs[0]
    inner = source.inputs[0] if source.inputs else None
    if inner is None or inner.op != "Transpose" or not is_standard(inner):
        return
    p1, p2 = inner.attrs.get("perm"), node.attrs.get("perm")
    if p1 is None or p2 is None:
        log.rejected("Transpose∘Transpose", node.name, "a perm is implicit (rank unknown)")
        return
    perm = [p1[i] for i in p2]
    node.inputs[0] = inner.inputs[0]
    if perm == sorted(perm):
        log.matched("Transpose∘Transpose = identity")
        if node.outputs[0] in graph.outputs and (node.inputs[0] in graph.inputs or isinstance(node.inputs[0], gs.Constant)):
            node.op, node.attrs = "Identity", {}
            return
        bypass(node, node.inputs[0], graph)
    else:
        node.attrs["perm"] = perm
        log.matched("Transpose∘Transpose")


def _reshape(node: gs.Node, graph: gs.Graph, log: RewriteLog) -> None:
    target = constant(node.inputs[1])
    source = node.inputs[0]
    inner = source.inputs[0] if source.inputs else None
    if inner is not None and inner.op == "Reshape" and is_standard(inner):
        if target is None:
            log.rejected("Reshape∘Reshape", node.name, "target shape is not a constant")
        elif (np.asarray(target) == 0).any() and not node.attrs.get("allowzero", 0):
            log.rejected("Reshape∘Reshape", node.name, "target shape copies a dimension (0) from the intermediate")
        else:
            node.inputs[0] = inner.inputs[0]
            source = node.inputs[0]
            log.matched("Reshape∘Reshape")
    shape = source.shape
    if target is not None and shape is not None and all(isinstance(d, int) and d >= 0 for d in shape) \
            and _resolve(target, shape) == list(shape):
        if node.outputs[0] in graph.outputs and (source in graph.inputs or isinstance(source, gs.Constant)):
            return
        bypass(node, source, graph)
        log.matched("Reshape to own shape")


def _resolve(target: np.ndarray, shape: list[int]) -> list[int] | None:
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    if 0 in dims:
        return None
    total = int(np.prod(shape))
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims
