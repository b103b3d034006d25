"""Int8 rewriting of MatMul / Gemm / Conv with constant weights (O2, lossy).

Weights: symmetric per output channel, stored as int8 initializers (¼ of fp32):

    s_w[n] = max|W[:, n]| / 127,   W_q = clip(round(W / s_w), −127, 127)

Schemes:

    static       x̂ = DequantizeLinear(QuantizeLinear(x, s_x, z_x))    s_x, z_x from calibration (uint8,
                 Ŵ = DequantizeLinear(W_q, s_w, axis)                  asymmetric: s_x = (max−min)/255)
                 op(x̂, Ŵ, b)                                          — ORT fuses QDQ into QLinear* kernels
    dynamic      (x_q, s_x, z_x) = DynamicQuantizeLinear(x)           per-tensor uint8 at run time
      MatMul     y = Cast(MatMulInteger(x_q, W_q, z_x)) · (s_x · s_w) (+ b)   — ORT's MatMulIntegerToFloat
      Conv       y = Cast(ConvInteger(x_q, W_q, z_x)) · (s_x · s_w) (+ b)
    weight-only  op(x, DequantizeLinear(W_q, s_w, axis), b)          — int8 storage, float compute

The error of int8 through a dozen layers stays around a cosine of 0.99 of
the float output; the pass's budget is a cosine of 0.98 against the graph
before it (on random and calibration inputs), else it is rolled back.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import OptionError
from graphopt.onnx.calibrate import tensor_ranges
from graphopt.onnx.ir import OnnxModel
from graphopt.pass_manager import RewriteLog
from graphopt.verify import Budget

from .base import OnnxPass, constant, is_standard

SCHEMES = ("dynamic", "static", "weight-only")
TARGETS = ("MatMul", "Gemm", "Conv")


class QuantizeInt8(OnnxPass):
    level = 2
    min_opset = 13          # per-axis DequantizeLinear
    budget = Budget(min_cosine=0.98)

    def __init__(self, scheme: str = "dynamic", calibration: Sequence[dict] = ()) -> None:
        if scheme not in SCHEMES:
            raise OptionError(f"int8 scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        if scheme == "static" and not calibration:
            raise OptionError("int8 static needs calibration data (calibration_data= / --calibration): "
                              "activation ranges are measured on it")
        self.scheme = scheme
        self.calibration = list(calibration)
        self.name = f"onnx_int8_{scheme.replace('-', '_')}"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> dict:
        graph = model.graph
        targets = []
        for node in list(graph.nodes):
            if node.op not in TARGETS:
                continue
            reason = _why_not(node)
            if reason:
                log.rejected(node.op, node.name, reason)
            else:
                targets.append(node)
        ranges = {}
        if self.scheme == "static" and targets:
            ranges = tensor_ranges(model, sorted({n.inputs[0].name for n in targets}), self.calibration)
        activations: dict[str, tuple] = {}
        layers = []
        for node in targets:
            weight, axis = _weight(node)
            w_q, w_scale = quantize_weight(weight, axis)
            layers.append({"layer": node.name, "op": node.op, "scheme": self.scheme,
                           "weight_rel_err": weight_error(weight, w_q, w_scale, axis)})
            if self.scheme == "dynamic":
                _dynamic(graph, node, w_q, w_scale, axis, activations)
            else:
                _dequantized_weight(graph, node, w_q, w_scale, axis)
                if self.scheme == "static":
                    _static_activation(graph, node, ranges[node.inputs[0].name], activations)
            log.matched(f"{node.op} → int8 {self.scheme}")
        return {"layers": layers}


def _why_not(node: gs.Node) -> str | None:
    if not is_standard(node):
        return f"custom domain {node.domain!r}"
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return "weight is not a constant (activation × activation product)"
    weight = constant(node.inputs[1])
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} is not float32"
    if node.op == "MatMul" and weight.ndim != 2:
        return f"weight has rank {weight.ndim}, not 2"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                              or node.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta ≠ 1"
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant(node.inputs[2])
        if bias is None:
            return "bias is not a constant"
        channels = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else weight.shape[-1]
        if bias.size != channels:
            return f"bias of shape {bias.shape} is not one value per output channel"
    if node.inputs[0].dtype is not None and np.dtype(node.inputs[0].dtype) != np.float32:
        return f"activation dtype {node.inputs[0].dtype} is not float32"
    return None


def _weight(node: gs.Node) -> tuple[np.ndarray, int]:
    """The weight and its output-channel axis."""
    weight = constant(node.inputs[1])
    if node.op == "Conv":
        return weight, 0
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight, 0
    return weight, 1


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: (W_q, s_w) with W ≈ W_q · s_w along `axis`."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=reduce)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    w_q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    return w_q, scale


def weight_error(weight: np.ndarray, w_q: np.ndarray, scale: np.ndarray, axis: int) -> float:
    """‖W − W_q·s_w‖ / ‖W‖: how much of the layer's weight int8 loses."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    norm = float(np.linalg.norm(weight))
    return float(np.linalg.norm(weight - w_q * scale.reshape(shape))) / norm if norm else 0.0


def _const(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def _dequantized_weight(graph: gs.Graph, node: gs.Node, w_q: np.ndarray, w_scale: np.ndarray, axis: int) -> None:
    name = node.name or node.outputs[0].name
    out = gs.Variable(f"{name}_weight_dq", dtype=np.float32, shape=list(w_q.shape))
    dq = gs.Node("DequantizeLinear", name=f"{name}_weight_dequantize",
                 inputs=[_const(f"{name}_weight_int8", w_q), _const(f"{name}_weight_scale", w_scale),
                         _const(f"{name}_weight_zero_point", np.zeros_like(w_scale, dtype=np.int8))],
                 outputs=[out], attrs={"axis": axis})
    node.inputs[1] = out
    graph.nodes.append(dq)


def _static_activation(graph: gs.Graph, node: gs.Node, value_range: tuple[float, float],
                       cache: dict[str, tuple]) -> None:
    x = node.inputs[0]
    if x.name not in cache:
        low, high = min(0.0, value_range[0]), max(0.0, value_range[1])
        scale = np.float32((high - low) / 255.0 or 1.0)
        zero = np.uint8(np.clip(np.round(-low / scale), 0, 255))
        q = gs.Variable(f"{x.name}_q", dtype=np.uint8, shape=x.shape)
        dq = gs.Variable(f"{x.name}_dq", dtype=np.float32, shape=x.shape)
        s, z = _const(f"{x.name}_scale", np.array(scale)), _const(f"{x.name}_zero_point", np.array(zero))
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{x.name}_quantize", inputs=[x, s, z], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{x.name}_dequantize", inputs=[q, s, z], outputs=[dq]))
        cache[x.name] = (dq,)
    node.inputs[0] = cache[x.name][0]


def _dynamic(graph: gs.Graph, node: gs.Node, w_q: np.ndarray, w_scale: np.ndarray, axis: int,
             cache: dict[str, tuple]) -> None:
    name = node.name or node.outputs[0].name
    x = node.inputs[0]
    if x.name not in cache:
        outs = [gs.Variable(f"{x.name}_dq_q", dtype=np.uint8), gs.Variable(f"{x.name}_dq_scale", dtype=np.float32),
                gs.Variable(f"{x.name}_dq_zero_point", dtype=np.uint8)]
        graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=f"{x.name}_dynamic_quantize",
                                   inputs=[x], outputs=outs))
        cache[x.name] = tuple(outs)
    x_q, x_scale, x_zero = cache[x.name]
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        w_q = np.ascontiguousarray(w_q.T)
    if node.op == "Conv":   # per-channel factors broadcast over the spatial axes of [N, C, …]
        op, attrs, scale_shape = "ConvInteger", dict(node.attrs), (-1,) + (1,) * (w_q.ndim - 2)
    else:
        op, attrs, scale_shape = "MatMulInteger", {}, (-1,)
    acc = gs.Variable(f"{name}_int32", dtype=np.int32)
    acc_f = gs.Variable(f"{name}_int32_float", dtype=np.float32)
    scale = gs.Variable(f"{name}_scale", dtype=np.float32)
    nodes = [
        gs.Node(op, name=f"{name}_integer", attrs=attrs,
                inputs=[x_q, _const(f"{name}_weight_int8", w_q), x_zero], outputs=[acc]),
        gs.Node("Mul", name=f"{name}_scale_product",
                inputs=[x_scale, _const(f"{name}_weight_scale", w_scale.reshape(scale_shape))], outputs=[scale]),
        gs.Node("Cast", name=f"{name}_cast", attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
    ]
    result = node.outputs[0]
    if bias is None:
        nodes.append(gs.Node("Mul", name=f"{name}_rescale", inputs=[acc_f, scale], outputs=[result]))
    else:
        scaled = gs.Variable(f"{name}_scaled", dtype=np.float32)
        nodes += [gs.Node("Mul", name=f"{name}_rescale", inputs=[acc_f, scale], outputs=[scaled]),
                  gs.Node("Add", name=f"{name}_bias", inputs=[scaled, _const(f"{name}_bias", bias.reshape(scale_shape))],
                          outputs=[result])]
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(nodes)

