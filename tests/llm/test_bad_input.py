"""Clear graphopt errors for what generation=True cannot take."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import graphopt

from .conftest import VOCAB, prompt, tiny_lm

FAST = dict(level="O1", measure_latency=False, progress=False)


def test_cache_shorter_than_the_prompt(llama):
    with pytest.raises(graphopt.OptionError, match="shorter than the example prompt"):
        graphopt.optimize(llama, example_kwargs={"input_ids": prompt(length=9)}, generation=True,
                          max_cache_len=8, **FAST)


@pytest.mark.parametrize("options, match", [
    (dict(max_cache_len=16), "generation=True only"),
    (dict(generation=True), "needs max_cache_len"),
    (dict(generation=True, max_cache_len=0), "positive int"),
])
def test_generation_options(llama, options, match):
    with pytest.raises(graphopt.OptionError, match=match):
        graphopt.optimize(llama, example_kwargs={"input_ids": prompt()}, **options, **FAST)


def test_encoder_is_refused():
    torch.manual_seed(0)
    encoder = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)).eval()
    with pytest.raises(graphopt.InputError, match="cannot generate"):
        graphopt.optimize(encoder, example_kwargs={"input_ids": prompt()}, generation=True, max_cache_len=16,
                          **FAST)


def test_unsupported_cache_types():
    model = tiny_lm("llama")
    model.generation_config.cache_implementation = "offloaded"
    with pytest.raises(graphopt.UnsupportedError, match="'offloaded' cache"):
        graphopt.optimize(model, example_kwargs={"input_ids": prompt()}, generation=True, max_cache_len=16, **FAST)
    sliding = tf.AutoModelForCausalLM.from_config(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8)).eval()
    with pytest.raises(graphopt.UnsupportedError, match="sliding window of 8"):
        graphopt.optimize(sliding, example_kwargs={"input_ids": prompt()}, generation=True, max_cache_len=16, **FAST)


def test_generate_past_the_cache(llama):
    lm = graphopt.optimize(llama, example_kwargs={"input_ids": prompt()}, generation=True, max_cache_len=10,
                           verify=False, **FAST)
    with pytest.raises(graphopt.InputError, match="max_cache_len=10"):
        lm.generate(prompt(), max_new_tokens=5)
    assert lm.generate(prompt(), max_new_tokens=4).shape == (2, 11)   # 7 + 4 − 1 = 10 slots
