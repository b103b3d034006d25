"""graphopt: a compiler-style graph optimizer for PyTorch and ONNX models."""
