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
    names = [i.name for i in model.graph.input]
    assert names[:4] == ["input_ids", "position_ids", "cache_position", "attention_mask"]
    assert len(names) == 4 + 2 * 2 and len(model.graph.output) == 1 + 2 * 2    # 2 layers' keys and values in, out
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)          # standard operators only
    assert torch.equal(generate_onnx(path, ids, 12), lm.generate(ids, max_new_tokens=12))
    batch = prompt(batch=3, length=5, seed=4)
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    assert torch.equal(generate_onnx(path, batch, 8, mask), lm.generate(batch, 8, attention_mask=mask))
