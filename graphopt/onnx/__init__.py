"""ONNX: export of optimized modules and the ONNX-in, ONNX-out path.

    graphopt.export_onnx(opt, example_inputs, "model.onnx")
    report = graphopt.optimize_onnx("in.onnx", "out.onnx", level="O2")
"""
from .export import export_onnx
from .ir import OnnxIR, OnnxModel
from .optimize import optimize_onnx

__all__ = ["export_onnx", "optimize_onnx", "OnnxIR", "OnnxModel"]
