"""ONNX graph passes (onnx-graphsurgeon IR), run by graphopt's pass manager through `OnnxIR`.

    dead nodes → identity/dropout → constant folding → Conv+BN → MatMul+Add→Gemm
    → Transpose/Reshape collapse → skip padding → (O2) int8
"""
from __future__ import annotations

from typing import Any, Sequence

from .base import OnnxPass
from .constant_folding import ConstantFolding
from .conv_bn import FoldConvBatchNorm
from .dead_nodes import DeadNodeElimination
from .gemm import MatMulAddToGemm
from .identity import EliminateIdentity
from .quantize import QuantizeInt8
from .rotary import RotaryCachesAtBatch
from .skip_padding import SkipPadding
from .transpose_reshape import CollapseTransposeReshape
from .uint8_quantize import QuantizeToUint8


def passes(int8: str | None = None, calibration: Sequence[dict] = ()) -> list[Any]:
    """Every ONNX pass in order; the int8 pass (level O2) when `int8` names a scheme. Skipping padding checks
    itself on the first calibration feed (or random look-alike inputs) with random padding masks; it runs
    before int8, so that per-tensor scales and calibrated ranges see real tokens only."""
    selected: list[Any] = [DeadNodeElimination(), EliminateIdentity(), ConstantFolding(), FoldConvBatchNorm(),
                           MatMulAddToGemm(), CollapseTransposeReshape()]
    selected.append(SkipPadding(calibration[:1]))
    if int8 is not None:
        selected.append(QuantizeInt8(int8, calibration))
    return selected


__all__ = ["passes", "OnnxPass", "QuantizeInt8", "QuantizeToUint8", "RotaryCachesAtBatch", "SkipPadding", "ConstantFolding", "DeadNodeElimination"]
