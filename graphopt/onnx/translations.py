"""Translations of graphopt's custom ops to standard ONNX operators (for the dynamo exporter).

Filled in once `graphopt.kernels` registers `torch.ops.graphopt.*`; without
them a graph holds no custom op and the table is empty.
"""
from __future__ import annotations

from typing import Any, Callable


def translation_table() -> dict[Any, Callable[..., Any]]:
    return {}
