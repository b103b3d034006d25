"""Channels followed through squeeze-excitation gates, window attention, transposed-weight linears and
shared layers (issue 14, class 7): masked-vs-sliced on Hugging Face tiny configs, pruning asserted to fire."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphopt
from graphopt.engine import ir
from graphopt.frontend.capture import capture
from graphopt.passes.pruning import analyze
from graphopt.passes.pruning import slice as slicing
from graphopt.engine.verify import compare

from .test_pruning import TOL, random_plan

transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval(), lambda b: {"input_ids": torch.randint(0, 99, (b, 7)),
                                                             "use_cache": False}


def _albert():
    config = transformers.AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
    return transformers.AlbertModel(config).eval(), lambda b: {"input_ids": torch.randint(0, 99, (b, 7))}


def _swin():
    config = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2],
                                     num_heads=[2], window_size=4, mlp_ratio=2.0)
    return transformers.SwinModel(config).eval(), lambda b: {"pixel_values": torch.randn(b, 3, 16, 16)}


def _o1(model, kwargs) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graphopt.optimize(model, (), example_kwargs=kwargs, level="O1", quantize=None,
                                 measure_latency=False, progress=False).graph_module


def _masked_vs_sliced(gm: torch.fx.GraphModule, kwargs: dict) -> dict[str, list[int]]:
    analysis = analyze(gm)
    plan = random_plan(analysis, 0, 0.5)
    masked, sliced = copy.deepcopy(gm), copy.deepcopy(gm)
    slicing.mask(masked, analysis, plan)
    slicing.apply(sliced, analyze(sliced), plan)
    with torch.no_grad():
        err = compare(sliced(**kwargs), masked(**kwargs))
    assert err.mismatch is None and err.max_rel <= TOL
    return {g: u for g, u in plan.items() if u}


@pytest.mark.parametrize("make", [_gpt2, _albert, _swin])
def test_hugging_face_blocks_prune_at_o1(make):
    """GPT-2: Conv1D views merge a symbolic batch; ALBERT: one layer's weights read by every layer;
    Swin: windows merged into the batch, rolled, a folded relative-position bias per head."""
    model, inputs = make()
    gm = _o1(model, inputs(2))
    plan = _masked_vs_sliced(gm, inputs(3))
    analysis = analyze(gm)
    units = {g.name: g.gran for g in analysis.prunable()}
    assert any(units[g] > 1 for g in plan) and any(units[g] == 1 for g in plan)   # heads and MLP neurons


def test_gpt2_conv1d_addmm_prunes_at_capture():
    """At O0 GPT-2's Conv1D is addmm(b, x, W[K, N]): W's dim 1 holds the output channels."""
    model, inputs = _gpt2()
    gm = capture(model, (), inputs(2)).module
    assert any(n.target == torch.ops.aten.addmm.default for n in gm.graph.nodes)
    plan = _masked_vs_sliced(gm, inputs(3))
    fc = "h.0.mlp.c_fc.weight"
    analysis = analyze(gm)
    group = next(g for g in analysis.prunable() if any(m.attr == fc and m.dim == 1 for m in g.members))
    assert plan.get(group.name)


def test_albert_shared_layer_is_sliced_once_for_all_its_readers():
    model, inputs = _albert()
    gm = capture(model, (), inputs(2)).module
    analysis = analyze(gm)
    ffn = "encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"
    (group,) = [g for g in analysis.prunable() if any(m.attr == ffn and m.role == "out" for m in g.members)]
    assert len(group.sources) == 2                       # both layers' FFN linears, one group
    plan = {group.name: list(range(0, 48, 2))}
    masked, sliced = copy.deepcopy(gm), copy.deepcopy(gm)
    slicing.mask(masked, analysis, plan)
    slicing.apply(sliced, analyze(sliced), plan)
    assert ir.attr_path(sliced, ffn).shape[0] == 24
    x = inputs(3)
    with torch.no_grad():
        err = compare(sliced(**x), masked(**x))
    assert err.mismatch is None and err.max_rel <= TOL
