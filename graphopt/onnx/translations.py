"""graphopt's custom int8 ops in standard ONNX operators, for `torch.onnx.export(dynamo=True)`.

    quantize_per_token(x, smooth)  ⇒  s = max(ReduceMax(|x / smooth|, axis 1) / 127, tiny)
                                      x_q = Cast(Clip(Round(x / s[:, None]), −127, 127), int8)
    int8_linear(x_q, w_q, s_x, s_w, b, act, dtype)
                                   ⇒  act(MatMul(DequantizeLinear(x_q, s_x, axis=0),
                                                 DequantizeLinear(w_qᵀ, s_w, axis=1)) + b)      (QDQ)
    w8a16_linear(x, w_q, s_w, b)   ⇒  MatMul(x, DequantizeLinear(w_qᵀ, s_w, axis=1)) + b

The quantization itself is the same float32 arithmetic as the ops' CPU path
(Round is half-to-even in both), so the int8 values are identical; the
products of the dequantized values are summed in float32, which differs from
the exact int32 sum by float rounding only. QDQ was chosen by measurement
(`python -m bench.onnx --only choice`, bench/results/onnx_int8_forms.md): on
this AVX2 CPU without VNNI, ONNX Runtime runs the per-token int8 × int8
`MatMulInteger` form 2× slower than the QDQ form at the same error, and its
fast uint8 × int8 kernels saturate (0.5 relative error; the same with
per-tensor `DynamicQuantizeLinear`). The int8 weights stay int8 initializers
(the transposes are folded by the post-export cleanup). Only the default ONNX
domain is used.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

_FLOAT = 1      # onnx.TensorProto.FLOAT
_INT8 = 3       # onnx.TensorProto.INT8
_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}


def translation_table() -> dict[Any, Callable[..., Any]]:
    """{torch op overload: onnxscript translation}; empty when graphopt.kernels is not importable."""
    try:
        import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*)
    except Exception:  # noqa: BLE001  (no kernels: graphs cannot hold their ops either)
        return {}
    ops = torch.ops.graphopt
    return {ops.quantize_per_token.default: quantize_per_token, ops.int8_linear.default: int8_linear,
            ops.w8a16_linear.default: w8a16_linear}


def _op() -> Any:
    from onnxscript import opset18
    return opset18


def quantize_per_token(x: Any, smooth: Any = None) -> tuple[Any, Any]:
    op = _op()
    from graphopt.kernels import SCALE_FLOOR
    xf = op.Cast(x, to=_FLOAT)
    if smooth is not None:
        xf = op.Div(xf, op.Cast(smooth, to=_FLOAT))
    amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[1]), keepdims=0)
    scale = op.Max(op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=float(SCALE_FLOOR)))
    scaled = op.Round(op.Div(xf, op.Unsqueeze(scale, op.Constant(value_ints=[1]))))
    q = op.Cast(op.Clip(scaled, op.Constant(value_float=-127.0), op.Constant(value_float=127.0)), to=_INT8)
    return q, scale


def int8_linear(x_q: Any, w_q: Any, x_scale: Any, w_scale: Any, bias: Any = None, activation: str = "none",
                out_dtype: torch.dtype = torch.float32) -> Any:
    op = _op()
    x = op.DequantizeLinear(x_q, x_scale, axis=0)
    y = op.MatMul(x, op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), w_scale, axis=1))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    y = _activation(op, y, activation)
    return op.Cast(y, to=_DTYPES[out_dtype]) if out_dtype != torch.float32 else y


def w8a16_linear(x: Any, w_q: Any, w_scale: Any, bias: Any = None) -> Any:
    op = _op()
    weight = op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), w_scale, axis=1)
    y = op.MatMul(op.Cast(x, to=_FLOAT), weight)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(y, x)


def _activation(op: Any, y: Any, activation: str) -> Any:
    if activation == "none":
        return y
    if activation == "relu":
        return op.Relu(y)
    if activation == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if activation in ("gelu", "gelu_tanh"):   # opset 20 Gelu; written out so opset 18 files stay portable
        half, one = op.Constant(value_float=0.5), op.Constant(value_float=1.0)
        if activation == "gelu":
            inner = op.Erf(op.Mul(y, op.Constant(value_float=0.7071067811865476)))
        else:
            cube = op.Mul(op.Mul(y, y), y)
            u = op.Mul(op.Constant(value_float=0.7978845608028654),
                       op.Add(y, op.Mul(op.Constant(value_float=0.044715), cube)))
            inner = op.Tanh(u)
        return op.Mul(op.Mul(half, y), op.Add(one, inner))
    raise ValueError(f"int8_linear activation {activation!r} has no ONNX translation")
