"""Bad input and safe writing: corrupted files, escaping external data, overwriting the input, atomic writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.onnx import files

from .helpers import save


def _mlp() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_model_is_a_clear_error_and_nothing_is_written(tmp_path, damage):
    src = save(_mlp(), tmp_path)
    data = src.read_bytes()
    src.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x08\x07not onnx at all" * 9,
                     "empty": b""}[damage])
    with pytest.raises(graphopt.InputError, match="model.onnx"):
        graphopt.optimize_onnx(src, tmp_path / "out.onnx", measure_latency=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_external_data_escaping_the_model_directory_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((8, 4), np.float32).tobytes())
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model = _mlp()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    onnx.save_model(model, str(model_dir / "model.onnx"))
    with pytest.raises(graphopt.InputError, match="outside the model's directory"):
        graphopt.optimize_onnx(model_dir / "model.onnx", model_dir / "out.onnx", progress=False)
    assert not (model_dir / "out.onnx").exists()


def test_external_data_inside_the_directory_loads(tmp_path):
    model = _mlp()
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.data",
                    size_threshold=0)
    report = graphopt.optimize_onnx(tmp_path / "model.onnx", tmp_path / "out.onnx", measure_latency=False,
                                    progress=False)
    assert report.final.max_rel_err == 0.0


def test_output_equal_to_input_is_refused_without_force(tmp_path):
    src = save(_mlp(), tmp_path)
    before = src.read_bytes()
    with pytest.raises(graphopt.OptionError, match="force"):
        graphopt.optimize_onnx(src, src, progress=False)
    assert src.read_bytes() == before
    graphopt.optimize_onnx(src, src, force=True, measure_latency=False, progress=False)
    onnx.checker.check_model(str(src))


def test_a_crash_while_writing_leaves_no_half_written_model(tmp_path, monkeypatch):
    """The writer dies half-way: the destination keeps its old content, no temporary file is left."""
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous")

    def dying_save(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(model.SerializeToString()[:10])
        raise OSError("disk full")
    monkeypatch.setattr(files.onnx, "save_model", dying_save)
    with pytest.raises(OSError, match="disk full"):
        files.save_model(_mlp(), dst)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_a_failed_check_leaves_nothing_behind(tmp_path):
    def reject(path):
        raise graphopt.VerificationError("outputs differ")
    with pytest.raises(graphopt.VerificationError):
        files.save_model(_mlp(), tmp_path / "out.onnx", check=reject)
    assert list(tmp_path.iterdir()) == []


def test_models_over_the_protobuf_limit_get_external_data(tmp_path, monkeypatch):
    """The 2 GB switch, exercised with the limit lowered (a real 2 GB model is too big for a unit test)."""
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 64)
    monkeypatch.setattr(files, "EXTERNAL_MIN_BYTES", 64)
    seen = []
    files.save_model(_mlp(), tmp_path / "out.onnx", check=lambda p: seen.append(onnx.load(str(p))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    loaded = files.load_model(tmp_path / "out.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.ones((8, 4), np.float32))
    assert len(seen) == 1


def test_unknown_quantize_or_pruning_options_are_clear_errors(tmp_path):
    src = save(_mlp(), tmp_path)
    with pytest.raises(graphopt.OptionError, match="quantize"):
        graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize="int4")
    with pytest.raises(graphopt.OptionError, match="calibration"):
        graphopt.optimize_onnx(src, tmp_path / "out.onnx", quantize="int8-static")
    with pytest.raises(graphopt.OptionError, match=".onnx"):
        graphopt.optimize_onnx(src, tmp_path / "out.txt")
