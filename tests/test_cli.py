"""The `graphopt` command line, run as a subprocess end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def graphopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _onnx_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Identity", ["a"], ["i"]), helper.make_node("Relu", ["i"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_optimize_onnx_file_end_to_end_with_report_and_saved_run(tmp_path):
    src = _onnx_model(tmp_path / "in.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32))
    result = graphopt("optimize", str(src), "-o", "out.onnx", "--int8", "static", "--calibration", str(calib),
                      "--report", "report.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "onnx_int8_static" in result.stdout
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["meta"]["quantize"] == "int8-static"
    shown = graphopt("report", "report.json", "--html", "again.html", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "onnx_int8_static" in shown.stdout and (tmp_path / "again.html").exists()


def test_optimize_torch_factory_end_to_end(tmp_path):
    result = graphopt("optimize", "tests.onnx.models:small_mlp", "-o", str(tmp_path / "mlp.onnx"), "--level", "O1",
                      cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert [n.op_type for n in onnx.load(str(tmp_path / "mlp.onnx")).graph.node] == ["Gemm", "Relu", "Gemm"]


@pytest.mark.parametrize("args,message", [
    (["optimize", "missing.onnx", "-o", "out.onnx"], "no such ONNX file"),
    (["optimize", "in.onnx", "-o", "in.onnx"], "--force"),
    (["optimize", "in.onnx", "-o", "out.onnx", "--prune", "0.5"], "--prune needs a torch model"),
    (["optimize", "in.onnx", "-o", "out.onnx", "--int8", "static"], "calibration"),
    (["optimize", "nosuchpackage.mod:factory", "-o", "out.onnx"], "cannot load"),
    (["optimize", "corrupt.onnx", "-o", "out.onnx"], "truncated or corrupted"),
    (["report", "nothing.json"], "not a saved graphopt run"),
])
def test_failures_exit_non_zero_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    """In-process `main()` (the subprocess tests above cover the entry point itself)."""
    _onnx_model(tmp_path / "in.onnx")
    (tmp_path / "corrupt.onnx").write_bytes((tmp_path / "in.onnx").read_bytes()[:100])
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:") and message in lines[0], lines
    assert not (tmp_path / "out.onnx").exists()


def test_unexpected_failures_are_one_line_too(tmp_path, monkeypatch, capsys):
    src = _onnx_model(tmp_path / "in.onnx")
    monkeypatch.setattr("graphopt.onnx.optimize_onnx", lambda *a, **k: 1 / 0)
    assert main(["optimize", str(src), "-o", str(tmp_path / "out.onnx")]) == 1
    assert capsys.readouterr().err.strip() == "graphopt: ZeroDivisionError: division by zero"


def test_usage_errors_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "in.onnx"])         # no -o
    assert exit_info.value.code == 2 and "-o" in capsys.readouterr().err
