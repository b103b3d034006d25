"""Skipping padded tokens (passes/onnx/skip_padding.py): exact where the outputs ignore padding, refused elsewhere."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.onnx.ir import OnnxModel
from graphopt.onnx.sessions import session
from graphopt.passes.onnx import SkipPadding
from graphopt.engine.rules import Reason
from graphopt.engine.verify import LOSSLESS, compare
from graphopt.data.zoo import MeanPooledEncoder

VOCAB, SEQ, BATCH = 50, 10, 3
POOLINGS_THAT_IGNORE_PADDING = ("mean", "max", "first")     # "first": position 0 is computed too


class TokenEncoder(nn.Module):
    """Embeddings → post-LN transformer layers (masked attention) → pooling over tokens.

    pooling: "mean" / "max" over real tokens (padding ignored), "first" (token 0, padded or not),
    "tokens" (every token's state, padded ones included).
    """

    def __init__(self, hidden: int, heads: int, layers: int, activation: str, pooling: str) -> None:
        super().__init__()
        self.heads, self.pooling, self.activation = heads, pooling, activation
        self.embed, self.position = nn.Embedding(VOCAB, hidden), nn.Embedding(SEQ, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * hidden) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(2 * hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2 * layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        x = self.norm(self.embed(input_ids) + self.position(torch.arange(s)))
        keep = attention_mask.bool()[:, None, None, :].expand(b, 1, s, s)   # ONNX Runtime's Attention wants S × S
        for i in range(len(self.qkv)):
            q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv[i](x).chunk(3, dim=-1))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, s, -1)
            x = self.norms[2 * i](x + self.out[i](attended))
            x = self.norms[2 * i + 1](x + self.down[i](getattr(F, self.activation)(self.up[i](x))))
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        if self.pooling == "mean":
            return (x * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.pooling == "max":
            return x.masked_fill(mask == 0, float("-inf")).amax(1)
        return x[:, 0] if self.pooling == "first" else x


def _encoder(seed: int, pooling: str, hidden: int = 32, heads: int = 2, layers: int = 1,
             activation: str = "gelu") -> tuple[TokenEncoder, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = TokenEncoder(hidden, heads, layers, activation, pooling).eval()
    lengths = torch.tensor([SEQ, 4, 1])
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return model, {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ)), "attention_mask": mask}


def _export(tmp_path, model, example, scheme) -> OnnxModel:
    """The optimized model's ONNX export with padding computed, as an OnnxModel (the torch side's own
    skip_padding is off, so the ONNX pass under test sees the padded graph)."""
    opt = graphopt.optimize(model, (), example_kwargs=example, quantize=scheme, level="O2" if scheme else "O1",
                            measure_latency=False, progress=False, disable=["skip_padding"])
    path = graphopt.export_onnx(opt, (), tmp_path / "model.onnx", example_kwargs=example, skip_padding=False)
    return OnnxModel.from_proto(onnx.load(str(path)))


def _feeds(example: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in example.items()}


masks = st.lists(st.lists(st.booleans(), min_size=SEQ, max_size=SEQ).filter(any), min_size=1, max_size=4)


@settings(max_examples=6, phases=(Phase.explicit, Phase.reuse, Phase.generate))   # an export per example:
#                                                                                       no shrinking
@given(seed=st.integers(0, 2**16), pooling=st.sampled_from(["mean", "max", "first", "tokens"]),
       heads=st.sampled_from([1, 2, 4]), layers=st.integers(1, 2), activation=st.sampled_from(["gelu", "relu", "silu"]),
       scheme=st.sampled_from([None, "int8-dynamic"]), probes=st.lists(masks, min_size=1, max_size=3))
def test_skipping_padding_is_exact_where_the_outputs_ignore_padding(tmp_path_factory, seed, pooling, heads, layers,
                                                                   activation, scheme, probes):
    """Random token models, float or int8: the rewrite applies exactly when the pooling ignores padded tokens,
    and then matches the padded graph within float32 rounding on random padding masks (any pattern, any batch)."""
    model, example = _encoder(seed, pooling, hidden=8 * heads, heads=heads, layers=layers, activation=activation)
    original = _export(tmp_path_factory.mktemp("skip"), model, example, scheme)
    rewritten = original.copy()
    result = SkipPadding([_feeds(example)]).run(rewritten)
    assert result.modified == (pooling in POOLINGS_THAT_IGNORE_PADDING), result.stats["rejected"]
    rng = np.random.default_rng(seed)
    for pattern in probes:
        mask = np.array(pattern, dtype=np.int64)
        feed = {"input_ids": rng.integers(0, VOCAB, mask.shape), "attention_mask": mask}
        for got, want in zip(rewritten.run(feed), original.run(feed)):
            assert not LOSSLESS.check(compare(got, want)), (pattern, compare(got, want))


def test_export_skips_padding_by_default_and_matches_the_module(tmp_path):
    """Through the public API: a mean-pooled encoder's file gathers real rows, and ONNX Runtime's output on a
    padded batch equals the torch module's."""
    model, example = _encoder(seed=1, pooling="mean", layers=2)
    path = graphopt.export_onnx(model, (), tmp_path / "model.onnx", example_kwargs=example)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "NonZero" in ops and ops.count("ScatterND") >= 2
    assert "'attention_mask'" in {p.key: p.value for p in proto.metadata_props}["graphopt.skip_padding"]
    got = OnnxModel.from_proto(onnx.load(str(path))).run(_feeds(example))[0]
    with torch.no_grad():
        want = model(**example)
    assert not LOSSLESS.check(compare(got, want))


def test_outputs_that_read_padded_rows_are_left_alone_with_the_reason(tmp_path):
    model, example = _encoder(seed=2, pooling="tokens")
    original = _export(tmp_path, model, example, None)
    result = SkipPadding([_feeds(example)]).run(original)
    assert not result.modified
    assert any("outputs read padded rows" in r for r in result.stats["rejected"]), result.stats["rejected"]


def test_a_first_token_classifier_computes_position_0_of_every_sequence(tmp_path):
    """Token 0 is read whatever the mask: the rewrite computes it for every sequence, and stays exact when it is
    padding (left padding)."""
    model, example = _encoder(seed=4, pooling="first")
    original = _export(tmp_path, model, example, None)
    rewritten = original.copy()
    result = SkipPadding([_feeds(example)]).run(rewritten)
    assert result.modified and result.stats["first_position_kept"]
    mask = np.zeros((3, SEQ), np.int64)
    mask[0, 4:], mask[1, :], mask[2, 7:] = 1, 1, 1
    feed = {"input_ids": np.random.default_rng(4).integers(0, VOCAB, mask.shape), "attention_mask": mask}
    assert not LOSSLESS.check(compare(rewritten.run(feed)[0], original.run(feed)[0]))


def test_a_model_without_a_mask_input_says_so(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    path = graphopt.export_onnx(model, (torch.randn(5, 8),), tmp_path / "mlp.onnx", skip_padding=False)
    result = SkipPadding([{"input": np.zeros((5, 8), np.float32)}]).run(OnnxModel.from_proto(onnx.load(str(path))))
    assert not result.modified and "no integer or boolean" in result.stats["rejected"][0]


def test_a_graph_the_torch_side_already_packed_is_recognised_not_rewritten_twice(tmp_path):
    model, example = _encoder(seed=4, pooling="mean")
    opt = graphopt.optimize(model, (), example_kwargs=example, level="O1", measure_latency=False, progress=False)
    assert opt.report["skip_padding"].modified                 # packed on the torch side
    path = graphopt.export_onnx(opt, (), tmp_path / "packed.onnx", example_kwargs=example)
    passes = {p["name"]: p for p in opt.report.meta["export_passes"]}
    assert not passes["onnx_skip_padding"]["rolled_back"] and not passes["onnx_skip_padding"]["modified"]
    result = SkipPadding([_feeds(example)]).run(OnnxModel.from_proto(onnx.load(str(path))))
    assert result.stats["reasons"] == {Reason.ALREADY_DONE: 1} and "'attention_mask'" in result.stats["rejected"][0]


def test_optimize_onnx_skips_padding_in_a_file_exported_without_it(tmp_path):
    model, example = _encoder(seed=3, pooling="mean")
    src = graphopt.export_onnx(model, (), tmp_path / "padded.onnx", example_kwargs=example, skip_padding=False)
    report = graphopt.optimize_onnx(src, tmp_path / "out.onnx", calibration_data=[_feeds(example)],
                                    measure_latency=False, progress=False)
    record = next(r for r in report.records if r.name == "onnx_skip_padding")
    assert record.stats["matches"] and not record.rolled_back
    got = OnnxModel.from_proto(onnx.load(str(tmp_path / "out.onnx"))).run(_feeds(example))[0]
    with torch.no_grad():
        assert not LOSSLESS.check(compare(got, model(**example)))


@pytest.mark.parametrize("family", ["Bert", "Roberta"])
def test_hugging_face_encoders_int8_skip_padding_exactly(tmp_path, family):
    """Hugging Face's own mask construction and attention, int8: the default export gathers real rows and
    computes what the padding-computed export does, on a new batch size and padding pattern. RoBERTa derives
    its position ids from a cumsum over the ids: that integer preprocessing must stay padded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128, vocab_size=VOCAB)
    model = MeanPooledEncoder(getattr(transformers, f"{family}Model")(config).eval()).eval()
    _, example = _encoder(seed=0, pooling="mean")
    opt = graphopt.optimize(model, (), example_kwargs=example, quantize="int8-dynamic", measure_latency=False,
                            progress=False, disable=["skip_padding"])   # the ONNX pass under test does the skipping
    skipped = graphopt.export_onnx(opt, (), tmp_path / "skipped.onnx", example_kwargs=example)
    padded = graphopt.export_onnx(opt, (), tmp_path / "padded.onnx", example_kwargs=example, skip_padding=False)
    assert "NonZero" in [n.op_type for n in onnx.load(str(skipped)).graph.node]
    mask = np.ones((5, SEQ), np.int64)
    mask[1, 3:], mask[2, 1:], mask[3, :6], mask[4, ::2] = 0, 0, 0, 0
    feed = {"input_ids": np.random.default_rng(0).integers(0, VOCAB, mask.shape), "attention_mask": mask}
    exact = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = session(onnx.load(str(skipped)), exact).run(None, feed)[0]
    want = session(onnx.load(str(padded)), exact).run(None, feed)[0]
    assert not LOSSLESS.check(compare(torch.from_numpy(got), torch.from_numpy(want)))
