"""optimize(..., generation=True, kv_cache="int8"): keys and values stored int8 with a scale per row, head and
token. The tokens are checked against Hugging Face's own generate() on a cache that rounds its states the same
way (written here, independently of graphopt), the budget against its rollback, and the bytes against the
formula."""
from __future__ import annotations

import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.cache_utils import DynamicCache, DynamicLayer

import graphopt
from graphopt.errors import OptionError
from graphopt.llm.decoder import quantize_states
from graphopt.llm.onnx import generate_onnx

from .conftest import prompt

FAST = dict(measure_latency=False, progress=False)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 of each head vector (the last axis), back in float: the reference of the int8 cache. A
    zero vector stays zero (the pad token's embedding is zero, and so are its keys in a model without bias)."""
    step = x.abs().amax(-1, keepdim=True) / 127
    return torch.where(step > 0, (x / step).round().clamp(-127, 127) * step, torch.zeros_like(x))


class RoundingLayer(DynamicLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(rounded(key_states), rounded(value_states), *args, **kwargs)


def hf_int8_generate(model: torch.nn.Module, ids: torch.Tensor, new: int, mask: torch.Tensor | None = None):
    cache = DynamicCache(config=model.config)
    cache.layers = [RoundingLayer() for _ in cache.layers]
    return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False,
                          pad_token_id=0)


def int8_lm(model: torch.nn.Module, ids: torch.Tensor, **options) -> torch.nn.Module:
    return graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=32,
                             kv_cache="int8", **{"level": "O1", **FAST, **options})


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(1, 9), dim=st.sampled_from([1, 7, 8, 64]),
       outlier=st.floats(1.0, 1e4), seed=st.integers(0, 2**16))
def test_quantize_states_rounds_each_head_vector_within_half_a_step(batch, heads, tokens, dim, outlier, seed):
    x = torch.randn(batch, heads, tokens, dim, generator=torch.Generator().manual_seed(seed))
    x[..., 0] *= outlier                                          # one channel far larger than the others
    codes, scales = quantize_states(x, torch.float32)
    assert codes.dtype == torch.int8 and scales.shape == (batch, heads, tokens, 1)
    assert int(codes.abs().max()) == 127                          # each vector's largest value uses the full range
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(scales, step)
    assert ((codes.float() * scales - x).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("batch", [2, 3])
def test_int8_cache_generates_hugging_face_tokens_on_a_rounding_cache(llama, batch):
    ids = prompt(batch=batch, seed=batch)
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0                                              # a left-padded row
    lm = int8_lm(llama, prompt())
    record = lm.report["kv_cache_int8"]
    assert record.modified and not record.rolled_back and lm.spec.int8
    assert torch.equal(lm.generate(ids, max_new_tokens=12, attention_mask=mask),
                       hf_int8_generate(llama, ids, 12, mask))


def test_int8_cache_bytes_and_report(llama):
    lm = int8_lm(llama, prompt())
    record = lm.report["kv_cache_int8"]
    layers, kv_heads, head_dim = 2, 2, 8                           # tests/llm/conftest.py's tiny Llama
    float_bytes = 2 * layers * kv_heads * 32 * head_dim * 4          # keys and values, 32 slots, float32
    assert record.stats["float_cache_bytes_per_row"] == float_bytes
    assert record.stats["cache_bytes_per_row"] == float_bytes * (head_dim + 4) / (4 * head_dim)   # codes + scale
    assert 0.99 <= record.min_cosine < 1.0                          # int8 rounds, within the default budget
    assert "kv_cache_int8" in str(lm.report)
    tokens = lm.report.meta["generation"]                           # against the float cache of the model
    assert tokens["perplexity_after"] == pytest.approx(tokens["perplexity_before"], rel=2e-2)


def test_budget_rolls_the_int8_cache_back(llama):
    ids = prompt()
    lm = int8_lm(llama, ids, kv_cache_budget=1.0)
    record = lm.report["kv_cache_int8"]
    assert record.rolled_back and record.code == "budget_exceeded" and "kv_cache_budget" in record.reason
    assert not lm.spec.int8
    assert torch.equal(lm.generate(ids, max_new_tokens=8), llama.generate(ids, max_new_tokens=8, do_sample=False))


def test_onnx_decoder_with_an_int8_cache(llama, tmp_path):
    ids = prompt()
    lm = int8_lm(llama, ids)
    path = graphopt.export_onnx(lm, (), tmp_path / "lm.onnx", example_kwargs={"input_ids": ids})
    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(path)).graph.input}
    assert inputs["past_key_values.0.key"] == onnx.TensorProto.INT8
    assert inputs["past_key_values.0.key_scale"] == onnx.TensorProto.FLOAT
    batch = prompt(batch=3, length=5, seed=4)
    assert torch.equal(generate_onnx(path, batch, 8), lm.generate(batch, 8))


@pytest.mark.parametrize("options, message", [
    (dict(generation=True, max_cache_len=32, kv_cache="int4"), "kv_cache='int4'"),
    (dict(kv_cache="int8"), "generation=True only"),
    (dict(generation=True, max_cache_len=32, kv_cache="int8", kv_cache_budget=0), "kv_cache_budget=0"),
])
def test_bad_kv_cache_options(llama, options, message):
    with pytest.raises(OptionError, match=message):
        graphopt.optimize(llama, example_kwargs={"input_ids": prompt()}, **FAST, **options)
