"""Importance of each unit of each channel group (higher = keep).

    l1 / l2     Σ over the group's weight tensors (producer rows and consumer
                columns) of |w| or w², per unit (l2 takes the square root)
    bn_scale    Σ |γ| of the BatchNorm scales in the group (l2 where it has none)
    taylor      Σ over calibration batches of |Σ_unit w·∂L/∂w| (first-order
                estimate of the loss change when the unit is removed)
    activation  mean |x| of the unit's channels where consumers read them,
                over the calibration batches
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from graphopt.engine import ir
from graphopt.errors import OptionError

from .model import Analysis, Group, Member

aten = torch.ops.aten
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "activation")


def call(module: Callable, item: Any) -> Any:
    """Run `module` on one calibration item: a tuple of args, a dict of kwargs, or one tensor."""
    if isinstance(item, tuple):
        return module(*item)
    if isinstance(item, dict):
        return module(**item)
    return module(item)


def _per_unit(tensor: torch.Tensor, m: Member) -> torch.Tensor:
    """Tensor elements of `m`'s units, shaped [units, everything else]."""
    t = tensor.detach().movedim(m.dim, 0)
    rows = t[m.seg.start:m.seg.end]
    return rows.reshape(m.seg.count, -1)


def magnitude(gm: fx.GraphModule, group: Group, power: int) -> torch.Tensor:
    score = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        tensor = ir.attr_path(gm, m.attr)
        if m.role in ("out", "in") and tensor.dim() >= 2:
            score += _per_unit(tensor, m).double().abs().pow(power).sum(1)
    return score.sqrt() if power == 2 else score


def bn_scale(gm: fx.GraphModule, group: Group, bn_weights: set[str]) -> torch.Tensor:
    members = [m for m in group.members if m.attr in bn_weights]
    if not members:
        return magnitude(gm, group, 2)
    return sum(_per_unit(ir.attr_path(gm, m.attr), m).double().abs().sum(1) for m in members)


def taylor(gm: fx.GraphModule, groups: list[Group], data: list[Any], labels: list[Any] | None,
           loss_fn: Callable | None) -> dict[str, torch.Tensor]:
    params = dict(gm.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    scores = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    try:
        for i, item in enumerate(data):
            gm.zero_grad(set_to_none=True)
            out = call(gm, item)
            label = labels[i] if labels is not None else None
            if loss_fn is not None:
                loss = loss_fn(out, label) if labels is not None else loss_fn(out)
            else:
                logits = out if isinstance(out, torch.Tensor) else out[0]
                loss = F.cross_entropy(logits, label)
            loss.backward()
            for g in groups:
                batch = torch.zeros(g.units, dtype=torch.float64)
                for m in g.members:
                    p = params.get(m.attr)
                    if p is not None and p.grad is not None:
                        batch += _per_unit(p * p.grad, m).double().sum(1)
                scores[g.name] += batch.abs()
    finally:
        gm.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return scores


def activation(gm: fx.GraphModule, analysis: Analysis, groups: list[Group], data: list[Any]) -> dict[str, torch.Tensor]:
    wanted = {g.name for g in groups}
    watch: dict[fx.Node, list[tuple[int, Any]]] = defaultdict(list)
    for node in gm.graph.nodes:
        if ir.is_op(node, aten.linear, aten.conv1d, aten.conv2d, aten.conv3d):
            x = node.args[0]
            dim = len(ir.shape(x)) - 1 if ir.is_op(node, aten.linear) else 1
            for seg in analysis.segs(x, dim):
                if seg.group in wanted:
                    watch[x].append((dim, seg))
    scores = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            for dim, seg in watch.get(n, ()):
                t = result.detach().abs().movedim(dim, 0)[seg.start:seg.end]
                scores[seg.group] += t.reshape(seg.count, -1).double().mean(1)
            return result

    with torch.no_grad():
        for item in data:
            args, kwargs = _as_call(item)
            Recorder(gm).run(*pytree.arg_tree_leaves(*args, **kwargs), enable_io_processing=False)
    return scores


def _as_call(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, dict):
        return (), item
    return (item,), {}


def compute(gm: fx.GraphModule, analysis: Analysis, groups: list[Group], criterion: str,
            data: Iterable[Any] | None = None, labels: list[Any] | None = None,
            loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Scores for every unit of every group in `groups`."""
    if criterion in ("l1", "l2"):
        return {g.name: magnitude(gm, g, 1 if criterion == "l1" else 2) for g in groups}
    if criterion == "bn_scale":
        bn_weights = {str(n.args[1].target) for n in ir.find_nodes(gm, aten.batch_norm)
                      if isinstance(n.args[1], fx.Node)}
        return {g.name: bn_scale(gm, g, bn_weights) for g in groups}
    batches = list(data) if data is not None else []
    if not batches:
        raise OptionError(f"criterion={criterion!r} needs calibration_data (batches of example inputs)")
    if criterion == "taylor":
        if loss_fn is None and labels is None:
            raise OptionError("criterion='taylor' needs prune_options['loss_fn'] or prune_options['labels'] "
                              "(one label tensor per calibration batch)")
        if labels is not None and len(labels) != len(batches):
            raise OptionError(f"prune_options['labels'] has {len(labels)} entries for {len(batches)} "
                              "calibration batches")
        return taylor(gm, groups, batches, labels, loss_fn)
    if criterion == "activation":
        return activation(gm, analysis, groups, batches)
    raise OptionError(f"criterion={criterion!r}: choose one of {', '.join(CRITERIA)}")
