"""graphopt.optimize(..., generation=True): the same tokens as Hugging Face's generate() at O1."""
from __future__ import annotations

import pytest
import torch

import graphopt

from .conftest import CONFIGS, prompt, tiny_lm

FAST = dict(measure_latency=False, progress=False)


def optimized(model: torch.nn.Module, ids: torch.Tensor, **options) -> torch.nn.Module:
    return graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=32,
                             **{"level": "O1", **FAST, **options})


@pytest.fixture(scope="module")
def llama_lm(llama):
    return optimized(llama, prompt())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_tokens_equal_hugging_face_per_family(family):
    model = tiny_lm(family)
    ids = prompt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = optimized(model, ids)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    got = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected), (got, expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the model is untouched
    tokens = lm.report.meta["generation"]
    assert tokens["greedy_agreement"] == 1.0 and tokens["first_divergence"] is None
    # O1 is lossless: perplexity moves by float32 rounding only (relative 1e-5 ≫ rounding, ≪ any real change)
    assert tokens["perplexity_after"] == pytest.approx(tokens["perplexity_before"], rel=1e-5)
    assert any(r.modified for r in lm.report.records), "no O1 pass changed the decoder graph"


def test_batched_left_padding_matches_hugging_face(llama, llama_lm):
    ids = prompt(batch=3, length=9, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = llama_lm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=10, top_p=0.9)])
def test_seeded_sampling_matches_hugging_face(llama, llama_lm, settings):
    ids = prompt(batch=2, length=5, seed=2)
    torch.manual_seed(123)
    expected = llama.generate(ids, max_new_tokens=10, do_sample=True, **settings)
    torch.manual_seed(123)
    got = llama_lm.generate(ids, max_new_tokens=10, do_sample=True, **settings)
    assert torch.equal(got, expected)
    again = llama_lm.generate(ids, max_new_tokens=10, do_sample=True,
                              generator=torch.Generator().manual_seed(5), **settings)
    assert torch.equal(again, llama_lm.generate(ids, max_new_tokens=10, do_sample=True,
                                                generator=torch.Generator().manual_seed(5), **settings))


def test_eos_stops_and_pads_like_hugging_face(llama, llama_lm):
    ids = prompt(batch=2, length=6, seed=3)
    greedy = llama.generate(ids, max_new_tokens=8, do_sample=False)
    eos = int(greedy[0, ids.shape[1] + 2])     # row 0's third new token: row 0 stops there
    expected = llama.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    got = llama_lm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == llama.generation_config.pad_token_id).all()


def test_one_report_for_prefill_and_decode(llama_lm):
    report = llama_lm.report
    assert report.baseline is not None and report.final is not None
    assert report.final.max_rel_err is not None and report.final.max_rel_err < 1e-4   # verify.LOSSLESS
    assert "generation" in report.meta and report.meta["generation"]["greedy_steps"] == 16


def test_int8_weight_only_through_generation(llama):
    ids = prompt()
    lm = optimized(llama, ids, level="O2", quantize="int8-weight-only")
    assert lm.report["int8_weight_only"].modified and not lm.report["int8_weight_only"].rolled_back
    tokens = lm.report.meta["generation"]
    assert 0.0 <= tokens["greedy_agreement"] <= 1.0 and tokens["next_token_logits_max_abs_err"] > 0   # int8 rounds
    # per-channel int8 weights move perplexity by well under 1 % on a random tiny model (measured: 0.02 %)
    assert tokens["perplexity_after"] == pytest.approx(tokens["perplexity_before"], rel=1e-2)
    assert lm.generate(ids, max_new_tokens=6).shape == (2, 13)


def test_int8_layers_are_timed_at_a_decode_step(llama, monkeypatch):
    """The decoder graph is captured on a prompt (M = batch × prompt length) but generating is mostly decode
    steps (M = batch): the int8 pass's per-layer timing judges each layer at the example's batch, where
    weight-only layers pay (a prompt's M would keep them float)."""
    from graphopt.passes.quantize import layer_speed
    timed: list[int] = []
    monkeypatch.setattr(layer_speed, "_time", lambda rows, *args: timed.append(rows))   # None: int8 is kept
    for batch in (1, 3):
        timed.clear()
        optimized(llama, prompt(batch=batch, length=7), level="O2", quantize="int8-weight-only",
                  quantize_options={"layer_speed": True})
        assert timed and set(timed) == {batch}, timed
