"""Rules and the pass that applies them: how every FX rewrite is written.

A `Rule` is three parts:

    pattern   where it may apply: a declarative `Op` tree for fixed-shape
              peepholes (`Op(aten.permute, Op(aten.permute, Var("x")))`), or,
              where spellings multiply (GELU, attention, normalization), a
              canonical-form walker in `match` that reads every spelling of
              the formula once
    check     conditions the graph must meet; a `Reject` (reason code and
              message) when it does not
    rewrite   the graph surgery, returning a `Match` (the pattern name the
              report counts and the nodes it made dead)

`RuleSet` is the one pass that applies rules: one sweep over the graph in
order, offering each live node to the rules anchored on its op, logging every
match and every rejection (`graphopt.engine.rules`), erasing the dead nodes. A
candidate whose pattern does not match at all is not logged: it was never a
candidate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reject

aten = torch.ops.aten

Bindings = dict[str, Any]


@dataclass(frozen=True)
class Var:
    """Matches any argument and binds it to `name`."""
    name: str


@dataclass(frozen=True)
class Op:
    """Matches a call of one of `ops` (ATen overload packets) whose leading
    arguments match `args`; binds the node itself to `name` when given."""
    ops: tuple[Any, ...]
    args: tuple[Any, ...] = ()
    name: str | None = None

    def __init__(self, ops: Any, *args: Any, name: str | None = None) -> None:
        object.__setattr__(self, "ops", tuple(ops) if isinstance(ops, (tuple, list)) else (ops,))
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "name", name)

    def match(self, value: Any, bound: Bindings | None = None) -> Bindings | None:
        """The bindings when `value` matches this pattern, else None."""
        bound = {} if bound is None else bound
        if not isinstance(value, fx.Node) or not ir.is_op(value, *self.ops) or len(value.args) < len(self.args):
            return None
        if self.name is not None:
            bound[self.name] = value
        for sub, actual in zip(self.args, value.args):
            if isinstance(sub, Var):
                bound[sub.name] = actual
            elif isinstance(sub, Op):
                if sub.match(actual, bound) is None:
                    return None
            elif sub != actual:
                return None
        return bound


@dataclass
class Match:
    """A successful rewrite: `pattern` names it in the report; `dead` are the
    replaced nodes, erased once nothing uses them."""
    pattern: str
    dead: list[fx.Node] = field(default_factory=list)


class Rule:
    """One rewrite: `pattern` (or `anchors` and a walker in `match`), `check`, `rewrite`."""
    name = "rule"                       # pattern name for rejections
    pattern: Op | None = None
    anchors: tuple[Any, ...] = ()       # ops a candidate's root may be (default: the pattern's root ops)

    def roots(self) -> tuple[Any, ...]:
        return self.anchors or (self.pattern.ops if self.pattern is not None else ())

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Bindings | Reject | None:
        """Bindings of a candidate rooted at `node`; None if it is not one. A walker may reject here."""
        return self.pattern.match(node, {"root": node}) if self.pattern is not None else None

    def check(self, gm: fx.GraphModule, b: Bindings) -> Reject | None:
        return None

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        raise NotImplementedError(f"{type(self).__name__}.rewrite")

    def apply(self, gm: fx.GraphModule, node: fx.Node) -> Match | Reject | None:
        found = self.match(gm, node)
        if found is None or isinstance(found, Reject):
            return found
        return self.check(gm, found) or self.rewrite(gm, found)


class RuleSet(Pass):
    """The pass that applies `rules` (in order, per node) in one sweep over the graph."""

    def __init__(self, name: str, rules: Sequence[Rule], fixed_point: bool = False) -> None:
        self.name, self.rules, self.fixed_point = name, list(rules), fixed_point

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        for node in list(gm.graph.nodes):
            for rule in self.rules:
                if _erased(node) or not ir.is_op(node, *rule.roots()):
                    continue
                outcome = rule.apply(gm, node)
                if isinstance(outcome, Reject):
                    log.rejected(rule.name, node, outcome)
                elif isinstance(outcome, Match):
                    log.matched(outcome.pattern)
                    dead = [n for n in dict.fromkeys(outcome.dead) if not _erased(n)]
                    checks = [u for n in dead for u in n.users if is_check(u)]
                    ir.erase_unused(gm.graph, checks + dead)
        return log.result(gm)


def is_check(node: fx.Node) -> bool:
    """torch.export's metadata asserts: they read a value but compute nothing."""
    return ir.is_op(node, aten._assert_tensor_metadata)


def _erased(node: fx.Node) -> bool:
    """Whether an earlier rewrite of this sweep erased `node` (torch.fx has no public flag for it)."""
    return getattr(node, "_erased", False)
