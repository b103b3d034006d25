"""The sensitivity sweep's cost (issue 14, class 9): probes share one working copy, a time budget, and
first-order curves for the groups the budget leaves unprobed."""
from __future__ import annotations

import math

import torch

from graphopt.frontend.capture import capture
from graphopt.passes.pruning import _drop_fn, allocate, analyze, importance
from graphopt.passes.pruning import slice as slicing
from tests.strategies import randomize_

from .test_counts import ResNetLike


def _setup():
    model = randomize_(ResNetLike(16), 0)
    gm = capture(model, (torch.randn(2, 3, 8, 8),)).module
    analysis = analyze(gm)
    groups = analysis.prunable()
    scores = importance.compute(gm, analysis, groups, "l2")
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    return gm, analysis, groups, scores, batches


def test_probes_restore_the_working_copy_and_match_a_fresh_mask():
    gm, analysis, groups, scores, batches = _setup()
    drop = _drop_fn(gm, analysis, batches, None, recalibrate=True)
    plan = {groups[0].name: [0, 1, 2, 3]}
    first, _, again = drop(plan), drop({groups[-1].name: [5]}), drop(plan)
    assert first == again and first > 0        # nothing of one probe leaks into the next
    fresh = _drop_fn(gm, analysis, batches, None, recalibrate=True)
    assert fresh(plan) == first


def test_budget_probes_largest_groups_first_and_estimates_the_rest():
    gm, analysis, groups, scores, batches = _setup()
    cost = allocate.Cost(gm, analysis)
    probed: list[str] = []

    def drop(plan):
        probed.extend(plan)
        return sum(len(units) for units in plan.values()) / 100

    plan = allocate.sensitivity(groups, scores, cost.flops, 0.5, 1, 0.8, drop, progress=False, budget_s=0.0)
    assert set(probed) == {max(groups, key=lambda g: cost.flops({}) - cost.flops({g.name: g.units})).name}
    assert cost.flops({k: len(v) for k, v in plan.items()}) <= 0.5 * cost.flops({}) * (1 + 1e-9)
    everything = allocate.sensitivity(groups, scores, cost.flops, 0.5, 1, 0.8, drop, progress=False,
                                      budget_s=math.inf)
    assert cost.flops({k: len(v) for k, v in everything.items()}) <= 0.5 * cost.flops({}) * (1 + 1e-9)
    assert len(set(probed)) == len(groups)
