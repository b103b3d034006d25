"""Row-wise ATen ops: which FX nodes compute each token row from the same row alone, and their form on packed rows.

A token tensor has the tokens of the mask's [B, S] as its leading dimensions:
[B·S, …] (lead 1) or [B, S, …] (lead 2), recognized from the capture's
symbolic shapes (B, S the mask's own sizes). On packed rows every token tensor
becomes [n, trailing…] for the n computed rows, so a node runs there unchanged
except where its arguments name the leading dimensions:

    dim d among the trailing dims             ⇒ d − rank (negative dims count from the end: unchanged by the lead)
    reshape / view to [lead…, t…] (rows kept)  ⇒ reshape to [−1, t…]

Accepted: linear / matmul / mm / addmm by a tensor that is not a token tensor
(the products), graphopt's per-row int8 ops (quantize_per_token, int8_linear,
w8a16_linear, w4a16_linear, layer_norm_quantize), layer_norm over trailing
dims, elementwise ops whose other operands are token tensors of the same
trailing rank or tensors broadcasting over the trailing dims only (no batch or
sequence size in their shape), softmax and reductions along trailing dims,
slice and unsqueeze on trailing dims, and reshapes that keep each row whole.
Everything else (attention, transposes that move the token axes, …) is a
boundary.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from graphopt.engine import ir

aten = torch.ops.aten

#: Ops whose every tensor operand broadcasts elementwise with the output.
ELEMENTWISE = (aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.pow, aten.where,
               aten.gelu, aten.relu, aten.silu, aten.tanh, aten.sigmoid, aten.erf, aten.exp, aten.log,
               aten.neg, aten.abs, aten.sqrt, aten.rsqrt, aten.reciprocal, aten.hardtanh, aten.hardswish,
               aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish, aten.softplus, aten.clamp, aten.to,
               aten._to_copy, aten.type_as, aten.dropout, aten.square, aten.sign, aten.round, aten.floor,
               aten.ceil)
#: Matrix products by a weight that is not a token tensor: (op, index of the token operand).
PRODUCTS = {aten.linear: 0, aten.matmul: 0, aten.mm: 0, aten.addmm: 1}
#: Reductions and normalizations along dims given as argument 1.
ALONG_DIMS = (aten.sum, aten.mean, aten.amax, aten.amin, aten.softmax, aten._softmax, aten.log_softmax,
              aten._log_softmax, aten.var, aten.std, aten.slice, aten.unsqueeze)
RESHAPES = (aten.reshape, aten.view, aten._unsafe_view)


#: graphopt's per-row kernels (each row of their [M, …] operands and outputs on its own), and the products.
GRAPHOPT_ROWS = frozenset({"graphopt::quantize_per_token", "graphopt::int8_linear", "graphopt::w8a16_linear",
                           "graphopt::w4a16_linear", "graphopt::layer_norm_quantize"})
GRAPHOPT_PRODUCTS = frozenset({"graphopt::int8_linear", "graphopt::w8a16_linear", "graphopt::w4a16_linear"})


def graphopt_op(node: fx.Node) -> str | None:
    """The schema name of a torch.ops.graphopt call ("graphopt::int8_linear"), else None."""
    name = node.target.name() if node.op == "call_function" and hasattr(node.target, "name") \
        and getattr(node.target, "namespace", None) == "graphopt" else None
    return name if isinstance(name, str) else None


@dataclass
class Rows:
    """The token layout of a graph: B and S, the mask's sizes (ints or SymInts)."""
    batch: Any
    seq: Any

    def lead(self, value: Any) -> int | None:
        """1 for [B·S, …], 2 for [B, S, …], None for anything else (a node or its recorded value)."""
        value = ir.val(value) if isinstance(value, fx.Node) else value
        if not isinstance(value, torch.Tensor):
            return None
        shape = tuple(value.shape)
        if len(shape) >= 2 and same(shape[0], self.batch) and same(shape[1], self.seq):
            return 2
        if shape and same(shape[0], self.batch * self.seq):
            return 1
        return None

    def trailing(self, node: fx.Node) -> tuple[Any, ...]:
        return tuple(ir.shape(node))[self.lead(node):]

    def mentions_tokens(self, node: fx.Node) -> bool:
        """Whether a tensor's shape names the batch or sequence size (it may not broadcast over rows)."""
        symbols = {s for d in (self.batch, self.seq) if isinstance(d, torch.SymInt) for s in _symbols(d)}
        return any(isinstance(d, torch.SymInt) and _symbols(d) & symbols for d in ir.shape(node) or ())


def same(a: Any, b: Any) -> bool:
    """Equal sizes without adding a guard: ints by value, symbolic sizes by their expression."""
    return bool(_expr(a) == _expr(b))


def _expr(size: Any) -> Any:
    """A size as a sympy expression (a symbol specialised by export reads as its value)."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _symbols(size: torch.SymInt) -> set:
    return set(size.node.expr.free_symbols)


Args = tuple[tuple, dict]


def row_wise(node: fx.Node, rows: Rows) -> Args | None:
    """The node's (args, kwargs) on packed rows, or None when it is not row-wise.

    Token-tensor arguments are left as they are (the emitter points them at packed rows)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        parent = node.args[0]
        return (node.args, node.kwargs) if isinstance(parent, fx.Node) and rows.lead(node) else None
    if isinstance(ir.val(node), (tuple, list)):
        outs = list(ir.val(node))
        if not outs or any(rows.lead(v) != 1 for v in outs):
            return None
    elif rows.lead(node) is None:
        return None
    rule = _rule(node)
    return rule(node, rows) if rule is not None else None


def is_product(node: fx.Node, rows: Rows) -> bool:
    return (ir.is_op(node, *PRODUCTS) or graphopt_op(node) in GRAPHOPT_PRODUCTS) and row_wise(node, rows) is not None


def _rule(node: fx.Node) -> Callable[[fx.Node, Rows], Args | None] | None:
    if ir.is_op(node, *PRODUCTS):
        return _product
    if graphopt_op(node) in GRAPHOPT_ROWS:
        return _per_row_kernel
    if ir.is_op(node, aten.layer_norm):
        return _layer_norm
    if ir.is_op(node, *ELEMENTWISE):
        return _elementwise
    if ir.is_op(node, *ALONG_DIMS):
        return _along_dims
    if ir.is_op(node, *RESHAPES):
        return _reshape
    return None


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(ir.val(a), torch.Tensor)]


def _product(node: fx.Node, rows: Rows) -> Args | None:
    x = node.args[PRODUCTS[ir.overload_packet(node.target)]]
    others = [a for a in _tensors(node) if a is not x]
    if not isinstance(x, fx.Node) or rows.lead(x) is None or len(rows.trailing(x)) < 1:
        return None
    if ir.is_op(node, aten.mm, aten.addmm) and rows.lead(x) != 1:
        return None
    if any(rows.lead(w) is not None or rows.mentions_tokens(w) for w in others):
        return None
    if ir.is_op(node, aten.matmul) and len(ir.shape(node.args[1])) != 2:
        return None
    return node.args, node.kwargs


def _per_row_kernel(node: fx.Node, rows: Rows) -> Args | None:
    """graphopt's kernels: [M, …] operands are token rows (lead 1), every other tensor is row-independent."""
    for a in _tensors(node):
        if rows.lead(a) not in (1, None) or (rows.lead(a) is None and rows.mentions_tokens(a)):
            return None
    return (node.args, node.kwargs) if rows.lead(node.args[0]) == 1 else None


def _layer_norm(node: fx.Node, rows: Rows) -> Args | None:
    x = node.args[0]
    if rows.lead(x) is None or len(node.args[1]) > len(rows.trailing(x)):
        return None
    if any(rows.lead(a) is not None or rows.mentions_tokens(a) for a in _tensors(node) if a is not x):
        return None
    return node.args, node.kwargs


def _elementwise(node: fx.Node, rows: Rows) -> Args | None:
    rank = len(rows.trailing(node))
    for a in _tensors(node):
        if rows.lead(a) is not None:
            if len(rows.trailing(a)) != rank:
                return None
        elif rows.mentions_tokens(a) or len(ir.shape(a)) > rank:
            return None
    return node.args, node.kwargs


def _along_dims(node: fx.Node, rows: Rows) -> Args | None:
    """dims (argument 1) on trailing axes, as negative dims. unsqueeze's dim counts in its output's rank."""
    x = node.args[0]
    if rows.lead(x) is None or len(node.args) < 2 or any(a is not x for a in _tensors(node)):
        return None
    reference = node if ir.is_op(node, aten.unsqueeze) else x
    rank, lead = len(ir.shape(reference)), rows.lead(reference)
    dims = node.args[1]
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return None                                    # over every dim, the rows' too
    listed = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not all(isinstance(d, int) for d in listed):
        return None
    positive = [d + rank if d < 0 else d for d in listed]
    if any(not lead <= d < rank for d in positive):
        return None
    negative = [d - rank for d in positive]
    new = negative if isinstance(dims, (list, tuple)) else negative[0]
    return (x, new, *node.args[2:]), node.kwargs


def _reshape(node: fx.Node, rows: Rows) -> Args | None:
    """A reshape that keeps each token row whole (trailing sizes static): to [−1, trailing of the output]."""
    x = node.args[0]
    if rows.lead(x) is None:
        return None
    before, after = rows.trailing(x), rows.trailing(node)
    if not all(isinstance(d, int) for d in (*before, *after)) or _numel(before) != _numel(after):
        return None
    return (x, [-1, *after]), {}


def _numel(sizes: tuple[int, ...]) -> int:
    total = 1
    for s in sizes:
        total *= s
    return total
