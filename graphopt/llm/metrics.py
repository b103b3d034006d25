"""What a pass costs in tokens: next-token logits, greedy agreement over N steps, perplexity on text.

- greedy agreement: the share of N greedy tokens (continuing the example prompt) that equal the
  reference's at the same position, and the first step where they differ (None when all agree);
- next-token logits: the largest absolute difference of the last position's logits on the prompt;
- perplexity: exp of the mean cross-entropy of each next token (teacher forcing, one prefill per text;
  padding excluded) on the calibration text (token-id tensors or {"input_ids", "attention_mask"} dicts),
  else on the example prompt; texts longer than the cache are cut to max_cache_len tokens.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from .generate import CacheSpec, Step, generate, prefill_inputs


def token_metrics(reference: Step, optimized: Step, spec: CacheSpec, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, texts: Iterable[Any] | None, steps: int,
                  reference_spec: CacheSpec | None = None) -> dict[str, Any]:
    """`reference_spec`: the reference's cache where it differs from `optimized`'s (a pruned model has
    fewer KV heads)."""
    reference_spec = reference_spec or spec
    steps = max(1, min(steps, spec.length - input_ids.shape[1] + 1))
    want = generate(reference, reference_spec, input_ids, steps, attention_mask)[:, input_ids.shape[1]:]
    got = generate(optimized, spec, input_ids, steps, attention_mask)[:, input_ids.shape[1]:]
    same = (want == got)
    differs = (~same).any(0).nonzero()
    with torch.no_grad():
        last = [step_logits(s, sp)(input_ids, attention_mask)[:, -1]
                for s, sp in ((reference, reference_spec), (optimized, spec))]
    logit_err = (last[0] - last[1]).abs().max().item()
    batches = text_batches(texts, spec.length) or text_batches([{"input_ids": input_ids,
                                                                  "attention_mask": attention_mask}])
    return {"greedy_steps": steps, "greedy_agreement": same.float().mean().item(),
            "first_divergence": int(differs[0]) if len(differs) else None,
            "next_token_logits_max_abs_err": logit_err,
            "perplexity_before": perplexity(step_logits(reference, reference_spec), batches),
            "perplexity_after": perplexity(step_logits(optimized, spec), batches),
            "perplexity_text_tokens": sum(int(m.sum()) for _, m in batches)}


def step_logits(step: Step, spec: CacheSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logits [B, S, V] of a prompt batch (ids, mask) through one prefill of a decoder step."""
    return lambda ids, mask: step(*prefill_inputs(ids, mask, spec))[0]


def perplexity(logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """exp(mean cross-entropy of each next token) over the (ids, mask) batches; padding excluded."""
    total, count = 0.0, 0
    for ids, mask in batches:
        with torch.no_grad():
            logits = logits_of(ids, mask).double()
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        total += losses[keep].sum().item()
        count += int(keep.sum())
    return math.exp(total / count) if count else math.nan


def text_batches(texts: Iterable[Any] | None, length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [B, S], mask [B, S]) of each token batch in `texts` (tensors, (ids, mask) tuples or dicts), cut to
    `length` tokens; items that hold no token ids are skipped."""
    batches = []
    for item in texts if texts is not None else ():
        ids, mask = (item.get("input_ids"), item.get("attention_mask")) if isinstance(item, dict) else (item, None)
        if isinstance(ids, (tuple, list)):
            ids, mask = ids[0], ids[1] if len(ids) > 1 and mask is None else mask
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            continue
        ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape).to(torch.long)
        batches.append((ids[:, :length], mask[:, :length]))
    return batches
