"""Operator fusions (level O1, lossless): one small module per rewrite.

Order: recognitions first (they read the formulas as written, before scalars
move into weights), then the algebraic cleanups (which turn matmuls into
linears), then BatchNorm folding (into those linears too) and the horizontal
GEMM merge last (it needs the final weights).
"""
from __future__ import annotations

from ..rules import RuleSet
from . import activation, algebraic, attention, batchnorm, grouped_query, horizontal_gemm, normalization


def passes() -> list[RuleSet]:
    """The fusion passes, in the order they run: each a `RuleSet` of one family's rules."""
    return [RuleSet("recognize_activations", activation.RULES),
            RuleSet("recognize_normalization", normalization.RULES),
            RuleSet("recognize_attention", attention.RULES),
            RuleSet("grouped_query_attention", grouped_query.RULES),           # after SDPA is recognized
            RuleSet("algebraic_cleanup", algebraic.RULES, fixed_point=True),   # a new linear can take a scale
            RuleSet("fold_batchnorm", batchnorm.RULES),                         # in the next sweep
            RuleSet("merge_parallel_gemms", horizontal_gemm.RULES)]
