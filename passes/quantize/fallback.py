"""Accuracy-aware fallback: keep the most sensitive layers float until the budget holds.

Like Intel Neural Compressor's tuning loop:

1. sensitivity: each candidate layer is quantized alone (the rest float) and
   the model's fidelity on the calibration data is measured; its loss is the
   layer's sensitivity
       cosine   1 − min cosine of the outputs vs the float model
       sqnr     10^(−SQNR/10), the noise-to-signal power ratio
       metric   metric(float model) − metric(model)
   and its error contribution is its share of the summed sensitivities
   (a first-order, additive model of how layer errors combine);
2. every candidate is quantized; while the budget fails, the most sensitive
   int8 layer falls back to float, one at a time, re-measuring after each;
3. if the budget cannot be met the selection says so (the report shows it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from graphopt.engine.verify import compare

from .calibrate import Inputs, run_batches
from .config import Fidelity

Build = Callable[[Sequence[str]], Any]   # names of the layers to quantize -> runnable module
Run = Callable[[Any, Sequence[Inputs]], list]   # (module, batches) -> its outputs on each batch


def score(fidelity: Fidelity, module: Any, batches: Sequence[Inputs], reference: Sequence[Any],
          run: Run = run_batches) -> float:
    """The fidelity of `module` (higher is better): min cosine, min SQNR in dB, or the user's metric.
    `run` runs the module on the batches (a torch module's call by default; an ONNX model's session)."""
    if fidelity.kind == "metric":
        return float(fidelity.metric(module))
    outputs = run(module, batches)
    if fidelity.kind == "cosine":
        return min(compare(out, ref).min_cosine for out, ref in zip(outputs, reference))
    return min(sqnr_db(out, ref) for out, ref in zip(outputs, reference))


def sqnr_db(actual: Any, expected: Any) -> float:
    """Lowest signal-to-quantization-noise ratio (dB) over the floating outputs."""
    worst = math.inf
    for a, b in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            noise = (a.double() - b.double()).pow(2).sum().item()
            signal = b.double().pow(2).sum().item()
            worst = min(worst, math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise))
    return worst


def loss(fidelity: Fidelity, value: float, float_value: float) -> float:
    """How far a score is from the float model's (0 = no loss)."""
    if fidelity.kind == "cosine":
        return max(0.0, 1.0 - value)
    if fidelity.kind == "sqnr":
        return 0.0 if value == math.inf else 10 ** (-value / 10)
    return max(0.0, float_value - value)


def meets(fidelity: Fidelity, value: float, float_value: float) -> bool:
    if fidelity.kind == "metric":
        return value >= float_value - fidelity.threshold
    return value >= fidelity.threshold


@dataclass
class Selection:
    quantized: list[str]
    fallback: list[str]                          # in the order they fell back
    sensitivity: dict[str, float] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)   # (int8 layers, score)
    met: bool = True
    float_score: float = 1.0

    @property
    def score(self) -> float:
        return self.history[-1][1] if self.history else self.float_score


def select(names: Sequence[str], build: Build, fidelity: Fidelity, batches: Sequence[Inputs],
           reference: Sequence[Any], progress: bool = True, run: Run = run_batches) -> Selection:
    """Rank `names` by sensitivity, then fall back the most sensitive until `fidelity` holds."""
    from tqdm.auto import tqdm
    float_score = score(fidelity, build([]), batches, reference, run) if fidelity.kind == "metric" else \
        (1.0 if fidelity.kind == "cosine" else math.inf)
    sensitivity = {}
    for name in tqdm(names, desc="int8 layer sensitivity", unit="layer", leave=False,
                     disable=None if progress else True):
        sensitivity[name] = loss(fidelity, score(fidelity, build([name]), batches, reference, run), float_score)
    total = sum(sensitivity.values())
    share = {n: (v / total if total > 0 else 0.0) for n, v in sensitivity.items()}
    ranked = sorted(names, key=lambda n: sensitivity[n], reverse=True)
    quantized, fallback = list(names), []
    selection = Selection(quantized, fallback, sensitivity, share, float_score=float_score)
    while True:
        value = score(fidelity, build(quantized), batches, reference, run) if quantized else float_score
        selection.history.append((len(quantized), value))
        if meets(fidelity, value, float_score):
            return selection
        if not quantized:
            selection.met = False
            return selection
        worst = next(n for n in ranked if n in quantized)
        quantized.remove(worst)
        fallback.append(worst)
