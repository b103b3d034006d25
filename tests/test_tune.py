"""graphopt.tune: a real search (optimize + finetune per trial, scored, timed against the original by the
project's interleaved timer), resumable, failures recorded, the budget always respected."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt.cli import main as cli
from tests.tune_models import agreement, mlp, quick

#: A narrow space over the MLP (lossless or int8, two schemes): trials are real optimize runs (~1-2 s each on
#: 2 cores), and repeats of a config reuse its result, so the tests stay fast.
MLP_SPACE = {"level": ["O1", "O2"], "quantize": ["int8-dynamic", "int8-weight-only"],
             "float.fc1": None, "float.fc2": None, "float.out": None}


def test_digits_tune_finds_a_config_within_budget_faster_than_o1():
    from graphopt.zoo import accuracy, batches, trained_digits_resnet
    torch.manual_seed(0)
    model, data = trained_digits_resnet()
    example = (data.x_test[:256],)
    calibration = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 64, seed=1)][:4]
    train = list(batches(data.x_train, data.y_train, 64, seed=2))

    def evaluate(module):
        return accuracy(module, data.x_test, data.y_test)

    space = {"level": ["O1", "O3"], "quantize": [None], "prune_mode": ["flops"], "prune": (0.45, 0.6),
             "prune_options.criterion": ["l2"], "prune_options.sensitivity": [False], "finetune.epochs": (2, 3)}
    result = graphopt.tune(model, example, evaluate=evaluate, accuracy_budget=0.5, trials=3, seed=0,
                           search_space=space, calibration_data=calibration, train_data=train,
                           speed_check={"min_rounds": 10, "max_rounds": 20, "max_seconds": 5.0}, progress=False)
    rows = {r["trial"]: r for r in result.trials}
    assert rows[0]["config"]["level"] == "O1" and rows[0]["state"] == "complete"   # the lossless baseline
    assert result.best_trial != 0, result.trials
    best = rows[result.best_trial]
    # within budget: scored again here, not read from the study
    assert evaluate(result.best) >= result.reference_score - 0.5
    # the structure that makes it faster: fewer parameters, channels pruned and fine-tuned
    assert best["config"]["prune"] is not None and best["finetune"]["epochs"] >= 2
    assert best["size_bytes"] < rows[0]["size_bytes"]
    # both latencies are the interleaved timer's ratio to the original (at least min_rounds paired rounds)
    for row in (best, rows[0]):
        assert row["verdict"] and row["latency_ratio"] > 0
    assert best["latency_ratio"] < rows[0]["latency_ratio"]
    # the config rebuilds the same module (finetune is deterministic for its seed)
    from graphopt import recipe
    rebuilt = recipe.build(model, example, result.config, result.finetune, calibration_data=calibration,
                           train_data=train)
    torch.testing.assert_close(rebuilt(data.x_test), result.best(data.x_test))


def test_resume_continues_the_same_study(tmp_path):
    model, example = mlp()
    storage = tmp_path / "study.db"
    lines: list[str] = []
    first = graphopt.tune(model, example, evaluate=agreement, accuracy_budget=1.0, trials=2, storage=storage,
                          study_name="s", search_space=MLP_SPACE, speed_check=quick(), progress=lines.append)
    assert len(first.trials) == 2
    second = graphopt.tune(model, example, evaluate=agreement, accuracy_budget=1.0, trials=4, storage=storage,
                           study_name="s", search_space=MLP_SPACE, speed_check=quick(), progress=lines.append)
    assert [r["trial"] for r in second.trials] == [0, 1, 2, 3]
    assert [r["params"] for r in second.trials[:2]] == [r["params"] for r in first.trials]
    assert sum(line.startswith("trial") for line in lines) == 4   # the second call ran only the missing two
    with pytest.raises(graphopt.OptionError, match="was run with"):   # a study measures one setting
        graphopt.tune(model, example, evaluate=agreement, accuracy_budget=2.0, trials=5, storage=storage,
                      study_name="s", search_space=MLP_SPACE, speed_check=quick(), progress=False)


def test_a_raising_trial_is_recorded_as_failed_and_the_search_goes_on():
    model, example = mlp()
    calls = []

    def evaluate(module):
        calls.append(1)
        if len(calls) == 3:   # 1: the original, 2: trial 0, 3: trial 1
            raise RuntimeError("evaluation crashed")
        return agreement(module)

    lines: list[str] = []
    result = graphopt.tune(model, example, evaluate=evaluate, accuracy_budget=5.0, trials=3, search_space=MLP_SPACE,
                           speed_check=quick(), progress=lines.append)
    states = [r["state"] for r in result.trials]
    assert states[1] == "fail" and "RuntimeError: evaluation crashed" in result.trials[1]["note"]
    assert states[0] == states[2] == "complete"
    assert "FAILED: RuntimeError: evaluation crashed" in lines[2]
    assert result.best is not None and result.best_trial != 1


@settings(max_examples=3)
@given(budget=st.sampled_from([0.0, 0.4, 2.0, 10.0]), seed=st.integers(0, 3))
def test_the_returned_model_respects_the_budget(budget, seed):
    model, example = mlp()
    space = {**MLP_SPACE, "float.fc2": [False, True]}
    result = graphopt.tune(model, example, evaluate=agreement, accuracy_budget=budget, trials=3, seed=seed,
                           search_space=space, speed_check=quick(), progress=False)
    assert result.best is not None   # the O1 trial is lossless: always within budget
    assert agreement(result.best) >= result.reference_score - budget
    completed = [r for r in result.trials if r["state"] == "complete"]
    assert all(r["drop"] <= budget for r in completed)
    assert all(r["drop"] > budget for r in result.trials if r["state"] == "pruned")
    assert min(r["latency_ratio"] for r in completed) == result.best_row["latency_ratio"]
    # result.config reproduces result.best through graphopt.optimize itself
    again = graphopt.optimize(model, example, **result.config)
    torch.testing.assert_close(again(example[0]), result.best(example[0]))


def test_bad_options_are_clear_errors():
    model, example = mlp()
    with pytest.raises(graphopt.OptionError, match="accuracy_budget"):
        graphopt.tune(model, example, evaluate=agreement, accuracy_budget=-1)
    with pytest.raises(graphopt.OptionError, match="objectives"):
        graphopt.tune(model, example, evaluate=agreement, accuracy_budget=1, objectives=("speed",))
    with pytest.raises(graphopt.OptionError, match="target"):
        graphopt.tune(model, example, evaluate=agreement, accuracy_budget=1, target="tensorrt")
    with pytest.raises(graphopt.OptionError, match="search_space"):
        graphopt.tune(model, example, evaluate=agreement, accuracy_budget=1, search_space={"prune": (0.5, 0.1)})
    with pytest.raises(graphopt.InputError, match="finite number"):
        graphopt.tune(model, example, evaluate=lambda m: "good", accuracy_budget=1)


def test_cli_tune_on_onnxruntime_then_optimize_with_the_config(tmp_path, capsys):
    (tmp_path / "models.py").write_text("from tests.tune_models import agreement, mlp\n")
    models = str(tmp_path / "models.py")
    best, report = tmp_path / "best.json", tmp_path / "tune.html"
    args = ["tune", f"{models}:mlp", "--eval", f"{models}:agreement", "--budget", "2", "--trials", "2",
            "--target", "onnxruntime", "-o", str(best), "--report", str(report)]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert err.count("best so far") == 2
    saved = json.loads(best.read_text())
    assert saved["target"] == "onnxruntime" and saved["optimize"]["level"] in ("O1", "O2", "O3")
    assert (tmp_path / "best.tune.db").exists()   # the study, beside the output
    page = report.read_text()
    assert "Pareto" in page and "data:image/png;base64" in page and "<table>" in page
    assert cli(args) == 0                          # the same command resumes: nothing left to run
    assert "trial " not in capsys.readouterr().err.replace("trial(s)", "")
    onnx = tmp_path / "out.onnx"
    assert cli(["optimize", f"{models}:mlp", "--config", str(best), "-o", str(onnx), "--quiet"]) == 0
    from graphopt import recipe
    model, example = mlp()
    config, _ = recipe.load(best)
    expected = graphopt.optimize(model, example, **config)(example[0])
    from graphopt.onnx.ir import session
    got = session(onnx).run(None, {session(onnx).get_inputs()[0].name: example[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)

