"""Skip padding, planning: the row-wise nodes that run on packed rows, and where rows enter and leave them.

A plan is made for one graph; the check plans again on its copy (planning is deterministic), so a plan never
crosses graphs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from .rows import Args, Rows, is_product, row_wise


@dataclass
class Plan:
    """What to rewrite in one graph."""
    mask: fx.Node                       # the [B, S] placeholder read for padding (0 = padding)
    rows: Rows
    nodes: dict[fx.Node, Args]          # nodes that run on packed rows, with their (args, kwargs) there
    sources: list[fx.Node]              # token tensors gathered on the way in
    sinks: list[fx.Node]                # token tensors scattered back on the way out
    keep_first: bool = False            # also compute each sequence's first position, real or not


def plan_rewrite(gm: fx.GraphModule, mask_name: str, keep_first: bool = False) -> Plan | Reject:
    """The segments of `gm` to run on the real rows of placeholder `mask_name`, or why there are none."""
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == mask_name)
    batch, seq = ir.shape(mask)
    rows = Rows(batch, seq)
    edits = {n: a for n in gm.graph.nodes if (a := row_wise(n, rows)) is not None}
    kept = _with_tuple_items(_feeding_products(edits, rows), edits)
    if not kept:
        return Reject(Reason.NO_GAIN, "no matrix product runs on token rows ([batch·sequence, …] or "
                                      "[batch, sequence, …] tensors of this mask's sizes)")
    sources: list[fx.Node] = []
    sinks: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node not in kept:
            continue
        for source in node.all_input_nodes:
            if source not in kept and rows.lead(source) is not None and source not in sources:
                sources.append(source)
        if not isinstance(ir.val(node), (tuple, list)) and any(user not in kept for user in node.users):
            sinks.append(node)
    return Plan(mask, rows, {n: edits[n] for n in gm.graph.nodes if n in kept}, sources, sinks, keep_first)


def _feeding_products(edits: dict[fx.Node, Args], rows: Rows) -> set[fx.Node]:
    """The matrix products among `edits` and the row-wise nodes that feed one.

    What follows the last product (an output's pooling, masking with −∞ for a max) stays padded: it may
    give padded rows values of their own, which zeros would not reproduce; and a gather and a scatter
    cost a copy each, which only a product repays."""
    kept = {n for n in edits if is_product(n, rows)}
    frontier = list(kept)
    while frontier:
        for producer in frontier.pop().all_input_nodes:
            if producer in edits and producer not in kept:
                kept.add(producer)
                frontier.append(producer)
    return kept


def _with_tuple_items(kept: set[fx.Node], edits: dict[fx.Node, Args]) -> set[fx.Node]:
    """Every item read from a kept multi-output node (its tuple is packed as a whole)."""
    items = {u for n in kept for u in n.users if u.target is operator.getitem and u in edits}
    return kept | items
