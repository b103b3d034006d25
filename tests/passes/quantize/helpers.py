"""Shared helpers for the int8 tests."""
from __future__ import annotations

import torch

import graphopt

QUIET = {"measure_latency": False, "progress": False, "verify_samples": 1}


def int8_record(opt: graphopt.OptimizedModule):
    """The report record of the int8 rewrite pass."""
    return next(r for r in opt.report.records if r.name.startswith("int8_"))


def graph_targets(opt: graphopt.OptimizedModule) -> list[str]:
    return [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]


def count_int8_ops(opt: graphopt.OptimizedModule) -> int:
    return sum(t.startswith("graphopt.int8_linear") or t.startswith("graphopt.w8a16_linear")
               for t in graph_targets(opt))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item() if a.norm() * b.norm() > 0 else float(torch.equal(a, b))
