"""Int8 rewriting of MatMul / Gemm / Conv with constant weights (O2, lossy).

Weights: symmetric per output channel, stored as int8 initializers (¼ of fp32):

    s_w[n] = max|W[:, n]| / 127,   W_q = clip(round(W / s_w), −127, 127)

(`passes/quantize/observers.quantize_weight`, the quantizer of the FX int8 pass, minmax on 8 bits).

Schemes:

    static       t̂ = DequantizeLinear(QuantizeLinear(t, s_t, z_t))   for the input and output t of every
                 Ŵ = DequantizeLinear(W_q, s_w, axis)                  MatMul/Gemm/Conv; s_t, z_t from ONNX
                 op(x̂, Ŵ, b)                                          Runtime calibration (uint8, asymmetric:
                                                                      s_t = (max − min)/255, min ≤ 0 ≤ max)
                 — with Q/DQ on both sides ONNX Runtime fuses each op into QLinearConv / QLinearMatMul
    dynamic      (x_q, s_x, z_x) = DynamicQuantizeLinear(x)           per-tensor uint8 at run time
      MatMul     y = Cast(MatMulInteger(x_q, W_q + 128, z_x, 128)) · (s_x · s_w) (+ b)   (uint8 × uint8: exact)
    weight-only  op(x, DequantizeLinear(W_q, s_w, axis), b)          — int8 storage, float compute

Convolutions are int8 only in the static scheme: ONNX Runtime runs `ConvInteger`
(dynamic) and an unfused DequantizeLinear → Conv (weight-only) 18–40× slower
than the float Conv on this CPU (bench/results/onnx.md), so those schemes
leave convs float and say why.

The error of int8 through a dozen layers stays around a cosine of 0.99 of
the float output; the pass's budget is a cosine of 0.98 against the graph
before it (on random and calibration inputs), else it is rolled back.

With an accuracy budget (`optimize_onnx(accuracy_budget=0.01)`: the outputs'
cosine to the graph before the pass stays ≥ 0.99 on the calibration feeds;
or ("sqnr", dB)), the layers are chosen as the torch pass chooses them
(`graphopt.passes.quantize.fallback`): each layer's sensitivity is measured
quantized alone, then the most sensitive fall back to float, one at a time,
until the budget holds; the pass's own budget becomes that cosine.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch

from graphopt.errors import OptionError
from graphopt.onnx.calibrate import tensor_ranges
from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject
from graphopt.engine.schemes import SHORT_NAMES, Scheme
from graphopt.engine.verify import Budget
from graphopt.passes.quantize import fallback
from graphopt.passes.quantize.config import Fidelity

from ..quantize.observers import quantize_weight
from .base import OnnxPass, constant, is_standard, replace_input

TARGETS = ("MatMul", "Gemm", "Conv")
CONV_REASON = {
    "dynamic": "ONNX Runtime runs ConvInteger ~40× slower than a float Conv on this CPU; int8-static quantizes convs",
    "weight-only": "ONNX Runtime runs DequantizeLinear → Conv unfused, ~18× slower; int8-static quantizes convs",
}


class QuantizeInt8(OnnxPass):
    level = 2
    min_opset = 13          # per-axis DequantizeLinear
    budget = Budget(min_cosine=0.98)

    def __init__(self, scheme: str = "dynamic", calibration: Sequence[dict] = (), fidelity: Fidelity | None = None,
                 progress: bool = True) -> None:
        if scheme not in SHORT_NAMES:
            raise OptionError(f"int8 scheme {scheme!r}: choose one of {', '.join(SHORT_NAMES)}")
        if scheme == "static" and not calibration:
            raise OptionError("int8 static needs calibration data (calibration_data= / --calibration): "
                              "activation ranges are measured on it")
        if fidelity is not None and (fidelity.kind == "metric" or not calibration):
            raise OptionError("an ONNX model's accuracy budget (accuracy_budget= / --accuracy-budget) is a cosine "
                              "tolerance or ('sqnr', dB) measured on calibration data: give calibration_data= / "
                              "--calibration (a metric(module) is for torch models)")
        self.scheme = scheme
        self.calibration = list(calibration)
        self.fidelity = fidelity
        self.progress = progress
        self.name = Scheme.parse(scheme).onnx_pass_name
        if fidelity is not None:
            self.budget = Budget(min_cosine=fidelity.threshold if fidelity.kind == "cosine" else
                                 (1 + 10 ** (-fidelity.threshold / 10)) ** -0.5)   # SQNR: cos = 1/√(1 + N/S)

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> dict:
        targets = []
        for node in list(model.graph.nodes):
            if node.op not in TARGETS:
                continue
            slow = CONV_REASON.get(self.scheme) if node.op == "Conv" else None
            reason = Reject(Reason.SLOWER, slow) if slow else _why_not(node)
            if reason:
                log.rejected(node.op, node.name, reason)
            else:
                targets.append(node)
        ranges = {}
        if self.scheme == "static" and targets:
            ranges = tensor_ranges(model, [t.name for t in _activations(model.graph, targets)], self.calibration)
        stats: dict[str, Any] = {}
        if self.fidelity is not None and targets:
            names = {_key(t): t.name or _key(t) for t in targets}
            selection = self._select(model, [_key(t) for t in targets], ranges)
            for node in targets:
                if _key(node) not in selection.quantized:
                    log.rejected(node.op, node.name, Reject(Reason.ACCURACY, "fell back to float: most sensitive "
                                                            "layer, the accuracy budget needs it"))
            targets = [t for t in targets if _key(t) in selection.quantized]
            stats["accuracy"] = {"budget": self.fidelity.describe(), "met": selection.met,
                                 "float": selection.float_score, "int8": selection.score,
                                 "history": selection.history,
                                 "fallback": [names[k] for k in selection.fallback]}
        stats["layers"] = self._quantize(model, targets, ranges)
        for node in targets:
            log.matched(f"{node.op} → int8 {self.scheme}")
        return stats

    def _quantize(self, model: OnnxModel, targets: list[gs.Node], ranges: dict) -> list[dict]:
        """Rewrite `targets` (nodes of `model`) into int8 in place; a row per layer."""
        graph = model.graph
        layers = []
        for node in targets:
            weight, axis = _weight(node)
            w_q, w_scale = _quantize_weight(weight, axis)
            layers.append({"layer": node.name, "op": node.op, "scheme": self.scheme,
                           "weight_rel_err": weight_error(weight, w_q, w_scale, axis)})
            if self.scheme == "dynamic":
                _dynamic(graph, node, w_q, w_scale)
            else:
                _dequantized_weight(graph, node, w_q, w_scale, axis)
        for tensor in _activations(graph, targets) if self.scheme == "static" else ():
            _quantize_dequantize(graph, tensor, ranges[tensor.name])
        return layers

    def _select(self, model: OnnxModel, keys: list[str], ranges: dict) -> fallback.Selection:
        """The layers (by `_key`) that int8 may take within the accuracy budget, on the calibration feeds."""
        feeds = [((), feed) for feed in self.calibration]

        def build(chosen: Sequence[str]) -> OnnxModel:
            trial = model.copy()
            self._quantize(trial, [n for n in trial.graph.nodes if n.op in TARGETS and _key(n) in chosen], ranges)
            return trial

        def run(trial: OnnxModel, batches: Sequence) -> list:
            return [trial.run(feed) for _, feed in batches]

        return fallback.select(keys, build, self.fidelity, feeds, run(model, feeds), self.progress, run=run)


def _key(node: gs.Node) -> str:
    """A layer's name that survives a graph copy and is unique (node names need not be): its first output's."""
    return node.outputs[0].name


def _why_not(node: gs.Node) -> Reject | None:
    if not is_standard(node):
        return Reject(Reason.CUSTOM_DOMAIN, f"custom domain {node.domain!r}")
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return Reject(Reason.NOT_CONSTANT, "weight is not a constant (activation × activation product)")
    weight = constant(node.inputs[1])
    if weight.dtype != np.float32:
        return Reject(Reason.DTYPE_MISMATCH, f"weight dtype {weight.dtype} is not float32")
    if node.op == "MatMul" and weight.ndim != 2:
        return Reject(Reason.SHAPE_MISMATCH, f"weight has rank {weight.ndim}, not 2")
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                              or node.attrs.get("beta", 1.0) != 1.0):
        return Reject(Reason.UNSUPPORTED_FORM, "Gemm with transA or alpha/beta ≠ 1")
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant(node.inputs[2])
        if bias is None:
            return Reject(Reason.NOT_CONSTANT, "bias is not a constant")
        channels = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else weight.shape[-1]
        if bias.size != channels:
            return Reject(Reason.SHAPE_MISMATCH, f"bias of shape {bias.shape} is not one value per output channel")
    if node.inputs[0].dtype is not None and np.dtype(node.inputs[0].dtype) != np.float32:
        return Reject(Reason.DTYPE_MISMATCH, f"activation dtype {node.inputs[0].dtype} is not float32")
    return None


def _weight(node: gs.Node) -> tuple[np.ndarray, int]:
    """The weight and its output-channel axis."""
    weight = constant(node.inputs[1])
    if node.op == "Conv":
        return weight, 0
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return weight, 0
    return weight, 1


def _quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_q, s_w) with W ≈ W_q · s_w along `axis`: the FX pass's per-channel quantizer (minmax, 8 bits)."""
    w_q, scale = quantize_weight(torch.from_numpy(np.ascontiguousarray(weight)), axis=axis)
    return w_q.numpy(), scale.numpy()


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


def _activations(graph: gs.Graph, targets: list[gs.Node]) -> list[gs.Variable]:
    """The float32 inputs and outputs of the targets that get Q/DQ (not graph outputs, not yet quantized)."""
    found: dict[str, gs.Variable] = {}
    for node in targets:
        for tensor in (node.inputs[0], node.outputs[0]):
            produced_by_dq = bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"
            if tensor in graph.outputs or produced_by_dq or isinstance(tensor, gs.Constant):
                continue
            if tensor.dtype is None or np.dtype(tensor.dtype) == np.float32:
                found.setdefault(tensor.name, tensor)
    return list(found.values())


def _quantize_dequantize(graph: gs.Graph, tensor: gs.Variable, value_range: tuple[float, float]) -> None:
    """t ⇒ DequantizeLinear(QuantizeLinear(t)) for every reader of t (uint8, asymmetric over the range)."""
    low, high = min(0.0, value_range[0]), max(0.0, value_range[1])
    scale = np.float32((high - low) / 255.0 or 1.0)
    zero = np.uint8(np.clip(np.round(-low / scale), 0, 255))
    readers = list(tensor.outputs)
    q = gs.Variable(f"{tensor.name}_q", dtype=np.uint8, shape=tensor.shape)
    dq = gs.Variable(f"{tensor.name}_dq", dtype=np.float32, shape=tensor.shape)
    s, z = _const(f"{tensor.name}_scale", np.array(scale)), _const(f"{tensor.name}_zero_point", np.array(zero))
    graph.nodes.append(gs.Node("QuantizeLinear", name=f"{tensor.name}_quantize", inputs=[tensor, s, z], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{tensor.name}_dequantize", inputs=[q, s, z], outputs=[dq]))
    for reader in readers:
        replace_input(reader, tensor, dq)


def _as_uint8(w_q: np.ndarray) -> np.ndarray:
    """int8 weights shifted to uint8 (zero point 128): ONNX Runtime's uint8×uint8 MatMulInteger is exact
    on AVX2, while its uint8×int8 kernel sums pairs in saturating int16 (errors up to ~50% with
    outlier activations, measured in bench/results/onnx_int8_forms.md)."""
    return (w_q.astype(np.int16) + 128).astype(np.uint8)


def _dynamic(graph: gs.Graph, node: gs.Node, w_q: np.ndarray, w_scale: np.ndarray) -> None:
    name = node.name or node.outputs[0].name
    x = node.inputs[0]
    x_q, x_scale, x_zero = (gs.Variable(f"{name}_x_q", dtype=np.uint8), gs.Variable(f"{name}_x_scale", dtype=np.float32),
                            gs.Variable(f"{name}_x_zero_point", dtype=np.uint8))
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        w_q = np.ascontiguousarray(w_q.T)
    acc = gs.Variable(f"{name}_int32", dtype=np.int32)
    acc_f = gs.Variable(f"{name}_int32_float", dtype=np.float32)
    scale = gs.Variable(f"{name}_scale", dtype=np.float32)
    result = node.outputs[0]
    scaled = gs.Variable(f"{name}_scaled", dtype=np.float32) if bias is not None else result
    nodes = [
        gs.Node("DynamicQuantizeLinear", name=f"{name}_quantize", inputs=[x], outputs=[x_q, x_scale, x_zero]),
        gs.Node("MatMulInteger", name=f"{name}_integer",
                inputs=[x_q, _const(f"{name}_weight_uint8", _as_uint8(w_q)), x_zero,
                        _const(f"{name}_weight_zero_point", np.array(128, dtype=np.uint8))], outputs=[acc]),
        gs.Node("Mul", name=f"{name}_scale_product", inputs=[x_scale, _const(f"{name}_weight_scale", w_scale)],
                outputs=[scale]),
        gs.Node("Cast", name=f"{name}_cast", attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
        gs.Node("Mul", name=f"{name}_rescale", inputs=[acc_f, scale], outputs=[scaled]),
    ]
    if bias is not None:
        nodes.append(gs.Node("Add", name=f"{name}_bias", inputs=[scaled, _const(f"{name}_bias", bias.reshape(-1))],
                             outputs=[result]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(nodes)
