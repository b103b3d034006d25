"""export_onnx's speed check: an int8 file measurably slower than the float export of the same model is
replaced by the float export (with a warning and a report line); otherwise the int8 file stays. The timer
is injected (deterministic: this tests the decision, not the machine's speed)."""
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import OptionError
from graphopt.engine.speed import SpeedCheck
from graphopt.engine.timing import Interleaved

QUIET = {"measure_latency": False, "progress": False, "verify_samples": 1}


def fixed_ratio(after_over_before: float) -> SpeedCheck:
    """A check whose timer reports the second file ("after": the int8 one) at a fixed multiple of the first."""
    def timer(calls, rounds: int) -> Interleaved:
        return Interleaved({"before": [1e-3] * rounds, "after": [after_over_before * 1e-3] * rounds})
    return SpeedCheck(timer=timer)


@pytest.fixture(scope="module")
def int8_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 48)
    return model, x, graphopt.optimize(model, (x,), quantize="int8-dynamic", **QUIET)


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_a_slower_int8_file_is_replaced_by_the_float_export(int8_module, tmp_path):
    model, x, opt = int8_module
    with pytest.warns(UserWarning, match="the float export was written instead"):
        path = graphopt.export_onnx(opt, (x,), tmp_path / "m.onnx", speed_check=fixed_ratio(2.0))
    assert "MatMulInteger" not in _ops(path) and _ops(path) & {"MatMul", "Gemm"}
    assert opt.report.meta["export_speed"].startswith("int8 file vs the float export in ONNX Runtime: 2.00× slower")
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):   # the float file is the model's own computation, at any batch
        xb = torch.randn(batch, 48)
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(xb).detach(), rtol=1e-4, atol=1e-5)


def test_an_int8_file_that_is_not_slower_stays(int8_module, tmp_path):
    _, x, opt = int8_module
    path = graphopt.export_onnx(opt, (x,), tmp_path / "m.onnx", speed_check=fixed_ratio(1.0))
    assert "MatMulInteger" in _ops(path)
    assert "no change" in opt.report.meta["export_speed"]


def test_bad_speed_check_options_are_clear(int8_module, tmp_path):
    _, x, opt = int8_module
    with pytest.raises(OptionError):
        graphopt.export_onnx(opt, (x,), tmp_path / "m.onnx", speed_check={"tolerance": -1})
    assert not (tmp_path / "m.onnx").exists()
