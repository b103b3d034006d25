"""Accuracy-aware fallback: a planted outlier layer is found, falls back, and the budget holds."""
import torch
import torch.nn as nn

import graphopt
from tests.passes.quantize.helpers import QUIET, cosine, int8_record


def planted_model():
    """Four linears; the input of `3` has one channel ~1000× the rest while `3`'s weight column
    for it is 1000× smaller (the outlier pattern of large transformers): the float output is
    ordinary, but per-token int8 of that input rounds every other channel to 0, so `3` is
    by far the most sensitive layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 16)).eval()
    with torch.no_grad():
        model[2].weight[5] *= 1000.0
        model[2].bias[5] = 1000.0
        model[3].weight[:, 5] /= 1000.0
    return model


def calibration():
    return [torch.randn(16, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_planted_outlier_layer_falls_back_and_budget_holds():
    model, data = planted_model(), calibration()
    opt = graphopt.optimize(model, (data[0],), quantize="int8-dynamic", calibration_data=data,
                            accuracy_budget=0.001, quantize_options={"smoothquant": False}, **QUIET)
    record = int8_record(opt)
    assert not record.rolled_back, record.reason
    layers = {row["layer"]: row for row in record.stats["layers"]}
    assert max(layers, key=lambda n: layers[n]["sensitivity"]) == "3"
    assert layers["3"]["scheme"] == "float" and "fell back" in layers["3"]["reason"]
    assert all(layers[n]["scheme"] == "int8-dynamic" for n in ("0", "2", "5"))
    accuracy = record.stats["accuracy"]
    assert accuracy["met"] and accuracy["fallback"] == ["3"] and accuracy["int8"] >= 0.999
    assert abs(sum(row["error_share"] for row in layers.values()) - 1) < 1e-9
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        assert cosine(opt(x), model(x)) >= 0.999


def test_user_metric_budget():
    model, data = planted_model(), calibration()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        labels = model(x).argmax(dim=1)

    def accuracy(module):
        with torch.no_grad():
            return (module(x).argmax(dim=1) == labels).float().mean().item()

    opt = graphopt.optimize(model, (data[0],), quantize="int8-dynamic", calibration_data=data,
                            accuracy_budget=(accuracy, 0.01), quantize_options={"smoothquant": False}, **QUIET)
    record = int8_record(opt)
    assert record.stats["accuracy"]["met"]
    assert accuracy(opt) >= 1.0 - 0.01


def test_zero_tolerance_keeps_every_layer_float():
    model, data = planted_model(), calibration()
    opt = graphopt.optimize(model, (data[0],), quantize="int8-weight-only", calibration_data=data,
                            accuracy_budget=0.0, **QUIET)
    record = int8_record(opt)
    assert {row["scheme"] for row in record.stats["layers"]} == {"float"}
    assert record.stats["accuracy"]["history"][-1][0] == 0
