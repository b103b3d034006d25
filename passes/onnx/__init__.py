"""ONNX graph passes (onnx-graphsurgeon IR), run by graphopt's pass manager through `OnnxIR`.

The standard peepholes are onnxscript's rules (`onnxscript_rules`); graphopt keeps
its own where onnxscript has none: the size-guarded constant folding, skipping
padding, the rotary caches, the int8 rewrite, and (export with ops="onnxruntime")
ONNX Runtime's GroupQueryAttention.

    dead nodes → identity/dropout → constant folding → Conv+BN → MatMul+Add→Gemm
    → Transpose/Reshape collapse → skip padding → (O2) int8
"""
from __future__ import annotations

from typing import Any, Sequence

from .base import OnnxPass
from .constant_folding import ConstantFolding
from .dropout import EliminateInferenceDropout
from .gqa import GroupQueryAttentionFusion
from .int4 import Int4Weights
from .onnxscript_rules import (DeadNodeElimination, OnnxscriptRules, collapse_transpose_reshape, eliminate_identity,
                               fold_conv_batchnorm, matmul_add_to_gemm)
from .quantize import QuantizeInt8
from .rotary import RotaryCachesAtBatch
from .skip_padding import SkipPadding


def passes(int8: str | None = None, calibration: Sequence[dict] = (), fidelity: Any = None,
           progress: bool = True) -> list[Any]:
    """Every ONNX pass in order; the int8 pass (level O2) when `int8` names a scheme. Skipping padding checks
    itself on the first calibration feed (or random look-alike inputs) with random padding masks; it runs
    before int8, so that per-tensor scales and calibrated ranges see real tokens only. `fidelity` (a
    `passes.quantize.config.Fidelity`): int8's accuracy budget, layers falling back to float until it holds."""
    selected: list[Any] = [DeadNodeElimination(), EliminateInferenceDropout(), eliminate_identity(), ConstantFolding(), fold_conv_batchnorm(),
                           matmul_add_to_gemm(), collapse_transpose_reshape()]
    selected.append(SkipPadding(calibration[:1]))
    if int8 is not None:
        selected.append(QuantizeInt8(int8, calibration, fidelity, progress))
    return selected


__all__ = ["passes", "OnnxPass", "OnnxscriptRules", "QuantizeInt8", "RotaryCachesAtBatch", "SkipPadding",
           "ConstantFolding", "DeadNodeElimination", "GroupQueryAttentionFusion", "Int4Weights"]
