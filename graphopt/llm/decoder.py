"""One decoder step of a Hugging Face causal LM as a pure function of tensors (a static KV cache).

    logits, present = DecoderStep(model)(input_ids, position_ids, cache_position, attention_mask, past)

- `input_ids`, `position_ids`: [B, q] (q = prompt length at prefill, 1 when decoding);
- `cache_position`: [q], the cache slots the q new tokens are written to;
- `attention_mask`: [B, L] over the whole cache (L = max_cache_len): 1 where a real token is, or is being,
  written (left padding and unwritten slots are 0);
- `past`: (key_0, value_0, key_1, value_1, …), each [B, H_kv, L, head_dim]; `present` the same after the write.

With an int8 cache (`optimize(..., kv_cache="int8")`), each state in `past` is two tensors: int8 codes
[B, H_kv, L, head_dim] and scales [B, H_kv, L, 1] in the model's dtype, one per row, head and slot:

    scale = max_d |x[d]| / 127,   code[d] = round(x[d] / scale) ∈ [−127, 127],   x̂[d] = code[d] · scale

so each head vector of a token keeps its own range (|x̂ − x| ≤ scale / 2 per element) and the cache takes
(head_dim + 4) / (4 · head_dim) of its float32 bytes (0.27 at head_dim 64). Attention reads the dequantized
cache; the tokens of the step itself are quantized before they are read, as every later step reads them.

The write is out of place (`index_copy`, not `index_copy_`), so the captured graph is a pure function: the
pass manager can run it on its verification inputs any number of times, and ONNX gets past key values as
inputs and present ones as outputs. The attention mask is built here, once, as the 4-D mask Hugging Face's
`create_causal_mask` would build (query i at slot c_i sees slot j iff j ≤ c_i and slot j holds a real token),
and handed to the model, which uses a 4-D mask as given (boolean for SDPA, additive 0/−max for eager).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from graphopt.errors import InputError, UnsupportedError

#: Attention implementations whose 4-D mask this module builds (Hugging Face's `_attn_implementation`).
MASK_KINDS = ("sdpa", "eager")
#: `generation_config.cache_implementation` values that mean a plain full-attention KV cache.
PLAIN_CACHES = (None, "static", "dynamic")


#: The int8 cache's code range: symmetric, −127 … 127.
INT8_MAX = 127


def quantize_states(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and `dtype` scales of states [B, H, q, head_dim], one scale per head vector (module docstring)."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
    codes = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale.to(dtype)


class _State:
    """One layer's keys (or values): a float tensor, or int8 codes with their scales."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    @property
    def length(self) -> int:
        return self.tensors[0].shape[2]

    def write(self, states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Write `states` at `slots` (out of place); the whole cache as attention reads it."""
        if len(self.tensors) == 1:
            self.tensors = (self.tensors[0].index_copy(2, slots, states.to(self.tensors[0].dtype)),)
            return self.tensors[0]
        codes, scales = self.tensors
        new_codes, new_scales = quantize_states(states, scales.dtype)
        self.tensors = codes.index_copy(2, slots, new_codes), scales.index_copy(2, slots, new_scales)
        return self.tensors[0].to(scales.dtype) * self.tensors[1]


class _Layer(CacheLayerMixin):
    """One layer's keys and values; `update` returns new tensors with the step's states written at its slots."""
    is_compileable = True
    is_sliding = False

    def __init__(self, keys: _State, values: _State, slots: torch.Tensor) -> None:
        super().__init__()
        self.key_state, self.value_state, self.slots = keys, values, slots
        self.keys, self.values = keys.tensors[0], values.tensors[0]   # what Hugging Face code may read
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("the functional cache is built initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_state.write(key_states, self.slots)
        self.values = self.value_state.write(value_states, self.slots)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.key_state.length, 0

    def get_seq_length(self) -> int:
        raise AssertionError("position_ids are always given to the model")

    def get_max_length(self) -> int:
        return self.key_state.length


class FunctionalCache(Cache):
    """A Hugging Face `Cache` over given tensors, written out of place (see the module docstring); an int8
    cache when the first tensor is int8."""

    def __init__(self, past: tuple[torch.Tensor, ...], slots: torch.Tensor) -> None:
        width = 2 if past[0].dtype == torch.int8 else 1
        states = [_State(tuple(past[i:i + width])) for i in range(0, len(past), width)]
        super().__init__(layers=[_Layer(states[i], states[i + 1], slots) for i in range(0, len(states), 2)])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for layer in self.layers for state in (layer.key_state, layer.value_state)
                     for t in state.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention reads the cache in (an int8 cache's: its scales')."""
        return self.layers[0].key_state.tensors[-1].dtype


class DecoderStep(torch.nn.Module):
    """`model` (not copied: its weights are shared) as one pure decoder step; see the module docstring."""

    def __init__(self, model: torch.nn.Module, mask_kind: str, cache_keyword: str) -> None:
        super().__init__()
        self.model, self.mask_kind, self.cache_keyword = model, mask_kind, cache_keyword

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                attention_mask: torch.Tensor, past_key_values: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        cache = FunctionalCache(tuple(past_key_values), cache_position)
        length = attention_mask.shape[1]
        slots = torch.arange(length, device=input_ids.device)
        visible = (slots[None, :] <= cache_position[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        dtype = cache.dtype
        mask = visible if self.mask_kind == "sdpa" else \
            torch.zeros((), dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         use_cache=True, **{self.cache_keyword: cache})
        return out.logits, cache.tensors()


def check_generation_model(model: torch.nn.Module, max_cache_len: int) -> tuple[str, str]:
    """Why `model` cannot be captured for generation (a GraphoptError), else (mask kind, cache keyword)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate) or not can_generate():
        raise InputError(f"generation=True needs a Hugging Face causal language model (…ForCausalLM, with "
                         f"generate()); {name} cannot generate: optimize it without generation=True")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError(f"generation=True captures decoder-only models; {name} is an encoder-decoder")
    parameters = inspect.signature(model.forward).parameters
    keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
    if keyword is None:
        raise UnsupportedError(f"{name}.forward takes no KV cache (neither `cache` nor `past_key_values`)")
    kind = getattr(config, "_attn_implementation", None) or "eager"
    if kind not in MASK_KINDS:
        raise UnsupportedError(f"attention implementation {kind!r}: generation=True builds masks for "
                               f"{' and '.join(MASK_KINDS)}; load the model with attn_implementation='sdpa'")
    cache_kind = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_kind not in PLAIN_CACHES:
        raise UnsupportedError(f"the model's generation_config asks for a {cache_kind!r} cache; generation=True "
                               "captures a static full-attention KV cache")
    layer_types = set(getattr(config, "layer_types", None) or ())
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedError(f"{name} has {', '.join(sorted(unknown))} layers: generation=True captures "
                               "a KV cache of attention layers only")
    window = getattr(config, "sliding_window", None)
    slides = "sliding_attention" in layer_types if layer_types else getattr(config, "use_sliding_window", True)
    if window is not None and slides and window < max_cache_len:
        raise UnsupportedError(f"{name} attends within a sliding window of {window} tokens, shorter than "
                               f"max_cache_len={max_cache_len}: a sliding-window cache is not supported; use "
                               f"max_cache_len ≤ {window}")
    return kind, keyword
