"""Recognize activations written out element by element.

    0.5 · x · (1 + erf(x / √2))                          ⇒  gelu(x)
    0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))    ⇒  gelu(x, approximate="tanh")
    x · sigmoid(x)                                       ⇒  silu(x)

Math: these are the definitions of the ATen ops (GELU = x·Φ(x) with
Φ(x) = ½(1 + erf(x/√2)); the tanh form is its standard approximation; SiLU),
so only float32 rounding changes. Any spelling matches: the outer product and
the argument of erf/tanh are flattened into polynomials in x, so
`x*0.5*(1+erf(x*0.7071…))`, `(x*(1+erf(x/√2)))/2` and `x + 0.044715*x*x*x`
are all recognized, while a different constant or a shared intermediate is
rejected with the reason.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Op, Rule, Var
from ._match import call, close, interior, poly_equal, polynomial, scalar

aten = torch.ops.aten

_TANH_C = math.sqrt(2.0 / math.pi)
_ARGUMENTS = {   # inner function -> (its argument as a polynomial in x, gelu's approximate=)
    aten.erf: ({1: 1.0 / math.sqrt(2.0)}, "none"),
    aten.tanh: ({1: _TANH_C, 3: _TANH_C * 0.044715}, "tanh"),
}


class SiluRule(Rule):
    """x · sigmoid(x) ⇒ silu(x): a fixed-shape peephole, written as a pattern."""
    name = "activation"
    pattern = Op(aten.mul, Var("a"), Var("b"))
    anchors = (aten.sigmoid,)

    def match(self, gm: fx.GraphModule, sig: fx.Node) -> Bindings | Reject | None:
        x = sig.args[0]
        product = next(iter(sig.users), None)
        found = self.pattern.match(product) if product is not None else None
        if found is None or x not in (found["a"], found["b"]):
            return None   # a plain sigmoid
        if len(sig.users) != 1:
            return Reject(Reason.OTHER_USERS, "sigmoid(x) has other users")
        if {found["a"], found["b"]} != {x, sig}:
            return Reject(Reason.NOT_THE_FORMULA, "product is not x · sigmoid(x)")
        return {"x": x, "sig": sig, "product": product}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        silu = call(gm.graph, aten.silu.default, (b["x"],), before=b["product"])
        ir.replace_all_uses(b["product"], silu)
        return Match("silu", [b["product"], b["sig"]])


class GeluRule(Rule):
    """0.5 · x · (1 + erf(x/√2)) and its tanh form ⇒ gelu: a canonical-form walker (every spelling)."""
    name = "activation"
    anchors = (aten.erf, aten.tanh)

    def match(self, gm: fx.GraphModule, inner: fx.Node) -> Bindings | Reject | None:
        want, approximate = _ARGUMENTS[ir.overload_packet(inner.target)]
        plus_one = next(iter(inner.users), None)
        if plus_one is None or not ir.is_op(plus_one, aten.add) or scalar(plus_one.args[1]) != 1.0:
            return None   # erf/tanh used for something other than a GELU
        if len(inner.users) != 1:
            return Reject(Reason.OTHER_USERS, f"{inner.name} has other users")
        root, x, absorbed = _half_x_times(plus_one)
        if root is None:
            return Reject(Reason.NOT_THE_FORMULA, "product around (1 + …) is not 0.5 · x · (1 + …)")
        inner_absorbed: list[fx.Node] = []
        if not poly_equal(polynomial(inner.args[0], x, inner, inner_absorbed), want):
            return Reject(Reason.NOT_THE_FORMULA,
                          f"argument of {ir.overload_packet(inner.target).__name__} is not the GELU formula in x")
        return {"x": x, "root": root, "approximate": approximate,
                "dead": [root, *absorbed, plus_one, inner, *inner_absorbed]}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        approximate = b["approximate"]
        gelu = call(gm.graph, aten.gelu.default, (b["x"],),
                    {"approximate": approximate} if approximate != "none" else {}, before=b["root"])
        ir.replace_all_uses(b["root"], gelu)
        return Match(f"gelu ({'erf' if approximate == 'none' else 'tanh'})", b["dead"])


RULES = [GeluRule(), SiluRule()]


def _half_x_times(plus_one: fx.Node) -> tuple[fx.Node | None, fx.Node | None, list[fx.Node]]:
    """Walk up the products using `plus_one` until one equals 0.5 · x · plus_one."""
    current = plus_one
    while len(current.users) == 1:
        parent = next(iter(current.users))
        if not ir.is_op(parent, aten.mul, aten.div) or current not in parent.args[:2]:
            break
        leaves: list[object] = []
        absorbed: list[fx.Node] = []
        coefficient = _factors(parent, None, leaves, absorbed)
        if coefficient is not None and len(leaves) == 2 and plus_one in leaves and close(coefficient, 0.5):
            x = leaves[1 - leaves.index(plus_one)]
            if isinstance(x, fx.Node) and x is not plus_one:
                return parent, x, absorbed
        current = parent
    return None, None, []


def _factors(node: object, owner: fx.Node | None, leaves: list[object], absorbed: list[fx.Node]) -> float | None:
    """Flatten a product into its scalar coefficient and its other factors (`leaves`),
    expanding products and scalar divisions used only inside the expression."""
    c = scalar(node)
    if c is not None:
        return c
    expandable = isinstance(node, fx.Node) and (owner is None or interior(node, owner)) \
        and ir.is_op(node, aten.mul, aten.div)
    if not expandable:
        leaves.append(node)
        return 1.0
    a = _factors(node.args[0], node, leaves, absorbed)
    if ir.is_op(node, aten.div):
        d = scalar(node.args[1])
        if a is None or not d:
            return None
        b = 1.0 / d
    else:
        b = _factors(node.args[1], node, leaves, absorbed)
    if a is None or b is None:
        return None
    absorbed.append(node)
    return a * b
