"""`quantize_options["layer_speed"]`: the int8 pass's per-layer timing (passes/quantize/layer_speed.py) on its own,
independent of the pass manager's speed check. tune's trials build with speed_check off and layer_speed on, so a
layer whose int8 form is slower stays float as it does at a fixed level. The verdicts here are scripted: the test
checks which layers are timed and what the rewrite does with a verdict, not this machine's speed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.passes.quantize import layer_speed

from .helpers import QUIET, cosine, int8_record


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture
def scripted(monkeypatch):
    """Every timed layer signature, recorded; the 64-input layers' int8 form is 'slower'."""
    timed: list[tuple[int, int]] = []

    def verdict(rows, weight, has_bias, scheme, bits, check, group_size):
        timed.append(tuple(weight.shape))
        return "float is faster on this target (scripted)" if weight.shape[1] == 64 else None
    monkeypatch.setattr(layer_speed, "_time", verdict)
    return timed


@pytest.mark.parametrize("batch", [3, 8])
def test_layer_speed_keeps_slower_layers_float_with_the_speed_check_off(scripted, batch):
    model = mlp()
    x = torch.randn(batch, 32)
    opt = graphopt.optimize(model, (x,), quantize="int8-dynamic", speed_check=False,
                            quantize_options={"layer_speed": True}, **QUIET)
    assert sorted(set(scripted)) == [(10, 64), (64, 32), (64, 64)]      # each signature timed
    rows = {row["layer"]: row for row in int8_record(opt).stats["layers"]}
    assert rows["0"]["scheme"] != "float"                               # the rewrite fired where int8 pays
    assert rows["2"]["scheme"] == rows["4"]["scheme"] == "float"
    assert "scripted" in rows["2"]["reason"] and "scripted" in rows["4"]["reason"]
    for other in (1, batch + 5):
        y = torch.randn(other, 32)
        with torch.no_grad():
            assert cosine(opt(y), model(y)) > 0.999


def test_without_layer_speed_nothing_is_timed(scripted):
    model, x = mlp(), torch.randn(4, 32)
    opt = graphopt.optimize(model, (x,), quantize="int8-dynamic", speed_check=False, **QUIET)
    assert not scripted and all(row["scheme"] != "float" for row in int8_record(opt).stats["layers"])
    graphopt.optimize(model, (x,), quantize="int8-dynamic", quantize_options={"layer_speed": False},
                      **{**QUIET, "measure_latency": True}, speed_check={"max_seconds": 0.2})
    assert not scripted                                  # off even where the pass manager times the passes


def test_layer_speed_must_be_a_bool():
    with pytest.raises(graphopt.OptionError, match="layer_speed"):
        graphopt.optimize(mlp(), (torch.randn(2, 32),), quantize="int8-dynamic",
                          quantize_options={"layer_speed": "yes"}, **QUIET)


def test_within_shared_verdicts_each_signature_is_timed_once(scripted):
    """graphopt.tune's trials run inside `shared_verdicts()`: a later build reuses the first one's verdicts (the
    same layers stay float), where two builds outside it time every signature again."""
    model, x = mlp(), torch.randn(4, 32)
    options = {"quantize": "int8-dynamic", "speed_check": False, "quantize_options": {"layer_speed": True}, **QUIET}
    with layer_speed.shared_verdicts():
        first = graphopt.optimize(model, (x,), **options)
        second = graphopt.optimize(model, (x,), **options)
    assert len(scripted) == 3                                   # three signatures, each timed once
    assert [r["scheme"] for r in int8_record(first).stats["layers"]] == \
        [r["scheme"] for r in int8_record(second).stats["layers"]]
    graphopt.optimize(model, (x,), **options)
    graphopt.optimize(model, (x,), **options)
    assert len(scripted) == 9                                   # outside the block: timed per build
