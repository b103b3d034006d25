"""Index mapping for the channel analysis: how a dimension of a tensor maps through reshapes and dimension lists.

`factor` pairs runs of input dims with runs of output dims of equal size (sympy products, so symbolic
batch sizes pair up); the reshape rule (op_rules/tensors.py) then scales segment offsets by the
inner sizes of those runs.
"""
from __future__ import annotations

import sympy

from .model import Seg


def static(size: object) -> int | None:
    """`size` if it is a concrete int, else None (symbolic)."""
    return size if isinstance(size, int) else None


def as_list(dims: object, rank: int) -> list[int]:
    """A reduction's `dim` argument as non-negative dims (None: all of them)."""
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        return [dims % rank]
    return [d % rank for d in dims]  # type: ignore[union-attr]


def grouped_layout(segs: tuple[Seg, ...], groups: int, per: int) -> bool:
    """Whether `segs` lay the same group out once per conv group of `per` channels."""
    ordered = sorted(segs, key=lambda s: s.start)
    return (len(ordered) == groups and len({s.group for s in ordered}) == 1
            and all(s.start == g * per and s.block * s.count == per for g, s in enumerate(ordered)))


def size_expr(size: object) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else size.node.expr  # type: ignore[union-attr]


def factor(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal size.

    Sizes are compared as sympy products, so a symbolic batch merged with a static
    dimension ([s0, 7, C] -> [7·s0, C]) pairs up. Dims that cannot be paired are left
    out; the caller treats them as unmapped."""
    def key(shape: tuple, dims: list[int]) -> sympy.Expr:
        return sympy.Mul(*(size_expr(shape[k]) for k in dims))
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        ins, outs = [i], [j]
        while (ratio := sympy.simplify(key(out_shape, outs) / key(in_shape, ins))) != 1:
            num, den = ratio.as_numer_denom()
            if num.free_symbols and den.free_symbols:
                return groups                      # unrelated symbols: opaque
            grow_in = bool(num.free_symbols) or (not den.free_symbols and bool(ratio > 1))
            if grow_in and ins[-1] + 1 < len(in_shape):
                ins.append(ins[-1] + 1)
            elif not grow_in and outs[-1] + 1 < len(out_shape):
                outs.append(outs[-1] + 1)
            else:
                return groups
        i, j = ins[-1] + 1, outs[-1] + 1
        groups.append((ins, outs))
    if groups:  # trailing size-1 dims join the last run
        groups[-1][0].extend(range(i, len(in_shape)))
        groups[-1][1].extend(range(j, len(out_shape)))
    return groups

