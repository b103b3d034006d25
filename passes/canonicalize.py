"""Canonicalization (level O1, lossless): put the graph in a clean, minimal form.

    dead_code_elimination   drop pure nodes whose results nobody uses, and the
                            parameters/buffers no node reads any more
    remove_noops            export's _assert_tensor_metadata checks dropped;
                            dropout(x, train=False) ⇒ x;  x·1, x/1, x+0, x-0, x**1 ⇒ x;
                            clone / alias / detach / same-dtype casts ⇒ x;
                            contiguous(x) ⇒ x when x is already contiguous;
                            view / reshape / expand / slice to x's own shape ⇒ x
    constant_folding        f(c₁, …, cₙ) ⇒ c  when every input is a parameter, buffer
                            or literal; guarded so the model grows by at most
                            `max_growth_bytes`
    cse                     two pure nodes with the same target and the same inputs
                            compute the same value: keep the first

Each is exact (no arithmetic changes), so the budget is LOSSLESS.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject

from .fusion._match import arg
from .rules import Bindings, Match, Op, Rule, RuleSet, Var

aten = torch.ops.aten


class CanonicalPass(Pass):
    """Canonicalization passes: O1, lossless (the `Pass` defaults)."""


class DeadCodeElimination(CanonicalPass):
    name = "dead_code_elimination"

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = ir.count_nodes(gm)
        gm.graph.eliminate_dead_code(is_impure_node=_keeps_effects)
        dropped = ir.drop_unused_attributes(gm)
        removed = before - ir.count_nodes(gm)
        log = RewriteLog()
        if removed:
            log.matched("dead node", removed)
        if dropped:
            log.matched("unused tensor", dropped)
        return log.result(gm)


def _keeps_effects(node: fx.Node) -> bool:
    """Impure nodes and call_module nodes (torch.export's input guards) are never dead."""
    return node.is_impure() or node.op == "call_module"


class NoOp(Rule):
    """op(x, …) ⇒ x: `pattern` binds x; `identity(node)` says whether the arguments make the op the
    identity; `safe(node, x)` rejects a candidate whose value may still differ from x. Only nodes with
    x's shape, dtype and device are candidates."""

    def __init__(self, name: str, pattern: Op, identity: Callable[[fx.Node], bool] = lambda node: True,
                 safe: Callable[[fx.Node, fx.Node], Reject | None] = lambda node, x: None) -> None:
        self.name, self.pattern, self.identity, self.safe = name, pattern, identity, safe

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Bindings | None:
        b = super().match(gm, node)
        if b is None or not isinstance(b["x"], fx.Node) or not self.identity(node) \
                or not _keeps_value_type(node, b["x"]):
            return None   # e.g. a reshape that reshapes or a cast that casts: not a candidate
        return b

    def check(self, gm: fx.GraphModule, b: Bindings) -> Reject | None:
        if ir.is_mutated(b["root"]) or ir.is_mutated(b["x"]):
            return Reject(Reason.MUTATED, "a user mutates the value in place")
        return self.safe(b["root"], b["x"])

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        ir.replace_all_uses(b["root"], b["x"])
        return Match(self.name, [b["root"]])


class DropMetadataAssert(Rule):
    """export's _assert_tensor_metadata: dtype/device checks only, and they pin values."""
    name = "metadata assert"
    pattern = Op(aten._assert_tensor_metadata)

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        return Match(self.name, [b["root"]])


def _dropout_off(node: fx.Node) -> bool:
    return arg(node, 2, "train", True) is False or arg(node, 1, "p", 0.5) == 0


def _identity_scalar(value: int) -> Callable[[fx.Node], bool]:
    def identity(node: fx.Node) -> bool:
        other = node.args[1] if len(node.args) > 1 else None
        return isinstance(other, (int, float)) and not isinstance(other, bool) and other == value \
            and node.kwargs.get("alpha", 1) == 1
    return identity


def _contiguous(node: fx.Node, x: fx.Node) -> Reject | None:
    if not _surely_contiguous(ir.val(x)):
        return Reject(Reason.UNSUPPORTED_FORM, "input may be non-contiguous; a later view needs the copy")
    return None


def _full_slice(node: fx.Node, x: fx.Node) -> Reject | None:
    if not _is_full_slice(node, ir.val(x)):
        return Reject(Reason.SHAPE_MISMATCH, "slice does not cover the whole dimension")
    return None


_X = Var("x")
NOOP_RULES: list[Rule] = [
    DropMetadataAssert(),
    NoOp("dropout (eval)", Op(aten.dropout, _X), _dropout_off),
    *(NoOp(f"{op.__name__}(x, {value})", Op(op, _X), _identity_scalar(value))
      for op, value in ((aten.mul, 1), (aten.div, 1), (aten.add, 0), (aten.sub, 0), (aten.pow, 1))),
    *(NoOp(op.__name__, Op(op, _X), lambda node: node.kwargs.get("memory_format") in (None, torch.preserve_format))
      for op in (aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy)),
    NoOp("same-dtype cast", Op((aten.to, aten._to_copy, aten.type_as), _X)),
    NoOp("contiguous", Op(aten.contiguous, _X), safe=_contiguous),
    *(NoOp(f"{op.__name__} to same shape", Op(op, _X)) for op in (aten.view, aten.reshape, aten._unsafe_view,
                                                                  aten.expand)),
    NoOp("full slice", Op(aten.slice, _X), safe=_full_slice),
]


class RemoveNoOps(RuleSet):
    """The no-op removal pass: `NOOP_RULES` applied in one sweep."""

    def __init__(self) -> None:
        super().__init__("remove_noops", NOOP_RULES)


def _keeps_value_type(node: fx.Node, source: fx.Node) -> bool:
    """Same shape, dtype and device in and out: the node may be the identity."""
    out, inp = ir.val(node), ir.val(source)
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dtype == inp.dtype
            and out.device == inp.device and _same_shape(out.shape, inp.shape))


def _same_shape(a: Any, b: Any) -> bool:
    if len(a) != len(b):
        return False
    return all((x == y) if isinstance(x, int) and isinstance(y, int) else str(x) == str(y) for x, y in zip(a, b))


def _surely_contiguous(value: torch.Tensor) -> bool:
    try:
        return bool(value.is_contiguous())
    except Exception:  # symbolic strides that cannot be decided statically
        return False


def _is_full_slice(node: fx.Node, value: torch.Tensor) -> bool:
    args = list(node.args) + [None] * 5
    dim, start, end, step = (args[1] or 0), (args[2] or 0), args[3], (args[4] or 1)
    size = value.shape[dim]
    return start == 0 and step == 1 and (end is None or (isinstance(size, int) and isinstance(end, int) and end >= size))


class FoldConstants(CanonicalPass):
    """Evaluate subgraphs that depend only on parameters, buffers and literals."""
    name = "constant_folding"

    def __init__(self, max_growth_bytes: int = 1 << 20) -> None:
        self.max_growth_bytes = max_growth_bytes

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        constant = self._constant_nodes(gm)
        values: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            if node not in constant or node.op == "get_attr":
                continue
            if all(user in constant for user in node.users):
                continue  # only fold the frontier: values that flow into run-time work
            value = self._evaluate(gm, node, constant, values)
            if not isinstance(value, torch.Tensor):
                log.rejected("fold", node, Reject(Reason.NOT_A_TENSOR,
                                                  f"result is {type(value).__name__}, not a tensor"))
                continue
            growth = value.numel() * value.element_size() - _bytes_freed(gm, node, constant)
            if growth > self.max_growth_bytes:
                log.rejected("fold", node, Reject(Reason.SIZE_LIMIT, f"would grow the model by {growth} bytes "
                                                                     f"(limit {self.max_growth_bytes})"))
                continue
            folded = ir.add_constant(gm, ir.owned_name(_first_attribute(node), f"folded_{node.name}"), value,
                                     parameter=False)
            ir.replace_all_uses(node, folded)
            log.matched("fold")
        gm.graph.eliminate_dead_code(is_impure_node=_keeps_effects)
        ir.drop_unused_attributes(gm)
        return log.result(gm)

    @staticmethod
    def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
        constant: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                constant.add(node)
            elif ir.is_pure(node) and not ir.is_mutated(node) and _inputs_constant(node, constant):
                constant.add(node)
        return constant

    def _evaluate(self, gm: fx.GraphModule, node: fx.Node, constant: set[fx.Node],
                  values: dict[fx.Node, Any]) -> Any:
        if node in values:
            return values[node]
        if node.op == "get_attr":
            value = ir.get_attr_value(gm, node)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                           lambda n: self._evaluate(gm, n, constant, values))
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        values[node] = value
        return value


def _first_attribute(node: fx.Node) -> fx.Node | None:
    """The first parameter or buffer a folded value is computed from (walking its inputs breadth-first): the
    folded constant is registered under that attribute's module, so layer names and patterns still find it."""
    pending, seen = list(node.all_input_nodes), set()
    while pending:
        current = pending.pop(0)
        if current.op == "get_attr":
            return current
        if current not in seen:
            seen.add(current)
            pending += current.all_input_nodes
    return None


def _inputs_constant(node: fx.Node, constant: set[fx.Node]) -> bool:
    inputs = node.all_input_nodes
    literal_sizes = all(not isinstance(a, torch.SymInt) for a in _flat(node.args))
    return literal_sizes and all(n in constant for n in inputs)


def _flat(args: Any) -> list[Any]:
    if isinstance(args, (list, tuple)):
        return [x for a in args for x in _flat(a)]
    return [args]


def _bytes_freed(gm: fx.GraphModule, node: fx.Node, constant: set[fx.Node]) -> int:
    """Bytes of the parameters that only feed `node`'s constant subgraph."""
    ancestors, stack = set(), [node]
    while stack:
        current = stack.pop()
        for n in current.all_input_nodes:
            if n in constant and n not in ancestors:
                ancestors.add(n)
                stack.append(n)
    closed = ancestors | {node}
    freed = 0
    for n in ancestors:
        if n.op == "get_attr" and all(user in closed for user in n.users):
            value = ir.get_attr_value(gm, n)
            freed += value.numel() * value.element_size()
    return freed


class EliminateCommonSubexpressions(CanonicalPass):
    name = "cse"

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        seen: dict[Any, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
            elif ir.is_pure(node) and not ir.is_mutated(node) and not any(map(ir.is_mutated, node.all_input_nodes)):
                try:  # an input written in place holds different values before and after the write
                    key = _hashable((node.target, node.args, node.kwargs))
                except TypeError:
                    continue  # an argument that cannot be compared safely
            else:
                continue
            first = seen.setdefault(key, node)
            if first is not node:
                ir.replace_all_uses(node, first)
                gm.graph.erase_node(node)
                log.matched("duplicate " + ("attribute" if node.op == "get_attr" else str(ir.overload_packet(node.target).__name__)))
        return log.result(gm)


def _hashable(value: Any) -> Any:
    """A hashable key equal for equal node arguments; TypeError if there is none."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _hashable(v)) for k, v in sorted(value.items())))
    if isinstance(value, torch.SymInt):
        return ("sym", str(value))
    hash(value)
    return (type(value).__name__, value)


def passes() -> list[Pass]:
    """The canonicalization pipeline, in order."""
    return [DeadCodeElimination(), RemoveNoOps(), EliminateCommonSubexpressions(), FoldConstants()]
