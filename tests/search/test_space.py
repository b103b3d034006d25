"""tune's default search space names only layers the optimized graph has: a layer that runs but whose result
nothing uses (BERT's pooler under a mean-pooling head, as in bench/tune.py's MiniLM) is gone after dead-code
elimination, and a per-group prune ratio or float switch drawn for it failed its trial ("matches no layer")."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.search.space import default_space, float_patterns, live_modules, prune_patterns


class WithUnusedPooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24))
        self.pooler = nn.Sequential(nn.Linear(24, 24), nn.Tanh())   # computed, its result unused
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        self.pooler(hidden)
        return self.head(hidden)


def example(batch: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 24, generator=torch.Generator().manual_seed(batch)),)


def test_the_default_space_leaves_out_layers_whose_result_nothing_uses():
    torch.manual_seed(0)
    model = WithUnusedPooler().eval()
    live = live_modules(model, example(), None)
    assert {"body.0", "body.2", "head"} <= live and "pooler.0" not in live
    assert "pooler.*" in prune_patterns(model)                    # what the space drew from before
    assert prune_patterns(model, live) == ["body.*"]
    assert float_patterns(model, live) == ["body.*", "head"] and "pooler.*" in float_patterns(model)
    space = default_space(model, live)
    assert not [path for path in space if "pooler" in path]
    assert {"prune_group.body.*", "float.body.*", "float.head"} <= set(space)


def test_every_drawn_prune_pattern_names_a_layer_of_the_graph():
    """The per-group ratios of the default space go through optimize (O3, per group) without an OptionError, and
    the pruned module runs at other batch sizes; the unused pooler's pattern would have been refused."""
    torch.manual_seed(0)
    model = WithUnusedPooler().eval()
    live = live_modules(model, example(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, example(), level="O3", prune={p: 0.5 for p in prune_patterns(model, live)},
                                measure_latency=False, speed_check=False, progress=False)
        with pytest.raises(graphopt.OptionError, match="pooler"):
            graphopt.optimize(model, example(), level="O3", prune={"pooler.*": 0.5}, measure_latency=False,
                              speed_check=False, progress=False)
    body = dict(opt.graph_module.named_parameters())
    assert [tuple(p.shape) for name, p in body.items() if name.startswith("body.0")][0][0] == 16, sorted(body)
    for batch in (1, 7):
        assert opt(*example(batch)).shape == (batch, 5)


def test_a_new_study_starts_from_the_fixed_levels_with_every_layer_int8():
    """The first trials are O1 and O2 at graphopt.optimize's defaults (int8-dynamic, no layer kept float,
    SmoothQuant with α searched per layer group where there is calibration data), drawn from the full default
    space: its random start would almost never switch every `float.*` off at once. A space that cannot draw
    a level gets no seed for it."""
    from graphopt.search.space import level_seeds
    from tests.search.tune_models import agreement, mlp, quick
    model, example_ = mlp()
    space = default_space(model, live_modules(model, example_, None))
    seeds = level_seeds(space)
    assert seeds[0] == {"level": "O1"}
    assert seeds[1]["level"] == "O2" and seeds[1]["quantize"] == "int8-dynamic"
    assert {p for p, v in seeds[1].items() if v is False} == {p for p in space if p.startswith("float.")}
    assert seeds[1]["quantize_options.smoothquant"] is True and seeds[1]["quantize_options.alpha"] == "search"
    assert level_seeds({**space, "level": ["O1", "O3"]}) == [{"level": "O1"}]
    assert level_seeds({**space, "quantize": ["int8-static"]}) == [{"level": "O1"}]
    assert level_seeds({**space, "level": ["O2"]}) == []

    result = graphopt.tune(model, example_, evaluate=agreement, accuracy_budget=100.0, trials=2,
                           calibration_data=[example_], speed_check=quick(), progress=False)
    first, second = (row["config"] for row in result.trials)
    assert first["level"] == "O1"
    assert second["level"] == "O2" and second["quantize"] == "int8-dynamic"
    assert "exclude" not in second.get("quantize_options", {})
    assert second["quantize_options"]["smoothquant"] is True and second["quantize_options"]["alpha"] == "search"
    from tests.passes.quantize.helpers import int8_record
    opt = graphopt.optimize(model, example_, **second, calibration_data=[example_], measure_latency=False)
    rows = int8_record(opt).stats["layers"]
    # no layer is excluded: each is int8, or float because its int8 form timed slower here (layer_speed)
    assert rows and all(row["scheme"] != "float" or "float is faster" in row["reason"] for row in rows), rows
    assert second["quantize_options"]["layer_speed"] is True


def test_trials_time_int8_layers_except_on_onnxruntime():
    """On torch and inductor a trial keeps the int8 pass's per-layer timing (its speed check is off); ONNX
    Runtime runs other kernels than those timed, so there the float switches alone decide."""
    model = WithUnusedPooler().eval()
    assert default_space(model)["quantize_options.layer_speed"] == [True]
    assert default_space(model, target="inductor")["quantize_options.layer_speed"] == [True]
    assert "quantize_options.layer_speed" not in default_space(model, target="onnxruntime")
