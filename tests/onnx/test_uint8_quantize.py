"""QuantizeToUint8: int8 codes shifted to uint8 become one QuantizeLinear into uint8, byte for byte."""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.onnx.ir import OnnxModel
from graphopt.passes.onnx import QuantizeToUint8

from .helpers import run, save


def _shifted_quantize(rows: int, cols: int, extra_reader: bool = False) -> onnx.ModelProto:
    """x → per-row QuantizeLinear (int8 zero point Expand(0)) → Cast int32 → Add 128 → Cast uint8."""
    nodes = [
        helper.make_node("Abs", ["x"], ["abs_x"]),
        helper.make_node("ReduceMax", ["abs_x", "axes"], ["amax"], keepdims=0),
        helper.make_node("Div", ["amax", "c127"], ["scale"]),
        helper.make_node("Shape", ["scale"], ["rows"]),
        helper.make_node("Expand", ["zero", "rows"], ["zp"]),
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=0),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
        helper.make_node("Add", ["q32", "c128"], ["u32"]),
        helper.make_node("Cast", ["u32"], ["u"], to=TensorProto.UINT8),
    ]
    outputs = [helper.make_tensor_value_info("u", TensorProto.UINT8, [rows, cols])]
    if extra_reader:
        nodes.append(helper.make_node("Cast", ["q"], ["q_float"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("q_float", TensorProto.FLOAT, [rows, cols]))
    inits = {"axes": np.array([1], np.int64), "c127": np.array(127.0, np.float32), "zero": np.array(0, np.int8),
             "c128": np.array(128, np.int32)}
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, cols])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _rewrite(model: onnx.ModelProto):
    ir = OnnxModel.from_proto(model)
    result = QuantizeToUint8().run(ir)
    ir.graph.toposort()
    return result, ir.to_proto()


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 2**16),
       magnitude=st.floats(1e-3, 1e3))
def test_shift_to_uint8_becomes_one_quantize_with_identical_bytes(tmp_path_factory, rows, cols, seed, magnitude):
    tmp = tmp_path_factory.mktemp("u8")
    model = _shifted_quantize(rows, cols)
    result, rewritten = _rewrite(model)
    assert result.stats["matches"] == {"QuantizeLinear → uint8": 1}
    assert "Add" not in _ops(rewritten) and "Cast" not in _ops(rewritten)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * magnitude).astype(np.float32)
    x[0, 0] = 0.0
    feeds = {"x": x}
    (want,), (got,) = run(save(model, tmp, "a.onnx"), feeds), run(save(rewritten, tmp, "b.onnx"), feeds)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_codes_read_elsewhere_are_left_alone_with_the_reason():
    result, rewritten = _rewrite(_shifted_quantize(3, 5, extra_reader=True))
    assert result.stats["matches"] == {}
    assert "Add" in _ops(rewritten)
    assert any("int8 codes not read by one Cast" in str(rejection) for rejection in result.stats["rejected"])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
