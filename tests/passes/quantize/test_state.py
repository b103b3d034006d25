"""Quantized module state: int8 bytes (~4× smaller), state_dict round trip, torch.export."""
import io

import torch
import torch.nn as nn

import graphopt
from tests.passes.quantize.helpers import QUIET, int8_record


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


def test_parameter_bytes_drop_about_four_times():
    x = torch.randn(8, 128)
    opt = graphopt.optimize(mlp(0), (x,), quantize="int8-dynamic", **QUIET)
    report = opt.report
    # int8 weights (1 byte) + a float32 scale per output channel; biases stay float32
    assert report.baseline.param_bytes / report.final.param_bytes > 3.5
    weights = int8_record(opt).stats["weight_bytes"]
    assert weights["before"] / weights["after"] > 3.9
    assert any(b.dtype == torch.int8 for b in opt.graph_module.buffers())


def test_state_dict_saves_and_reloads():
    x = torch.randn(8, 128)
    a = graphopt.optimize(mlp(0), (x,), quantize="int8-dynamic", calibration_data=[x], **QUIET)
    b = graphopt.optimize(mlp(1), (x,), quantize="int8-dynamic", calibration_data=[x], **QUIET)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert any(t.dtype == torch.int8 for t in state.values())
    b.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_quantized_module_survives_torch_export_with_dynamic_batch():
    x = torch.randn(8, 4, 128)
    for scheme in ("int8-dynamic", "int8-static", "int8-weight-only"):
        opt = graphopt.optimize(mlp(0), (x,), quantize=scheme, calibration_data=[x], **QUIET)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(opt.graph_module, (x,), dynamic_shapes=({0: batch},), strict=False)
        assert any("graphopt" in str(n.target) for n in exported.graph.nodes)
        module = exported.module()
        for rows in (8, 3):
            y = torch.randn(rows, 4, 128)
            with torch.no_grad():
                assert torch.allclose(module(y), opt(y), rtol=0, atol=0), scheme
