"""The sweep's fast subset: every stage ok on a tiny encoder and a tiny CNN, float stages lossless."""
from __future__ import annotations

import pytest

from bench import sweep
from graphopt.engine.verify import LOSSLESS_REL_TOL

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sweep.FAST)
def test_fast_subset_passes_every_stage(name):
    row = sweep.run_model(name)
    assert {stage: row[stage] for stage in sweep.STAGES} == {stage: "ok" for stage in sweep.STAGES}
    assert row["O1 err"] <= LOSSLESS_REL_TOL                      # O1 is lossless
    assert all(isinstance(row[f"{stage} s"], float) for stage in sweep.STAGES)


def test_a_failure_is_a_row_with_the_first_line_of_the_error(monkeypatch):
    """A stage that raises records the error's class and first line; the next stages still run."""
    import graphopt

    def refuse(*args, **kwargs):
        raise graphopt.ExportError("the runtime refused it\nsecond line")
    monkeypatch.setattr(graphopt, "export_onnx", refuse)
    row = sweep.run_model("resnet", stages=("O1", "export_onnx"))
    assert row["O1"] == "ok"
    assert row["export_onnx"] == "ExportError: the runtime refused it"
    assert row["export_onnx err"] is None


def test_timeout_is_a_row(tmp_path):
    """The stage a model was in when its time ran out says so; the stages after it did not run."""
    row = sweep.run_isolated("bert", ("O1", "O2"), timeout_s=0.5)
    assert row["O1"].startswith("timed out after")
    assert row["O2"] == "not run"
