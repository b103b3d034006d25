"""An ONNX model's weights lie once: its copies, its ONNX Runtime sessions and its onnx_ir form share them.

Before, every session held its own copy of the weights (and a repacked one), every pass copied them
through a proto, and a 1.1B-parameter decoder's export was killed for memory at 24 GB.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.onnx.ir import OnnxModel
from graphopt.onnx.sessions import SHARED_MIN_BYTES, session
from graphopt.passes.onnx import DeadNodeElimination


def mlp(rows: int, hidden: int, seed: int = 0) -> onnx.ModelProto:
    """x @ W1 → Relu → @ W2 + b, plus a dead x @ unused that no output reads; W1 and `unused` large enough to
    be shared."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((rows, hidden)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 7)).astype(np.float32), "W2")
    bias = numpy_helper.from_array(rng.standard_normal(7).astype(np.float32), "b")
    unused = numpy_helper.from_array(np.ones((rows, hidden), np.float32), "unused")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
         helper.make_node("MatMul", ["x", "unused"], ["dead"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7])], [w1, w2, bias, unused])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reference(proto: onnx.ModelProto, x: np.ndarray, prepack: bool = True) -> np.ndarray:
    """The output of a session on the whole proto (repacked weights sum in another order: compared alike)."""
    return session(proto, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, prepack=prepack).run(None, {"x": x})[0]


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(129, 300), batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_sessions_on_shared_weights_compute_what_the_file_does(rows, batch, seed):
    proto = mlp(rows, 160, seed)
    before = proto.SerializeToString()
    model = OnnxModel.from_proto(proto)
    assert proto.SerializeToString() == before                     # the input proto is not touched
    light, weights = model.shared_proto()
    assert {"W1", "unused"} <= set(weights) and "b" not in weights   # the small bias stays inline
    assert light.ByteSize() < SHARED_MIN_BYTES
    x = np.random.default_rng(seed).standard_normal((batch, rows)).astype(np.float32)
    for prepack in (True, False):
        got = model.new_session(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, prepack=prepack).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, reference(proto, x, prepack))
    np.testing.assert_array_equal(model.run({"x": x})[0].numpy(), session(proto).run(None, {"x": x})[0])
    full = model.to_proto()                                        # a file's proto holds every byte again
    assert full.ByteSize() > sum(a.nbytes for a in weights.values())
    np.testing.assert_array_equal(reference(full, x), reference(proto, x))


def test_copies_and_the_onnx_ir_round_trip_share_the_arrays():
    model = OnnxModel.from_proto(mlp(200, 160))
    array = model.graph.tensors()["W1"].values
    assert model.copy().graph.tensors()["W1"].values is array
    cleaned = DeadNodeElimination().run(model)                     # through onnx_ir and back
    assert "unused" in model.graph.tensors() and cleaned.modified and "unused" not in cleaned.module.graph.tensors()
    assert np.shares_memory(cleaned.module.graph.tensors()["W1"].values, array)
    x = np.random.default_rng(1).standard_normal((2, 200)).astype(np.float32)
    np.testing.assert_array_equal(cleaned.module.run({"x": x})[0].numpy(), model.run({"x": x})[0].numpy())


def _rss() -> int:
    """Resident bytes, from /proc (Linux, as tests/llm/memory_probe.py)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_checking_session_adds_no_copy_of_the_weights():
    """256 MB of weights: a session that checks values (no repacking) adds a small fraction of them."""
    model = OnnxModel.from_proto(mlp(4096, 16384))
    weights = sum(a.nbytes for a in model.shared_proto()[1].values())
    start = _rss()
    sessions = [model.new_session(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, prepack=False) for _ in range(3)]
    sessions[0].run(None, {"x": np.ones((1, 4096), np.float32)})
    assert _rss() - start < 0.25 * weights, f"3 sessions added {(_rss() - start) / 2**20:.0f} MiB"


def test_a_model_over_two_gigabytes_is_written_from_its_arrays(tmp_path, monkeypatch):
    """Past protobuf's limit (lowered here to 1 MB) the weights go to the data file straight from the arrays,
    page-aligned, and the file computes what the model does."""
    import graphopt.onnx.ir as onnx_ir_module
    from graphopt.onnx.files import save_model
    monkeypatch.setattr(onnx_ir_module, "PROTOBUF_LIMIT", 1 << 20)
    model = OnnxModel.from_proto(mlp(300, 1024))
    path = save_model(model, tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and path.stat().st_size < SHARED_MIN_BYTES
    stored = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in stored.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 2 and all(offset % 4096 == 0 for offset in offsets)   # W1 and `unused`
    x = np.random.default_rng(2).standard_normal((3, 300)).astype(np.float32)
    got = session(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, model.run({"x": x})[0].numpy())


@settings(max_examples=4, deadline=None)
@given(form=st.sampled_from(["reshape", "dequantize"]), batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_weights_onnx_runtimes_optimizers_read_stay_in_the_proto(form, batch, seed):
    """ONNX Runtime's optimizers read a weight's TensorProto, not the array shared for it: constant folding of
    Reshape(W), the DequantizeLinear(W) + MatMul fusion. On a by-reference weight a session at the default
    level failed to start ("External initializer … out of bounds"); such weights go into the proto, the MatMul
    weight beside them is still shared, and the session computes what the file does."""
    rng = np.random.default_rng(seed)
    k, n = 256, 320                                       # every weight over SHARED_MIN_BYTES (int8 too)
    if form == "reshape":
        read = [numpy_helper.from_array(rng.standard_normal(k * n).astype(np.float32), "W"),
                numpy_helper.from_array(np.array([k, n], np.int64), "shape")]
        make = helper.make_node("Reshape", ["W", "shape"], ["w"])
    else:
        read = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "W"),
                numpy_helper.from_array((rng.random(n) * 0.01 + 1e-3).astype(np.float32), "scale")]
        make = helper.make_node("DequantizeLinear", ["W", "scale"], ["w"], axis=1)
    shared = numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "V")
    graph = helper.make_graph(
        [make, helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "V"], ["y"])],
        "read", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])], [*read, shared])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((batch, k)).astype(np.float32)
    model = OnnxModel.from_proto(onnx.ModelProto.FromString(proto.SerializeToString()))
    got = model.new_session().run(None, {"x": x})[0]
    # the same optimizations on both sides (ONNX Runtime's DequantizeLinear + MatMul fusion quantizes x)
    want = session(proto, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert set(model.shared_proto(optimizing_session=True)[1]) == {"V"}
    assert set(model.shared_proto()[1]) == {"W", "V"}          # a file or a non-optimizing session: all
