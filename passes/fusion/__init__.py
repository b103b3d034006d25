"""Operator fusions (level O1, lossless): one small module per rewrite."""
from __future__ import annotations

from typing import Any

from .activation import RecognizeActivations
from .attention import RecognizeAttention
from .batchnorm import FoldBatchNorm
from .horizontal_gemm import MergeParallelGemms
from .normalization import RecognizeNormalization


def passes() -> list[Any]:
    """The fusion passes, in the order they run."""
    return [FoldBatchNorm(), RecognizeActivations(), RecognizeNormalization(), RecognizeAttention(), MergeParallelGemms()]
