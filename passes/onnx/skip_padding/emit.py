"""Skip padding, emission: the gathers, the rewired segment nodes and the scatters a plan asks for.

    idx = NonZero(Reshape(m, [−1]))
    segment(x)  ⇒  ScatterND(zeros [B·S, …], idxᵀ, segment(Gather(Reshape(x, [−1, …]), idx)))  (then [B, S, …])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .plan import Plan


@dataclass
class RealRows:
    """The tensors every gather and scatter shares, built once per rewrite."""
    index: gs.Variable          # [n] row numbers of the computed rows in [B·S]
    column: gs.Variable         # the same as [n, 1], ScatterND's indices
    count: gs.Variable          # [B·S] as a shape
    tokens: gs.Variable         # [B, S] as a shape
    minus_one: gs.Constant


def apply(graph: gs.Graph, plan: Plan) -> None:
    """Rewrite `graph` by `plan`: segments on real rows, padded rows of their outputs zeros."""
    tensors = graph.tensors()
    rows = _real_rows(graph, tensors[plan.mask], plan.keep_first)
    real: dict[str, gs.Variable] = {}
    for name in plan.sources:
        real[name] = gs.Variable(f"{name}_real_rows", dtype=tensors[name].dtype)
        flat = _flatten_rows(graph, tensors[name], rows) if plan.source_leads[name] == 2 else tensors[name]
        graph.nodes.append(gs.Node("Gather", f"{name}_gather_real_rows", attrs={"axis": 0},
                                   inputs=[flat, rows.index], outputs=[real[name]]))
    nodes = [n for n in graph.nodes if n.name in plan.nodes]
    for node in nodes:
        for i, tensor in enumerate(node.outputs):
            if tensor.name:
                real[tensor.name] = gs.Variable(f"{tensor.name}_real_rows", dtype=tensor.dtype)
                node.outputs[i] = real[tensor.name]
    for node in nodes:
        edits = plan.nodes[node.name]
        node.attrs.update(edits.attrs)
        for i, tensor in enumerate(node.inputs):
            if i in edits.inputs:
                node.inputs[i] = gs.Constant(f"{node.name}_input_{i}_on_real_rows", edits.inputs[i])
            elif tensor.name in real:
                node.inputs[i] = real[tensor.name]
    for name, (lead, dtype) in plan.sinks.items():
        _scatter(graph, tensors[name], real[name], rows, lead, dtype)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _real_rows(graph: gs.Graph, mask: gs.Tensor, keep_first: bool) -> RealRows:
    """The computed rows: the real tokens, and with `keep_first` each sequence's first position too."""
    minus_one = gs.Constant("skip_padding_minus_one", np.array([-1], np.int64))
    names = ("mask_flat", "nonzero", "index", "index_column", "row_count", "token_dims")
    flat, nonzero, index, column, count, tokens = (gs.Variable(f"skip_padding_{n}") for n in names)
    computed = _or_first_position(graph, mask) if keep_first else mask
    graph.nodes += [
        gs.Node("Reshape", "skip_padding_flatten", inputs=[computed, minus_one], outputs=[flat]),
        gs.Node("NonZero", "skip_padding_nonzero", inputs=[flat], outputs=[nonzero]),
        gs.Node("Reshape", "skip_padding_index", inputs=[nonzero, minus_one], outputs=[index]),
        gs.Node("Transpose", "skip_padding_column", attrs={"perm": [1, 0]}, inputs=[nonzero], outputs=[column]),
        gs.Node("Shape", "skip_padding_row_count", inputs=[flat], outputs=[count]),
        gs.Node("Shape", "skip_padding_token_dims", inputs=[mask], outputs=[tokens]),
    ]
    return RealRows(index, column, count, tokens, minus_one)


def _or_first_position(graph: gs.Graph, mask: gs.Tensor) -> gs.Variable:
    """mask ≠ 0 or position = 0, as a [B, S] boolean."""
    names = ("real", "shape", "length", "positions", "first", "kept")
    real, shape, length, positions, first, kept = (gs.Variable(f"skip_padding_{n}") for n in names)
    scalar = {v: gs.Constant(f"skip_padding_{v}", np.array(v, np.int64)) for v in (0, 1)}
    graph.nodes += [
        gs.Node("Cast", "skip_padding_real", attrs={"to": onnx.TensorProto.BOOL}, inputs=[mask], outputs=[real]),
        gs.Node("Shape", "skip_padding_shape", inputs=[mask], outputs=[shape]),
        gs.Node("Gather", "skip_padding_length", attrs={"axis": 0}, inputs=[shape, scalar[1]], outputs=[length]),
        gs.Node("Range", "skip_padding_positions", inputs=[scalar[0], length, scalar[1]], outputs=[positions]),
        gs.Node("Equal", "skip_padding_first", inputs=[positions, scalar[0]], outputs=[first]),
        gs.Node("Or", "skip_padding_kept", inputs=[real, first], outputs=[kept]),
    ]
    return kept


def _flatten_rows(graph: gs.Graph, tensor: gs.Tensor, rows: RealRows) -> gs.Variable:
    """[B, S, …] → [B·S, …]."""
    trailing, shape, flat = (gs.Variable(f"{tensor.name}_{s}") for s in ("row_dims", "rows_shape", "as_rows"))
    graph.nodes += [
        gs.Node("Shape", f"{tensor.name}_row_dims", attrs={"start": 2}, inputs=[tensor], outputs=[trailing]),
        gs.Node("Concat", f"{tensor.name}_rows_shape", attrs={"axis": 0}, inputs=[rows.minus_one, trailing],
                outputs=[shape]),
        gs.Node("Reshape", f"{tensor.name}_as_rows", inputs=[tensor, shape], outputs=[flat]),
    ]
    return flat


def _scatter(graph: gs.Graph, full: gs.Variable, real: gs.Variable, rows: RealRows, lead: int,
             dtype: np.dtype) -> None:
    """full = ScatterND(zeros [B·S, …], real row numbers, real), reshaped to [B, S, …] when `lead` is 2."""
    name = full.name
    trailing, shape, zeros = (gs.Variable(f"{name}_{s}") for s in ("row_dims", "padded_shape", "zeros"))
    graph.nodes += [
        gs.Node("Shape", f"{name}_row_dims", attrs={"start": 1}, inputs=[real], outputs=[trailing]),
        gs.Node("Concat", f"{name}_padded_shape", attrs={"axis": 0}, inputs=[rows.count, trailing], outputs=[shape]),
        gs.Node("ConstantOfShape", f"{name}_zeros", inputs=[shape], outputs=[zeros],
                attrs={"value": gs.Constant(f"{name}_zero", np.zeros(1, dtype))}),
    ]
    scattered = full if lead == 1 else gs.Variable(f"{name}_padded_rows", dtype=full.dtype)
    graph.nodes.append(gs.Node("ScatterND", f"{name}_scatter_real_rows", inputs=[zeros, rows.column, real],
                               outputs=[scattered]))
    if lead == 2:
        token_shape = gs.Variable(f"{name}_token_shape")
        graph.nodes += [
            gs.Node("Concat", f"{name}_token_shape", attrs={"axis": 0}, inputs=[rows.tokens, trailing],
                    outputs=[token_shape]),
            gs.Node("Reshape", f"{name}_as_tokens", inputs=[scattered, token_shape], outputs=[full]),
        ]
