"""Tiny decoder-only Hugging Face models from configs (random weights, seeded): vocab 96, hidden 32, 2 layers,
4 query heads over 2 KV heads where the family has grouped-query attention."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "phi3": lambda: tf.Phi3Config(**COMMON),
    "gemma": lambda: tf.GemmaConfig(**COMMON, head_dim=8),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def tiny_lm(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def prompt(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    """Token ids from 3 up (0, 1, 2 are pad, BOS and EOS)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_lm("llama")
