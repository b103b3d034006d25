"""Capture a Hugging Face causal LM's decoder step (graphopt.llm.decoder) as one graph for prefill and decode.

The step is exported once with torch.export (non-strict) with a symbolic batch and a symbolic query length
(1 ≤ q ≤ max_cache_len), so the same graph runs the prompt (q = S) and each decode step (q = 1); the cache
length is static. The model is not deep-copied: a structural copy in eval mode shares its parameter and
buffer tensors (an LLM's weights are most of the memory), and no pass writes into them (LLM pruning runs
before capture, on its own copy: graphopt.llm.prune).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export import Dim
from transformers.cache_utils import DynamicCache

from graphopt.errors import CaptureError, InputError
from graphopt.frontend.capture import _first_line, _hint

from .decoder import DecoderStep, check_generation_model
from .generate import CacheSpec, next_inputs, prefill_inputs


@dataclass
class CapturedDecoder:
    module: fx.GraphModule        # the exported step
    step: DecoderStep             # the eager step (the reference the passes are verified against)
    spec: CacheSpec
    example: tuple                # prefill inputs of the example prompt


def shared_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s module tree in eval mode that shares its parameters and buffers (no weight copy)."""
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo).eval()


def capture_decoder(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    max_cache_len: int, kv_int8: bool = False) -> CapturedDecoder:
    step, spec = eager_step(model, input_ids, max_cache_len, kv_int8)
    input_ids, attention_mask = _at_least_two(input_ids, attention_mask)
    example = prefill_inputs(input_ids, attention_mask, spec)
    batch, query = Dim.AUTO, Dim("query", min=1, max=max_cache_len)
    shapes = ({0: batch, 1: query}, {0: batch, 1: query}, {0: query}, {0: batch},
              tuple({0: batch} for _ in example[4]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(step, example, dynamic_shapes=shapes, strict=False)
        except Exception as exc:   # torch raises many types; all become CaptureError
            raise CaptureError(_first_line(exc), _hint(exc)) from exc
    unlifted = exported.module()
    module = fx.GraphModule(unlifted, unlifted.graph)
    module.meta.update(getattr(unlifted, "meta", {}))
    return CapturedDecoder(module.eval(), step, spec, example)


def eager_step(model: torch.nn.Module, input_ids: torch.Tensor, max_cache_len: int,
               kv_int8: bool = False) -> tuple[DecoderStep, CacheSpec]:
    """`model`'s decoder step, run eagerly (on a structural copy sharing its tensors), and its cache's shape
    (an int8 cache with `kv_int8`)."""
    mask_kind, keyword = check_generation_model(model, max_cache_len)
    work = shared_eval_copy(model)
    spec = _cache_spec(work, keyword, input_ids, max_cache_len)
    return DecoderStep(work, mask_kind, keyword), dataclasses.replace(spec, int8=kv_int8)


def _at_least_two(input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The example with batch and length ≥ 2 (rows and tokens repeated): torch.export specialises a dimension
    whose example size is 1, and the graph must take any batch and both q = S and q = 1."""
    for dim in (0, 1):
        if input_ids.shape[dim] == 1:
            input_ids = input_ids.repeat_interleave(2, dim)
            attention_mask = attention_mask.repeat_interleave(2, dim) if attention_mask is not None else None
    return input_ids, attention_mask


def _cache_spec(model: torch.nn.Module, keyword: str, input_ids: torch.Tensor, max_cache_len: int) -> CacheSpec:
    """Heads and head size of each layer's keys and values, read from one eager token with a dynamic cache."""
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:1, :1], use_cache=True, **{keyword: cache})
    except Exception as exc:
        raise InputError(f"the model fails on the example input_ids: {_first_line(exc)}") from exc
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return CacheSpec(max_cache_len, tuple((t.shape[1], t.shape[3]) for t in tensors), tensors[0].dtype)


def verification_inputs(captured: CapturedDecoder, seed: int) -> list[tuple[tuple, dict]]:
    """Decoder-step inputs to verify passes on: a decode step first (the speed check times inputs[0]), the
    example's prefill, and a decode step at batch + 1 (the batch must stay symbolic)."""
    step, example = captured.step, captured.example
    decode = _decode_after(step, example)
    generator = torch.Generator().manual_seed(seed)
    ids = example[0]
    extra = torch.randint(0, int(ids.max()) + 1, (1, ids.shape[1]), generator=generator, dtype=ids.dtype)
    wider = prefill_inputs(torch.cat([ids, extra]), torch.cat([example[3][:, :ids.shape[1]], torch.ones_like(extra)]),
                           captured.spec)
    return [(decode, {}), (example, {}), (_decode_after(step, wider), {})]


def _decode_after(step: DecoderStep, inputs: tuple) -> tuple:
    with torch.no_grad():
        logits, present = step(*inputs)
    return next_inputs(logits[:, -1].argmax(-1), inputs, present)
