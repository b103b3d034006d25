"""The generation loop over a decoder step (a torch graph or an ONNX Runtime session), like Hugging Face's
`generate()` for decoder-only models: greedy or sampling (temperature → top-k → top-p, Hugging Face's own
logits warpers, in its order, drawing with `torch.multinomial` as it does, so a seed gives the same tokens),
EOS stopping (finished rows are filled with the pad token), batched prompts with left padding (positions
count real tokens only: cumsum(mask) − 1).

The static cache holds `max_cache_len` slots: the prompt takes S of them and every generated token but the
last one more, so S + max_new_tokens − 1 ≤ max_cache_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from graphopt.errors import InputError

#: step(input_ids, position_ids, cache_position, attention_mask, past) -> (logits [B, q, V], present)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple], tuple[torch.Tensor, tuple]]


@dataclass(frozen=True)
class CacheSpec:
    """Shape of the static cache: per state (key_0, value_0, key_1, …) its (heads, head_dim); the model's dtype.

    With `int8`, each state is two tensors: its int8 codes [B, heads, L, head_dim] and its scales [B, heads,
    L, 1] in `dtype` (one per row, head and slot: graphopt.llm.decoder's int8 cache)."""
    length: int
    heads_dims: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    int8: bool = False

    def empty(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        def zeros(h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(batch, h, self.length, d, dtype=dtype, device=device)
        if not self.int8:
            return tuple(zeros(h, d, self.dtype) for h, d in self.heads_dims)
        return tuple(t for h, d in self.heads_dims for t in (zeros(h, d, torch.int8), zeros(h, 1, self.dtype)))

    def nbytes(self, batch: int = 1) -> int:
        """The cache's bytes at `batch` rows."""
        return sum(t.nbytes for t in self.empty(batch, "meta"))


def prefill_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   spec: CacheSpec) -> tuple[torch.Tensor, ...]:
    """The decoder-step inputs (input_ids, position_ids, cache_position, attention_mask, past) of a prompt."""
    check_prompt(input_ids, attention_mask, spec.length)
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    full = torch.zeros(batch, spec.length, dtype=torch.long, device=input_ids.device)
    full[:, :length] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    slots = torch.arange(length, device=input_ids.device)
    return input_ids, positions, slots, full, spec.empty(batch, input_ids.device)


def next_inputs(tokens: torch.Tensor, previous: tuple[torch.Tensor, ...],
                present: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The decoder-step inputs that feed `tokens` [B] after the step whose inputs were `previous`."""
    _, positions, slots, full, _ = previous
    slot = int(slots[-1]) + 1
    if slot >= full.shape[1]:
        raise InputError(f"the static cache is full ({full.shape[1]} slots): optimize with a larger max_cache_len")
    full = full.clone()
    full[:, slot] = 1
    return (tokens[:, None], positions[:, -1:] + 1, torch.tensor([slot], device=slots.device), full, tuple(present))


def check_prompt(input_ids: Any, attention_mask: Any, max_cache_len: int, max_new_tokens: int = 1) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(f"input_ids must be an integer tensor [batch, sequence], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise InputError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[1] + max_new_tokens - 1 > max_cache_len:
        raise InputError(f"a prompt of {input_ids.shape[1]} tokens and {max_new_tokens} new tokens need "
                         f"{input_ids.shape[1] + max_new_tokens - 1} cache slots; the module was optimized with "
                         f"max_cache_len={max_cache_len}")


def sampling_settings(config: GenerationConfig | None, **given: Any) -> dict[str, Any]:
    """The call's value, else the model's generation_config's, else Hugging Face's default, per setting."""
    defaults = GenerationConfig._get_default_generation_params()
    settings = {}
    for name in ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"):
        value = given.get(name)
        if value is None and config is not None:
            value = getattr(config, name, None)
        settings[name] = defaults.get(name) if value is None else value
    return settings


def _warpers(settings: dict[str, Any]) -> LogitsProcessorList:
    """Hugging Face's sampling warpers for these settings, in `generate()`'s order."""
    warpers = LogitsProcessorList()
    if not settings.get("do_sample"):
        return warpers
    if settings["temperature"] is not None and settings["temperature"] != 1.0:
        warpers.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"] is not None and settings["top_k"] != 0:
        warpers.append(TopKLogitsWarper(top_k=settings["top_k"]))
    if settings["top_p"] is not None and settings["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings["top_p"]))
    return warpers


def generate(step: Step, spec: CacheSpec, input_ids: torch.Tensor, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             **settings: Any) -> torch.Tensor:
    """Prompt + generated tokens [B, S + n], n ≤ max_new_tokens (fewer when every row hit EOS)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    check_prompt(input_ids, attention_mask, spec.length, max_new_tokens)
    warpers = _warpers(settings)
    eos = settings.get("eos_token_id")
    eos = torch.tensor(eos if isinstance(eos, Sequence) else [eos]) if eos is not None else None
    pad = settings.get("pad_token_id")
    if pad is None and eos is not None:
        pad = int(eos[0])     # as Hugging Face does when the model has no pad token
    inputs = prefill_inputs(input_ids, attention_mask, spec)
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for index in range(max_new_tokens):
        with torch.no_grad():
            logits, present = step(*inputs)
        scores = warpers(sequences, logits[:, -1, :].to(torch.float32))
        if settings.get("do_sample"):
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
            unfinished &= ~torch.isin(tokens, eos.to(tokens.device))
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        if index == max_new_tokens - 1 or not unfinished.any():
            break
        inputs = next_inputs(tokens, inputs, present)
    return sequences
