"""Skip padding, planning: the row-wise segments that run on real rows only, and where rows enter and leave them.

A plan names nodes and tensors only, so it can be emitted on a copy of the graph (to check it) and then on
the graph itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..row_ops import PRODUCTS, Edits, Rows, row_wise, token_leads


@dataclass
class Plan:
    """What to rewrite, by tensor and node names."""
    mask: str
    nodes: dict[str, Edits]                  # nodes that run on the real rows only, and their edits
    sources: list[str]                       # token tensors gathered on the way in
    source_leads: dict[str, int]             # 1: [B·S, …], 2: [B, S, …]
    sinks: dict[str, tuple[int, np.dtype]]   # token tensors scattered back on the way out: lead, dtype
    keep_first: bool = False                 # also compute each sequence's first position, real or not


def plan_rewrite(graph: gs.Graph, mask: str, seq: int, shapes: dict) -> tuple[Plan | None, str]:
    """The segments to run on real rows, or (None, why none)."""
    rows = Rows({n: v[0] for n, v in shapes.items()}, token_leads({n: v[0] for n, v in shapes.items()},
                                                                  {n: v[1] for n, v in shapes.items()}, seq),
                _only_tokens_vary(graph, mask))
    nodes = {n.name: n for n in graph.nodes}
    edits = {name: e for name, e in ((n.name, row_wise(n, rows)) for n in graph.nodes) if e is not None}
    floats = {name for name, (_, _, dtype) in shapes.items() if np.dtype(dtype).kind == "f" and name in rows.leads}
    kept = _shapes_consistent(set(edits), nodes)
    kept = _shapes_consistent(_feeding_products(_on_float_activations(kept, graph, floats), nodes), nodes)
    if not kept:
        return None, "no matrix product runs on token rows ([batch·sequence, …] or [batch, sequence, …] tensors)"
    sources, sinks = [], []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.name not in kept:
            continue
        for tensor in node.inputs:
            if rows.lead(tensor) and (not tensor.inputs or tensor.inputs[0].name not in kept) \
                    and tensor.name not in sources:
                sources.append(tensor.name)
        for tensor in node.outputs:
            if tensor.name and (tensor.name in outputs or any(c.name not in kept for c in tensor.outputs)):
                sinks.append(tensor.name)
    return Plan(mask, {name: edits[name] for name in kept}, sources, {n: rows.leads[n] for n in sources},
                {n: (rows.leads[n], np.dtype(shapes[n][2])) for n in sinks}), ""


def _only_tokens_vary(graph: gs.Graph, mask: str) -> bool:
    """Whether every symbolic input dimension is one of the mask's (batch, sequence): then row shapes are fixed."""
    tokens = {d for d in graph.tensors()[mask].shape or () if not isinstance(d, int)}
    return all(isinstance(d, int) or d in tokens for t in graph.inputs for d in (t.shape or ()))


def _shapes_consistent(names: set[str], nodes: dict[str, gs.Node]) -> set[str]:
    """`names` less each Shape read outside it (its value would be the real rows') and each Expand whose shape
    is not such a Shape of `names` (until none is left)."""
    names = set(names)
    changed = True
    while changed:
        changed = False
        for name in list(names):
            node = nodes[name]
            if (node.op == "Shape" and any(c.name not in names for c in node.outputs[0].outputs)) \
                    or (node.op == "Expand" and node.inputs[1].inputs[0].name not in names):
                names.discard(name)
                changed = True
    return names


def _on_float_activations(names: set[str], graph: gs.Graph, floats: set[str]) -> set[str]:
    """The nodes of `names` that read a float token tensor or the output of such a node.

    Integer and boolean preprocessing (masks, position ids) stays padded: it is cheap, and often read along
    the sequence (RoBERTa's position ids are a cumsum over non-pad ids), where zeros would change it.
    A fixed point, not one sweep: a pass may have appended nodes out of topological order."""
    kept: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if node.name in names and node.name not in kept and any(
                    t.name in floats or (t.inputs and t.inputs[0].name in kept) for t in node.inputs):
                kept.add(node.name)
                changed = True
    return kept


def _feeding_products(names: set[str], nodes: dict[str, gs.Node]) -> set[str]:
    """The matrix products among `names` and the nodes that feed one through `names`.

    What follows the last product (an output's pooling, masking with −∞ for a max) stays padded: it may
    give padded rows values of its own, which zeros would not reproduce."""
    kept = {name for name in names if nodes[name].op in PRODUCTS}
    frontier = list(kept)
    while frontier:
        for tensor in nodes[frontier.pop()].inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and producer.name in names and producer.name not in kept:
                kept.add(producer.name)
                frontier.append(producer.name)
    return kept
