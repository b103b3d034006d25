"""Canonicalization: dead code, no-ops, constant folding and CSE, on random op chains.

A random program applies a chain of steps to x; some steps are no-ops
(x·1, x+0, eval dropout, clone, contiguous, same-shape reshape, same-dtype
cast), some recompute an earlier value (CSE), some add a value computed from
parameters only (constant folding), some compute a value nobody uses (dead
code). After the canonicalize passes the output must be unchanged and none of
the removable nodes may remain.
"""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from graphopt.engine import ir
from graphopt.frontend.capture import capture
from graphopt.frontend.inputs import verification_inputs
from graphopt.engine.pass_manager import PassManager
from graphopt.passes.canonicalize import (DeadCodeElimination, EliminateCommonSubexpressions, FoldConstants,
                                          RemoveNoOps, passes)
from graphopt.engine.verify import LOSSLESS_REL_TOL, compare, run_on
from graphopt.engine.rules import Reason

aten = torch.ops.aten
STEPS = ["mul1", "add0", "dropout", "clone", "contiguous", "reshape_same", "cast_same", "dup_tanh", "const_bias",
         "dead", "real_linear", "real_relu"]


class Program(nn.Module):
    def __init__(self, steps, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.steps = steps
        self.lin = nn.Linear(width, width)
        self.w = nn.Parameter(torch.randn(width))
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        for step in self.steps:
            if step == "mul1":
                x = x * 1
            elif step == "add0":
                x = x + 0
            elif step == "dropout":
                x = self.drop(x)
            elif step == "clone":
                x = x.clone()
            elif step == "contiguous":
                x = x.contiguous()
            elif step == "reshape_same":
                x = x.reshape(x.shape)
            elif step == "cast_same":
                x = x.to(torch.float32)
            elif step == "dup_tanh":
                x = torch.tanh(x) + torch.tanh(x)
            elif step == "const_bias":
                x = x + (self.w * 2 + 1).exp()
            elif step == "dead":
                _ = torch.sin(x) * 3
            elif step == "real_linear":
                x = self.lin(x)
            elif step == "real_relu":
                x = torch.relu(x)
        return x


@settings(max_examples=30)
@given(steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=10), width=st.integers(1, 16),
       seed=st.integers(0, 1000))
def test_canonicalize_is_exact_and_leaves_nothing_removable(steps, width, seed):
    model = Program(steps, width, seed).eval()
    x = torch.randn(3, width)
    gm = capture(model, (x,)).module
    inputs = verification_inputs((x,), {}, 2)
    reference = run_on(model, inputs)
    out, report = PassManager(passes(), measure_latency=False).run(gm, inputs, reference)
    assert not report.rolled_back, report
    fresh = torch.randn(5, width)
    with torch.no_grad():
        errors = compare(out(fresh), model(fresh))
    assert errors.max_rel <= LOSSLESS_REL_TOL
    targets = [ir.overload_packet(n.target) for n in ir.compute_nodes(out)]
    for removable in (aten.dropout, aten.clone, aten.sin, aten.exp, aten._to_copy):
        assert removable not in targets, (steps, out.graph)
    assert targets.count(aten.tanh) == steps.count("dup_tanh"), "CSE must keep one tanh per dup step"
    muls = [n for n in ir.find_nodes(out, aten.mul) if n.args[1] == 1]
    assert not muls and not [n for n in ir.find_nodes(out, aten.add) if n.args[1] == 0]


def _run(pass_, model, x):
    gm = capture(model, (x,)).module
    inputs = verification_inputs((x,), {}, 1)
    return PassManager([pass_], measure_latency=False).run(gm, inputs, run_on(model, inputs))


class MutatedClone(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1)
        return x * 2 + y


class Transposed(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1).contiguous().view(-1)


def test_noops_that_matter_are_kept_with_a_reason():
    out, report = _run(RemoveNoOps(), MutatedClone(), torch.randn(3, 4))
    assert ir.find_nodes(out, aten.clone), "a clone that is mutated in place must stay"
    _, report = _run(RemoveNoOps(), Transposed(), torch.randn(3, 4))
    assert report["remove_noops"].reasons == {Reason.UNSUPPORTED_FORM: 1}, report["remove_noops"].stats


class BigConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(64))

    def forward(self, x):
        return x + self.v[:, None] * self.v[None, :]     # a 64×64 outer product of a 64-vector


def test_constant_folding_respects_the_size_guard():
    out, report = _run(FoldConstants(max_growth_bytes=1024), BigConstant(), torch.randn(2, 64, 64))
    assert ir.find_nodes(out, aten.mul), "folding 64×64 floats (16 KiB) exceeds a 1 KiB growth budget"
    assert Reason.SIZE_LIMIT in report["constant_folding"].reasons
    out, report = _run(FoldConstants(max_growth_bytes=1 << 20), BigConstant(), torch.randn(2, 64, 64))
    assert not ir.find_nodes(out, aten.mul) and report["constant_folding"].matches == {"fold": 1}


class RandomNoise(nn.Module):
    def forward(self, x):
        return x + torch.rand(3) * 0 + torch.rand(3) * 0


def test_cse_and_folding_never_touch_random_ops():
    for pass_ in (EliminateCommonSubexpressions(), FoldConstants()):
        out, _ = _run(pass_, RandomNoise(), torch.randn(2, 3))
        assert len(ir.find_nodes(out, aten.rand)) == 2


def test_dead_code_elimination_drops_unused_parameters():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            _ = self.unused(x)
            return self.used(x)
    out, report = _run(DeadCodeElimination(), Unused(), torch.randn(2, 4))
    assert not ir.find_nodes(out, aten.linear)[1:] and not hasattr(out.unused, "weight")
    assert report["dead_code_elimination"].matches["dead node"] == 1


class FillsIndexTables(nn.Module):
    """BEiT's relative-position index in small: two equal `zeros` tables, each filled in place through a
    slice (`copy_` into a view), then used to index a different-sized parameter table."""

    def __init__(self):
        super().__init__()
        self.t0, self.t1 = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(7, 4))

    def forward(self, x):
        idx0 = torch.zeros(3, 3, dtype=torch.long)
        idx0[1:] = 9                       # valid for t0 (10 rows), out of range for t1 (7 rows)
        idx1 = torch.zeros(3, 3, dtype=torch.long)
        idx1[0] = 6
        return x + self.t0[idx0.view(-1)].sum(0) + self.t1[idx1.view(-1)].sum(0)


@pytest.mark.parametrize("pass_", [EliminateCommonSubexpressions(), FoldConstants()], ids=["cse", "fold"])
def test_values_written_in_place_through_a_view_are_neither_merged_nor_folded(pass_):
    """Regression: CSE merged the two tables (IndexError on BEiT), and folding read the table before its fill."""
    model, x = FillsIndexTables(), torch.randn(2, 4)
    out, report = _run(pass_, model, x)
    assert not report.rolled_back, report
    with torch.no_grad():
        assert torch.equal(out(x), model(x))
