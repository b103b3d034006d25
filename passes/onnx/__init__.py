"""ONNX graph passes (onnx-graphsurgeon IR)."""
