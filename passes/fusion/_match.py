"""Matching helpers shared by the fusion rules (`graphopt.passes.rules` applies them).

- `arg`, `scalar`, `close`: reading ATen arguments and literal constants.
- `polynomial`: a value written as sums and products of one variable
  (`0.5*x*(1 + …)`, `x + 0.044715*x**3`), flattened so that every spelling of
  the same formula matches once.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.engine import ir

from ..rules import is_check

aten = torch.ops.aten


def users(node: fx.Node) -> list[fx.Node]:
    """The nodes that compute with `node` (metadata asserts on it left out)."""
    return [u for u in node.users if not is_check(u)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` (positional) or `name` (keyword) of a call, else `default`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def scalar(value: Any) -> float | None:
    """A Python number literal (not bool) as float, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def close(a: float | None, b: float, rel: float = 1e-6) -> bool:
    """Literal constants written with enough digits (0.7978845608 for sqrt(2/pi))."""
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def rank(node: fx.Node) -> int | None:
    s = ir.shape(node)
    return len(s) if s is not None else None


def permutation(node: fx.Node) -> list[int] | None:
    """The dimension order a transpose/permute node produces (None: another op, or rank unknown)."""
    r = rank(node)
    if r is None:
        return None
    if ir.is_op(node, aten.transpose):
        perm = list(range(r))
        a, b = node.args[1] % r, node.args[2] % r
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if ir.is_op(node, aten.permute):
        return [d % r for d in node.args[1]]
    return None


def same_shape(a: Iterable, b: Iterable) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None,
         before: fx.Node | None = None, after: fx.Node | None = None) -> fx.Node:
    """Insert `target(*args, **kwargs)` before `before` (or after `after`)."""
    where = graph.inserting_before(before) if before is not None else graph.inserting_after(after)
    with where:
        return graph.call_function(target, args, kwargs or {})


def interior(node: Any, owner: fx.Node) -> bool:
    """`node` is a computed value used only by `owner` (so a fusion may absorb it)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and users(node) == [owner]


Poly = dict[int, float]   # power of the variable -> coefficient


def polynomial(node: Any, x: fx.Node, owner: fx.Node | None, absorbed: list[fx.Node]) -> Poly | None:
    """`node` as a polynomial in `x`, expanding only nodes used solely by their
    parent in the expression (collected in `absorbed`); None if it is not one."""
    if node is x:
        return {1: 1.0}
    c = scalar(node)
    if c is not None:
        return {0: c}
    if not isinstance(node, fx.Node) or (owner is not None and not interior(node, owner)):
        return None
    if not ir.is_op(node, aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.neg, aten.rsub):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    sub = [polynomial(a, x, node, absorbed) for a in node.args[:2]]
    result = _combine(ir.overload_packet(node.target), sub, node.args)
    if result is not None:
        absorbed.append(node)
    return result


def _combine(op: Any, sub: list[Poly | None], args: tuple) -> Poly | None:
    a = sub[0]
    if a is None:
        return None
    if op is aten.neg:
        return {k: -v for k, v in a.items()}
    b = sub[1] if len(sub) > 1 else None
    if op is aten.pow:
        n = scalar(args[1])
        if n is None or n != int(n) or not 0 < n <= 4:
            return None
        result: Poly = {0: 1.0}
        for _ in range(int(n)):
            result = times(result, a)
        return result
    if b is None:
        return None
    if op is aten.add:
        return _plus(a, b, 1.0)
    if op is aten.sub:
        return _plus(a, b, -1.0)
    if op is aten.rsub:
        return _plus(b, a, -1.0)
    if op is aten.mul:
        return times(a, b)
    if op is aten.div and set(b) == {0} and b[0] != 0:
        return {k: v / b[0] for k, v in a.items()}
    return None


def _plus(a: Poly, b: Poly, sign: float) -> Poly:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + sign * v
    return out


def times(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for i, u in a.items():
        for j, v in b.items():
            out[i + j] = out.get(i + j, 0.0) + u * v
    return out


def poly_equal(p: Poly | None, want: Poly, rel: float = 1e-6) -> bool:
    if p is None:
        return False
    keys = {k for k, v in p.items() if v != 0} | set(want)
    return all(close(p.get(k, 0.0), want.get(k, 0.0), rel) for k in keys)


def constant_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor of a get_attr node, else None."""
    value = ir.const_value(gm, node)
    return value if isinstance(value, torch.Tensor) else None
