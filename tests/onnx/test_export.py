"""export_onnx: optimized torch models (float and int8) round-trip through ONNX Runtime within tolerance."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.onnx.export import TOLERANCES
from graphopt.verify import LOSSLESS_REL_TOL, Budget
from graphopt.zoo import DigitsResNet

from .helpers import cosine, rel_err

FAST = dict(measure_latency=False, progress=False)


def _ort(path, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), feeds)})


def _dims(path):
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input]


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
    x = torch.rand(7, 1, 8, 8)                     # another batch size than the example's
    (got,) = _ort(path, [x.numpy()])
    assert rel_err(got, model(x).detach().numpy()) <= LOSSLESS_REL_TOL
    assert {n.domain for n in onnx.load(str(path)).graph.node} == {""}


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight-only"])
def test_int8_export_uses_standard_ops_and_int8_initializers(tmp_path, scheme):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32)).eval()
    inputs = (torch.randn(8, 64),)
    opt = graphopt.optimize(model, inputs, level="O2", quantize=scheme, **FAST)
    assert any("graphopt." in str(n.target) for n in opt.graph_module.graph.nodes)
    path = graphopt.export_onnx(opt, inputs, tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} == {""}
    int8 = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8)
    assert int8 == 64 * 256 + 256 * 32
    float_path = graphopt.export_onnx(model, inputs, tmp_path / "float.onnx")
    assert path.stat().st_size < 0.3 * float_path.stat().st_size     # ~¼ of fp32, plus scales and biases
    x = torch.randn(5, 64)   # basic (exact) optimizations: the file's meaning, not ORT's lossy MatMulNBits fusion
    (got,) = _ort(path, [x.numpy()], ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    want = opt(x).detach().numpy()
    budget = TOLERANCES[scheme]
    assert rel_err(got, want) <= budget.max_rel_err and cosine(got, want) >= budget.min_cosine


def test_token_inputs_get_dynamic_batch_and_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    path = graphopt.export_onnx(model, (), tmp_path / "bert.onnx", example_kwargs=kwargs)
    assert _dims(path) == [["batch", "sequence"], ["batch", "sequence"]]
    ids = torch.randint(0, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    got = _ort(path, [ids.numpy(), mask.numpy()])
    want = model(input_ids=ids, attention_mask=mask)
    assert rel_err(got[0], want.last_hidden_state.detach().numpy()) <= LOSSLESS_REL_TOL


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
