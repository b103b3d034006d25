"""ONNX passes: random graphs through optimize_onnx, and each rewrite on a graph made to trigger it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.engine.verify import LOSSLESS_REL_TOL
from graphopt.engine.rules import Reason

from .graphs import onnx_graphs
from .helpers import op_types, rel_err, run, save

FAST = dict(measure_latency=False, progress=False)


def _inputs(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = model.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return {x.name: rng.standard_normal(shape).astype(np.float32)}


@settings(max_examples=25, deadline=None)
@given(onnx_graphs())
def test_random_graphs_keep_their_outputs(tmp_path_factory, model):
    """O1 on random graphs: ONNX Runtime outputs equal the original's within float32 rounding."""
    tmp = tmp_path_factory.mktemp("g")
    src = save(model, tmp)
    report = graphopt.optimize_onnx(src, tmp / "out.onnx", level="O1", **FAST)
    assert not report.rolled_back, [r.reason for r in report.rolled_back]   # a rollback would hide a bug
    for seed in range(2):
        feeds = _inputs(model, seed)
        (want,), (got,) = run(src, feeds), run(tmp / "out.onnx", feeds)
        assert got.shape == want.shape
        assert rel_err(got, want) <= LOSSLESS_REL_TOL


def _model(nodes, inputs, outputs, inits, opset=17, domains=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    onnx.checker.check_model(model)
    return model


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


rng = np.random.default_rng(0)
f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731


def _optimize(tmp_path, model, **options):
    src = save(model, tmp_path)
    dst = tmp_path / "out.onnx"
    report = graphopt.optimize_onnx(src, dst, **{**FAST, **options})
    return src, dst, report


def test_conv_bn_folds_and_matmul_add_becomes_gemm(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y"])]
    inits = {"w": f32(4, 2, 3, 3), "g": f32(4) + 2, "b": f32(4), "m": f32(4), "v": np.abs(f32(4)) + 0.5,
             "s": np.array([-1, 64], np.int64), "fc": f32(64, 5), "bias": f32(5)}
    model = _model(nodes, [_vi("x", [3, 2, 4, 4])], [_vi("y", [3, 5])], inits)
    src, dst, report = _optimize(tmp_path, model, level="O1")
    assert op_types(dst) == ["Conv", "Relu", "Reshape", "Gemm"]
    assert report.matches() == {"FuseBatchNormIntoConv": 1, "MatMulAddToGemm": 1}
    feeds = {"x": f32(3, 2, 4, 4)}
    assert rel_err(run(dst, feeds)[0], run(src, feeds)[0]) <= LOSSLESS_REL_TOL


def test_transposes_reshapes_identities_and_dropout_collapse(tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("Transpose", ["i"], ["t1"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
             helper.make_node("Dropout", ["t2"], ["d"]),
             helper.make_node("Reshape", ["d", "s1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t3"], perm=[1, 0]),
             helper.make_node("Transpose", ["t3"], ["y"], perm=[1, 0])]
    inits = {"s1": np.array([24], np.int64), "s2": np.array([4, 6], np.int64)}
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [4, 6])], inits)
    src, dst, report = _optimize(tmp_path, model, level="O1")
    assert op_types(dst) == ["Reshape"]
    feeds = {"x": f32(2, 3, 4)}
    np.testing.assert_array_equal(run(dst, feeds)[0], run(src, feeds)[0])   # data movement only: exact


def test_reshape_that_copies_a_dimension_collapses_through_the_known_shape(tmp_path):
    """onnxscript's rule replaces the copied dimension (0) by the intermediate's static size."""
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"]), helper.make_node("Reshape", ["r1", "s2"], ["y"])]
    inits = {"s1": np.array([6, 4], np.int64), "s2": np.array([0, 2, 2], np.int64)}
    model = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [6, 2, 2])], inits)
    src, dst, report = _optimize(tmp_path, model, level="O1")
    assert op_types(dst) == ["Reshape"]
    assert report["onnx_collapse_transpose_reshape"].matches == {"ReshapeReshape": 1}
    feeds = {"x": f32(2, 3, 4)}
    np.testing.assert_array_equal(run(dst, feeds)[0], run(src, feeds)[0])


def test_constant_folding_never_materializes_a_huge_generator(tmp_path):
    """ConstantOfShape of 64 Mi floats stays a node; the small Shape→Gather chain folds."""
    big = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=big),
             helper.make_node("ReduceSum", ["ones", "axes"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "small"], ["a"]),
             helper.make_node("Mul", ["a", "total"], ["y"])]
    inits = {"shape": np.array([4096, 16384], np.int64), "axes": np.array([0, 1], np.int64),
             "small": f32(3) }
    model = _model(nodes, [_vi("x", [3])], [_vi("y", [3])], inits)
    src, dst, report = _optimize(tmp_path, model, level="O1")
    assert dst.stat().st_size < 10_000
    assert "ConstantOfShape" in op_types(dst)
    assert Reason.SIZE_LIMIT in report["onnx_constant_folding"].reasons
    feeds = {"x": f32(3)}
    assert rel_err(run(dst, feeds)[0], run(src, feeds)[0]) <= LOSSLESS_REL_TOL


def test_constant_folding_budget_covers_the_whole_pass(tmp_path):
    """Weights made at run time by ConstantOfShape (the onnx zoo's "light" graphs): eight 192 KiB
    generators, each far under the 1 MiB guard, would together add 1.5 MiB; the pass's one budget
    folds the first five and keeps the rest as nodes, and the outputs are unchanged."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])
    nodes, previous = [], "x"
    for i in range(8):
        nodes += [helper.make_node("ConstantOfShape", [f"shape{i}"], [f"w{i}"], value=value),
                  helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"])]
        previous = f"h{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    inits = {f"shape{i}": np.array([224, 224], np.int64) for i in range(8)}
    model = _model(nodes, [_vi("x", [2, 224])], [_vi("y", [2, 224])], inits)
    src, dst, report = _optimize(tmp_path, model, level="O1")
    growth = dst.stat().st_size - src.stat().st_size
    assert 0 < growth <= 1 << 20                                 # the guard's budget, for the whole pass
    assert op_types(dst).count("ConstantOfShape") == 3           # 5 × 196 KiB fit in 1 MiB, the 6th does not
    assert report["onnx_constant_folding"].reasons[Reason.SIZE_LIMIT] == 3
    feeds = {"x": f32(2, 224)}
    assert rel_err(run(dst, feeds)[0], run(src, feeds)[0]) <= LOSSLESS_REL_TOL


def test_custom_domain_ops_are_skipped_with_a_reason(tmp_path):
    """A com.microsoft op (ORT runs it) on a constant: not folded, left alone with the reason."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Gelu", ["c"], ["g"], domain="com.microsoft"),
             helper.make_node("Add", ["a", "g"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 8])], [_vi("y", [2, 4])], {"w": f32(8, 4), "b": f32(4), "c": f32(4)},
                   domains=["com.microsoft"])
    src, dst, report = _optimize(tmp_path, model, level="O1")
    assert sorted(op_types(dst)) == ["Add", "Gelu", "Gemm"]
    feeds = {"x": f32(2, 8)}
    assert rel_err(run(dst, feeds)[0], run(src, feeds)[0]) <= LOSSLESS_REL_TOL
    assert Reason.CUSTOM_DOMAIN in report["onnx_constant_folding"].reasons


def test_unknown_custom_op_cannot_be_verified_but_optimizes_without_verify(tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("MyOp", ["i"], ["y"], domain="acme.custom")]
    model = _model(nodes, [_vi("x", [2, 8])], [_vi("y", [2, 8])], {}, domains=["acme.custom"])
    src = save(model, tmp_path)
    with pytest.raises(graphopt.UnsupportedError, match="verify=False"):
        graphopt.optimize_onnx(src, tmp_path / "out.onnx", **FAST)
    assert not (tmp_path / "out.onnx").exists()
    graphopt.optimize_onnx(src, tmp_path / "out.onnx", verify=False, **FAST)
    assert op_types(tmp_path / "out.onnx") == ["MyOp"]


def test_old_opset_is_upgraded_for_int8(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _model(nodes, [_vi("x", [4, 16])], [_vi("y", [4, 8])], {"w": f32(16, 8)}, opset=11)
    _, dst, report = _optimize(tmp_path, model, level="O2", quantize="int8-weight-only")
    assert onnx.load(str(dst)).opset_import[0].version == 13
    assert report.matches()["opset upgrade to 13"] == 1
    assert "DequantizeLinear" in op_types(dst)


def test_model_that_cannot_be_upgraded_skips_the_pass_and_says_so(tmp_path):
    """Opset 6 training-mode Dropout has no adapter to opset 13: the int8 pass is skipped, O1 still runs.

    ONNX Runtime runs opset ≥ 7 only, so this model is optimized without verification."""
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("MatMul", ["i", "w"], ["m"]),
             helper.make_node("Dropout", ["m"], ["y"], is_test=0)]
    model = _model(nodes, [_vi("x", [4, 16])], [_vi("y", [4, 8])], {"w": f32(16, 8)}, opset=6)
    _, dst, report = _optimize(tmp_path, model, level="O2", quantize="int8-weight-only", verify=False)
    assert any("onnx_int8_weight_only: cannot upgrade opset 6 → 13" in s for s in report.meta["skipped"])
    assert op_types(dst) == ["MatMul", "Dropout"]
    assert report["onnx_inference_dropout"].reasons == {Reason.TRAINING_MODE: 1}


def test_a_rule_that_raises_inside_onnxscript_leaves_the_graph_as_it_was():
    """Add(p, p) with p = MatMul(a, W) (a random graph of tests/onnx/graphs.py drew it): onnxscript 0.7's
    MatMul+Add→Gemm rule writes Gemm(a, W, p) and then refuses to remove p's MatMul, which the Gemm reads
    (a ValueError inside onnx_ir)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.onnx.ir import OnnxModel
    from graphopt.passes.onnx.onnxscript_rules import matmul_add_to_gemm
    from graphopt.engine.rules import Reason
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["p"]), helper.make_node("Add", ["p", "p"], ["y"])], "doubled",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w])
    model = OnnxModel.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"a": rng.standard_normal((1, 4)).astype(np.float32)}
    expected = model.run(feeds)
    result = matmul_add_to_gemm().run(model)
    assert result.modified or result.stats["reasons"] == {Reason.UNSUPPORTED_FORM: 1}
    np.testing.assert_allclose(result.module.run(feeds)[0], expected[0], rtol=1e-6)
