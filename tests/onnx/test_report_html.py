"""The HTML report: table and plots, and that headless Chromium renders it."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.report_html import load_report

from .helpers import save


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (3, 1, 3, 3)), ("g", (3,)), ("b", (3,)), ("m", (3,)), ("fc", (48, 8)), ("c", (8,)))]
    inits.append(numpy_helper.from_array(np.ones(3, np.float32), "v"))
    inits.append(numpy_helper.from_array(np.array([-1, 48], np.int64), "s"))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), helper.make_node("Reshape", ["r", "s"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["y"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp)
    result = graphopt.optimize_onnx(src, tmp / "out.onnx", level="O2", progress=False)
    result.meta["levels"] = [{"level": "O1", "latency_ms": 1.0, "max_rel_err": 1e-7},
                             {"level": "O2", "latency_ms": 0.5, "max_rel_err": 1e-2}]
    return result


def test_html_has_the_pass_table_and_three_plots(tmp_path, report):
    path = report.to_html(tmp_path / "r.html")
    text = path.read_text()
    for record in report.records:
        assert f"<td>{record.name}</td>" in text
    assert text.count("data:image/png;base64,") == 3     # waterfall, per-layer error, accuracy/latency


def test_saved_run_loads_back(tmp_path, report):
    (tmp_path / "run.json").write_text(report.to_json())
    loaded = load_report(tmp_path / "run.json")
    assert str(loaded) == str(report)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_headless_chromium_renders_it(tmp_path, report):
    path = report.to_html(tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", path.as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1600, 1200)
    rows_with_ink = (pixels[..., :3].std(axis=1).mean(axis=1) > 0.01).mean()
    assert rows_with_ink > 0.3       # text and plots down the page, not a blank or error page
