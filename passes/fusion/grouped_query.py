"""Grouped-query attention: let SDPA read the KV groups instead of a materialized repeat.

    k' = reshape(expand(unsqueeze(k, 2), [B, G, r, L, D]), [B, G·r, L, D])      (Hugging Face's repeat_kv;
    v' likewise                                                                    slices over whole dims
    scaled_dot_product_attention(q, k', v', mask, …)                              and a clone may sit between)
        ⇒ scaled_dot_product_attention(q, k, v, mask, …, enable_gqa=True)

Math: k'[b, h] = k[b, ⌊h / r⌋] (the expand copies each of the G heads r times, next to each other, and the
reshape merges (G, r) into G·r heads), and SDPA with enable_gqa gives query head h the key/value head
⌊h / (H_q / G)⌋ = ⌊h / r⌋ when H_q = G·r: the same attention, without the r× copy of the cache per layer
per step. Exact up to the order of float32 sums.

Rejected with a reason: SDPA already asked for GQA, k and v repeated differently (or only one of them),
a repeat whose factor does not make the query's head count, an intermediate with other users, shapes unknown.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Rule
from ._match import arg, call, interior

aten = torch.ops.aten

_RESHAPES = (aten.reshape, aten.view, aten._unsafe_view)
_COPIES = (aten.clone, aten.contiguous)


class GroupedQueryRule(Rule):
    """A walker: repeat_kv is written with or without clones and whole-dimension slices."""
    name = "grouped_query_attention"
    anchors = (aten.scaled_dot_product_attention,)

    def match(self, gm: fx.GraphModule, sdpa: fx.Node) -> Bindings | Reject | None:
        q, k, v = sdpa.args[:3]
        if sdpa.kwargs.get("enable_gqa", False):
            return None
        k_source, v_source = _repeated(k, sdpa), _repeated(v, sdpa)
        if k_source is None and v_source is None:
            return None        # plain multi-head attention
        for source in (k_source, v_source):
            if isinstance(source, Reject):
                return source
        if k_source is None or v_source is None:
            return Reject(Reason.NOT_THE_FORMULA, "only one of k and v is a repeat")
        (k_base, k_rep, k_dead), (v_base, v_rep, v_dead) = k_source, v_source
        q_shape, base_shape = ir.shape(q), ir.shape(k_base)
        if q_shape is None or base_shape is None or len(q_shape) != 4:
            return Reject(Reason.UNKNOWN_SHAPE, "shapes unknown")
        if k_rep != v_rep or not isinstance(q_shape[1], int) or q_shape[1] != base_shape[1] * k_rep:
            return Reject(Reason.SHAPE_MISMATCH,
                          f"repeat factors k×{k_rep}, v×{v_rep} do not map {base_shape[1]} KV heads onto {q_shape[1]}")
        return {"sdpa": sdpa, "k": k_base, "v": v_base, "rep": k_rep, "dead": [sdpa, *k_dead, *v_dead]}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        sdpa = b["sdpa"]
        args = (sdpa.args[0], b["k"], b["v"], *sdpa.args[3:])
        fused = call(gm.graph, aten.scaled_dot_product_attention.default, args, {**sdpa.kwargs, "enable_gqa": True},
                     before=sdpa)
        ir.replace_all_uses(sdpa, fused)
        return Match(f"repeat_kv ×{b['rep']} → enable_gqa", b["dead"])


RULES = [GroupedQueryRule()]


def _repeated(node: fx.Node, sdpa: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | Reject | None:
    """(k, r, nodes of the repeat) if `node` is repeat_kv(k, r) used only by `sdpa`; why not; None."""
    if not ir.is_op(node, *_RESHAPES):
        return None
    dead = [node]
    expanded = node.args[0]
    while isinstance(expanded, fx.Node) and ir.is_op(expanded, *_COPIES):
        dead.append(expanded)
        expanded = expanded.args[0]
    if not isinstance(expanded, fx.Node) or not ir.is_op(expanded, aten.expand):
        return None
    dead.append(expanded)
    source = _strip_full_slices(expanded.args[0], dead)
    if not ir.is_op(source, aten.unsqueeze) or source.args[1] != 2:
        return None
    dead.append(source)
    base = _strip_full_slices(source.args[0], dead)
    out, grown, base_shape = ir.shape(node), ir.shape(expanded), ir.shape(base)
    if out is None or grown is None or base_shape is None or len(grown) != 5 or len(base_shape) != 4:
        return Reject(Reason.UNKNOWN_SHAPE, "shapes unknown")
    rep = grown[2]
    if not isinstance(rep, int) or str(out[1]) != str(base_shape[1] * rep) or \
            any(str(a) != str(b) for a, b in zip((out[0], *out[2:]), (base_shape[0], *base_shape[2:]))):
        return Reject(Reason.NOT_THE_FORMULA, "the reshape does not merge the repeat into the head dimension")
    if any(not interior(n, owner) for n, owner in zip(dead, [sdpa, *dead])):
        return Reject(Reason.OTHER_USERS, "an intermediate of the repeat has other users")
    return base, rep, dead


def _strip_full_slices(node: fx.Node, dead: list[fx.Node]) -> fx.Node:
    """Skip `x[:, :]`-style slices over a whole dimension (indexing with None writes them)."""
    while isinstance(node, fx.Node) and ir.is_op(node, aten.slice) and _full(node):
        dead.append(node)
        node = node.args[0]
    return node


def _full(node: fx.Node) -> bool:
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    return start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= 2 ** 62))
