"""graphopt: a compiler-style graph optimizer for PyTorch and ONNX models.

    opt = graphopt.optimize(model, example_inputs, level="O1")
    print(opt.report)
"""
from .api import OptimizedModule, optimize
from .errors import (CaptureError, GraphoptError, InputError, OptionError, UnsupportedError,
                     VerificationError)
from .report import PassRecord, Report

__all__ = [
    "optimize", "OptimizedModule", "Report", "PassRecord",
    "GraphoptError", "CaptureError", "InputError", "OptionError", "UnsupportedError", "VerificationError",
]
