"""export_onnx: optimized torch models (float and int8) round-trip through ONNX Runtime within tolerance."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.onnx.export import TOLERANCES
from graphopt.engine.verify import LOSSLESS_REL_TOL, Budget
from graphopt.data.zoo import DigitsResNet

from .helpers import cosine, rel_err

FAST = dict(measure_latency=False, progress=False)


def _ort(path, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), feeds)})


def _dims(path):
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]


def _initializer_bytes(path):
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = DigitsResNet(width=8, hidden=32).eval()
    return model, (torch.rand(4, 1, 8, 8),)


def test_float_export_round_trips_with_a_dynamic_batch(tmp_path, cnn):
    """A lazy optimized module (captured by the export itself) round-trips at another batch size."""
    model, inputs = cnn
    opt = graphopt.optimize(model, level="O1", **FAST)
    path = graphopt.export_onnx(opt, inputs, tmp_path / "cnn.onnx")
    assert opt.captured
    assert _dims(path) == [["batch", 1, 8, 8]]
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output"]   # not the exporter's `linear_1`
    x = torch.rand(7, 1, 8, 8)                     # another batch size than the example's
    (got,) = _ort(path, [x.numpy()])
    assert rel_err(got, model(x).detach().numpy()) <= LOSSLESS_REL_TOL
    assert {n.domain for n in onnx.load(str(path)).graph.node} == {""}


#: The product each scheme is exported as (graphopt.onnx.translations): W8A8 as uint8 × uint8
#: MatMulInteger (zero points 128, exact int32), weight-only as DequantizeLinear + MatMul.
PRODUCT = {"int8-dynamic": ("MatMulInteger", onnx.TensorProto.UINT8),
           "int8-static": ("MatMulInteger", onnx.TensorProto.UINT8),
           "int8-weight-only": ("DequantizeLinear", onnx.TensorProto.INT8)}


@pytest.mark.parametrize("scheme", list(PRODUCT))
def test_int8_export_uses_standard_ops_and_8_bit_initializers(tmp_path, scheme):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32)).eval()
    inputs = (torch.randn(8, 64),)
    calibration = [(torch.randn(8, 64),) for _ in range(2)] if scheme == "int8-static" else None
    opt = graphopt.optimize(model, inputs, level="O2", quantize=scheme, calibration_data=calibration, **FAST)
    assert any("graphopt." in str(n.target) for n in opt.graph_module.graph.nodes)
    path = graphopt.export_onnx(opt, inputs, tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} == {""}
    op_type, weight_type = PRODUCT[scheme]
    assert sum(n.op_type == op_type for n in proto.graph.node) == 2
    if scheme == "int8-dynamic":   # activations quantized straight to uint8: one QuantizeLinear, no shift
        producers = {o: n for n in proto.graph.node for o in n.output}
        for matmul in (n for n in proto.graph.node if n.op_type == "MatMulInteger"):
            assert producers[matmul.input[0]].op_type == "QuantizeLinear"
    export_passes = {row["name"]: row for row in opt.report.meta["export_passes"]}
    assert not any(row["rolled_back"] for row in export_passes.values()), export_passes
    assert "onnx_constant_folding" in export_passes and "onnx_dead_nodes" in export_passes
    weights = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type == weight_type and i.dims)
    assert weights == 64 * 256 + 256 * 32
    float_path = graphopt.export_onnx(model, inputs, tmp_path / "float.onnx")
    assert _initializer_bytes(path) < 0.3 * _initializer_bytes(float_path)   # ~¼ of fp32, plus scales and biases
    x = torch.randn(5, 64)                             # another batch size than the example's
    want = opt(x).detach().numpy()
    budget = TOLERANCES[scheme]
    # basic (exact) optimizations: the file's meaning; all: what a user runs (ORT's MatMulNBits fusion
    # quantizes the activations of weight-only DequantizeLinear + MatMul, so only W8A8 is held to it)
    levels = [ort.GraphOptimizationLevel.ORT_ENABLE_BASIC] + \
        [ort.GraphOptimizationLevel.ORT_ENABLE_ALL] * (op_type == "MatMulInteger")
    for level in levels:
        (got,) = _ort(path, [x.numpy()], level)
        assert rel_err(got, want) <= budget.max_rel_err and cosine(got, want) >= budget.min_cosine, level


class _Quantize(torch.nn.Module):
    def forward(self, x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.graphopt.quantize_per_token(x, smooth)


def test_per_token_quantization_exports_to_the_same_int8_values(tmp_path):
    """QuantizeLinear (axis 0) divides and rounds half to even as the torch op: identical int8, equal scales."""
    torch.manual_seed(2)
    x = torch.randn(6, 48) * torch.logspace(-3, 2, 48)
    smooth = torch.rand(48) + 0.5
    path = graphopt.export_onnx(_Quantize(), (x, smooth), tmp_path / "q.onnx")
    x = torch.randn(300, 48) * torch.logspace(-3, 2, 48)
    x[0, :8] = torch.arange(8) - 3.5                  # .5 after the divide: ties to even
    x[1] = 0                                          # an all-zero row: the scale floor
    q, scale = _Quantize()(x, torch.ones(48))
    got_q, got_scale = _ort(path, [x.numpy(), np.ones(48, np.float32)])
    assert got_q.dtype == np.int8
    np.testing.assert_array_equal(got_q, q.numpy())
    np.testing.assert_array_equal(got_scale, scale.numpy())


def _tiny_bert(seed: int, hidden: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 1-layer Hugging Face BERT (2 heads, FFN 2 × hidden, 100 tokens) and a 2 × 12 token batch."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * hidden, vocab_size=100)
    kwargs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return transformers.BertModel(config).eval(), kwargs


def test_int8_transformer_export_runs_at_another_batch(tmp_path):
    """3-D activations flattened to batch × tokens rows: the per-token scales follow the dynamic batch."""
    model, kwargs = _tiny_bert(seed=3, hidden=64)
    opt = graphopt.optimize(model, (), example_kwargs=kwargs, level="O2", quantize="int8-dynamic", **FAST)
    path = graphopt.export_onnx(opt, (), tmp_path / "bert.onnx", example_kwargs=kwargs)
    assert [dims[0] for dims in _dims(path)] == ["batch", "batch"]
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["last_hidden_state", "pooler_output"]
    int8_linears = sum(n.target == torch.ops.graphopt.int8_linear.default for n in opt.graph_module.graph.nodes)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MatMulInteger") == int8_linears > 0
    ids, mask = torch.randint(0, 100, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    want = opt(input_ids=ids, attention_mask=mask).last_hidden_state.detach().numpy()
    budget = TOLERANCES["int8-dynamic"]
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _ort(path, [ids.numpy(), mask.numpy()], level)[0]
        assert rel_err(got, want) <= budget.max_rel_err and cosine(got, want) >= budget.min_cosine, level


class _TwoSequences(torch.nn.Module):
    """An encoder-decoder's inputs in miniature: two token inputs of independent lengths, one embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        memory = self.embed(input_ids)
        return self.embed(decoder_input_ids) @ memory.transpose(1, 2)


def test_independent_sequence_lengths_keep_distinct_axis_names(tmp_path):
    """Naming both token inputs' axis 1 `sequence` told ONNX Runtime the two lengths are equal: it reused one
    buffer for both embeddings and failed on BART ({2,4,32} != {2,8,32})."""
    torch.manual_seed(0)
    model = _TwoSequences().eval()
    kwargs = {"input_ids": torch.randint(0, 50, (2, 8)), "decoder_input_ids": torch.randint(0, 50, (2, 4))}
    path = graphopt.export_onnx(model, (), tmp_path / "two.onnx", example_kwargs=kwargs)
    assert _dims(path) == [["batch", "sequence"], ["batch", "decoder_input_ids_1"]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, encoder, decoder in ((2, 8, 4), (3, 5, 9)):
        ids = {"input_ids": torch.randint(0, 50, (batch, encoder)),
               "decoder_input_ids": torch.randint(0, 50, (batch, decoder))}
        got = session.run(None, {k: v.numpy() for k, v in ids.items()})[0]
        np.testing.assert_allclose(got, model(**ids).detach().numpy(), rtol=1e-5, atol=1e-5)


class _Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"scores": x * 2, "extra": (x + 1, x.relu())}


def test_outputs_are_named_after_the_models_keys_or_as_asked(tmp_path):
    x = torch.randn(3, 4)
    path = graphopt.export_onnx(_Nested(), (x,), tmp_path / "keys.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["scores", "extra_0", "extra_1"]
    path = graphopt.export_onnx(_Nested(), (x,), tmp_path / "asked.onnx", output_names=["s", "plus", "relu"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["s", "plus", "relu"]
    got = dict(zip(["s", "plus", "relu"], session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    np.testing.assert_array_equal(got["plus"], (x + 1).numpy())    # the names sit on the right outputs
    np.testing.assert_array_equal(got["relu"], x.relu().numpy())
    with pytest.raises(graphopt.InputError, match=r"3 distinct.*\['scores', 'extra_0', 'extra_1'\]"):
        graphopt.export_onnx(_Nested(), (x,), tmp_path / "bad.onnx", output_names=["a", "a", "b"])
    assert not (tmp_path / "bad.onnx").exists()


def test_a_mismatch_raises_with_the_output_name_and_error_and_writes_nothing(tmp_path, cnn):
    model, inputs = cnn
    with pytest.raises(graphopt.VerificationError, match=r"output '.*' differs .*max abs err"):
        graphopt.export_onnx(model, inputs, tmp_path / "x.onnx", tolerance=Budget(max_rel_err=-1.0))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_clear_errors(tmp_path, cnn):
    model, inputs = cnn
    with pytest.raises(graphopt.InputError, match="tuple"):
        graphopt.export_onnx(model, inputs[0], tmp_path / "x.onnx")
    with pytest.raises(graphopt.InputError, match="nn.Module"):
        graphopt.export_onnx("model.pt", inputs, tmp_path / "x.onnx")


def test_int8_export_budget_widens_with_the_modules_own_error_and_still_catches_a_wrong_translation(
        tmp_path, monkeypatch):
    """The tolerance grows with the int8 module's distance to the float model (2e, cos 2θ), never
    enough to pass an export whose integer product is wrong."""
    from graphopt.onnx import export as export_module
    from graphopt.onnx import translations
    torch.manual_seed(4)
    layers = [m for _ in range(8) for m in (torch.nn.Linear(48, 48), torch.nn.LayerNorm(48))]
    model = torch.nn.Sequential(*layers).eval()
    inputs = (torch.randn(16, 48),)
    opt = graphopt.optimize(model, inputs, level="O2", quantize="int8-dynamic", **FAST)
    final, floor = opt.report.final, TOLERANCES["int8-dynamic"]
    budget = export_module._budget(opt, "int8-dynamic")
    assert budget.max_rel_err == max(floor.max_rel_err, 2 * final.max_rel_err)
    assert budget.min_cosine == pytest.approx(min(floor.min_cosine, 2 * final.min_cosine ** 2 - 1))
    graphopt.export_onnx(opt, inputs, tmp_path / "ok.onnx")

    def off_by_one_weight(op, q):            # a translation bug: codes shifted by 127 instead of 128
        return op.Cast(op.Add(op.Cast(q, to=6), op.Constant(value=onnx.helper.make_tensor(
            "shift", onnx.TensorProto.INT32, [], [127]))), to=2)
    monkeypatch.setattr(translations, "_to_uint8", off_by_one_weight)
    monkeypatch.setattr(translations, "_codes_uint8", off_by_one_weight)    # and on the activations
    with pytest.raises(graphopt.VerificationError, match="differs from the torch module"):
        graphopt.export_onnx(opt, inputs, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_default_opset_keeps_float_files_usable_by_onnx_runtime_quantization(tmp_path):
    """Float exports stay at opset 20 (ORT's quantize_dynamic mistakes an opset-23 Attention for its own
    contrib op); int8 exports take opset 23 where onnxruntime runs its Attention op."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from graphopt.onnx.export import default_opset
    model, kwargs = _tiny_bert(seed=5, hidden=32)
    opt = graphopt.optimize(model, (), example_kwargs=kwargs, level="O1", **FAST)
    path = graphopt.export_onnx(opt, (), tmp_path / "float.onnx", example_kwargs=kwargs)
    assert onnx.load(str(path)).opset_import[0].version == 20 == default_opset(None)
    quantize_dynamic(str(path), str(tmp_path / "ort_int8.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    _ort(tmp_path / "ort_int8.onnx", [kwargs["input_ids"].numpy(), kwargs["attention_mask"].numpy()])
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    assert default_opset("int8-dynamic") == (23 if (major, minor) >= (1, 23) else 20)
