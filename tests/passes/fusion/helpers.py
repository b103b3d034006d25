"""Shared checks for the fusion tests: optimize at O1, then compare on fresh inputs."""
from __future__ import annotations

from typing import Callable

import torch
from hypothesis import Phase, settings

import graphopt
from graphopt.engine.verify import LOSSLESS_REL_TOL, compare


def fuse(model: torch.nn.Module, make_inputs: Callable[[int], tuple], seeds: tuple[int, ...] = (101, 202)):
    """Optimize `model` at O1 on make_inputs(0); assert nothing was rolled back and the
    optimized module matches the original within float32 rounding on fresh inputs."""
    model = model.eval()
    opt = graphopt.optimize(model, make_inputs(0), level="O1", measure_latency=False, progress=False)
    assert not opt.report.rolled_back, [(r.name, r.reason) for r in opt.report.rolled_back]
    for seed in seeds:
        inputs = make_inputs(seed)
        with torch.no_grad():
            err = compare(opt(*inputs), model(*inputs))
        assert err.mismatch is None, err.mismatch
        assert err.max_rel <= LOSSLESS_REL_TOL, f"max rel err {err.max_rel:.3g} on fresh inputs (seed {seed})"
    return opt


def rejections(opt, pass_name: str) -> list[str]:
    return [reason for r in opt.report.records if r.name.startswith(pass_name)
            for reason in r.stats.get("rejected", [])]


def reasons(opt, pass_name: str) -> set[str]:
    """The rejection codes (graphopt.engine.rules.Reason) of the passes whose name starts with `pass_name`."""
    return {code for r in opt.report.records if r.name.startswith(pass_name) for code in r.reasons}


def count(opt, prefix: str) -> int:
    """Total matches of the patterns whose name starts with `prefix`."""
    return sum(v for k, v in opt.report.matches().items() if k.startswith(prefix))


def ops(opt) -> list[str]:
    """Names of the ATen ops left in the optimized graph."""
    return [str(n.target).split(".")[1] for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("aten.")]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def examples(n: int) -> settings:
    """Hypothesis settings for these tests: n examples, no shrinking (each example
    exports and optimizes a model, ~1 s; the unshrunk failing example is printed)."""
    return settings(max_examples=n, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
