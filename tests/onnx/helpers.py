"""Shared helpers of the ONNX tests: save a model, run it in ONNX Runtime, compare."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest


def save(model: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    path = Path(directory) / name
    onnx.save_model(model, str(path))
    return path


def run(path: Path, feeds: dict[str, np.ndarray],
        level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """The weight-only ops' float32 paths at every M: their bfloat16 fast paths (M ≤ FAST_ROWS) round x, the scales
    and the output to bfloat16 (2⁻⁹), while an exported file dequantizes and multiplies in float32, as those
    paths do."""
    from graphopt.kernels import int4mm, int8mm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int4mm, "FAST_ROWS", 0)
        patch.setattr(int8mm, "FAST_ROWS", 0)
        yield
