"""`graphopt.optimize(lm, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=N, ...)`.

The decoder step (graphopt.llm.decoder) is captured once (graphopt.llm.capture) and run through the pass
manager, verified on a decode step, the example's prefill and a decode step at another batch size (one
graph serves both, so one report covers both). Latency and the speed check time one decode step, and the
int8 pass's per-layer timing judges each layer at a decode step's rows (the example's batch). After the
passes the report gets a "generation" entry (graphopt.llm.metrics): greedy-token agreement with the model
over N steps, the next-token logits' error, and perplexity on calibration text before and after.

Memory: the model's weights are never copied. The IR adapter below copies a graph for each pass but shares
its tensors (passes make new tensors, they never write into old ones), so peak memory stays near the model
plus what a pass adds (e.g. its int8 weights).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.engine import ir
from graphopt.engine.config import Options
from graphopt.errors import InputError, OptionError
from graphopt.engine.pass_manager import FxIR, PassManager
from graphopt.engine.pipeline import build_passes
from graphopt.engine.rules import Reason
from graphopt.report import PassRecord, Report
from graphopt.engine.verify import run_on
from graphopt.passes.quantize.layer_speed import timed_rows

from .capture import capture_decoder, eager_step, verification_inputs
from .generate import CacheSpec, check_prompt, generate, prefill_inputs, sampling_settings
from .metrics import step_logits, text_batches, token_metrics
from .prune import PrunedLM, prune_lm

#: Greedy steps the token check runs (capped by the cache).
TOKEN_CHECK_STEPS = 16


@dataclass(frozen=True)
class Source:
    """What a generation module was captured from (not a submodule: its weights are not the module's own)."""
    model: torch.nn.Module            # the model captured: the original, or its pruned / fine-tuned copy
    original: torch.nn.Module         # the model as the user gave it (the reference of the token metrics)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pruned: PrunedLM | None


class SharedTensorsFxIR(FxIR):
    """FxIR whose per-pass copy shares the parameters and buffers (the graph and modules are copied)."""

    def copy(self, module: fx.GraphModule) -> fx.GraphModule:
        return ir.copy_sharing_tensors(module)


class GenerationModule(torch.nn.Module):
    """A causal LM optimized for generation: `.generate(...)` like Hugging Face's; calling it runs one
    decoder step (input_ids, position_ids, cache_position, attention_mask, past) -> (logits, present)."""

    def __init__(self, graph_module: fx.GraphModule, spec: CacheSpec, report: Report, options: Options,
                 generation_config: Any, source: Source) -> None:
        super().__init__()
        self.graph_module, self.spec, self.report, self.options = graph_module, spec, report, options
        self.generation_config, self.source = generation_config, source

    captured = True

    @property
    def max_cache_len(self) -> int:
        return self.spec.length

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
                 attention_mask: torch.Tensor | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt and new tokens [B, S + n], as `model.generate(...)` returns them (see graphopt.llm.generate).
        Unset sampling settings come from the model's generation_config, then Hugging Face's defaults."""
        settings = sampling_settings(self.generation_config, do_sample=do_sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return generate(self.graph_module, self.spec, input_ids, max_new_tokens, attention_mask, generator,
                        **settings)

    def finetuned(self, train_data: Iterable[Any], teacher: torch.nn.Module | None, **finetune_options: Any
                  ) -> "GenerationModule":
        """`graphopt.finetune` of a generation module: distil into the model it was captured from (the pruned
        copy after LLM pruning) on token batches, then capture it and run the graph passes again."""
        from graphopt.training.finetuning import finetune
        tuned = finetune(self.source.model, train_data, teacher, **finetune_options)
        source = self.source
        return _build(tuned, source.original, source.input_ids, source.attention_mask, self.options, source.pruned)

    def onnx_io_names(self) -> tuple[list[str], list[str]]:
        """The exported decoder's input and output names (graphopt.llm.onnx.io_names)."""
        from .onnx import io_names
        return io_names(len(self.spec.heads_dims) // 2, self.spec.int8)

    def decoder_inputs(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        """The decoder-step inputs of a prompt given as `input_ids=` (and `attention_mask=`): what
        `export_onnx` exports the step on."""
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", args[0] if args else None)
        mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
        if kwargs or len(args) > 2:
            raise InputError(f"a generation module takes input_ids and attention_mask, not "
                             f"{', '.join(sorted(kwargs)) or 'more positional inputs'}")
        check_prompt(ids, mask, self.spec.length)
        return prefill_inputs(ids, mask, self.spec)


def optimize_for_generation(model: torch.nn.Module, example_inputs: tuple | None,
                            example_kwargs: Mapping[str, Any] | None, options: Options) -> GenerationModule:
    """Capture `model` for generation and run the passes; see the module docstring."""
    if options.max_cache_len is None:
        raise OptionError("generation=True needs max_cache_len= (the static KV cache's length in tokens)")
    if options.backend == "inductor":
        raise OptionError("backend='inductor' does not work with generation=True")
    kwargs = dict(example_kwargs or {})
    args = tuple(example_inputs or ())
    ids = kwargs.pop("input_ids", args[0] if args else None)
    mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
    if ids is None:
        raise OptionError("generation=True needs example_kwargs={'input_ids': ids} (a prompt to capture on)")
    if kwargs:
        raise OptionError(f"generation=True takes input_ids and attention_mask as examples, not {sorted(kwargs)}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError("example input_ids must be an integer tensor [batch, sequence]")
    if ids.shape[1] > options.max_cache_len:
        raise OptionError(f"max_cache_len={options.max_cache_len} is shorter than the example prompt "
                          f"({ids.shape[1]} tokens)")
    pruned = None
    if options.prune is not None:   # before capture: it changes the cache's shape (see graphopt.llm.prune)
        pruned = prune_lm(model, options.prune, options.calibration_data, options.prune_options, options.progress,
                          options.max_cache_len)
        if options.on_record is not None:
            options.on_record(pruned.record)
    return _build(pruned.model if pruned else model, model, ids, mask, options, pruned)


def _build(source: torch.nn.Module, original: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
           options: Options, pruned: PrunedLM | None) -> GenerationModule:
    """Capture `source` (the model, or its pruned or fine-tuned copy) and run the graph passes; the token
    metrics compare with `original`, the model as the user gave it."""
    start = time.perf_counter()
    cache_record = _int8_cache_record(source, ids, mask, options) if options.kv_cache == "int8" else None
    kv_int8 = cache_record is not None and not cache_record.rolled_back
    captured = capture_decoder(source, ids, mask, options.max_cache_len, kv_int8)
    inputs = verification_inputs(captured, options.seed)
    reference = run_on(captured.step, inputs) if options.verify else []
    # pruning ran before capture; calibration text becomes prefill inputs of the decoder step
    steps = [prefill_inputs(i, m, captured.spec) for i, m in text_batches(options.calibration_data,
                                                                            options.max_cache_len)]
    graph_options = dataclasses.replace(options, prune=None, calibration_data=steps or None)
    manager = PassManager(build_passes(graph_options), SharedTensorsFxIR(), level=options.level,
                          enable=options.enable, disable=options.disable, verify=options.verify,
                          reproducer_dir=options.reproducer_dir, measure_latency=options.measure_latency,
                          progress=options.progress, speed_check=options.speed_check, on_record=options.on_record)
    report = Report(meta={
        "level": options.level_name, "quantize": options.quantize, "prune": options.prune, "verify": options.verify,
        "dynamic_batch": True, "passes": [p.name for p in manager.selected],
        "notes": [f"generation: one decoder-step graph for prefill and decode, static KV cache of "
                  f"{options.max_cache_len} tokens; latency and the speed check time one decode step"]})
    with timed_rows(ids.shape[0]):    # int8 layers are judged on a decode step of the example's batch
        gm, report = manager.run(captured.module, inputs, reference, report)
    if cache_record is not None:
        report.records.insert(0, cache_record)
    if pruned is not None:
        _report_pruning(report, pruned)
    if options.verify:   # against the model as given (unpruned, with its float cache)
        step, spec = (captured.step, captured.spec) if source is original and not kv_int8 else \
            eager_step(original, ids, options.max_cache_len)
        report.meta["generation"] = token_metrics(step, gm, captured.spec, ids, mask, options.calibration_data,
                                                  TOKEN_CHECK_STEPS, reference_spec=spec)
    report.meta["total_s"] = time.perf_counter() - start + (pruned.record.wall_s if pruned else 0.0)
    return GenerationModule(gm, captured.spec, report, options,
                            copy.deepcopy(getattr(original, "generation_config", None)),
                            Source(source, original, ids, mask, pruned))


def _int8_cache_record(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                       options: Options) -> PassRecord:
    """What an int8 KV cache costs `model`: the cosine of each position's next-token logits with the int8
    cache to those with the float cache, over the example prompt and the calibration text (a prefill reads
    every token of the prompt back from the cache, quantized); rolled back below `kv_cache_budget`."""
    start = time.perf_counter()
    step, float_spec = eager_step(model, ids, options.max_cache_len)   # one step reads either cache
    int8_spec = dataclasses.replace(float_spec, int8=True)
    texts = text_batches(options.calibration_data, options.max_cache_len)
    cosine = 1.0
    for text_ids, text_mask in texts + text_batches([{"input_ids": ids, "attention_mask": mask}]):
        with torch.no_grad():
            exact, approx = (step_logits(step, spec)(text_ids, text_mask) for spec in (float_spec, int8_spec))
        real = text_mask.bool()
        cosine = min(cosine, F.cosine_similarity(exact[real].double(), approx[real].double(), dim=-1).min().item())
    kept = cosine >= options.kv_cache_budget
    return PassRecord(
        "kv_cache_int8", time.perf_counter() - start, 0, ir.param_bytes(model), min_cosine=cosine,
        modified=kept, rolled_back=not kept,
        reason=None if kept else f"next-token logits cosine {cosine:.5f} is below kv_cache_budget "
                                 f"{options.kv_cache_budget:g}: the cache stays {float_spec.dtype}",
        code=None if kept else Reason.BUDGET_EXCEEDED.value,
        stats={"cache_bytes_per_row": (int8_spec if kept else float_spec).nbytes(),
               "float_cache_bytes_per_row": float_spec.nbytes(), "budget": options.kv_cache_budget,
               "texts": len(texts) + 1})


def _report_pruning(report: Report, pruned: PrunedLM) -> None:
    """The pruning record first; the baseline's parameters are the model's as given (the graph was captured
    after pruning, so its own latency and error figures start from the pruned model)."""
    pruned.record.nodes = report.baseline.nodes
    report.records.insert(0, pruned.record)
    report.baseline.param_bytes = pruned.bytes_before
    report.meta["notes"].append("LLM pruning ran before capture (MLP channels and KV groups of the nn.Module): "
                                "the baseline's latency and every error below start from the pruned model; the "
                                "generation metrics compare with the model as given")
