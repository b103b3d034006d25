"""Generation with ONNX Runtime on a decoder `graphopt.export_onnx` wrote from a generation module.

    graphopt.export_onnx(lm, (), "lm.onnx", example_kwargs={"input_ids": ids})
    tokens = graphopt.llm.onnx.generate_onnx("lm.onnx", ids, max_new_tokens=32)

The file's inputs are input_ids [batch, sequence], position_ids [batch, sequence], cache_position
[sequence], attention_mask [batch, max_cache_len] and the past keys and values (past_key_values.0.key,
past_key_values.0.value, …, each [batch, kv_heads, max_cache_len, head_dim]); its outputs `logits` [batch,
sequence, vocab] and the present keys and values (present.0.key, present.0.value, …), as `io_names` names them
(an int8 cache adds each state's scales: past_key_values.0.key_scale, …).
The loop is graphopt.llm.generate's, with the session as the step.

A decoder written with ONNX Runtime's contrib operators (`export_onnx(..., ops="onnxruntime")`) has the same
inputs and outputs: its GroupQueryAttention nodes derive seqlens_k, the total length and the attention bias
from cache_position and attention_mask inside the graph (graphopt.passes.onnx.gqa), so this loop feeds either
file as it is. That file reads cache_position as consecutive slots and the cache after them as unwritten,
which is what the loop feeds: arange(S) at the prefill, then one slot a step, from an empty cache.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch

from graphopt.onnx.sessions import session

from .generate import CacheSpec, generate

#: The decoder step's leading inputs, in DecoderStep.forward's order.
STEP_INPUTS = ("input_ids", "position_ids", "cache_position", "attention_mask")


def io_names(layers: int, int8: bool = False) -> tuple[list[str], list[str]]:
    """The decoder file's input and output names for a model of `layers` layers (the onnxruntime-genai
    convention: past_key_values.{i}.key in, present.{i}.key out); an int8 cache's scales follow each state
    as past_key_values.{i}.key_scale (graphopt.llm.decoder)."""
    parts = ("", "_scale") if int8 else ("",)
    def cache(prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kind}{part}" for i in range(layers) for kind in ("key", "value") for part in parts]
    return [*STEP_INPUTS, *cache("past_key_values")], ["logits", *cache("present")]


def rename_io(proto: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """`proto` with its graph inputs and outputs renamed, in order, to `inputs` and `outputs` (every node
    reading or writing them follows). An output that is also an input, or another output, is copied by an
    Identity first, so that each name names one value."""
    graph = proto.graph
    if len(graph.input) != len(inputs) or len(graph.output) != len(outputs):
        raise ValueError(f"the decoder has {len(graph.input)} inputs and {len(graph.output)} outputs, "
                         f"expected {len(inputs)} and {len(outputs)}")
    rename = {old.name: new for old, new in zip(graph.input, inputs)}
    seen = set(rename)
    for value, new in zip(graph.output, outputs):
        if value.name in seen:
            graph.node.append(onnx.helper.make_node("Identity", [value.name], [new], name=f"{new}_copy"))
        else:
            rename[value.name] = new
        seen.add(value.name)
        value.name = new
    for value in graph.input:
        value.name = rename[value.name]
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
    for info in graph.value_info:
        info.name = rename.get(info.name, info.name)
    return proto


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
           onnx.TensorProto.BFLOAT16: torch.bfloat16}


class OnnxDecoderStep:
    """An ONNX Runtime session as a decoder step (torch tensors in and out)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.session = session(path)
        model = onnx.load(str(path), load_external_data=False)
        past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
        states = [i for i in past if not i.name.endswith("_scale")]
        dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in states]
        int8 = len(states) < len(past)   # an int8 cache: the float type is its scales'
        self.spec = CacheSpec(dims[0][2], tuple((d[1], d[3]) for d in dims),
                              _DTYPES[past[1 if int8 else 0].type.tensor_type.elem_type], int8)
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        leaves = [*inputs[:4], *inputs[4]]
        feeds = {name: leaf.detach().cpu().numpy() for name, leaf in zip(self.names, leaves)}
        outputs = self.session.run(None, feeds)
        return torch.from_numpy(np.asarray(outputs[0])), tuple(torch.from_numpy(np.asarray(o)) for o in outputs[1:])


def generate_onnx(path: str | os.PathLike, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
    """Greedy (or sampled, with `do_sample=True` and the warpers' settings) generation in ONNX Runtime."""
    step = OnnxDecoderStep(path)
    settings.setdefault("do_sample", False)
    return generate(step, step.spec, input_ids, max_new_tokens, attention_mask, **settings)
