"""Recalibration after slicing (adaptive BN on the folded graph) and the sensitivity give-back."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.frontend.capture import capture
from graphopt.errors import OptionError
from graphopt.passes.pruning import StructuredPruning, allocate, analyze
from graphopt.passes.pruning import recalibrate as calibration
from graphopt.passes.pruning import slice as slicing
from graphopt.passes.pruning.model import Group
from tests.strategies import cnn_cases

from .test_pruning import random_plan


@settings(max_examples=15, deadline=None)
@given(case=cnn_cases(), seed=st.integers(0, 1000), ratio=st.sampled_from([0.25, 0.5]))
def test_recalibrated_convs_have_their_unpruned_moments(case, seed, ratio):
    gm = capture(case.model, case.make_inputs(2, 0)).module
    batches = [case.make_inputs(4, s) for s in range(1, 4)]
    analysis = analyze(gm)
    plan = random_plan(analysis, seed, ratio)
    reference = calibration.statistics(gm, calibration.conv_nodes(gm), batches)
    slicing.apply(gm, analysis, plan)
    kept = calibration.kept_channels(analysis, plan, reference)
    done = calibration.recalibrate(gm, reference, batches, kept)
    assert set(done) == set(reference)
    after = calibration.statistics(gm, calibration.conv_nodes(gm), batches)
    for name, (mean, std) in after.items():
        index = torch.tensor(kept(next(n for n in gm.graph.nodes if n.name == name)), dtype=torch.long)
        want_mean, want_std = reference[name][0][index], reference[name][1][index]
        # convs run in float32 on O(1) activations: moments agree to float32 accumulation error
        scale = float(want_std.max()) + float(want_mean.abs().max()) + 1.0
        assert torch.allclose(mean, want_mean, atol=1e-4 * scale), (case, name)
        live = std > 1e-3 * scale                  # (near-)constant channels only get the mean shift
        assert torch.allclose(std[live], want_std[live], rtol=1e-3, atol=1e-4 * scale), (case, name)


@settings(max_examples=10, deadline=None)
@given(case=cnn_cases())
def test_recalibrating_an_unpruned_graph_changes_nothing(case):
    gm = capture(case.model, case.make_inputs(2, 0)).module
    batches = [case.make_inputs(4, s) for s in range(1, 3)]
    x = case.make_inputs(3, 7)
    with torch.no_grad():
        before = gm(*x)
    calibration.recalibrate(gm, calibration.statistics(gm, calibration.conv_nodes(gm), batches), batches)
    with torch.no_grad():
        after = gm(*x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * (1 + before.abs().max().item())), case


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y + self.b2(self.c2(torch.relu(self.b1(self.c1(y))))))
        return self.fc(y.mean((2, 3)))


def _prune(options, calibration_data):
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(8, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, (x,), prune=0.5, prune_options=options, calibration_data=calibration_data,
                                disable=["int8_dynamic"], measure_latency=False, progress=False)
    return model, opt


def test_recalibration_is_on_with_calibration_data_and_reported():
    data = [(torch.randn(16, 3, 8, 8),) for _ in range(3)]
    model, opt = _prune({"sensitivity": False}, data)
    _, plain = _prune({"sensitivity": False, "recalibrate": False}, data)
    assert opt.report["structured_pruning"].stats["recalibrated"]
    assert not plain.report["structured_pruning"].stats["recalibrated"]
    # same channels removed (same shapes), different folded statistics (moments: the property test above)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.graph_module.named_parameters()}  # noqa: E731
    assert shapes(opt) == shapes(plain)
    params = lambda m: dict(m.graph_module.named_parameters())  # noqa: E731
    assert any(not torch.equal(v, params(plain)[k]) for k, v in params(opt).items())


def test_recalibrate_options():
    with pytest.raises(OptionError, match="recalibrate"):
        StructuredPruning(0.5, {"recalibrate": "yes"})
    gm = capture(Residual().eval(), (torch.randn(2, 3, 8, 8),)).module
    with pytest.raises(OptionError, match="calibration_data"):
        StructuredPruning(0.5, {"recalibrate": True, "sensitivity": False}).run(gm)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(2, 40), st.floats(0.1, 10.0), st.floats(0.01, 1.0)),
                      min_size=1, max_size=5),
       keep=st.floats(0.2, 0.95), round_to=st.sampled_from([1, 4, 8]))
def test_sensitivity_meets_the_target_without_removing_more_than_it_needs(sizes, keep, round_to):
    groups = [Group(f"g{i}", units, [f"s{i}"], [f"m{i}"]) for i, (units, _, _) in enumerate(sizes)]
    weight = {g.name: w for g, (_, w, _) in zip(groups, sizes)}
    harm = {g.name: h for g, (_, _, h) in zip(groups, sizes)}
    units = {g.name: g.units for g in groups}
    cost = lambda removed: sum(weight[k] * (units[k] - removed.get(k, 0)) for k in units)  # noqa: E731
    scores = {g.name: torch.arange(g.units, dtype=torch.float64) for g in groups}
    # strictly increasing drop: every unit given back is worth having
    drop = lambda plan: sum(harm[k] * (len(v) + len(v) ** 2 / units[k]) for k, v in plan.items())  # noqa: E731
    plan = allocate.sensitivity(groups, scores, cost, keep, round_to, 0.8, drop, progress=False)
    removed = {k: len(v) for k, v in plan.items()}
    full = cost({})
    # the sweep's largest ratio (0.75) bounds what a group may lose
    reachable = {g.name: min(allocate.levels(g, round_to, 0.8), key=lambda k: abs(k - 0.75 * g.units))
                 for g in groups}
    if cost(reachable) <= keep * full:
        assert cost(removed) <= keep * full + 1e-9
    for g in groups:
        assert plan[g.name] == list(range(removed[g.name]))           # lowest scores go first
        lower = [n for n in allocate.levels(g, round_to, 0.8) if n < removed[g.name]]
        if lower and cost(removed) <= keep * full + 1e-9:
            # giving back the next step of any group would break the target
            assert cost(dict(removed, **{g.name: lower[-1]})) > keep * full - 1e-9 * full, (g.name, removed)
    assert not math.isnan(cost(removed))
