"""graphopt: a compiler-style graph optimizer for PyTorch and ONNX models.

    opt = graphopt.optimize(model, example_inputs, level="O1")
    print(opt.report)

`import graphopt` is light (the errors and the report classes): the engine
(torch, onnx, onnxruntime, triton) loads on first use of a name below
(PEP 562 module `__getattr__`), so the command line starts in well under a
second and answers `--help` before any of it is imported.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (CaptureError, ExportError, GraphoptError, InputError, OptionError, UnsupportedError,
                     VerificationError)
from .report import PassRecord, Report

#: Public names loaded on first use, and the module each comes from.
_LAZY = {"optimize": ".api", "OptimizedModule": ".api", "export_onnx": ".onnx", "optimize_onnx": ".onnx",
         "finetune": ".training.finetuning", "tune": ".search.tuner", "TuneResult": ".search.tuner"}

__all__ = [
    "optimize", "OptimizedModule", "export_onnx", "optimize_onnx", "finetune", "tune", "TuneResult", "Report", "PassRecord",
    "GraphoptError", "CaptureError", "ExportError", "InputError", "OptionError", "UnsupportedError", "VerificationError",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value       # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
