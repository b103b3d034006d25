"""Parameter counts of the pruning report after BatchNorm folding (issue 14, class 8)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.engine import ir
from tests.strategies import randomize_


class ResNetLike(nn.Module):
    """conv(no bias) → BN → ReLU, a residual pair of the same, pooling and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        return self.fc(x.mean((2, 3)))


def _weights_read_by_layers(gm: torch.fx.GraphModule) -> int:
    """Elements of the weights and biases the graph's convolutions and linears take, by node argument."""
    total = 0
    for node in ir.find_nodes(gm, torch.ops.aten.conv2d, torch.ops.aten.linear):
        total += sum(ir.get_attr_value(gm, a).numel() for a in node.args[1:3] if isinstance(a, torch.fx.Node))
    return total


def _optimize(model: nn.Module, x: torch.Tensor, **options) -> graphopt.OptimizedModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graphopt.optimize(model, (x,), prune=0.5, disable=["int8_dynamic"], measure_latency=False,
                                 progress=False, **options)


@pytest.mark.parametrize("target", ["flops", "params"])
def test_counts_after_batchnorm_folding_are_the_graphs(target):
    width = 16
    model = randomize_(ResNetLike(width), 0)
    x = torch.randn(2, 3, 8, 8)
    opt = _optimize(model, x, prune_options={"target": target})
    stats = opt.report["structured_pruning"].stats
    # folded: every conv holds its weight and a new bias of `width`; the BN tensors are gone
    folded = sum(m.weight.numel() + m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    folded += sum(p.numel() for p in model.fc.parameters())
    assert stats["params_before"] == folded
    assert stats["params_after"] == _weights_read_by_layers(opt.graph_module)
    assert stats["params_after"] < stats["params_before"]
    if target == "params":
        assert stats["params_after"] <= 0.5 * stats["params_before"]


def test_param_count_ignores_dead_attributes_and_counts_shared_storage_once():
    gm = torch.fx.symbolic_trace(nn.Linear(4, 3))
    assert ir.param_count(gm) == 15
    gm.register_parameter("left_over", nn.Parameter(torch.zeros(100)))   # a folded-away weight
    gm.register_buffer("tied", gm.weight.data)                             # the same storage again
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        gm.graph.get_attr("left_over")                                    # a get_attr nobody reads
    assert ir.param_count(gm) == 15
    assert ir.param_bytes(gm) == 15 * 4


def test_a_missed_target_names_the_blocking_op():
    """Most FLOPs sit behind a cumsum (an unknown op, a boundary): prune=0.5 cannot be met, and the stats say
    which group would have saved most and what blocks it."""
    from .test_pruning import UnknownOp
    model = UnknownOp().eval()
    with pytest.warns(UserWarning, match="fell short of its target"):
        opt = graphopt.optimize(model, (torch.randn(2, 3, 8, 8),), prune=0.5, disable=["int8_dynamic"],
                                measure_latency=False, progress=False, prune_options={"round_to": 1})
    stats = opt.report["structured_pruning"].stats
    assert stats["flops_after"] > 0.5 * stats["flops_before"] and not stats["target_met"]
    assert "blocked by" in stats["shortfall"] and "cumsum" in stats["shortfall"]


def test_a_met_target_reports_no_shortfall():
    opt = _optimize(randomize_(ResNetLike(16), 0), torch.randn(2, 3, 8, 8))
    stats = opt.report["structured_pruning"].stats
    assert stats["target_met"] and stats["shortfall"] == ""
