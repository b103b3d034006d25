"""graphopt composed with torch.compile: both routes of graphopt/compile.py.

- `optimize(..., backend="inductor")`: the optimized graph compiled by inductor
  matches the original within the level's tolerance, the graphopt::* int8 ops
  trace without a graph break, and other batch sizes reuse the compiled code.
- `torch.compile(model, backend="graphopt")`: random models match the original,
  a model with graph breaks has every subgraph optimized and reported, and a
  changing batch size recompiles a bounded number of times.

Tolerances: O1 is lossless, so the compiled module must match the original to
float32 rounding (LOSSLESS_REL_TOL; inductor re-associates sums in its fused
kernels, which stays orders of magnitude below it). O2 is judged by the
budget the int8 pass itself keeps (cosine ≥ DEFAULT_MIN_COSINE vs the float
model) on the inputs verification checked it on, and on fresh inputs the
compiled graph must compute what the same graph computes eagerly (cosine ≥
COMPILED_VS_EAGER_COS: the graphs are identical, only the rounding of fused
float kernels differs, which can flip a per-token int8 rounding or two).

torch.compile takes ~5-20 s a graph on the 2-core machine: the examples are few
and the models small.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import graphopt
from graphopt.compile import GraphoptBackend
from graphopt.compile.runner import InductorRunner
from graphopt.engine.speed import SpeedCheck
from graphopt.engine.timing import Interleaved
from graphopt.errors import OptionError
from graphopt.engine.verify import LOSSLESS_REL_TOL, compare
from graphopt.passes.quantize.config import DEFAULT_MIN_COSINE
from tests.strategies import MaskedEncoder, Transformer, models, randomize_

COMPILED_VS_EAGER_COS = 0.9999
QUIET = dict(measure_latency=False, progress=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    graphopt.compile.clear()
    yield
    torch._dynamo.reset()


def check_level(level: str, actual, expected) -> None:
    errors = compare(actual, expected)
    assert errors.mismatch is None, errors.mismatch
    if level == "O1":
        assert errors.max_rel <= LOSSLESS_REL_TOL, f"rel err {errors.max_rel:.3g}"
    else:
        assert errors.min_cosine >= DEFAULT_MIN_COSINE, f"cosine {errors.min_cosine:.6f}"


def small_transformer() -> nn.Module:
    torch.manual_seed(0)
    return randomize_(Transformer(dim=32, heads=4, hidden=64, depth=1, activation="gelu",
                                  scale_first=False, masked=False), seed=0)


@settings(max_examples=3, deadline=None)
@given(case=models(), level=st.sampled_from(["O1", "O2"]))
def test_inductor_route_matches_the_original(case, level):
    torch._dynamo.reset()
    example = case.make_inputs(3, 1)
    compiled = graphopt.optimize(case.model, example, level=level, backend="inductor", **QUIET)
    eager = compiled.graph_module   # the same optimized graph, run without inductor
    with torch.no_grad():
        check_level(level, compiled(*example), case.model(*example))
        batch = 5 if compiled.report.meta["dynamic_batch"] else 3
        fresh = case.make_inputs(batch, 99)
        actual, expected = compiled(*fresh), case.model(*fresh)
        if level == "O1":
            check_level(level, actual, expected)
        else:
            assert compare(actual, eager(*fresh)).min_cosine >= COMPILED_VS_EAGER_COS


def test_int8_ops_compile_without_graph_breaks():
    model = small_transformer()
    x = torch.randn(4, 6, 32)
    opt = graphopt.optimize(model, (x,), level="O2", **QUIET)
    targets = {str(n.target) for n in opt.graph_module.graph.nodes}
    assert {"graphopt.quantize_per_token.default", "graphopt.int8_linear.default"} <= targets, targets
    explained = torch._dynamo.explain(opt.graph_module)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_inductor_route_does_not_recompile_per_batch_size():
    model = small_transformer()
    opt = graphopt.optimize(model, (torch.randn(4, 6, 32),), level="O2", backend="inductor", **QUIET)
    assert opt.report.meta["dynamic_batch"]
    with torch.no_grad():
        for batch in (4, 5, 7, 9, 12):
            x = torch.randn(batch, 6, 32)
            assert compare(opt(x), model(x)).min_cosine >= DEFAULT_MIN_COSINE
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_copy_compiles_its_own_graph():
    """graphopt.finetune trains a deep copy: its compiled code must run the copy's weights."""
    model = small_transformer()
    opt = graphopt.optimize(model, (torch.randn(2, 6, 32),), level="O1", backend="inductor", **QUIET)
    twin = copy.deepcopy(opt)
    assert twin._runner.gm is twin.graph_module and twin.graph_module is not opt.graph_module
    assert opt._runner.gm is opt.graph_module


def timer_where_after_takes(factor: float):
    """An injected speed-check timer: each call runs once (inductor compiles on it), the "after" one timed at
    `factor` × the "before" one."""
    def timer(calls, rounds: int) -> Interleaved:
        for call in calls.values():
            call()
        return Interleaved({"before": [1.0] * rounds, "after": [factor] * rounds})
    return timer


@pytest.mark.parametrize("factor", [1.3, 0.7])
def test_inductor_route_is_never_slower_than_the_model(factor):
    """backend="inductor": the speed check times the compiled result against the model as given (the passes
    were timed on eager graphs); a result it finds slower runs the model as given, a faster one stays."""
    model = small_transformer()
    opt = graphopt.optimize(model, (torch.randn(2, 6, 32),), level="O0", backend="inductor", progress=False,
                            speed_check=SpeedCheck(timer=timer_where_after_takes(factor)))
    assert isinstance(opt._runner, InductorRunner) == (factor < 1), opt.report.meta.get("speed_vs_model")
    assert ("calls run the model as given" in opt.report.meta.get("speed", "")) == (factor > 1)
    for batch in (2, 5):
        x = torch.randn(batch, 6, 32)
        with torch.no_grad():
            assert compare(opt(x), model(x)).max_rel <= LOSSLESS_REL_TOL


@settings(max_examples=2, deadline=None)
@given(case=models(), level=st.sampled_from(["O1", "O2"]))
def test_backend_matches_the_original(case, level):
    torch._dynamo.reset()
    backend = GraphoptBackend({"level": level, **QUIET})
    compiled = torch.compile(case.model, backend=backend)
    example = case.make_inputs(3, 1)
    with torch.no_grad():
        check_level(level, compiled(*example), case.model(*example))
    optimized = [s for s in backend.subgraphs if s.skipped is None]
    assert len(optimized) == len(backend.reports) >= 1
    assert all(r.meta["level"] == level and not r.rolled_back for r in backend.reports)


@settings(max_examples=2, deadline=None)
@given(batch=st.integers(5, 9), seed=st.integers(0, 2**16))
def test_backend_skips_padding_on_a_static_subgraph_larger_than_the_probe_rows(batch, seed):
    """dynamo hands the backend a static subgraph; exported again, its sizes are SymInts specialised to the
    example's batch (torch.export guards them). The capture must read them as static: the skip-padding check
    then probes every row of the batch instead of a few (which the guard refused: the pass raised)."""
    torch._dynamo.reset()
    model = randomize_(MaskedEncoder(vocab=20, max_len=12, dim=16, heads=2, hidden=32, depth=1,
                                     activation="gelu", scale_first=False, head="mean"), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (batch, 12), generator=generator)
    mask = (torch.arange(12)[None, :] < torch.randint(1, 13, (batch, 1), generator=generator)).long()
    backend = GraphoptBackend({"level": "O1", "speed_check": False, **QUIET})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        check_level("O1", compiled(ids, mask), model(ids, mask))
    (report,) = backend.reports
    assert report.meta["dynamic_batch"] is False
    assert not report.rolled_back, [(r.name, r.reason) for r in report.rolled_back]
    assert report["skip_padding"].modified


class BranchingModel(nn.Module):
    """A graph break on a data-dependent branch: dynamo captures three subgraphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(24, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 48))
        self.b = nn.Sequential(nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16))
        self.c = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if x[:, 0].mean() > 0:
            return self.b(h)
        return self.c(h) * 2


def test_backend_optimizes_and_reports_every_subgraph_across_a_graph_break():
    torch.manual_seed(0)
    model = randomize_(BranchingModel(), seed=0)
    compiled = torch.compile(model, backend="graphopt", options={"level": "O2", **QUIET})

    def run(batches) -> None:
        for batch in batches:
            for sign in (1.0, -1.0):   # both sides of the branch
                x = torch.randn(batch, 24)
                x[:, 0] = sign * x[:, 0].abs()
                with torch.no_grad():
                    assert compare(compiled(x), model(x)).min_cosine >= DEFAULT_MIN_COSINE

    run([6, 9])   # dynamo compiles each frame statically, then once more with a dynamic batch
    subgraphs = graphopt.compile.subgraphs()
    assert all(s.skipped is None for s in subgraphs), [(s.index, s.skipped) for s in subgraphs]
    reports = graphopt.compile.reports()
    assert len(reports) == len(subgraphs) >= 3
    assert all(not r.rolled_back and r.meta["level"] == "O2" for r in reports)
    assert all(r["int8_dynamic"].matches.get("linear → int8", 0) >= 1 for r in reports), "each holds linears"
    matches = [r.matches() for r in reports]
    assert any("batchnorm→linear" in m for m in matches), "block a: BatchNorm folded into its linear"
    assert any(m.get("linear → int8") == 2 and "batchnorm→linear" not in m for m in matches), "branch b"
    assert any("scalar → linear (output)" in m for m in matches), "branch c: `* 2` folded into its linear"
    run([13, 20, 31])
    assert len(graphopt.compile.subgraphs()) == len(subgraphs), "recompiled for a new batch size"


def test_backend_runs_a_subgraph_it_cannot_capture_as_captured(monkeypatch):
    def fail(*args, **kwargs):
        raise graphopt.CaptureError("export failed here", "a hint")
    monkeypatch.setattr(graphopt.api, "capture", fail)
    model = small_transformer()
    backend = GraphoptBackend({"level": "O1", "backend": "eager", **QUIET})   # eager: no inductor compile
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 6, 32)
    with pytest.warns(UserWarning, match="runs without graphopt"), torch.no_grad():
        assert compare(compiled(x), model(x)).max_rel <= LOSSLESS_REL_TOL
    assert backend.reports == [] and "export failed here" in backend.subgraphs[0].skipped


class ScaledAttention(nn.Module):
    """Attention with its softmax scale a Python float argument: once the float changes between calls,
    dynamo passes it to the backend as a 0-d tensor that the subgraph reads with `.item()`."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(self.query(x), x, x, scale=scale)


@settings(max_examples=2, deadline=None)
@given(batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_backend_optimizes_a_subgraph_that_reads_a_python_number(batch, seed):
    """torch.export cannot capture a graph whose values come from `.item()`: such a subgraph used to run
    without graphopt (the MiniLM row of bench/results/compile.md, after BERT's had compiled the same attention
    code with another scale). The backend optimizes it for the number of its first call, and runs a call with
    another number without graphopt."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = ScaledAttention().eval()
    backend = GraphoptBackend({"level": "O1", "backend": "eager", **QUIET})
    runners = []

    def recording(gm, example_inputs):
        runners.append((backend(gm, example_inputs), list(example_inputs)))
        return runners[-1][0]

    compiled = torch.compile(model, backend=recording)
    generator = torch.Generator().manual_seed(seed)
    for scale in (0.5, 0.25):   # the second value makes dynamo pass the number as a tensor
        for rows in (batch, batch + 2):
            x = torch.randn(rows, 3, 5, 8, generator=generator)
            with torch.no_grad():
                assert compare(compiled(x, scale), model(x, scale)).max_rel <= LOSSLESS_REL_TOL
    assert all(s.skipped is None for s in backend.subgraphs), [s.skipped for s in backend.subgraphs]
    assert len(backend.reports) == len(backend.subgraphs)
    numbered = [i for i, s in enumerate(backend.subgraphs) if s.notes[0].startswith("optimized for")]
    assert numbered and backend.subgraphs[numbered[0]].notes[0].endswith("= 0.25"), \
        [s.notes for s in backend.subgraphs]
    run, inputs = runners[numbered[0]]      # called as dynamo would call it with another number
    x = torch.randn(batch, 3, 5, 8, generator=generator)
    number = next(i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) and v.dim() == 0)
    batch_input = next(i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) and v.dim() == 4)
    inputs[number], inputs[batch_input] = torch.tensor(0.3, dtype=inputs[number].dtype), x
    sizes = [i for i, v in enumerate(inputs) if isinstance(v, torch.SymInt | int)]
    for i in sizes:
        inputs[i] = batch
    with torch.no_grad():
        (out,) = run(*inputs)
        assert compare(out, model(x, 0.3)).max_rel <= LOSSLESS_REL_TOL


class ScaledByBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h) * x.shape[0]   # after the break, x's size is an input but x is not


def test_backend_leaves_a_subgraph_it_cannot_lower_to_the_compiler():
    model = ScaledByBatch().eval()
    backend = GraphoptBackend({"level": "O1", "backend": "eager", **QUIET})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (3, 5, 7):   # the second size makes dynamo recompile with a symbolic size
            x = torch.randn(batch, 8)
            assert compare(compiled(x), model(x)).max_rel <= LOSSLESS_REL_TOL
    skipped = [s.skipped for s in backend.subgraphs if s.skipped]
    assert skipped and all("not dimension 0 of an input" in why for why in skipped), skipped
    assert len(backend.reports) == len(backend.subgraphs) - len(skipped) >= 2


def test_backend_refuses_options_that_need_model_inputs():
    with pytest.raises(OptionError, match="calibration_data"):
        GraphoptBackend({"level": "O2", "calibration_data": [torch.randn(2, 4)]})
    with pytest.raises(OptionError, match="int8-static"):
        GraphoptBackend({"level": "O2", "quantize": "int8-static"})
    with pytest.raises(OptionError, match="backend"):
        GraphoptBackend({"backend": "tensorrt"})
