"""The HTML report: table and plots, and that headless Chromium renders it."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.report import load_report

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
    result = graphopt.optimize_onnx(src, tmp / "out.onnx", level="O2", progress=False,
                                    speed_check=False)   # int8 on this tiny graph may be slower: the plots need it
    result.meta["levels"] = [{"level": "O1", "latency_ms": 1.0, "max_rel_err": 1e-7},
                             {"level": "O2", "latency_ms": 0.5, "max_rel_err": 1e-2}]
    return result


@pytest.fixture(scope="module")
def pruned_report():
    """A real O3 run: pruning records its groups as a dict in stats["layers"] (it crashed the page once)."""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    opt = graphopt.optimize(model, (x,), level="O3", prune=0.5, quantize=None, progress=False)
    assert any(isinstance(r.stats.get("layers"), dict) for r in opt.report.records if r.modified)
    return opt.report


def test_a_pruned_run_renders_with_its_groups(tmp_path, pruned_report):
    text = pruned_report.to_html(tmp_path / "pruned.html").read_text()
    assert "structured_pruning" in text and text.count("data:image/png;base64,") >= 2
    assert "prune None" not in text and "<th>pruning</th><td>0.5</td>" in text


def test_header_values_are_words_and_sizes_share_one_unit(tmp_path, report):
    text = report.to_html(tmp_path / "r.html").read_text()
    assert "<th>int8 scheme</th><td>int8-dynamic</td>" in text
    assert "<th>verified after every pass</th><td>yes</td>" in text
    units = {u for u in ("KiB", "MiB") if f" {u}<" in text or f" {u} " in text}
    assert units == {report.size_unit}, units


def test_export_passes_read_as_phrases_not_dicts(tmp_path):
    from graphopt.report import Report
    report = Report(meta={"export_passes": [
        {"name": "onnx_constant_folding", "modified": True, "rolled_back": False, "matches": {"folded node": 6}},
        {"name": "onnx_skip_padding", "modified": False, "rolled_back": False, "matches": {}}]})
    text = report.to_html(tmp_path / "r.html").read_text()
    assert "onnx_constant_folding: changed (folded node×6); onnx_skip_padding: no change" in text
    assert "{&#x27;name&#x27;" not in text and "'name'" not in text


def test_a_rolled_back_pass_is_said_prominently(tmp_path, report):
    import copy
    rolled = copy.deepcopy(report)
    rolled.records[-1].rolled_back = True
    rolled.records[-1].reason = "output cosine 0.93 < 0.99 (budget: output cosine ≥ 0.99); rolled back"
    rolled.meta["outcome"] = ["int8-dynamic was requested but ROLLED BACK: output cosine 0.93 < 0.99"]
    text = rolled.to_html(tmp_path / "rolled.html").read_text()
    assert "class='summary problem'" in text and "<b>not done</b>" in text and "<h2>Rolled back</h2>" in text


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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("which", ["report", "pruned_report"])
def test_headless_chromium_renders_it(tmp_path, request, which):
    path = request.getfixturevalue(which).to_html(tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1600, 1200)
    rows_with_ink = (pixels[..., :3].std(axis=1).mean(axis=1) > 0.01).mean()
    assert rows_with_ink > 0.3       # text and plots down the page, not a blank or error page
