"""export_onnx of a generation module: a decoder with past key values, and ONNX Runtime's greedy loop gives
the torch module's tokens; with ops="onnxruntime" too (GroupQueryAttention, MatMulNBits)."""
from __future__ import annotations

import onnx
import torch

import graphopt
from graphopt.engine.verify import LOSSLESS, compare
from graphopt.llm.generate import next_inputs, prefill_inputs
from graphopt.llm.onnx import OnnxDecoderStep, generate_onnx, io_names

from ..onnx.helpers import exact_kernels
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


def _contrib_decoder(lm: torch.nn.Module, ids: torch.Tensor, path) -> onnx.ModelProto:
    """The module's decoder written with ONNX Runtime's contrib operators: one GroupQueryAttention a layer, in
    place of attention and its cache write, and the standard file's inputs and outputs."""
    path = graphopt.export_onnx(lm, (), path, example_kwargs={"input_ids": ids}, ops="onnxruntime")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    layers = len(lm.spec.heads_dims) // 2
    assert ops.count("GroupQueryAttention") == layers and not {"Attention", "ScatterND"} & set(ops)
    inputs, outputs = io_names(layers)
    assert [i.name for i in model.graph.input] == inputs and [o.name for o in model.graph.output] == outputs
    record = next(r for r in lm.report.meta["export_passes"] if r["name"] == "onnx_group_query_attention")
    assert record["modified"] and not record["rolled_back"]
    return model


def _same_tokens(lm: torch.nn.Module, path) -> None:
    """ONNX Runtime's greedy loop and the module's, with the model's EOS and pad tokens in both: batch 1, and a
    batch of 3 whose middle row is left-padded."""
    stop = {k: getattr(lm.generation_config, k) for k in ("eos_token_id", "pad_token_id")}
    single = prompt(batch=1, length=6, seed=2)
    assert torch.equal(generate_onnx(path, single, 10, **stop), lm.generate(single, max_new_tokens=10))
    batch = prompt(batch=3, length=5, seed=4)
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    assert torch.equal(generate_onnx(path, batch, 8, mask, **stop), lm.generate(batch, 8, attention_mask=mask))


def test_onnxruntime_decoder_uses_group_query_attention_and_generates_the_same_tokens(llama, tmp_path):
    ids = prompt()
    lm = graphopt.optimize(llama, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=24,
                           level="O1", measure_latency=False, progress=False, verify=False)
    _contrib_decoder(lm, ids, tmp_path / "lm.onnx")
    _same_tokens(lm, tmp_path / "lm.onnx")
    # a decode step after a left-padded prefill, against the module: logits and every cache slot
    batch = prompt(batch=3, length=5, seed=6)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    step = OnnxDecoderStep(tmp_path / "lm.onnx")
    inputs = prefill_inputs(batch, mask, lm.spec)
    for _ in range(2):
        with torch.no_grad():
            want, want_cache = lm(*inputs)
        got, got_cache = step(*inputs)
        reason = LOSSLESS.check(compare(got, want))
        assert reason is None, reason
        for a, b in zip(got_cache, want_cache):
            assert LOSSLESS.check(compare(a, b)) is None
        inputs = next_inputs(want[:, -1].argmax(-1), inputs, want_cache)


def test_onnxruntime_int4_decoder_is_matmul_nbits_and_generates_the_int4_modules_tokens(llama, tmp_path):
    ids = prompt()
    lm = graphopt.optimize(llama, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=24,
                           level="O2", quantize="int4-weight-only", measure_latency=False, progress=False,
                           verify=False)
    model = _contrib_decoder(lm, ids, tmp_path / "lm.onnx")
    linears = [n for n in lm.graph_module.graph.nodes if str(n.target).startswith(("graphopt.w4a16", "graphopt.w8a16"))]
    bits = [{a.name: a.i for a in n.attribute}["bits"] for n in model.graph.node if n.op_type == "MatMulNBits"]
    int4 = [n for n in linears if "w4a16" in str(n.target)]
    assert int4 and bits == [4] * len(int4)                 # every int4 layer; the int8 head stays standard
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(linears) - len(int4)
    with exact_kernels():        # the int4 module's own float32 path, as the file computes it
        _same_tokens(lm, tmp_path / "lm.onnx")
