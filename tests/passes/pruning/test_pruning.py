"""Structured pruning: masked-vs-sliced equivalence, coupling, boundaries, criteria, options."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.engine import ir
from graphopt.frontend.capture import capture
from graphopt.errors import OptionError
from graphopt.passes.pruning import StructuredPruning, allocate, analyze, importance
from graphopt.passes.pruning import slice as slicing
from graphopt.engine.verify import LOSSLESS_REL_TOL, compare

from .models import prunable_models

# Slicing drops terms the masked twin multiplies by exact zeros, so the two differ only by
# float32 re-association of the remaining sums: the engine's lossless tolerance.
TOL = LOSSLESS_REL_TOL


def random_plan(analysis, seed: int, ratio: float) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    groups = analysis.prunable()
    scores = {g.name: torch.rand(g.units, generator=generator, dtype=torch.float64) for g in groups}
    return allocate.by_ratio(groups, scores, {g.name: ratio for g in groups}, round_to=1, max_ratio=0.9)


def masked_and_sliced(model: nn.Module, inputs: tuple, seed: int, ratio: float):
    gm = capture(model, inputs).module
    analysis = analyze(gm)
    plan = random_plan(analysis, seed, ratio)
    masked = copy.deepcopy(model).eval()
    slicing.mask(masked, analysis, plan)
    sliced = copy.deepcopy(gm)
    slicing.apply(sliced, analyze(sliced), plan)   # group names are stable across copies
    return gm, analysis, plan, masked, sliced


@settings(max_examples=15, deadline=None)
@given(case=prunable_models(), seed=st.integers(0, 1000), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_masked_equals_sliced(case, seed, ratio):
    gm, analysis, plan, masked, sliced = masked_and_sliced(case.model, case.make_inputs(2, 0), seed, ratio)
    if case.family in ("squeeze-excite", "window-attn"):   # the gate / windows do not stop the pruning
        assert any(g.units > 2 for g in analysis.prunable()) and any(plan.values()), case
    x = case.make_inputs(3, 1)   # another batch size: the sliced graph keeps a dynamic batch
    with torch.no_grad():
        err = compare(sliced(*x), masked(*x))
    assert err.mismatch is None and err.max_rel <= TOL, (case, err)
    # coupled groups lose the same units everywhere: every member dimension shrank by exactly that
    for group in analysis.groups.values():
        for m in group.members:
            before = ir.attr_path(gm, m.attr).shape[m.dim]
            after = ir.attr_path(sliced, m.attr).shape[m.dim]
            lost = sum(s.block * len(plan.get(s.group, ())) for s in _segs_of(analysis, m.attr, m.dim))
            assert after == before - lost
    # the cost model predicts the sliced graph's FLOPs exactly
    removed = {k: len(v) for k, v in plan.items()}
    assert allocate.count_flops(sliced) == pytest.approx(allocate.Cost(gm, analysis).flops(removed), rel=1e-9)


def _segs_of(analysis, attr, dim):
    return {m.seg for g in analysis.groups.values() for m in g.members if (m.attr, m.dim) == (attr, dim)}


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.a(x), dim=1)   # mixes channels: not element-wise
        return self.c(F.relu(self.b(y)))


def test_unknown_op_is_a_boundary():
    gm = capture(UnknownOp().eval(), (torch.randn(2, 3, 6, 6),)).module
    analysis = analyze(gm)
    groups = {tuple(g.modules): g for g in analysis.groups.values()}
    blocked = groups[("a",)]
    assert not blocked.prunable and any("cumsum" in r for r in blocked.blocked)
    assert groups[("b", "c")].prunable                      # the channels after it are still prunable
    assert not groups[("c",)].prunable                      # graph output keeps its shape


def test_ignored_layers_keep_their_shape():
    model = UnknownOp().eval()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, (x,), prune=0.5, prune_options={"ignored": ["b"], "round_to": 1},
                                disable=["int8_dynamic"], measure_latency=False)
    assert opt.graph_module.b.weight.shape == model.b.weight.shape
    with pytest.raises(OptionError, match="candidates: a, b, c"):
        graphopt.optimize(model, (x,), prune=0.5, prune_options={"ignored": ["nope*"]},
                          disable=["int8_dynamic"], measure_latency=False)


class DeadChannels(nn.Module):
    """Channels 0..7 of the hidden layer carry nothing: every criterion must rank them last."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.up.weight[:8] = 0
            self.up.bias[:8] = 0
            self.down.weight[:, :8] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "activation"])
def test_criteria_rank_dead_channels_first(criterion):
    torch.manual_seed(0)
    model = DeadChannels().eval()
    gm = capture(model, (torch.randn(4, 8),)).module
    analysis = analyze(gm)
    (group,) = analysis.prunable()
    data = [(torch.randn(16, 8),) for _ in range(3)]
    labels = [torch.randint(0, 4, (16,)) for _ in range(3)]
    scores = importance.compute(gm, analysis, [group], criterion, data, labels=labels)[group.name]
    assert set(torch.argsort(scores)[:8].tolist()) == set(range(8))


def test_taylor_needs_a_loss_or_labels():
    with pytest.raises(OptionError, match="taylor"):
        StructuredPruning(0.5, {"criterion": "taylor"})


@pytest.mark.parametrize("prune, options", [
    (1.0, {}), (-0.1, {}), ({"up": 1.5}, {}), (0.5, {"bogus": 1}), (0.5, {"criterion": "random"}),
    (0.5, {"round_to": 0}), (0.5, {"max_layer_ratio": 1.0}), (0.5, {"target": "latency"}),
])
def test_bad_options(prune, options):
    with pytest.raises(OptionError):
        StructuredPruning(prune, options)


def test_pattern_ratio_that_matches_nothing_lists_candidates():
    gm = capture(DeadChannels().eval(), (torch.randn(2, 8),)).module
    with pytest.raises(OptionError, match="candidates: down, up"):
        StructuredPruning({"encoder.*": 0.5}).run(gm)


def test_pattern_ratios_name_layers_whose_batchnorm_was_folded():
    """O3 folds each BatchNorm into its convolution before pruning; the folded weight stays under the
    convolution's module path, so a pattern naming the container still selects its channels."""
    def block() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    model.add_module("body", block())
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(16 * 25, 4)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, (torch.randn(2, 3, 5, 5),), level="O3", prune={"stem.*": 0.5},
                                measure_latency=False, speed_check=False, progress=False)
    assert opt.report["fold_batchnorm"].modified and not opt.report["fold_batchnorm"].rolled_back
    weights = {name: p.shape for name, p in opt.graph_module.named_parameters() if p.dim() == 4}
    body = [shape for name, shape in weights.items() if name.startswith("body.0.")]
    stem = [shape for name, shape in weights.items() if name.startswith("stem.0.")]
    assert body and stem, sorted(weights)
    # the stem's output channels halved (and the body's inputs with them); the body's outputs kept
    assert stem[0][0] == 8 and body[0][:2] == (16, 8), weights
    for batch in (1, 3):
        assert opt(torch.randn(batch, 3, 5, 5)).shape == (batch, 4)


class SiblingBlock(nn.Module):
    """Two linears reading one input (q and k of attention, an inception block's branches): O1 merges them."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.ModuleDict({"a": nn.Linear(12, 16), "b": nn.Linear(12, 16)})
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.branch["a"](x)) * torch.sigmoid(self.branch["b"](x)))


def test_pattern_ratios_name_layers_that_a_fusion_merged():
    """Horizontal GEMM merging runs before pruning; the merged weight stays under the first branch's module,
    so a pattern naming the branches' container still selects their channels (it matched no layer before,
    as tune's per-group patterns on MiniLM's attention.self.* showed)."""
    torch.manual_seed(0)
    model = SiblingBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, (torch.randn(4, 12),), level="O3", prune={"branch.*": 0.5},
                                measure_latency=False, speed_check=False, progress=False)
    assert opt.report.matches().get("merged 2× linear") == 1, opt.report.matches()
    out = dict(opt.graph_module.named_parameters())
    assert [p.shape for name, p in out.items() if name.startswith("out.") and p.dim() == 2] == [(3, 8)], out.keys()
    for batch in (1, 5):
        x = torch.randn(batch, 12)
        assert opt(x).shape == (batch, 3)


def test_no_prunable_group_leaves_the_model_unchanged():
    model = nn.Linear(8, 4).eval()
    gm = capture(model, (torch.randn(2, 8),)).module
    with pytest.warns(UserWarning, match="no prunable channel group"):
        result = StructuredPruning(0.5).run(gm)
    assert not result.modified and gm.weight.shape == (4, 8)


@pytest.mark.parametrize("options", [{}, {"ranking": "local"}, {"target": "params"},
                                     {"sensitivity": True}, {"criterion": "activation"}])
def test_optimize_meets_the_target(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 10)).eval()
    x = torch.randn(2, 3, 6, 6)
    calibration = [(torch.randn(4, 3, 6, 6),) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = graphopt.optimize(model, (x,), prune=0.5, prune_options=options, calibration_data=calibration,
                                disable=["int8_dynamic"], measure_latency=False, progress=False)
    stats = opt.report["structured_pruning"].stats
    kind = "params" if options.get("target") == "params" else "flops"
    assert stats[f"{kind}_after"] <= 0.5 * stats[f"{kind}_before"] * 1.0001
    assert stats[f"{kind}_after"] >= 0.2 * stats[f"{kind}_before"]       # no layer emptied to get there
    assert opt(torch.randn(5, 3, 6, 6)).shape == (5, 10)
    torch.export.export(opt.graph_module, (x,), strict=False)


def _hf(kind: str):
    import transformers
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=32)
        return transformers.BertModel(config).eval(), (torch.randint(0, 99, (2, 7)),)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48)
    return transformers.ViTModel(config).eval(), (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_hugging_face_heads_and_ffn(kind):
    model, inputs = _hf(kind)
    gm, analysis, plan, masked, sliced = masked_and_sliced(model, inputs, seed=0, ratio=0.5)
    pruned_heads = [g for g in analysis.prunable() if g.gran == 8 and plan.get(g.name)]
    pruned_ffn = [g for g in analysis.prunable() if g.gran == 1 and plan.get(g.name)]
    assert len(pruned_heads) == 2 and len(pruned_ffn) == 2    # one of each per layer
    with torch.no_grad():
        err = compare(sliced(*inputs), masked(*inputs))
    assert err.mismatch is None and err.max_rel <= TOL
    query = next(m.attr for m in pruned_heads[0].members if m.role == "out")   # BERT query / ViT q_proj
    assert ir.attr_path(sliced, query).shape[0] == 16   # 2 of 4 heads of 8 channels left
    exported = torch.export.export(sliced, inputs, strict=False).module()
    with torch.no_grad():
        assert compare(exported(*inputs), sliced(*inputs)).max_rel <= TOL


def test_fused_qkv_slices_prune_by_heads():
    """O1 fuses BERT's q/k/v into one linear read by three static slices: heads stay prunable through them."""
    model, inputs = _hf("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = graphopt.optimize(model, inputs, level="O1", quantize=None, measure_latency=False,
                                  progress=False).graph_module
    assert any(ir.is_op(n, torch.ops.aten.slice) for n in fused.graph.nodes)
    analysis = analyze(fused)
    heads = [g for g in analysis.prunable() if g.gran == 8]
    assert len(heads) == 2 and all(len({m.attr for m in g.members if m.role == "out"}) == 1 for g in heads)
    plan = random_plan(analysis, 0, 0.5)
    masked, sliced = copy.deepcopy(fused), copy.deepcopy(fused)
    slicing.mask(masked, analysis, plan)
    slicing.apply(sliced, analyze(sliced), plan)
    x = (torch.randint(0, 99, (3, 7)),)   # the sequence length is static in the capture
    with torch.no_grad():
        err = compare(sliced(*x), masked(*x))
    assert err.mismatch is None and err.max_rel <= TOL
    removed = sum(len(plan.get(g.name, ())) for g in heads)
    fused_qkv = next(m.attr for m in heads[0].members if m.role == "out")
    assert removed and ir.attr_path(sliced, fused_qkv).shape[0] < ir.attr_path(fused, fused_qkv).shape[0]


@pytest.mark.parametrize("seq", [12, 24])
def test_flops_of_a_token_model_count_its_example_sequence_per_sample(seq):
    """A symbolic batch counts as 1 and a symbolic sequence as its example length: linears grow with seq,
    attention with seq² (hand count for a 1-layer BERT, hidden 32, 2 heads, FFN 64, with its pooler)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (3, seq)), "attention_mask": torch.ones(3, seq, dtype=torch.long)}
    gm = graphopt.optimize(model, (), example_kwargs=kwargs, level="O0", progress=False,
                           measure_latency=False).graph_module
    per_token = 3 * 32 * 32 + 32 * 32 + 2 * 32 * 64                 # Q, K, V, output projection, FFN
    attention = seq * seq * (16 + 16) * 2                            # QKᵀ and PV, 2 heads of 16
    assert allocate.count_flops(gm) == per_token * seq + attention + 32 * 32   # + pooler on one token
