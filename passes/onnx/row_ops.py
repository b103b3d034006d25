"""Row-wise ONNX ops: which nodes compute each token row from the same row alone, and how they run on compact rows.

A token tensor has the tokens of a [B, S] batch as its leading dimensions:
[B·S, …] (lead 1) or [B, S, …] (lead 2); what follows is the row's trailing
shape. On compact rows every token tensor becomes [n, trailing…] for the n
real tokens, so a node runs there unchanged except where its meaning depends
on the leading dimensions:

    axis a in the trailing dims             ⇒ a − rank (negative axes count from the end: unchanged by the lead)
    constant c with leading 1s beyond the trailing rank ⇒ c without them (same right-aligned broadcast)
    Reshape to [lead…, t…] (rows kept)       ⇒ Reshape to [−1, t…]

Accepted (each with its condition): elementwise ops whose other operands are
constants broadcasting over the trailing dims; MatMul / MatMulInteger by a
constant matrix; Gemm on [B·S, K]; Gather from a constant table by token ids;
Quantize/DequantizeLinear per tensor, per row ([B·S] scales on axis 0) or per
trailing channel; reductions, Softmax, LayerNormalization, Split, Slice,
Unsqueeze and Squeeze on trailing axes; Reshape within a row (when the graph's
only dynamic dimensions are batch and sequence); Shape and Expand of a scalar
to a row tensor's shape. Everything else (attention, transposes that move the
token axes, …) is a boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .base import constant, is_standard

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Mod", "Abs", "Neg", "Relu", "LeakyRelu", "Elu", "Selu",
    "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Softplus", "Mish", "Sqrt", "Reciprocal",
    "Exp", "Log", "Cast", "Round", "Floor", "Ceil", "Sign", "Clip", "Identity", "Not", "And", "Or", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "IsNaN", "IsInf"})
REDUCTIONS = frozenset({"ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceSumSquare", "ReduceLogSumExp"})
ALONG_AXIS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "Split"})
PRODUCTS = frozenset({"MatMul", "MatMulInteger", "Gemm"})


@dataclass
class Rows:
    """The token layout of a graph's tensors (from running it at batch sizes 1 and 2)."""
    shapes: dict[str, tuple[int, ...]]     # every computed tensor's shape at batch 1
    leads: dict[str, int]                  # token tensors: 1 ([B·S, …]) or 2 ([B, S, …])
    static_rows: bool                      # the trailing shapes are constants (only B and S vary)

    def lead(self, tensor: gs.Tensor) -> int | None:
        return self.leads.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int:
        return len(self.shapes[tensor.name])

    def trailing(self, tensor: gs.Tensor) -> tuple[int, ...]:
        return tuple(self.shapes[tensor.name][self.leads[tensor.name]:])


@dataclass
class Edits:
    """How a row-wise node changes on compact rows: attributes to set, constant inputs to replace."""
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)


def token_leads(shapes_1: dict[str, tuple], shapes_2: dict[str, tuple], seq: int) -> dict[str, int]:
    """{name: lead} for tensors whose leading dims are S / 2·S ([B·S, …]) or (1, S) / (2, S) ([B, S, …])."""
    leads = {}
    for name, one in shapes_1.items():
        two = shapes_2[name]
        if len(one) != len(two) or not one:
            continue
        if one[0] == seq and two[0] == 2 * seq and one[1:] == two[1:]:
            leads[name] = 1
        elif len(one) >= 2 and one[:2] == (1, seq) and two[:2] == (2, seq) and one[2:] == two[2:]:
            leads[name] = 2
    return leads


def row_wise(node: gs.Node, rows: Rows) -> Edits | None:
    """The edits that run `node` on compact rows, or None when its rows are not computed from the same rows."""
    if not is_standard(node) or not node.outputs:
        return None
    if node.op == "Shape":
        return Edits() if rows.lead(node.inputs[0]) and not node.attrs.get("start") and "end" not in node.attrs \
            else None
    outputs = [t for t in node.outputs if t.name]
    if not outputs or any(rows.lead(t) is None for t in outputs):
        return None
    rule = _RULES.get(node.op) or (_elementwise if node.op in ELEMENTWISE else None)
    rule = rule or (_reduction if node.op in REDUCTIONS else None)
    rule = rule or (_along_axis if node.op in ALONG_AXIS else None)
    if rule is None:
        return None
    edits = Edits()
    return edits if rule(node, rows, edits) else None


def _trailing_axis(axis: int, tensor: gs.Tensor, rows: Rows) -> int | None:
    """`axis` of `tensor` counted from the end, if it is a trailing (per-row) axis."""
    rank = rows.rank(tensor)
    positive = axis + rank if axis < 0 else axis
    return positive - rank if rows.lead(tensor) <= positive < rank else None


def _trailing_axes(axes: Any, tensor: gs.Tensor, rows: Rows) -> list[int] | None:
    if axes is None:
        return None
    found = [_trailing_axis(int(a), tensor, rows) for a in np.ravel(axes)]
    return None if not found or None in found else found


def _broadcast_constant(index: int, tensor: gs.Tensor, trailing_rank: int, edits: Edits) -> bool:
    """A constant operand that broadcasts over the trailing dims only (leading 1s dropped on compact rows)."""
    value = constant(tensor)
    if value is None:
        return False
    extra = np.ndim(value) - trailing_rank
    if extra > 0:
        if any(d != 1 for d in np.shape(value)[:extra]):
            return False
        edits.inputs[index] = np.reshape(value, np.shape(value)[extra:])
    return True


def _elementwise(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    out = node.outputs[0]
    trailing_rank = rows.rank(out) - rows.lead(out)
    for i, tensor in enumerate(node.inputs):
        if not tensor.name:
            continue
        if rows.lead(tensor) is not None:
            if rows.rank(tensor) - rows.lead(tensor) != trailing_rank:
                return False
        elif not _broadcast_constant(i, tensor, trailing_rank, edits):
            return False
    return True


def _matmul(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x, weight = node.inputs[0], constant(node.inputs[1])
    return rows.lead(x) is not None and rows.rank(x) > rows.lead(x) and weight is not None and weight.ndim == 2 \
        and all(_scalar(t) for t in node.inputs[2:] if t.name)


def _gemm(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x = node.inputs[0]
    return rows.lead(x) == 1 and rows.rank(x) == 2 and not node.attrs.get("transA", 0) \
        and constant(node.inputs[1]) is not None \
        and all(_broadcast_constant(2, t, 1, edits) for t in node.inputs[2:3] if t.name)


def _gather(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    return node.attrs.get("axis", 0) == 0 and constant(node.inputs[0]) is not None \
        and rows.lead(node.inputs[1]) is not None


def _quantize(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x = node.inputs[0]
    if rows.lead(x) is None or node.attrs.get("block_size", 0):
        return False
    axis = node.attrs.get("axis", 1)
    positive = axis + rows.rank(x) if axis < 0 else axis
    for tensor in node.inputs[1:]:
        if not tensor.name or _scalar(tensor):
            continue
        if rows.lead(tensor) == 1 and rows.rank(tensor) == 1 and rows.lead(x) == 1 and positive == 0:
            continue                                      # per-row parameters
        value, trailing = constant(tensor), _trailing_axis(axis, x, rows)
        if value is None or np.ndim(value) != 1 or trailing is None:
            return False
        edits.attrs["axis"] = trailing                    # per-channel parameters
    return True


def _reduction(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x = node.inputs[0]
    if rows.lead(x) is None:
        return False
    if "axes" in node.attrs:
        axes = _trailing_axes(node.attrs["axes"], x, rows)
        edits.attrs["axes"] = axes
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = _trailing_axes(constant(node.inputs[1]), x, rows)
        if axes is not None:
            edits.inputs[1] = np.array(axes, np.int64)
    else:
        axes = None                                       # reduces over every axis, the rows' too
    return axes is not None


def _along_axis(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x = node.inputs[0]
    default = 0 if node.op == "Split" else -1
    axis = _trailing_axis(node.attrs.get("axis", default), x, rows) if rows.lead(x) is not None else None
    if axis is None:
        return False
    edits.attrs["axis"] = axis
    if node.op == "Split":
        return all(constant(t) is not None for t in node.inputs[1:] if t.name)
    trailing_rank = rows.rank(x) - rows.lead(x)
    return all(_broadcast_constant(i, t, trailing_rank, edits) for i, t in enumerate(node.inputs) if i and t.name)


def _unsqueeze(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    reference = node.outputs[0] if node.op == "Unsqueeze" else node.inputs[0]   # axes index the larger rank
    if rows.lead(node.inputs[0]) is None:
        return False
    if len(node.inputs) > 1:
        axes = _trailing_axes(constant(node.inputs[1]), reference, rows)
        if axes is not None:
            edits.inputs[1] = np.array(axes, np.int64)
    else:
        axes = _trailing_axes(node.attrs.get("axes"), reference, rows)
        edits.attrs["axes"] = axes
    return axes is not None


def _slice(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x = node.inputs[0]
    if rows.lead(x) is None or len(node.inputs) < 4 or not all(constant(t) is not None for t in node.inputs[1:]
                                                                 if t.name):
        return False
    axes = _trailing_axes(constant(node.inputs[3]), x, rows)
    if axes is not None:
        edits.inputs[3] = np.array(axes, np.int64)
    return axes is not None


def _reshape(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    x, out = node.inputs[0], node.outputs[0]
    if not rows.static_rows or rows.lead(x) is None \
            or int(np.prod(rows.trailing(x))) != int(np.prod(rows.trailing(out))):
        return False
    edits.inputs[1] = np.array([-1, *rows.trailing(out)], np.int64)
    return True


def _expand(node: gs.Node, rows: Rows, edits: Edits) -> bool:
    shape = node.inputs[1]
    return _scalar(node.inputs[0]) and bool(shape.inputs) and shape.inputs[0].op == "Shape"


def _scalar(tensor: gs.Tensor) -> bool:
    value = constant(tensor)
    return value is not None and np.size(value) == 1


_RULES = {"MatMul": _matmul, "MatMulInteger": _matmul, "Gemm": _gemm, "Gather": _gather,
          "QuantizeLinear": _quantize, "DequantizeLinear": _quantize, "Unsqueeze": _unsqueeze,
          "Squeeze": _unsqueeze, "Slice": _slice, "Reshape": _reshape, "Expand": _expand}
