"""graphopt: a compiler-style graph optimizer for PyTorch and ONNX models.

    opt = graphopt.optimize(model, example_inputs, level="O1")
    print(opt.report)
"""
from .api import OptimizedModule, optimize
from .errors import (CaptureError, ExportError, GraphoptError, InputError, OptionError, UnsupportedError,
                     VerificationError)
from .finetune import finetune
from .onnx import export_onnx, optimize_onnx
from .report import PassRecord, Report

__all__ = [
    "optimize", "OptimizedModule", "export_onnx", "optimize_onnx", "finetune", "Report", "PassRecord",
    "GraphoptError", "CaptureError", "ExportError", "InputError", "OptionError", "UnsupportedError", "VerificationError",
]
