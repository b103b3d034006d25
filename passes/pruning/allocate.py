"""How many units each group loses, and which.

Cost model (per sample: a symbolic batch dimension counts as 1, any other
symbolic dimension, e.g. a token model's sequence length, as its example value):

    MACs = Σ over conv / linear / (add)mm / matmul / attention nodes of
           base_MACs · Π keep-fraction of each pruned dimension it reads or writes
    params = Σ over tensors of numel · Π keep-fraction of each pruned dimension

A keep-fraction is 1 - (removed elements)/(size) of one dimension of one
tensor, so the model is exact for the sliced graph (tests check it).

Allocation, with units removed in steps that keep a multiple of `round_to`
channels and never more than `max_ratio` of a group:

- global: rank all units by score / mean score of their group and remove the
  cheapest step of any group until the FLOPs (or params) target is met;
- local: the same ratio of every group (found by bisection for a target), or
  the ratios the user gave per module pattern;
- sensitivity: each group's metric drop measured alone at a few ratios (under
  a time budget, largest groups first; the rest estimated from their scores);
  greedily take the step with the smallest drop per FLOP saved, then give
  back steps of the largest drop that the target does not need (the last
  step of a large group can overshoot it).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.fx as fx

from graphopt.engine import ir

from .model import Analysis, Group, Seg

aten = torch.ops.aten


@dataclass
class Term:
    base: float
    dims: list[tuple[int, tuple[Seg, ...]]]   # (size, segments) of each pruned dimension involved


def _sizer(gm: fx.GraphModule) -> Callable[[fx.Node], list[int]]:
    """Per-sample sizes of a node's dimensions: batch symbols (dimension 0 of the inputs) → 1, other symbols
    (a sequence length) → their example value."""
    batch: set = set()
    for node in gm.graph.nodes:
        shape = ir.shape(node) if node.op == "placeholder" else None
        if shape and isinstance(shape[0], torch.SymInt):
            batch |= shape[0].node.expr.free_symbols

    def size(d: object) -> int:
        if isinstance(d, int):
            return d
        expr, env = d.node.expr, d.node.shape_env
        value = expr.subs({symbol: 1 if symbol in batch else ir.shape_hint(env, symbol)
                           for symbol in expr.free_symbols})
        return max(int(value), 1)

    return lambda node: [size(d) for d in (ir.shape(node) or ())]


class Cost:
    """FLOPs (multiply-accumulates) and parameter count as functions of the units removed."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis) -> None:
        self.flop_terms: list[Term] = []
        self.param_terms: list[Term] = []
        seg_of = analysis.segs
        _size = _sizer(gm)
        for node in gm.graph.nodes:
            if ir.is_op(node, aten.conv1d, aten.conv2d, aten.conv3d, aten.linear, aten.matmul, aten.bmm,
                        aten.mm, aten.addmm, aten.scaled_dot_product_attention):
                out = _size(node)
                dims = [(out[d], seg_of(node, d)) for d in range(len(out)) if seg_of(node, d)]
                x = node.args[0]
                if ir.is_op(node, aten.linear):
                    k = _size(node.args[1])[1]
                    dims += [(k, seg_of(x, len(_size(x)) - 1))] if seg_of(x, len(_size(x)) - 1) else []
                    base = math.prod(out) * k
                elif ir.is_op(node, aten.scaled_dot_product_attention):
                    q, key, v = (_size(a) for a in node.args[:3])
                    base = math.prod(q[:-1]) * key[-2] * (q[-1] + v[-1])
                elif ir.is_op(node, aten.matmul, aten.bmm, aten.mm, aten.addmm):
                    if ir.is_op(node, aten.addmm):
                        x = node.args[1]
                    k = _size(x)[-1]
                    base = math.prod(out) * k
                    if ir.is_op(node, aten.mm, aten.addmm) and seg_of(x, 1):   # x·W with W stored [K, N]
                        dims.append((k, seg_of(x, 1)))
                else:
                    w = _size(node.args[1])
                    base = math.prod(out) * math.prod(w[1:])
                    groups = node.args[6] if len(node.args) > 6 else 1
                    if not (groups > 1 and w[1] == 1) and seg_of(x, 1):   # depthwise reads what it writes
                        dims.append((w[1] * groups, seg_of(x, 1)))
                self.flop_terms.append(Term(float(base), dims))
        members: dict[str, dict[int, list[Seg]]] = {}
        for group in analysis.groups.values():
            for m in group.members:
                members.setdefault(m.attr, {}).setdefault(m.dim, []).append(m.seg)
        for name, tensor in ir.live_tensors(gm).items():   # what the graph reads, each storage once
            if not tensor.is_floating_point():
                continue
            dims = [(tensor.shape[d], tuple(segs)) for d, segs in members.get(name, {}).items()]
            self.param_terms.append(Term(float(tensor.numel()), dims))

    @staticmethod
    def _eval(terms: list[Term], removed: Mapping[str, int]) -> float:
        total = 0.0
        for term in terms:
            value = term.base
            for size, segs in term.dims:
                value *= 1 - sum(s.block * removed.get(s.group, 0) for s in segs) / size
            total += value
        return total

    def flops(self, removed: Mapping[str, int]) -> float:
        return self._eval(self.flop_terms, removed)

    def params(self, removed: Mapping[str, int]) -> float:
        return self._eval(self.param_terms, removed)

    def of(self, kind: str) -> Callable[[Mapping[str, int]], float]:
        return self.flops if kind == "flops" else self.params


def count_flops(gm: fx.GraphModule) -> float:
    """Multiply-accumulates of `gm` per sample (conv, linear, matmul, attention)."""
    return Cost(gm, Analysis({}, {}, [], [])).flops({})


def levels(group: Group, round_to: int, max_ratio: float) -> list[int]:
    """Allowed numbers of removed units, ascending (kept channels stay a multiple of round_to)."""
    step = max(1, math.ceil(round_to / group.gran))
    most = min(group.units - 1, math.floor(group.units * max_ratio + 1e-9))
    allowed = [0] + [group.units - k for k in range(step * (group.units // step), 0, -step)
                     if 0 < group.units - k <= most]
    return sorted(set(allowed))


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    order = torch.argsort(scores, stable=True)
    return sorted(order[:n].tolist())


def by_ratio(groups: Sequence[Group], scores: Mapping[str, torch.Tensor], ratios: Mapping[str, float],
             round_to: int, max_ratio: float) -> dict[str, list[int]]:
    """Local: each group loses the allowed level nearest to its ratio of units."""
    plan: dict[str, list[int]] = {}
    for g in groups:
        want = ratios.get(g.name, 0.0) * g.units
        options = levels(g, round_to, max_ratio)
        n = min(options, key=lambda k: (abs(k - want), k))
        plan[g.name] = _lowest(scores[g.name], n)
    return plan


def uniform(groups: Sequence[Group], scores: Mapping[str, torch.Tensor], cost: Callable, keep: float,
            round_to: int, max_ratio: float) -> dict[str, list[int]]:
    """Local: one ratio for every group, bisected so the cost falls to `keep` of the original."""
    full = cost({})
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        plan = by_ratio(groups, scores, {g.name: mid for g in groups}, round_to, max_ratio)
        if cost({k: len(v) for k, v in plan.items()}) > keep * full:
            lo = mid
        else:
            hi = mid
    return by_ratio(groups, scores, {g.name: hi for g in groups}, round_to, max_ratio)


def global_rank(groups: Sequence[Group], scores: Mapping[str, torch.Tensor], cost: Callable, keep: float,
                round_to: int, max_ratio: float) -> dict[str, list[int]]:
    """Global: remove the step of lowest normalized score until the cost reaches `keep`."""
    full = cost({})
    norm = {g.name: scores[g.name] / (scores[g.name].mean() + 1e-12) for g in groups}
    order = {g.name: torch.sort(norm[g.name]).values for g in groups}
    allowed = {g.name: levels(g, round_to, max_ratio) for g in groups}
    removed = {g.name: 0 for g in groups}
    while cost(removed) > keep * full:
        best, best_score = None, math.inf
        for g in groups:
            nxt = [k for k in allowed[g.name] if k > removed[g.name]]
            if not nxt:
                continue
            chunk = order[g.name][removed[g.name]:nxt[0]]
            if chunk.mean().item() < best_score:
                best, best_score = g.name, chunk.mean().item()
        if best is None:
            break
        removed[best] = min(k for k in allowed[best] if k > removed[best])
    return {g.name: _lowest(scores[g.name], removed[g.name]) for g in groups}


def sensitivity(groups: Sequence[Group], scores: Mapping[str, torch.Tensor], cost: Callable, keep: float,
                round_to: int, max_ratio: float, drop: Callable[[Mapping[str, list[int]]], float],
                ratios: Sequence[float] = (0.25, 0.5, 0.75), progress: bool = True,
                budget_s: float = math.inf) -> dict[str, list[int]]:
    """Greedy under the target, by measured metric drop per unit of cost saved.

    `drop(plan)` is the metric lost when `plan` (one group's lowest units) is applied alone. Groups are
    probed largest cost first while `budget_s` lasts; a group left unprobed gets the first-order curve

        drop(n) ≈ k · Σ lowest n scores / Σ scores

    with k the median of that ratio over the probed points (1 when none was probed).
    """
    from tqdm.auto import tqdm
    full = cost({})
    curves: dict[str, list[tuple[int, float]]] = {}
    order = sorted(groups, key=lambda g: cost({g.name: g.units}) - full)   # most cost first
    start = time.perf_counter()
    bar = tqdm(order, desc="pruning sensitivity", unit="group", disable=None if progress else True)
    for g in bar:
        if curves and time.perf_counter() - start > budget_s:   # the largest group is always probed
            break
        bar.set_postfix_str(", ".join(g.modules[:2]) or g.name)
        allowed = levels(g, round_to, max_ratio)
        points = [(0, 0.0)]
        for r in ratios:
            n = min(allowed, key=lambda k: abs(k - r * g.units))
            if n > points[-1][0]:
                points.append((n, max(points[-1][1], drop({g.name: _lowest(scores[g.name], n)}))))
        curves[g.name] = points
    bar.close()

    def removed_share(g: Group, n: int) -> float:
        ordered = torch.sort(scores[g.name]).values
        return float(ordered[:n].sum() / ordered.sum().clamp_min(1e-30))

    ratios_seen = [loss / share for g in groups if g.name in curves for n, loss in curves[g.name][1:]
                   if (share := removed_share(g, n)) > 0]
    k = statistics.median(ratios_seen) if ratios_seen else 1.0
    for g in groups:
        if g.name not in curves:
            allowed = levels(g, round_to, max_ratio)
            curves[g.name] = [(n, k * removed_share(g, n)) for n in allowed]

    def loss_at(name: str, n: int) -> float:
        pts = curves[name]
        for (a, la), (b, lb) in zip(pts, pts[1:]):
            if a <= n <= b:
                return la + (lb - la) * (n - a) / (b - a)
        return pts[-1][1] if n >= pts[-1][0] else 0.0

    removed = {g.name: 0 for g in groups}
    allowed = {g.name: [k for k in levels(g, round_to, max_ratio) if k <= curves[g.name][-1][0]] for g in groups}
    while cost(removed) > keep * full:
        best, best_rate = None, math.inf
        now = cost(removed)
        for g in groups:
            nxt = [k for k in allowed[g.name] if k > removed[g.name]]
            if not nxt:
                continue
            trial = dict(removed, **{g.name: nxt[0]})
            saved = now - cost(trial)
            if saved <= 0:
                continue
            rate = (loss_at(g.name, nxt[0]) - loss_at(g.name, removed[g.name]) + 1e-12) / saved
            if rate < best_rate:
                best, best_rate = g.name, rate
        if best is None:
            break
        removed[best] = min(k for k in allowed[best] if k > removed[best])
    # the last step may overshoot the target: give back, one step at a time, the units whose
    # removal cost the most metric while the target still holds
    while True:
        best, best_gain = None, 0.0
        for g in groups:
            back = [k for k in allowed[g.name] if k < removed[g.name]]
            if not back:
                continue
            trial = dict(removed, **{g.name: back[-1]})
            gain = loss_at(g.name, removed[g.name]) - loss_at(g.name, back[-1])
            if cost(trial) <= keep * full and gain > best_gain:
                best, best_gain = g.name, gain
        if best is None:
            break
        removed[best] = max(k for k in allowed[best] if k < removed[best])
    return {g.name: _lowest(scores[g.name], removed[g.name]) for g in groups}
