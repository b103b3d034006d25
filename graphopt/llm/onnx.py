"""Generation with ONNX Runtime on a decoder `graphopt.export_onnx` wrote from a generation module.

    graphopt.export_onnx(lm, (), "lm.onnx", example_kwargs={"input_ids": ids})
    tokens = graphopt.llm.onnx.generate_onnx("lm.onnx", ids, max_new_tokens=32)

The file's inputs are input_ids [batch, sequence], position_ids [batch, sequence], cache_position
[sequence], attention_mask [batch, max_cache_len] and the past keys and values (key_0, value_0, …, each
[batch, kv_heads, max_cache_len, head_dim]); its outputs the logits [batch, sequence, vocab] and the present
keys and values in the same order. The loop is graphopt.llm.generate's, with the session as the step.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch

from graphopt.onnx.ir import session

from .generate import CacheSpec, generate

_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
           onnx.TensorProto.BFLOAT16: torch.bfloat16}


class OnnxDecoderStep:
    """An ONNX Runtime session as a decoder step (torch tensors in and out)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.session = session(path)
        model = onnx.load(str(path), load_external_data=False)
        past = [i for i in model.graph.input][4:]
        dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in past]
        self.spec = CacheSpec(dims[0][2], tuple((d[1], d[3]) for d in dims),
                              _DTYPES[past[0].type.tensor_type.elem_type])
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
