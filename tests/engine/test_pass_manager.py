"""The pass manager: selection by level and name, verification, rollback, reproducers."""
import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.engine import ir
from graphopt.frontend.capture import capture
from graphopt.errors import OptionError
from graphopt.frontend.inputs import verification_inputs
from graphopt.engine.pass_manager import FxIR, Pass, PassManager, PassResult, RewriteLog
from graphopt.engine.verify import LOSSLESS, Budget, compare, run_on
from graphopt.engine.rules import Reason

aten = torch.ops.aten


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class BreaksLinear(Pass):
    """A deliberately wrong 'lossless' pass: drops every linear's bias."""
    name = "breaks_linear"

    def run(self, gm):
        log = RewriteLog()
        for node in ir.find_nodes(gm, aten.linear):
            node.args = node.args[:2]
            log.matched("drop bias")
        return log.result(gm)


class Crashes(Pass):
    name = "crashes"

    def run(self, gm):
        raise RuntimeError("boom inside the pass")


class ScalesOutput(Pass):
    """A 'lossy' pass that multiplies the output by (1 + eps): within a rel-err budget of 1e-2."""
    name, level = "scales_output", 2

    def __init__(self, eps, budget):
        self.eps, self.budget = eps, budget

    def run(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (value,) = output.args[0]
        with gm.graph.inserting_before(output):
            scaled = gm.graph.call_function(aten.mul.Tensor, (value, 1.0 + self.eps))
        output.args = ((scaled,),)
        return PassResult(gm, True, {})


class CountsDown(Pass):
    """Fixed-point pass: removes one relu per run."""
    name, fixed_point = "counts_down", True

    def run(self, gm):
        relus = ir.find_nodes(gm, aten.relu)
        if not relus:
            return PassResult(gm, False, {})
        node = relus[0]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return PassResult(gm, True, {})


def _setup(model=None):
    model = model or TinyNet().eval()
    x = torch.randn(4, 6)
    captured = capture(model, (x,))
    inputs = verification_inputs((x,), {}, 2)
    return captured.module, inputs, run_on(model, inputs)


def test_wrong_lossless_pass_is_rolled_back_with_the_reason():
    gm, inputs, reference = _setup()
    out, report = PassManager([BreaksLinear()]).run(gm, inputs, reference)
    record = report["breaks_linear"]
    assert record.rolled_back and record.code == Reason.BUDGET_EXCEEDED, record.reason
    assert out is gm  # the graph before the pass is kept
    assert len(ir.find_nodes(out, aten.linear)) == 2 and all(len(n.args) == 3 for n in ir.find_nodes(out, aten.linear))


def test_crashing_pass_is_rolled_back_and_writes_a_reproducer(tmp_path):
    gm, inputs, reference = _setup()
    with pytest.warns(UserWarning, match="rolled back"):
        out, report = PassManager([Crashes()], reproducer_dir=tmp_path).run(gm, inputs, reference)
    record = report["crashes"]
    assert record.rolled_back and record.code == Reason.PASS_RAISED and "boom inside the pass" in record.reason
    repro = record.reproducer
    files = {p.name for p in (tmp_path / repro.split("/")[-1]).iterdir()}
    assert {"graph.py", "graph.txt", "passes.txt", "exception.txt"} <= files
    assert "boom inside the pass" in (tmp_path / repro.split("/")[-1] / "exception.txt").read_text()
    assert "> crashes" in (tmp_path / repro.split("/")[-1] / "passes.txt").read_text()
    assert out is gm
    assert repro in str(report)


class BakesBatch(Pass):
    """A 'lossy' pass that reshapes the output to the example's literal shape, as int8 reshapes did."""
    name, level, budget = "bakes_batch", 2, Budget(min_cosine=0.99)

    def __init__(self, shape):
        self.shape = shape

    def run(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (value,) = output.args[0]
        with gm.graph.inserting_before(output):
            baked = gm.graph.call_function(aten.reshape.default, (value, list(self.shape)))
        output.args = ((baked,),)
        return PassResult(gm, True, {})


def test_a_pass_that_only_works_at_the_example_batch_fails_verification_and_is_rolled_back():
    """The verification inputs hold the example at a second batch size where capture kept the batch dynamic."""
    model, x = TinyNet().eval(), torch.randn(4, 6)
    captured = capture(model, (x,))
    inputs = verification_inputs((x,), {}, 1, other_shape=captured.other_shape)
    assert [a[0].shape[0] for a, _ in inputs] == [4, 4, 5]   # example, a look-alike, the second batch size
    reference = run_on(model, inputs)
    with pytest.warns(UserWarning, match="rolled back"):
        out, report = PassManager([BakesBatch((4, 3))], level=2).run(captured.module, inputs, reference)
    record = report["bakes_batch"]
    assert record.rolled_back and "shape '[4, 3]' is invalid" in record.reason, record.reason
    assert out is captured.module


def test_token_models_verify_at_a_second_batch_and_sequence_length():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 4)

        def forward(self, ids, mask):
            return self.embed(ids) * mask[..., None]

    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    captured = capture(Tokens(), (ids, mask))
    (ids2, mask2), _ = captured.other_shape
    assert ids2.shape == mask2.shape == (3, 8)
    assert mask2[:2, :7].equal(mask) and mask2[2, :7].equal(mask[0])   # the example's own mask, repeated
    inputs = verification_inputs((ids, mask), {}, 1, other_shape=captured.other_shape)
    assert [a[0].shape for a, _ in inputs] == [(2, 7), (2, 7), (3, 8)]
    assert any("second size" in note for note in captured.notes)


def test_lossy_pass_kept_within_budget_and_rolled_back_beyond():
    gm, inputs, reference = _setup()
    within = ScalesOutput(1e-3, Budget(max_rel_err=1e-2))
    beyond = ScalesOutput(1e-1, Budget(max_rel_err=1e-2))
    _, report = PassManager([within], level=2).run(gm, inputs, reference)
    assert not report["scales_output"].rolled_back
    assert report["scales_output"].max_rel_err == pytest.approx(1e-3, rel=1e-3)
    _, report = PassManager([beyond], level=2).run(gm, inputs, reference)
    assert report["scales_output"].rolled_back and report["scales_output"].code == Reason.BUDGET_EXCEEDED


def test_level_enable_disable_select_passes():
    lossy = ScalesOutput(0, Budget(max_rel_err=1e-2))
    assert [p.name for p in PassManager([CountsDown(), lossy], level=1).selected] == ["counts_down"]
    assert [p.name for p in PassManager([CountsDown(), lossy], level=1, enable=["scales_output"]).selected] \
        == ["counts_down", "scales_output"]
    assert [p.name for p in PassManager([CountsDown(), lossy], level=2, disable=["counts_down"]).selected] \
        == ["scales_output"]
    with pytest.raises(OptionError, match="unknown pass name.*nope.*known passes"):
        PassManager([CountsDown()], disable=["nope"])


def test_requires_is_checked():
    class NeedsCountdown(CountsDown):
        name, requires = "needs", ("counts_down",)
    with pytest.raises(OptionError, match="requires counts_down"):
        PassManager([NeedsCountdown(), CountsDown()])
    PassManager([CountsDown(), NeedsCountdown()])


def test_fixed_point_reruns_until_no_change_under_the_step_cap():
    class Deep(nn.Module):
        def forward(self, x):
            for _ in range(5):
                x = torch.relu(x) + 1
            return x
    gm, inputs, reference = _setup(Deep())
    # removing relu changes values: disable verification to test the iteration alone
    out, report = PassManager([CountsDown()], verify=False, max_steps=3).run(gm, inputs, reference)
    assert len(report.records) == 3 and len(ir.find_nodes(out, aten.relu)) == 2
    out, report = PassManager([CountsDown()], verify=False, max_steps=10).run(gm, inputs, reference)
    assert len(report.records) == 6 and not ir.find_nodes(out, aten.relu)


def test_unknown_pass_names_through_optimize_are_clear_errors():
    with pytest.raises(OptionError, match="unknown pass name"):
        graphopt.optimize(TinyNet(), (torch.randn(2, 6),), disable=["no_such_pass"])


def test_report_renders_every_pass():
    model = TinyNet().eval()
    opt = graphopt.optimize(model, (torch.randn(2, 6),), progress=False)
    text, md, data = str(opt.report), opt.report.to_markdown(), opt.report.to_dict()
    for record in opt.report.records:
        assert record.name in text and record.name in md
    assert data["baseline"]["nodes"] >= data["final"]["nodes"]
    assert {"name", "wall_s", "nodes", "param_bytes", "latency_ms", "max_abs_err", "max_rel_err",
            "rolled_back"} <= set(data["passes"][0])
    assert "latency" in opt.report.summary()


@settings(max_examples=25)
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_lossless_budget_allows_output_rounding_of_the_dtype_and_catches_real_errors(dtype, seed):
    """Re-associating a sum in the output's dtype is lossless; dropping one term never is."""
    g = torch.Generator().manual_seed(seed)
    terms = torch.randn(4, 16, 32, generator=g).to(dtype).unbind(1)
    forward = functools.reduce(torch.add, terms)             # one summation order…
    backward = functools.reduce(torch.add, terms[::-1])      # …and the reverse, each step rounded in `dtype`
    assert LOSSLESS.check(compare(backward, forward)) is None
    wrong = functools.reduce(torch.add, terms[1:])           # a bug: one term lost
    reason = LOSSLESS.check(compare(wrong, forward))
    assert reason is not None and "relative error" in reason


def test_fusion_and_smoothing_are_kept_on_a_bfloat16_model():
    """Half-precision rounding alone must not roll back lossless passes (SmoothQuant's folding here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[:4] *= 30                # outlier channels into the second linear: smoothing pays
    model = model.to(torch.bfloat16)
    x = torch.randn(8, 32).to(torch.bfloat16)
    calibration = [(torch.randn(16, 32).to(torch.bfloat16),) for _ in range(4)]
    opt = graphopt.optimize(model, (x,), level="O2", quantize="int8-dynamic", calibration_data=calibration,
                            progress=False, speed_check=False)   # the error budget is the point, not speed
    assert not opt.report.rolled_back, [(r.name, r.reason) for r in opt.report.rolled_back]
    assert opt.report["smoothquant"].modified
