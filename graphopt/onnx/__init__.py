"""ONNX: export of optimized modules and the ONNX-in, ONNX-out path."""
from __future__ import annotations

from typing import Any

from graphopt.errors import UnsupportedError


def export_onnx(opt: Any, example_inputs: tuple, path: str, **kwargs: Any) -> None:
    raise UnsupportedError("graphopt.export_onnx is not available yet in this version")


def optimize_onnx(src: str, dst: str, **kwargs: Any) -> Any:
    raise UnsupportedError("graphopt.optimize_onnx is not available yet in this version")
