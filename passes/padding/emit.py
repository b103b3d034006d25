"""Skip padding, emission: the index of the computed rows, the gathers, the rewired segment nodes, the scatters.

    idx = nonzero(m.flatten()).flatten()                              n computed rows (n is data-dependent)
    segment(x)  ⇒  index_put(zeros [B·S, …], [idx], segment(index_select(x.flatten(0, 1), 0, idx)))
                                                                          (viewed as [B, S, …] again)

n is an unbacked symbolic size for torch.export and FakeTensor propagation: nothing in a segment branches on
it, so the graph stays traceable, re-exportable (ONNX NonZero / Gather / ScatterND) and dynamic in B and S.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .plan import Plan

aten = torch.ops.aten


def apply(gm: fx.GraphModule, plan: Plan) -> None:
    """Rewrite `gm` by `plan`: segments on packed rows, padded rows of their outputs zeros."""
    graph = gm.graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        idx, count, batch, seq, anchor = _computed_rows(graph, plan)
    order = {n: i for i, n in enumerate(graph.nodes)}
    packed: dict[fx.Node, fx.Node] = {}
    for source in plan.sources:     # an input (the mask itself, a float token input) is gathered after idx
        with graph.inserting_after(source if order[source] > order[anchor] else anchor):
            nodes = [] if plan.rows.lead(source) == 1 else [graph.call_function(aten.flatten.using_ints,
                                                                                (source, 0, 1))]
            nodes.append(graph.call_function(aten.index_select.default, (nodes[-1] if nodes else source, 0, idx)))
        _chain(nodes)
        packed[source] = nodes[-1]

    def on_packed_rows(arg: fx.Node) -> fx.Node:
        return packed.get(arg, arg)

    for node, (args, kwargs) in plan.nodes.items():
        node.args = fx.node.map_arg(args, on_packed_rows)
        node.kwargs = fx.node.map_arg(kwargs, on_packed_rows)
    for sink in plan.sinks:
        lead, trailing = plan.rows.lead(sink), plan.rows.trailing(sink)
        users = [u for u in sink.users if u not in plan.nodes]
        with graph.inserting_after(sink):
            full = _scatter(graph, sink, trailing, idx, count, (batch, seq) if lead == 2 else None)
        for user in users:
            user.replace_input_with(sink, full)


def _computed_rows(graph: fx.Graph, plan: Plan) -> tuple[fx.Node, Any, Any, Any, fx.Node]:
    """idx (the computed rows of [B·S]), B·S, B and S (ints where static, `sym_size` nodes where symbolic), and
    the last node made here."""
    mask = plan.mask
    nodes = []

    def call(op: Any, *args: Any) -> fx.Node:
        nodes.append(graph.call_function(op, args))
        return nodes[-1]

    computed = call(aten.ne.Scalar, mask, 0)
    if plan.keep_first:     # the first position of each sequence: the running count of ones is 1
        first = call(aten.eq.Scalar, call(aten.cumsum.default, call(aten.ones_like.default, mask), 1), 1)
        computed = call(aten.logical_or.default, computed, first)
    flat = call(aten.reshape.default, computed, [-1])
    idx = call(aten.reshape.default, call(aten.nonzero.default, flat), [-1])
    sizes = [d if isinstance(d, int) else call(aten.sym_size.int, m, i)
             for m, i, d in ((flat, 0, plan.rows.batch * plan.rows.seq), (mask, 0, plan.rows.batch),
                             (mask, 1, plan.rows.seq))]
    _chain(nodes)
    return (idx, *sizes, nodes[-1])


def _chain(nodes: list[fx.Node]) -> None:
    """Keep nodes created under one insertion point in creation order (each one after the previous)."""
    for before, after in zip(nodes, nodes[1:]):
        before.append(after)


def _scatter(graph: fx.Graph, sink: fx.Node, trailing: tuple, idx: fx.Node, count: Any,
             tokens: tuple[Any, Any] | None) -> fx.Node:
    """full = index_put(zeros [B·S, …], [idx], sink), viewed as [B, S, …] when `tokens` is (B, S)."""
    nodes = []
    dims = []
    for i, d in enumerate(trailing):
        if isinstance(d, int):
            dims.append(d)
        else:
            nodes.append(graph.call_function(aten.sym_size.int, (sink, i + 1)))
            dims.append(nodes[-1])
    nodes.append(graph.call_function(aten.new_zeros.default, (sink, [count, *dims])))
    nodes.append(graph.call_function(aten.index_put.default, (nodes[-1], [idx], sink)))
    if tokens is not None:
        nodes.append(graph.call_function(aten.view.default, (nodes[-1], [*tokens, *dims])))
    _chain(nodes)
    return nodes[-1]
