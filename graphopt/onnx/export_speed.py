"""The exported int8 file is never slower than the float export of the same model.

An int8 ONNX graph can lose to its float export in ONNX Runtime (small layers, where quantizing the
activations and the uint8 product cost more than the float GEMM saves; a CPU without fast int8). With
a speed check, `export_onnx` also exports the model as given in float, times both files in ONNX
Runtime (interleaved, on the example inputs, default graph optimizations: what a user runs) and
writes the float file where the int8 one is measurably slower (the whole 95 % interval above 1),
saying so in a warning and in `report.meta["export_speed"]`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from graphopt.engine.speed import SpeedCheck, parse_speed_check

from .ir import OnnxModel


def export_speed_check(opt: Any, value: Any) -> SpeedCheck | None:
    """The check to apply: `value` if given (True, False, a dict, a SpeedCheck), else the optimized
    module's own `speed_check` option (None for a plain module)."""
    if value is not None:
        return parse_speed_check(value, True)
    return getattr(getattr(opt, "options", None), "speed_check", None)


def faster_file(int8: OnnxModel, float_: Callable[[], OnnxModel], feeds: dict[str, np.ndarray],
                check: SpeedCheck, report: Any) -> OnnxModel | None:
    """The float model (built by `float_()`) when the int8 model `int8` is measurably slower, else None."""
    float_model = float_()
    runs = [model.new_session() for model in (float_model, int8)]
    names = [[i.name for i in s.get_inputs()] for s in runs]
    calls = [lambda s=s, n=n: s.run(None, {k: feeds[k] for k in n}) for s, n in zip(runs, names)]
    verdict = check.compare(*calls)
    text = f"int8 file vs the float export in ONNX Runtime: {verdict.describe()}"
    slower = verdict.low > 1.0
    if slower:
        text += "; the float export was written instead"
        warnings.warn(f"graphopt: {text}")
    if report is not None and hasattr(report, "meta"):
        report.meta["export_speed"] = text
    return float_model if slower else None
