"""Operator fusions (level O1, lossless): one small module per rewrite.

Order: recognitions first (they read the formulas as written, before scalars
move into weights), then the algebraic cleanups (which turn matmuls into
linears), then BatchNorm folding (into those linears too) and the horizontal
GEMM merge last (it needs the final weights).
"""
from __future__ import annotations

from typing import Any

from .activation import RecognizeActivations
from .algebraic import AlgebraicCleanup
from .attention import RecognizeAttention
from .batchnorm import FoldBatchNorm
from .grouped_query import GroupedQueryAttention
from .horizontal_gemm import MergeParallelGemms
from .normalization import RecognizeNormalization


def passes() -> list[Any]:
    """The fusion passes, in the order they run."""
    return [RecognizeActivations(), RecognizeNormalization(), RecognizeAttention(), GroupedQueryAttention(),
            AlgebraicCleanup(),
            FoldBatchNorm(), MergeParallelGemms()]
