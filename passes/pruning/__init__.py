"""Structured pruning (level O3): remove whole channels, neurons and attention heads.

    analyze (groups.py) → score units (importance.py) → allocate (allocate.py) → slice (slice.py)

`prune=r` (a number in [0, 1)) removes the fraction r of the FLOPs (or of the
parameters with prune_options target="params"): `prune=0.5` keeps half the
FLOPs. `prune={pattern: r}` removes the fraction r of the channels of every
group whose module path matches the fnmatch pattern.

prune_options:
    criterion        "l2" (default) | "l1" | "bn_scale" | "taylor" | "activation"
    ranking          "global" (default) | "local"
    round_to         kept channels stay a multiple of this (default 8)
    max_layer_ratio  largest fraction of one group removed (default 0.8)
    ignored          module-name patterns whose channels are kept
    target           "flops" (default) | "params"
    sensitivity      "auto" (default): True when calibration_data is given;
                     True: allocate from a per-group sweep on calibration data
                     (on the digits ResNet at 2x fewer FLOPs it loses least
                     before fine-tuning: 95.97% vs 82.62% for global ranking;
                     after the same fine-tune all allocations reach 99.24%,
                     bench/results/pruning.md); False: ranking
    sweep_ratios     ratios of that sweep (default (0.25, 0.5, 0.75))
    sweep_batches    calibration batches each sweep probe runs (default 2)
    sweep_budget_s   seconds the sweep may take (default 60): groups are probed
                     largest cost first; the rest get their curve from their
                     importance scores (allocate.sensitivity)
    recalibrate      "auto" (default): True when calibration_data is given;
                     True: after slicing, give every convolution's output
                     channels the mean and std they had before pruning on the
                     calibration data (the folded BatchNorm re-estimated,
                     recalibrate.py); False: no correction
    metric           callable(module) -> float, higher is better (the sweep's
                     measure; default: minus the relative output error)
    loss_fn          callable(outputs[, labels]) -> loss, for "taylor"
    labels           one label tensor per calibration batch, for "taylor"
    max_calibration_batches   batches used for scoring and the sweep (default 8)

When a ratio target cannot be met, the stats say so (`target_met`, and
`shortfall`: the blocked groups that would have saved most, each with the op
that blocks it, and the groups already at their largest cut) and a warning
repeats it.

The pass is lossy: its budget is unbounded (the report records the error),
and recovery is `graphopt.finetune`.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from fnmatch import fnmatch
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.engine import ir
from graphopt.errors import OptionError
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject
from graphopt.engine.verify import Budget

from . import allocate, importance, recalibrate as calibration, slice as slicing
from .groups import Analysis, analyze, matching_groups

DEFAULTS: dict[str, Any] = {
    "criterion": "l2", "ranking": "global", "round_to": 8, "max_layer_ratio": 0.8, "ignored": (),
    "target": "flops", "sensitivity": "auto", "recalibrate": "auto", "sweep_ratios": (0.25, 0.5, 0.75),
    "metric": None, "sweep_batches": 2, "sweep_budget_s": 60.0,
    "loss_fn": None, "labels": None, "max_calibration_batches": 8,
}


def validate(prune: Any, prune_options: Mapping[str, Any]) -> dict[str, Any]:
    """Checked prune_options with defaults filled in; raises OptionError."""
    unknown = sorted(set(prune_options) - set(DEFAULTS))
    if unknown:
        raise OptionError(f"unknown prune_options key(s): {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **prune_options}
    ratios = prune.values() if isinstance(prune, Mapping) else [prune]
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise OptionError(f"prune ratio {ratio!r} must be a number in [0, 1)")
    if opts["criterion"] not in importance.CRITERIA:
        raise OptionError(f"prune_options criterion={opts['criterion']!r}: choose one of {', '.join(importance.CRITERIA)}")
    choices = {"ranking": ("global", "local"), "target": ("flops", "params")}
    for key, allowed in choices.items():
        if opts[key] not in allowed:
            raise OptionError(f"prune_options {key}={opts[key]!r}: choose one of {', '.join(allowed)}")
    if not isinstance(opts["round_to"], int) or isinstance(opts["round_to"], bool) or opts["round_to"] < 1:
        raise OptionError(f"prune_options round_to={opts['round_to']!r} must be a positive integer")
    if not isinstance(opts["max_layer_ratio"], (int, float)) or not 0 < opts["max_layer_ratio"] < 1:
        raise OptionError(f"prune_options max_layer_ratio={opts['max_layer_ratio']!r} must be in (0, 1)")
    for key in ("sensitivity", "recalibrate"):
        if opts[key] not in (True, False, "auto"):
            raise OptionError(f"prune_options {key}={opts[key]!r}: choose True, False or 'auto'")
    if isinstance(opts["ignored"], str):
        opts["ignored"] = (opts["ignored"],)
    if opts["criterion"] == "taylor" and opts["loss_fn"] is None and opts["labels"] is None:
        raise OptionError("criterion='taylor' needs prune_options['loss_fn'] or prune_options['labels']")
    if isinstance(opts["sweep_batches"], bool) or not isinstance(opts["sweep_batches"], int) or opts["sweep_batches"] < 1:
        raise OptionError(f"prune_options sweep_batches={opts['sweep_batches']!r} must be a positive integer")
    if isinstance(opts["sweep_budget_s"], bool) or not isinstance(opts["sweep_budget_s"], (int, float)) \
            or opts["sweep_budget_s"] <= 0:
        raise OptionError(f"prune_options sweep_budget_s={opts['sweep_budget_s']!r} must be a positive number")
    for key in ("loss_fn", "metric"):
        if opts[key] is not None and not callable(opts[key]):
            raise OptionError(f"prune_options {key} must be callable")
    return opts


class StructuredPruning(Pass):
    """Slice channels, neurons and heads out of the graph (see the package docstring)."""
    name = "structured_pruning"
    level = 3
    budget = Budget()   # lossy by design: unbounded, the report records the error

    def __init__(self, prune: float | Mapping[str, float], options: Mapping[str, Any] | None = None,
                 calibration_data: Any = None, progress: bool = True) -> None:
        self.prune = prune
        self.options = validate(prune, options or {})
        self.calibration_data = calibration_data
        self.progress = progress

    def _batches(self) -> list[Any] | None:
        if self.calibration_data is None:
            return None
        return list(itertools.islice(iter(self.calibration_data), self.options["max_calibration_batches"]))

    def run(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        log = RewriteLog()
        analysis = analyze(gm, opts["ignored"])
        self._check_patterns(analysis)
        groups = analysis.prunable()
        for group in analysis.groups.values():
            if not group.prunable:
                log.rejected("channel group", group.name,
                             Reject(Reason.NOT_ELIGIBLE, "; ".join(group.blocked) or "a single unit"))
        if not groups:
            warnings.warn("graphopt: structured pruning found no prunable channel group; the model is unchanged "
                          f"(boundaries: {'; '.join(analysis.boundaries[:5]) or 'none'})")
            return log.result(gm, boundaries=analysis.boundaries)
        batches = self._batches()
        scores = importance.compute(gm, analysis, groups, opts["criterion"], batches, opts["labels"],
                                    opts["loss_fn"])
        cost = allocate.Cost(gm, analysis)
        plan = self._allocate(gm, analysis, groups, scores, cost, batches)
        plan = {k: v for k, v in plan.items() if v}
        before = (cost.flops({}), cost.params({}))
        recalibrate = self._recalibrates(batches)
        reference = calibration.statistics(gm, calibration.conv_nodes(gm), batches) if recalibrate else {}
        slicing.apply(gm, analysis, plan)
        recalibrated = (calibration.recalibrate(gm, reference, batches,
                                                calibration.kept_channels(analysis, plan, reference), self.progress)
                        if recalibrate else [])
        after = (allocate.count_flops(gm), float(ir.param_count(gm)))
        log.matched("channel group", len(plan))
        layers = {g.name: {"modules": g.modules, "units": g.units, "unit_channels": g.gran,
                           "pruned_units": len(plan.get(g.name, ()))} for g in groups}
        shortfall = self._shortfall(analysis, groups, plan, cost, before, after)
        if shortfall:
            warnings.warn(f"graphopt: structured pruning fell short of its target: {shortfall}")
        return log.result(gm, flops_before=before[0], flops_after=after[0], params_before=before[1],
                          params_after=after[1], flops_ratio=after[0] / before[0] if before[0] else 1.0,
                          layers=layers, boundaries=analysis.boundaries, recalibrated=recalibrated,
                          target_met=not shortfall, shortfall=shortfall)

    def _shortfall(self, analysis: Analysis, groups: list, plan: Mapping[str, list[int]], cost: allocate.Cost,
                   before: tuple[float, float], after: tuple[float, float]) -> str:
        """Why a ratio target was missed ('' when met): the blocked groups that would have saved most,
        each with the op that blocks it, and the groups already at their largest allowed cut."""
        if isinstance(self.prune, Mapping):
            return ""
        kind = self.options["target"]
        index = 0 if kind == "flops" else 1
        keep = 1.0 - float(self.prune)
        if not before[index] or after[index] <= keep * before[index] * (1 + 1e-6):
            return ""
        measure = cost.of(kind)
        full = measure({})
        saving = {g.name: full - measure({g.name: g.units}) for g in analysis.groups.values() if g.blocked}
        blockers = sorted(saving, key=saving.get, reverse=True)[:3]
        limits = allocate.levels
        capped = [g.name for g in groups if plan.get(g.name) and len(plan[g.name]) == max(
            limits(g, self.options["round_to"], self.options["max_layer_ratio"]))]
        parts = [f"kept {after[index] / before[index]:.2f} of the {kind}, asked {keep:.2f}"]
        parts += [f"{name} ({saving[name] / full:.0%} of the {kind}) blocked by {analysis.groups[name].blocked[0]}"
                  for name in blockers if saving[name] > 0]
        if capped:
            parts.append(f"{len(capped)} group(s) at their largest cut (max_layer_ratio="
                         f"{self.options['max_layer_ratio']}, round_to={self.options['round_to']})")
        return "; ".join(parts)

    def _recalibrates(self, batches: list[Any] | None) -> bool:
        if self.options["recalibrate"] is True and not batches:
            raise OptionError("prune_options recalibrate=True needs calibration_data")
        return bool(batches) and self.options["recalibrate"] in (True, "auto")

    def _check_patterns(self, analysis: Analysis) -> None:
        candidates = sorted({m for g in analysis.groups.values() for m in g.modules})
        patterns = list(self.options["ignored"]) + (list(self.prune) if isinstance(self.prune, Mapping) else [])
        for pattern in patterns:
            if not any(fnmatch(m, pattern) for m in candidates) and not any(
                    fnmatch(s, pattern) for g in analysis.groups.values() for s in g.sources):
                raise OptionError(f"pattern {pattern!r} matches no layer; candidates: {', '.join(candidates)}")

    def _allocate(self, gm: fx.GraphModule, analysis: Analysis, groups: list, scores: dict, cost: allocate.Cost,
                  batches: list[Any] | None) -> dict[str, list[int]]:
        opts = self.options
        round_to, max_ratio = opts["round_to"], opts["max_layer_ratio"]
        if isinstance(self.prune, Mapping):
            ratios: dict[str, float] = {}
            for pattern, ratio in self.prune.items():
                for g in matching_groups(analysis, pattern):
                    ratios[g.name] = ratio
            return allocate.by_ratio(groups, scores, ratios, round_to, max_ratio)
        keep = 1.0 - float(self.prune)
        measure = cost.of(opts["target"])
        if opts["sensitivity"] is True or (opts["sensitivity"] == "auto" and batches):
            if not batches:
                raise OptionError("prune_options sensitivity=True needs calibration_data")
            drop = _drop_fn(gm, analysis, batches[:opts["sweep_batches"]], opts["metric"],
                            self._recalibrates(batches))
            return allocate.sensitivity(groups, scores, measure, keep, round_to, max_ratio, drop,
                                        opts["sweep_ratios"], self.progress, opts["sweep_budget_s"])
        rank = allocate.global_rank if opts["ranking"] == "global" else allocate.uniform
        return rank(groups, scores, measure, keep, round_to, max_ratio)


def _drop_fn(gm: fx.GraphModule, analysis: Analysis, batches: list[Any],
             metric: Callable[[torch.nn.Module], float] | None,
             recalibrate: bool = False) -> Callable[[Mapping[str, list[int]]], float]:
    """Metric lost when a plan is applied as a mask (equal to slicing, much cheaper), recalibrated
    as the sliced graph will be when `recalibrate`. Every probe masks one working copy in place and
    restores its tensors afterwards (no copy of the graph per probe)."""
    with torch.no_grad():
        reference = [importance.call(gm, b) for b in batches]
    stats = calibration.statistics(gm, calibration.conv_nodes(gm), batches) if recalibrate else {}
    base = metric(gm) if metric is not None else 0.0
    work = copy.deepcopy(gm)
    if recalibrate:   # biases recalibration would add, added once: zero, so the copy computes the same
        for node in calibration.conv_nodes(work):
            calibration.bias_node(work, node)
    saved = {name: t.detach().clone() for name, t in ir.live_tensors(work).items()}

    def score(module: torch.nn.Module) -> float:
        if metric is not None:
            return metric(module)
        errors = []
        with torch.no_grad():
            for b, ref in zip(batches, reference):
                got = [t.double() for t in pytree.tree_leaves(importance.call(module, b)) if isinstance(t, torch.Tensor)]
                want = [t.double() for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
                num = math.sqrt(sum(((g - w) ** 2).sum().item() for g, w in zip(got, want)))
                den = math.sqrt(sum((w ** 2).sum().item() for w in want)) or 1.0
                errors.append(num / den)
        return -sum(errors) / len(errors)

    def drop(plan: Mapping[str, list[int]]) -> float:
        try:
            slicing.mask(work, analysis, plan)
            if recalibrate:
                calibration.recalibrate(work, stats, batches)
            return base - score(work)
        finally:
            with torch.no_grad():
                for name, tensor in ir.live_tensors(work).items():
                    tensor.copy_(saved[name])

    return drop


def passes(options: Any) -> list[Any]:
    """The pruning passes for `options.prune` (a ratio or {pattern: ratio}) and `options.prune_options`."""
    return [StructuredPruning(options.prune, options.prune_options, options.calibration_data,
                              getattr(options, "progress", True))]


__all__ = ["StructuredPruning", "passes", "validate", "analyze"]
