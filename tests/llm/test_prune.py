"""LLM pruning for generation (graphopt.llm.prune): MLP channels and whole KV groups, scored on text."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt.llm.prune import find_blocks, prune_lm

from .conftest import VOCAB, prompt, tiny_lm

FAMILIES = ["llama", "mistral", "qwen2", "gemma"]     # separate q/k/v/o and gate/up/down projections


def texts(count: int = 3, batch: int = 2, length: int = 12, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """Token batches with left padding in the first row, as a tokenizer gives them."""
    out = []
    for i in range(count):
        ids = prompt(batch, length, seed + i)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def zeroed(model: torch.nn.Module, pruned: torch.nn.Module) -> torch.nn.Module:
    """`model` with the units `pruned` removed zeroed instead (their down_proj / o_proj input columns)."""
    import copy
    work = copy.deepcopy(model)
    for block in find_blocks(work):
        kept = pruned.get_submodule(block.name)
        module = work.get_submodule(block.name)
        full, small = (module.down_proj, kept.down_proj) if block.kind == "mlp" else (module.o_proj, kept.o_proj)
        # kept columns: those of the original whose values survive in the pruned layer (columns are unique here)
        keep = [j for j in range(full.weight.shape[1])
                if any(torch.equal(full.weight[:, j], small.weight[:, k]) for k in range(small.weight.shape[1]))]
        with torch.no_grad():
            mask = torch.ones(full.weight.shape[1], dtype=torch.bool)
            mask[keep] = False
            full.weight[:, mask] = 0
    return work


@settings(max_examples=6, deadline=None)
@given(family=st.sampled_from(FAMILIES), ratio=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 50),
       batch=st.sampled_from([1, 3]))
def test_removing_units_computes_what_zeroing_them_does(family, ratio, seed, batch):
    model = tiny_lm(family, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_lm(model, ratio, texts(), {"sensitivity": False})
    layers = result.record.stats["layers"]
    assert any(g["pruned_units"] for g in layers.values())                      # the rewrite fired
    assert result.record.stats["params_after"] < result.record.stats["params_before"]
    ids = prompt(batch, 9, seed)
    torch.testing.assert_close(logits(result.model, ids), logits(zeroed(model, result.model), ids),
                               atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # the input is not modified


def test_the_least_important_group_and_channels_go_first():
    model = tiny_lm("llama")
    layer = model.model.layers[0]
    with torch.no_grad():   # KV group 1 (query heads 2, 3: o_proj columns 16..31) adds nothing to the residual
        layer.self_attn.o_proj.weight[:, 16:] = 0
        layer.mlp.down_proj.weight[:, 8:40] *= 1e-3    # 32 MLP channels barely contribute
    result = prune_lm(model, 0.5, texts())
    pruned = result.model.model.layers[0]
    torch.testing.assert_close(pruned.self_attn.o_proj.weight, layer.self_attn.o_proj.weight[:, :16])
    torch.testing.assert_close(pruned.self_attn.k_proj.weight, layer.self_attn.k_proj.weight[:8])
    keep = list(range(8)) + list(range(40, 64))
    torch.testing.assert_close(pruned.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, keep])
    cost = result.record.stats["layers"]["model.layers.0.self_attn"]["perplexity_cost"]
    assert abs(cost) < 1e-9                      # removing a group that adds nothing costs nothing


def test_generation_after_pruning_runs_at_other_batches_and_matches_the_pruned_model():
    model = tiny_lm("llama")
    calibration = texts()
    ids = prompt(2, 7)
    lm = graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=32,
                           level="O3", prune=0.5, quantize=None, calibration_data=calibration, speed_check=False,
                           progress=False)
    record = lm.report["structured_pruning"]
    assert record.stats["perplexity_after"] > 0 and all("perplexity_cost" in g for g in record.stats["layers"].values())
    assert [h for h, _ in lm.spec.heads_dims] == [1, 1, 1, 1]             # one KV head per layer left in the cache
    assert lm.report.baseline.param_bytes > lm.report.final.param_bytes     # the report shows what pruning saved
    generation = lm.report.meta["generation"]
    assert generation["perplexity_before"] != generation["perplexity_after"]   # measured against the original
    int8 = graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=32,
                             level="O3", prune=0.5, calibration_data=calibration, speed_check=False, progress=False)
    assert int8.report["smoothquant"].modified    # the text calibrated the graph passes (as decoder-step inputs)
    assert int8.generate(prompt(3, 5), max_new_tokens=3).shape == (3, 8)
    pruned = prune_lm(model, 0.5, calibration).model                         # the same pruning, deterministic
    for batch in (1, 3):
        prompt_ids = prompt(batch, 5, seed=batch)
        want = pruned.generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(lm.generate(prompt_ids, max_new_tokens=6, do_sample=False), want)


def test_finetune_recovers_a_pruned_generation_module_on_token_batches():
    model = tiny_lm("llama")
    calibration = texts(count=4)
    lm = graphopt.optimize(model, example_kwargs={"input_ids": prompt(2, 7)}, generation=True, max_cache_len=32,
                           level="O3", prune=0.5, quantize=None, calibration_data=calibration, speed_check=False,
                           progress=False)

    def distance(module: torch.nn.Module) -> float:
        """Mean KL of the teacher's next-token distributions to the module's, on the calibration text."""
        total = 0.0
        for item in calibration:
            with torch.no_grad():
                s = module(**item).logits.log_softmax(-1)
                t = model(**item).logits.log_softmax(-1)
            total += F.kl_div(s, t, reduction="batchmean", log_target=True).item()
        return total
    tuned = graphopt.finetune(lm, calibration, teacher=model, epochs=3, progress=False)
    assert type(tuned) is type(lm) and "structured_pruning" in [r.name for r in tuned.report.records]
    assert distance(tuned.source.model) < distance(lm.source.model)
    out = tuned.generate(prompt(1, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and int(out.max()) < VOCAB


def test_an_input_ids_attention_mask_pair_is_two_inputs_not_labels():
    from graphopt.training.finetuning import _split
    ids, mask = prompt(2, 6), torch.ones(2, 6, dtype=torch.long)
    assert _split((ids, mask)) == ((ids, mask), {}, None)
    images, labels = torch.randn(2, 3), torch.tensor([1, 0])
    args, _, got = _split((images, labels))
    assert got is labels and args == (images,)


def test_bad_pruning_requests_are_clear_errors():
    ids = prompt(2, 7)
    common = dict(example_kwargs={"input_ids": ids}, generation=True, max_cache_len=32, level="O3")
    with pytest.raises(graphopt.UnsupportedError, match="Llama-style"):
        graphopt.optimize(tiny_lm("gpt2"), prune=0.5, calibration_data=texts(), **common)
    with pytest.raises(graphopt.InputError, match="calibration"):
        graphopt.optimize(tiny_lm("llama"), prune=0.5, **common)
    with pytest.raises(graphopt.OptionError, match="removes no unit"):
        graphopt.optimize(tiny_lm("llama"), prune=0.01, calibration_data=texts(), **common)
    with pytest.raises(graphopt.OptionError, match="do not apply"):
        graphopt.optimize(tiny_lm("llama"), prune=0.5, calibration_data=texts(), prune_options={"criterion": "l1"},
                          **common)
