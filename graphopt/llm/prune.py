"""Structured pruning of a causal LM for generation: MLP channels and whole KV groups, scored on text.

Units, per decoder layer of a Llama-style model (attention with `q_proj k_proj v_proj o_proj`, MLP with
`gate_proj up_proj down_proj`: Llama, Mistral, Qwen2, Gemma, …):
- an MLP channel j: row j of gate_proj and up_proj, column j of down_proj;
- a KV group g: key/value head g (its rows of k_proj and v_proj) and the n_rep query heads that read it
  (query heads g·n_rep … g·n_rep + n_rep − 1: rows of q_proj, columns of o_proj). Removing whole groups keeps
  n_rep = H_q / H_kv, so grouped-query attention, RoPE and the cache layout stay as they are; a layer's
  cache just holds fewer heads (graphopt's static cache is sized per layer, from the pruned model).

Importance (one pass over the calibration text with hooks, padding excluded): the mean size of what a unit
adds to the residual stream,

    MLP channel j:  mean_t |h_tj| · ‖W_down[:, j]‖₂            h = act(gate(x)) ⊙ up(x), down_proj's input
    KV group g:     mean_t ‖Σ_{h ∈ g} W_o[:, h] a_th‖₂          a_th: query head h's attention output

and each layer loses the `ratio` least important units of each family (MLP channels kept in multiples of 8,
at least one KV group kept).

Cost per group (`prune_options={"sensitivity": True}`, the default): the
perplexity on the calibration text with only that group pruned, against the unpruned model. Pruning is
computed there by zeroing the units' columns of down_proj / o_proj: nothing else reads a removed unit, so
this is exactly what the sliced model computes.

The input model is never modified: the pruned model is a structural copy that shares every tensor it does
not slice.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from graphopt.engine import ir
from graphopt.errors import InputError, OptionError, UnsupportedError
from graphopt.report import PassRecord

from .capture import shared_eval_copy
from .metrics import perplexity, text_batches

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
#: MLP channels are kept in multiples of this (GEMM-friendly widths).
CHANNEL_MULTIPLE = 8
OPTIONS = ("sensitivity",)


@dataclass
class Block:
    """One prunable family of one layer: its module path, kind and units."""
    name: str                     # module path, e.g. "model.layers.3.mlp"
    kind: str                     # "mlp" (channels) or "attention" (KV groups)
    units: int
    group_heads: int = 1          # attention: query heads per KV group (n_rep)
    head_dim: int = 1
    ratio: float = 0.0

    def output_layer(self, model: nn.Module) -> nn.Linear:
        """The projection whose input columns the units own: down_proj (MLP) or o_proj (attention)."""
        module = model.get_submodule(self.name)
        return module.down_proj if self.kind == "mlp" else module.o_proj

    def keep_count(self) -> int:
        if self.kind == "mlp":
            keep = round(self.units * (1 - self.ratio) / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
            return min(self.units, max(CHANNEL_MULTIPLE, keep))
        return min(self.units, max(1, round(self.units * (1 - self.ratio))))


@dataclass
class PrunedLM:
    model: nn.Module              # the pruned copy (shares the tensors it did not slice)
    record: PassRecord            # for the report: per-group units, importance and perplexity cost
    bytes_before: int             # parameter bytes of the model as given


def prune_lm(model: nn.Module, prune: float | Mapping[str, float], calibration_data: Iterable[Any] | None,
             options: Mapping[str, Any] | None = None, progress: bool = False,
             max_length: int | None = None) -> PrunedLM:
    """Prune `model`'s MLP channels and KV groups by `prune` (a ratio, or {module-path pattern: ratio});
    see the module docstring."""
    start = time.perf_counter()
    opts = _check_options(options)
    work = shared_eval_copy(model)
    blocks = find_blocks(work)
    _set_ratios(blocks, prune)
    batches = text_batches(calibration_data, max_length)
    if not batches:
        raise InputError("LLM pruning scores units on calibration text: give calibration_data (token-id tensors "
                         "[batch, seq] or {'input_ids', 'attention_mask'} dicts)")
    scores = importance(work, blocks, batches, progress)
    keep = {b.name: _top(scores[b.name], b.keep_count()) for b in blocks}
    base = perplexity(_logits_of(work), batches)
    costs = _costs(work, blocks, keep, batches, base, progress) if opts["sensitivity"] else {}
    params_before, bytes_before = ir.param_count(work), ir.param_bytes(work)
    for block in blocks:
        if len(keep[block.name]) < block.units:
            _slice(work.get_submodule(block.name), block, keep[block.name])
    after = perplexity(_logits_of(work), batches)
    layers = {b.name: {"modules": [b.name], "kind": "MLP channels" if b.kind == "mlp" else "KV groups",
                       "units": b.units, "unit_channels": 1 if b.kind == "mlp" else b.group_heads * b.head_dim,
                       "pruned_units": b.units - len(keep[b.name]), "ratio": b.ratio,
                       **({"perplexity_cost": costs[b.name]} if b.name in costs else {})} for b in blocks}
    params_after = ir.param_count(work)
    record = PassRecord("structured_pruning", time.perf_counter() - start, 0, ir.param_bytes(work), modified=True,
                        stats={"layers": layers, "params_before": float(params_before),
                               "params_after": float(params_after), "perplexity_before": base,
                               "perplexity_after": after, "calibration_tokens": sum(int(m.sum()) for _, m in batches),
                               "matches": {"KV group / MLP channel block": sum(
                                   len(keep[b.name]) < b.units for b in blocks)}})
    return PrunedLM(work, record, bytes_before)


def find_blocks(model: nn.Module) -> list[Block]:
    """The MLP and attention blocks of every decoder layer."""
    blocks = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in MLP):
            blocks.append(Block(name, "mlp", module.down_proj.in_features))
        elif all(isinstance(getattr(module, p, None), nn.Linear) for p in ATTENTION):
            head_dim = getattr(module, "head_dim", None)
            if not isinstance(head_dim, int):
                raise UnsupportedError(f"{name} ({type(module).__name__}) has no integer head_dim attribute: "
                                       "its heads cannot be told apart for pruning")
            heads, kv_heads = module.q_proj.out_features // head_dim, module.k_proj.out_features // head_dim
            if heads % kv_heads:
                raise UnsupportedError(f"{name}: {heads} query heads over {kv_heads} KV heads is not grouped-query "
                                       "attention with equal groups")
            blocks.append(Block(name, "attention", kv_heads, heads // kv_heads, head_dim))
    if not blocks:
        raise UnsupportedError(f"LLM pruning covers Llama-style decoders (attention with {', '.join(ATTENTION)}, "
                               f"MLP with {', '.join(MLP)} as separate nn.Linear layers); {type(model).__name__} "
                               "has none (fused projections such as Phi-3's qkv_proj or GPT-2's Conv1D are not "
                               "covered)")
    return blocks


def _set_ratios(blocks: list[Block], prune: float | Mapping[str, float]) -> None:
    for block in blocks:
        block.ratio = _ratio(prune, block.name)
    if not any(b.keep_count() < b.units for b in blocks):
        sizes = ", ".join(sorted({f"{b.units} {'MLP channels' if b.kind == 'mlp' else 'KV groups'}" for b in blocks}))
        raise OptionError(f"prune={prune!r} removes no unit (layers have {sizes}; channels are kept in multiples "
                          f"of {CHANNEL_MULTIPLE}, one KV group at least)")


def importance(model: nn.Module, blocks: list[Block], batches: list[tuple[torch.Tensor, torch.Tensor]],
               progress: bool) -> dict[str, torch.Tensor]:
    """{block: score per unit} over the calibration batches (see the module docstring)."""
    totals = {b.name: torch.zeros(b.units, dtype=torch.float64) for b in blocks}
    tokens = {"mask": None, "count": 0}

    def hook(block: Block, layer: nn.Linear) -> Callable:
        weight = layer.weight.detach().double()

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            keep = tokens["mask"].reshape(*x.shape[:-1], 1).to(x.dtype)
            if block.kind == "mlp":
                totals[block.name] += (x.abs() * keep).sum(tuple(range(x.dim() - 1))) * weight.norm(dim=0)
            else:
                heads = x.reshape(*x.shape[:-1], block.units, block.group_heads, block.head_dim)
                w = weight.reshape(weight.shape[0], block.units, block.group_heads, block.head_dim)
                added = torch.einsum("...grd,ogrd->...go", heads, w)      # each group's sum into the residual
                totals[block.name] += (added.norm(dim=-1) * keep).sum(tuple(range(added.dim() - 1)))
        return record

    handles = []
    for block in blocks:
        layer = block.output_layer(model)
        handles.append(layer.register_forward_pre_hook(hook(block, layer)))
    from tqdm.auto import tqdm
    try:
        for ids, mask in tqdm(batches, desc="LLM pruning: unit importance", unit="batch",
                              disable=None if progress else True):
            tokens["mask"] = mask.bool()
            tokens["count"] += int(mask.sum())
            with torch.no_grad():
                _logits_of(model)(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(tokens["count"], 1) for name, total in totals.items()}


def _costs(model: nn.Module, blocks: list[Block], keep: Mapping[str, list[int]],
           batches: list[tuple[torch.Tensor, torch.Tensor]], base: float, progress: bool) -> dict[str, float]:
    """{block: perplexity with only that block pruned − unpruned perplexity}."""
    from tqdm.auto import tqdm
    costs = {}
    bar = tqdm([b for b in blocks if len(keep[b.name]) < b.units], desc="LLM pruning: perplexity cost", unit="group",
               disable=None if progress else True)
    for block in bar:
        bar.set_postfix_str(block.name)
        layer = block.output_layer(model)
        original = layer.weight
        columns = torch.ones(original.shape[1], dtype=torch.bool)
        columns[_columns(block, keep[block.name])] = False
        layer.weight = nn.Parameter(original.detach().masked_fill(columns, 0), requires_grad=False)
        try:
            costs[block.name] = perplexity(_logits_of(model), batches) - base
        finally:
            layer.weight = original
    return costs


def _columns(block: Block, units: list[int]) -> torch.Tensor:
    """Input columns of down_proj / o_proj (= output rows of gate/up or q) that the kept `units` own."""
    units_t = torch.tensor(units, dtype=torch.long)
    if block.kind == "mlp":
        return units_t
    width = block.group_heads * block.head_dim
    return (units_t[:, None] * width + torch.arange(width)).reshape(-1)


def _slice(module: nn.Module, block: Block, units: list[int]) -> None:
    """Replace `module`'s projections with ones that keep only `units` (new tensors; the old are untouched)."""
    columns = _columns(block, units)
    if block.kind == "mlp":
        module.gate_proj = _sliced(module.gate_proj, rows=columns)
        module.up_proj = _sliced(module.up_proj, rows=columns)
        module.down_proj = _sliced(module.down_proj, columns=columns)
        return
    kv_rows = (torch.tensor(units)[:, None] * block.head_dim + torch.arange(block.head_dim)).reshape(-1)
    module.q_proj = _sliced(module.q_proj, rows=columns)
    module.k_proj = _sliced(module.k_proj, rows=kv_rows)
    module.v_proj = _sliced(module.v_proj, rows=kv_rows)
    module.o_proj = _sliced(module.o_proj, columns=columns)


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        weight, bias = weight[rows], bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(layer.training).requires_grad_(layer.weight.requires_grad)


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """The indices of the `count` largest scores, in increasing order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def _ratio(prune: float | Mapping[str, float], name: str) -> float:
    if not isinstance(prune, Mapping):
        return float(prune)
    return next((float(r) for pattern, r in prune.items() if fnmatch.fnmatchcase(name, pattern)), 0.0)


def _logits_of(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logits [B, S, V] of `model` on a left- or right-padded batch (positions count real tokens only)."""
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return run


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise OptionError(f"prune_options {unknown} do not apply to LLM pruning (generation=True); it takes "
                          f"{', '.join(OPTIONS)}")
    sensitivity = opts.get("sensitivity", "auto")
    if sensitivity not in (True, False, "auto"):
        raise OptionError(f"prune_options sensitivity={sensitivity!r}: choose True, False or 'auto'")
    return {"sensitivity": sensitivity is not False}   # calibration text is always given here
