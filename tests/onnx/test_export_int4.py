"""export_onnx of int4 weight-only modules: block-wise DequantizeLinear with 4-bit initializers."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import InputError
from graphopt.onnx.export import TOLERANCES
from graphopt.engine.verify import compare

QUIET = dict(measure_latency=False, progress=False, verify_samples=1)
FOUR_BIT = (onnx.TensorProto.UINT4, onnx.TensorProto.INT4)
#: The issue's bound for int4 weights against fp32 (scales and zero points included).
MAX_INT4_FRACTION = 0.30


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@pytest.fixture(scope="module")
def int4_mlp():
    """K = 71 (odd: a padding nibble, a partial last group of 32) and 96; the head int4 too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(71, 96), nn.ReLU(), nn.Linear(96, 40)).eval()
    opt = graphopt.optimize(model, (torch.randn(4, 71),), quantize="int4-weight-only",
                            quantize_options={"head": "int4", "group_size": 32}, **QUIET)
    return model, opt


@pytest.fixture(scope="module")
def int4_file(int4_mlp, tmp_path_factory):
    _, opt = int4_mlp
    return graphopt.export_onnx(opt, (torch.randn(4, 71),), tmp_path_factory.mktemp("int4") / "mlp.onnx")


def test_int4_file_keeps_int4_size(int4_mlp, int4_file):
    model, opt = int4_mlp
    proto = onnx.load(str(int4_file))
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in dq)
    four_bit = [i for i in proto.graph.initializer if i.data_type in FOUR_BIT]
    assert len(four_bit) == 4                                     # codes and zero points of both layers
    initializer_bytes = sum(len(i.raw_data) for i in proto.graph.initializer)
    # the module's uint8 zero points are 4-bit in the file: never more bytes than the int4 module holds
    assert initializer_bytes <= _param_bytes(opt.graph_module)
    assert int4_file.stat().st_size <= MAX_INT4_FRACTION * _param_bytes(model)
    record = next(r for r in opt.report.meta["export_passes"] if r["name"] == "onnx_int4_weights")
    assert record["modified"] and not record["rolled_back"] and record["matches"]["4-bit weight"] == 2


@pytest.mark.parametrize("batch", [1, 6])
def test_int4_file_matches_the_module(int4_mlp, int4_file, batch):
    """At ONNX Runtime's default level (the file as users run it), at two batch sizes other than the example's."""
    _, opt = int4_mlp
    x = torch.randn(batch, 71, generator=torch.Generator().manual_seed(batch))
    sess = ort.InferenceSession(str(int4_file), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = opt(x)
    reason = TOLERANCES["int4-weight-only"].check(compare(torch.from_numpy(got), want))
    assert reason is None, reason


def test_int4_below_opset_21_is_refused(int4_mlp, tmp_path):
    _, opt = int4_mlp
    with pytest.raises(InputError, match="opset 21"):
        graphopt.export_onnx(opt, (torch.randn(4, 71),), tmp_path / "old.onnx", opset=20)
    assert not (tmp_path / "old.onnx").exists()
