"""export_onnx of a generation module: a decoder with past key values, and ONNX Runtime's greedy loop gives
the torch module's tokens."""
from __future__ import annotations

import onnx
import torch

import graphopt
from graphopt.llm.onnx import generate_onnx

from .conftest import prompt


def test_onnx_decoder_generates_the_same_tokens(llama, tmp_path):
    ids = prompt()
    lm = graphopt.optimize(llama, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=24,
                           level="O1", measure_latency=False, progress=False)
    path = graphopt.export_onnx(lm, (), tmp_path / "lm.onnx", example_kwargs={"input_ids": ids})
    model = onnx.load(str(path))
    cache = [f"{i}.{kind}" for i in range(2) for kind in ("key", "value")]      # 2 layers' keys and values
    assert [i.name for i in model.graph.input] == ["input_ids", "position_ids", "cache_position", "attention_mask",
                                                   *(f"past_key_values.{c}" for c in cache)]
    assert [o.name for o in model.graph.output] == ["logits", *(f"present.{c}" for c in cache)]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)          # standard operators only
    assert torch.equal(generate_onnx(path, ids, 12), lm.generate(ids, max_new_tokens=12))
    batch = prompt(batch=3, length=5, seed=4)
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    assert torch.equal(generate_onnx(path, batch, 8, mask), lm.generate(batch, 8, attention_mask=mask))
