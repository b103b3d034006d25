"""Skipping padded tokens in FX graphs (passes/padding/): exact where the outputs ignore padding, refused elsewhere."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.engine import ir
from graphopt.frontend.capture import capture
from graphopt.onnx.export import TOLERANCES
from graphopt.engine.pass_manager import FxIR, PassManager
from graphopt.passes.padding import SkipPadding
from graphopt.engine.rules import Reason
from graphopt.engine.verify import LOSSLESS, compare, run_on
from graphopt.data.zoo import MeanPooledEncoder

from ..strategies import MaskedEncoder, masked_encoder_cases, randomize_

VOCAB = 20


def _tokens(batch: int, seq: int, generator: torch.Generator, scattered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a padding mask with at least one real token a row: right-padded lengths down to 1,
    or scattered holes."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    if scattered:
        mask = torch.rand((batch, seq), generator=generator) < 0.5
        mask[torch.arange(batch), torch.randint(0, seq, (batch,), generator=generator)] = True
    else:
        lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
        mask = torch.arange(seq)[None, :] < lengths[:, None]
    return ids, mask.long()


def _skip_padding(model: torch.nn.Module, example: tuple) -> tuple[torch.fx.GraphModule, dict]:
    """The captured graph after the pass alone, under the pass manager's verification on the example."""
    captured = capture(model, example)
    inputs = [(example, {})]
    manager = PassManager([SkipPadding()], FxIR(), verify=True, measure_latency=False)
    gm, report = manager.run(captured.module, inputs, run_on(captured.original, inputs))
    record = report.records[-1]
    return gm, {**record.stats, "rolled_back": record.rolled_back, "reason": record.reason}


@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # a capture each:
@given(model=masked_encoder_cases(), seed=st.integers(0, 2**16))                               # no shrinking
def test_skipping_padding_is_exact_where_the_outputs_ignore_padding(model, seed):
    """Random encoders whose head ignores padded tokens (masked mean-pool, or the first token): the rewrite fires
    (computing position 0 too for a first-token head) and matches the model within float32 rounding at two
    batch sizes and two lengths, on right-padded and scattered masks."""
    generator = torch.Generator().manual_seed(seed)
    gm, stats = _skip_padding(model, _tokens(2, 6, generator, scattered=False))
    assert stats["matches"].get("token rows scattered back", 0) > 0 and not stats["rolled_back"], stats
    assert stats["first_position_kept"] == (model.head == "first"), stats
    for batch, seq in ((2, 6), (5, 9)):
        for scattered in (False, True):
            ids, mask = _tokens(batch, seq, generator, scattered)
            with torch.no_grad():
                got, want = gm(ids, mask), model(ids, mask)
            assert not LOSSLESS.check(compare(got, want)), (batch, seq, mask, compare(got, want))


def test_a_model_returning_every_token_state_is_refused_with_the_reason():
    """Padded rows of the output would become zeros: the check on random padding masks refuses the rewrite."""
    torch.manual_seed(0)
    model = randomize_(MaskedEncoder(VOCAB, 16, dim=8, heads=2, hidden=16, depth=1, activation="gelu",
                                     scale_first=False, head="tokens"), 0).eval()
    gm, stats = _skip_padding(model, _tokens(2, 6, torch.Generator().manual_seed(0), scattered=False))
    assert not stats["matches"], stats
    assert stats["reasons"] == {Reason.READS_PADDING: 1}, stats
    assert "read padded rows" in stats["rejected"][0]
    assert not any(n.target == torch.ops.aten.nonzero.default for n in gm.graph.nodes)


def test_a_model_without_a_mask_input_is_not_a_candidate():
    """No integer or boolean [batch, sequence] input: unchanged, and nothing in the report (as for any rule
    whose pattern never matched)."""
    captured = capture(torch.nn.Linear(4, 4), (torch.randn(2, 3, 4),))
    result = SkipPadding([((torch.randn(2, 3, 4),), {})]).run(captured.module)
    assert not result.modified and not result.stats["rejected"]


class _PooledMLP(torch.nn.Module):
    """Float token features in, a per-token MLP, masked mean-pool: the segment starts at a graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        return (self.mlp(features) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def test_a_token_input_is_gathered_after_the_row_index():
    """A segment whose source is a placeholder: its gather comes after the index it reads (a graph that lints
    and runs), and the result matches at another batch size (capture fixes a float input's length)."""
    torch.manual_seed(0)
    model = _PooledMLP().eval()
    generator = torch.Generator().manual_seed(1)
    _, mask = _tokens(3, 5, generator, scattered=False)
    gm, stats = _skip_padding(model, (torch.randn(3, 5, 6, generator=generator), mask))
    assert stats["matches"] and not stats["rolled_back"], stats
    _, mask = _tokens(4, 5, generator, scattered=True)
    features = torch.randn(4, 5, 6, generator=generator)
    with torch.no_grad():
        assert not LOSSLESS.check(compare(gm(features, mask), model(features, mask)))


def test_graphopts_int8_ops_run_on_packed_rows():
    """On a graph already rewritten to int8, quantize_per_token and int8_linear are row-wise: they join the
    segments (their row count becomes the data-dependent n) and the result matches the int8 graph."""
    torch.manual_seed(0)
    model = randomize_(MaskedEncoder(VOCAB, 16, dim=16, heads=2, hidden=32, depth=1, activation="gelu",
                                     scale_first=False, head="mean"), 0).eval()
    generator = torch.Generator().manual_seed(0)
    example = _tokens(3, 6, generator, scattered=False)
    opt = graphopt.optimize(model, example, quantize="int8-dynamic", disable=["skip_padding"],
                            quantize_options={"min_in_features": 1}, measure_latency=False, speed_check=False,
                            progress=False)
    int8 = opt.graph_module
    inputs = [(example, {})]
    manager = PassManager([SkipPadding()], FxIR(), verify=True, measure_latency=False)
    gm, report = manager.run(int8, inputs, run_on(int8, inputs))
    assert report.records[-1].modified and not report.records[-1].rolled_back, report.records[-1]
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.graphopt.int8_linear.default]
    assert linears and all(ir.shape(n)[0] == ir.shape(linears[0])[0] for n in linears)
    assert not isinstance(ir.shape(linears[0])[0], int) and str(ir.shape(linears[0])[0]).startswith("u"), \
        ir.shape(linears[0])        # an unbacked size: the number of real rows
    ids, mask = _tokens(5, 9, generator, scattered=True)
    with torch.no_grad():
        assert not LOSSLESS.check(compare(gm(ids, mask), int8(ids, mask)))


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_hugging_face_mean_pooled_bert_skips_padding_end_to_end(tmp_path, level):
    """A tiny BERT under sentence-transformers' mean pooling: optimize() keeps the rewrite (before int8 at O2),
    the module runs at another batch size and length, and re-exports to ONNX with the same outputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = MeanPooledEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()
    generator = torch.Generator().manual_seed(0)
    example = _tokens(3, 8, generator, scattered=False)
    opt = graphopt.optimize(model, example, level=level, measure_latency=False, speed_check=False, progress=False)
    record = opt.report["skip_padding"]
    assert record.modified and not record.rolled_back, record
    assert record.stats["mask_input"] == "attention_mask"
    names = [r.name for r in opt.report.records]
    if level == "O2":
        assert names.index("skip_padding") < names.index("int8_dynamic")
    ids, mask = _tokens(5, 11, generator, scattered=True)
    with torch.no_grad():
        got, want = opt(ids, mask), model(ids, mask)
    if level == "O1":
        assert not LOSSLESS.check(compare(got, want)), compare(got, want)
    else:                                               # the accuracy target for int8 MiniLM
        assert compare(got, want).min_cosine >= 0.99, compare(got, want)
    path = graphopt.export_onnx(opt, example, tmp_path / "bert.onnx", skip_padding=False)
    assert "NonZero" in [n.op_type for n in onnx.load(str(path)).graph.node]     # the FX rewrite, exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    tolerance = TOLERANCES[opt.options.quantize]            # the export's own check, at another shape
    assert not tolerance.check(compare(torch.from_numpy(exported), got)), compare(torch.from_numpy(exported), got)
