"""ONNX int8 rewriting: dynamic, static (ORT calibration) and weight-only, on random and fixed graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.onnx.quantize import QuantizeInt8
from graphopt.passes.quantize.observers import quantize_weight
from graphopt.engine.rules import Reason

from .graphs import onnx_graphs
from .helpers import cosine, op_types, run, save

FAST = dict(measure_latency=False, progress=False)
BUDGET = QuantizeInt8.budget.min_cosine


@settings(max_examples=12, deadline=None)
@given(onnx_graphs(), st.sampled_from(["int8-dynamic", "int8-weight-only"]))
def test_random_graphs_stay_within_the_int8_budget(tmp_path_factory, model, scheme):
    """Kept int8 rewrites hold the budget on fresh inputs too; a rollback always says why."""
    tmp = tmp_path_factory.mktemp("q")
    src = save(model, tmp)
    report = graphopt.optimize_onnx(src, tmp / "out.onnx", level="O2", quantize=scheme, **FAST)
    for record in report.rolled_back:
        assert "budget" in record.reason
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
    (want,), (got,) = run(src, feeds), run(tmp / "out.onnx", feeds)
    if np.abs(want).max() > 0:
        assert cosine(got, want) >= BUDGET - 0.01   # fresh inputs: the budget, less sampling noise


def _mlp(rng, hidden=256) -> onnx.ModelProto:
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
             for n, s in (("w1", (64, hidden)), ("w2", (hidden, 10)))]
    inits += [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b1")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scheme,ops", [
    ("int8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
    ("int8-static", {"QuantizeLinear", "DequantizeLinear"}),
    ("int8-weight-only", {"DequantizeLinear"}),
])
def test_int8_schemes_store_int8_weights_and_keep_accuracy(tmp_path, scheme, ops):
    rng = np.random.default_rng(0)
    src = save(_mlp(rng), tmp_path)
    calibration = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]
    report = graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize=scheme, calibration_data=calibration,
                                    **FAST)
    out = tmp_path / "out.onnx"
    assert not report.rolled_back
    assert ops <= set(op_types(out))
    int8 = [i for i in onnx.load(str(out)).graph.initializer    # 8-bit weights (dynamic: uint8, zero point 128)
            if i.data_type in (TensorProto.INT8, TensorProto.UINT8) and i.name.endswith(("weight_int8", "weight_uint8"))]
    assert sum(np.prod(i.dims) for i in int8) == 64 * 256 + 256 * 10
    assert out.stat().st_size < 0.3 * src.stat().st_size       # int8 weights: ~¼ of float32, plus scales
    feeds = {"x": rng.standard_normal((5, 64)).astype(np.float32)}
    assert cosine(run(out, feeds)[0], run(src, feeds)[0]) >= BUDGET


def test_static_calibration_from_an_npz_directory(tmp_path):
    rng = np.random.default_rng(1)
    src = save(_mlp(rng), tmp_path)
    (tmp_path / "calib").mkdir()
    for i in range(3):
        np.savez(tmp_path / "calib" / f"{i}.npz", x=rng.standard_normal((4, 64)).astype(np.float32))
    report = graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize="int8-static",
                                    calibration_data=tmp_path / "calib", **FAST)
    assert report.matches() == {"MatMulAddToGemm": 1, "Gemm → int8 static": 1, "MatMul → int8 static": 1}


def test_weight_quantization_is_within_half_a_step_on_the_output_channel_axis():
    """The one per-channel quantizer on ONNX layouts: MatMul W[K, N] (axis 1), Gemm/Conv W[C_out, …] (axis 0)."""
    rng = np.random.default_rng(2)
    for shape, axis in (((32, 16), 0), ((32, 16), 1), ((8, 3, 3, 3), 0)):
        w = rng.standard_normal(shape).astype(np.float32)
        w_q, scale = (t.numpy() for t in quantize_weight(torch.from_numpy(w), axis=axis))
        assert w_q.shape == w.shape and scale.shape == (shape[axis],)
        view = [1] * w.ndim
        view[axis] = -1
        # round-to-nearest: at most half a step per element; 1e-7 covers the float32 rounding of W / s
        assert np.abs(w - w_q * scale.reshape(view)).max() <= scale.max() / 2 + 1e-7
        # each channel's largest |w| maps to ±127 exactly
        assert (np.abs(w_q).max(axis=tuple(i for i in range(w.ndim) if i != axis)) == 127).all()


def test_activation_products_are_left_float_with_a_reason(tmp_path):
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "aa", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    report = graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize="int8-dynamic", **FAST)
    assert Reason.NOT_CONSTANT in report["onnx_int8_dynamic"].reasons


def _outlier_mlp(rng) -> onnx.ModelProto:
    """x → MatMul(first) → Relu → ×c → MatMul(second) → MatMul(third): c lifts channel 0 of the second
    layer's input 1000× (its weight row shrunk 1000×, so the function is a plain MLP's). Per-tensor int8
    of that input has a step of ~1000/255 of a normal channel's range: the other 31 channels round to 0
    (cosine far below 0.9), while the first and third layers keep a cosine ≥ 0.999."""
    scale = np.ones(32, np.float32)
    scale[0] = 1000.0
    w2 = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
    w2[0] /= 1000.0
    inits = [numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float32), "w1"),
             numpy_helper.from_array(scale, "c"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array((rng.standard_normal((32, 4)) / np.sqrt(32)).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Mul", ["r", "c"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["t"], name="second"),
             helper.make_node("MatMul", ["t", "w3"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_accuracy_budget_keeps_the_sensitive_layer_float_as_the_torch_path_does(tmp_path):
    rng = np.random.default_rng(3)
    src = save(_outlier_mlp(rng), tmp_path)
    calibration = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    whole = graphopt.optimize_onnx(src, tmp_path / "whole.onnx", quantize="int8-dynamic",
                                   calibration_data=calibration, **FAST)
    assert whole["onnx_int8_dynamic"].rolled_back       # every layer int8: far below the default 0.98
    report = graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize="int8-dynamic", calibration_data=calibration,
                                    accuracy_budget=0.01, **FAST)
    record = report["onnx_int8_dynamic"]
    assert record.modified and not record.rolled_back
    assert record.matches == {"MatMul → int8 dynamic": 2} and Reason.ACCURACY in record.reasons
    accuracy = record.stats["accuracy"]
    assert accuracy["met"] and accuracy["fallback"] == ["second"] and accuracy["budget"] == "output cosine ≥ 0.99"
    assert report.final.min_cosine >= 0.99 and report.meta["accuracy_budget"] == "output cosine ≥ 0.99"
    feeds = {"x": rng.standard_normal((5, 16)).astype(np.float32)}          # fresh inputs of the same kind
    assert cosine(run(tmp_path / "out.onnx", feeds)[0], run(src, feeds)[0]) >= 0.99
    with pytest.raises(graphopt.OptionError, match="calibration"):
        graphopt.optimize_onnx(src, tmp_path / "x.onnx", quantize="int8-dynamic", accuracy_budget=0.01, **FAST)
    with pytest.raises(graphopt.OptionError, match="applies to int8"):
        graphopt.optimize_onnx(src, tmp_path / "x.onnx", accuracy_budget=0.01, calibration_data=calibration, **FAST)
    assert not (tmp_path / "x.onnx").exists()
