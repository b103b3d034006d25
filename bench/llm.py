"""LLM weight-only quantization: perplexity of a Llama trained here on real text, and CPU decode throughput.

    python -m bench.llm             # full run (the lead runs it on a quiet machine)
    python -m bench.llm --quick     # tiny settings, end to end in about a minute (checks the script)

(a) Accuracy. A small Llama-architecture model (byte-level vocabulary, 4 layers, hidden 256, GQA 4/2) is
    trained for ``--train-seconds`` on the Python standard library's documentation text
    (``pydoc_data.topics``, real English and code, ~0.8 MB). Held out: the last 10 % of the text. Rows:
    fp32, graphopt int8-weight-only, int4-weight-only RTN and int4 calibrated (activation-aware scales on
    training-text calibration batches), each through ``graphopt.optimize``; the int8 KV cache
    (``optimize(generation=True, kv_cache="int8")``, scored through one prefill of its decoder step, which
    reads every token back from the cache); LLM pruning (MLP channels, and KV groups) through
    ``optimize(generation=True, prune=…)``, before and after ``graphopt.finetune``. Columns: held-out perplexity,
    its change against fp32 (goals: int8 ≤ +0.5 %, int4 calibrated ≤ +3 %), and greedy token agreement over
    64 generated tokens from held-out prompts (share of positions equal to fp32's greedy tokens).
(b) Decode throughput on this CPU, a ~1B Llama-shaped model from config (hidden 2048, 22 layers, GQA 32/8,
    intermediate 5632, vocab 32000, random weights, no EOS), batch 1 and 8, prompt 128, 64 new tokens, greedy.
    Rows: Hugging Face ``generate`` on the fp32 model (dynamic KV cache, eager: the anchor); Hugging Face's
    static cache with the forward under ``torch.compile``; torchao int8 weight-only on a bfloat16 copy (its
    CPU path); ``graphopt.optimize(model, example_kwargs={"input_ids": …}, generation=True,
    max_cache_len=192, …)`` at O1, int8-weight-only and int4-weight-only (one decoder-step graph with a
    static cache, ``.generate``); ONNX Runtime generating on ``export_onnx`` of the O1 module (past key values
    as inputs and outputs). The int4 row runs with ``verify=False``: on random weights 22 layers of int4 noise
    put the logits' cosine under the pass's default budget (0.95), so the checked pass keeps the model
    float; int4's cost in accuracy is measured in (a), on a trained model. Every row is timed interleaved
    (bench/harness.py) in one run, so load hits every row alike. Goal: int4 ≥ 2.5× fp32 eager at batch 1.
    One more ONNX Runtime row generates on ``export_onnx(int4 module, ops="onnxruntime")``: MatMulNBits and
    GroupQueryAttention, onnxruntime-genai's operators.

    python -m bench.llm --decode-only --rows "graphopt O1" --batches 8 --rounds 5
                                    # part of (b) alone, against the anchor; writes llm_decode.md, not llm.md
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import resource
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from bench.harness import earlier_rows, interleaved, pin_threads, write_results
from graphopt.data.zoo import CausalLMLogits
from graphopt.llm.metrics import step_logits

SEQ = 128
STEPS = 64


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def corpus() -> bytes:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def small_llama(quick: bool) -> nn.Module:
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128 if quick else 256, intermediate_size=256 if quick else 768,
        num_hidden_layers=2 if quick else 4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=SEQ + STEPS, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def train(model: nn.Module, data: torch.Tensor, seconds: float) -> dict[str, Any]:
    from tqdm import tqdm
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    start, steps, loss = time.perf_counter(), 0, float("nan")
    with tqdm(desc="training", unit="step") as bar:
        while time.perf_counter() - start < seconds:
            batch = windows(data, 16, SEQ + 1, g)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            loss_t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss_t.backward()
            optimizer.step()
            steps, loss = steps + 1, loss_t.item()
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
    optimizer.zero_grad(set_to_none=True)     # a parameter's .grad trips the captured graph's guards
    model.requires_grad_(False).eval()
    return {"steps": steps, "final train loss": loss, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def perplexity(module: nn.Module, batches: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        logits = module(batch[:, :-1].contiguous())
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def greedy(module: nn.Module, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation without a cache: a fixed [B, P + steps] buffer, right-padded (a causal model's
    logits at position t do not see the padding after t), so one captured shape serves every step."""
    b, p = prompts.shape
    buffer = torch.zeros(b, p + steps, dtype=torch.long)
    buffer[:, :p] = prompts
    for t in range(p, p + steps):
        buffer[:, t] = module(buffer)[:, t - 1].argmax(dim=-1)
    return buffer[:, p:]


def accuracy(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    text = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(0.9 * text.numel())
    train_data, held_out = text[:split], text[split:]
    model = small_llama(args.quick)
    trained = train(model, train_data, args.train_seconds)
    g = torch.Generator().manual_seed(2)
    eval_batches = [windows(held_out, 8, SEQ + 1, g) for _ in range(2 if args.quick else 8)]
    calibration = [windows(train_data, 4, SEQ, g) for _ in range(2 if args.quick else 8)]
    steps = 8 if args.quick else STEPS
    prompts = windows(held_out, 4, SEQ - steps, g)     # prompt + continuation = SEQ: the captured length
    wrapped = CausalLMLogits(model).eval()
    quiet = dict(measure_latency=False, speed_check=False, progress=False, verify_samples=1)
    example = (eval_batches[0][:, :-1].contiguous(),)
    variants: dict[str, nn.Module] = {"torch fp32": wrapped}
    variants["graphopt int8-weight-only"] = graphopt.optimize(wrapped, example, quantize="int8-weight-only", **quiet)
    variants["graphopt int4-weight-only RTN (g128)"] = graphopt.optimize(
        wrapped, example, quantize="int4-weight-only", quantize_options={"awq": False}, **quiet)
    variants["graphopt int4-weight-only calibrated (g128)"] = graphopt.optimize(
        wrapped, example, quantize="int4-weight-only", calibration_data=calibration, **quiet)
    lm = graphopt.optimize(model, example_kwargs={"input_ids": prompts[:2]}, generation=True, max_cache_len=SEQ,
                           level="O1", kv_cache="int8", calibration_data=calibration, **quiet)
    variants["graphopt O1 + int8 KV cache (per head and token)"] = PrefillLogits(lm)
    cache = lm.report["kv_cache_int8"]
    kv_note = (f"int8 KV cache: {'kept' if not cache.rolled_back else 'rolled back'}, next-token logits cosine "
               f"{cache.min_cosine:.5f} to the float cache on the calibration text (budget "
               f"{cache.stats['budget']}); cache {cache.stats['cache_bytes_per_row'] / 2**10:.0f} KiB per sequence "
               f"against {cache.stats['float_cache_bytes_per_row'] / 2**10:.0f} KiB in float32")
    pruning = prune_rows(model, train_data, calibration, prompts, g, args.quick)
    variants.update(pruning["variants"])
    rows, reference_tokens, base = [], None, None
    for name, module in variants.items():
        ppl = perplexity(module, eval_batches)
        tokens = greedy(module, prompts, steps)
        if reference_tokens is None:
            reference_tokens, base = tokens, ppl
        rows.append({"model": name, "held-out perplexity": ppl, "Δ perplexity %": 100 * (ppl / base - 1),
                     f"greedy agreement ({steps} steps)": float((tokens == reference_tokens).float().mean())})
        print(rows[-1], flush=True)
    return rows, {**trained, "pruning": pruning["notes"], "kv_cache": kv_note}


class PrefillLogits(nn.Module):
    """A generation module as token ids → logits: one prefill of its decoder step, which reads every token
    back from its cache (so an int8 cache's rounding is in the logits)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return step_logits(self.lm.graph_module, self.lm.spec)(input_ids, None)


#: LLM pruning rows: {name: prune=} (the small model has 2 KV groups per layer: 0.5 removes one).
PRUNINGS = {"MLP channels 25 %": {"*mlp": 0.25}, "MLP channels 25 % + KV groups 50 %": {"*mlp": 0.25, "*self_attn": 0.5}}


def prune_rows(model: nn.Module, train_data: torch.Tensor, calibration: list[torch.Tensor], prompts: torch.Tensor,
               g: torch.Generator, quick: bool) -> dict[str, Any]:
    """graphopt's LLM pruning (generation=True, prune=…) on calibration text, then `graphopt.finetune` of the
    generation module by distillation from the unpruned model on training-text token batches."""
    variants, notes = {}, []
    recovery = [windows(train_data, 8, SEQ, g) for _ in range(4 if quick else 150)]
    for name, prune in PRUNINGS.items():
        start = time.perf_counter()
        lm = graphopt.optimize(model, example_kwargs={"input_ids": prompts[:2]}, generation=True, max_cache_len=SEQ,
                               level="O3", prune=prune, quantize=None, calibration_data=calibration,
                               measure_latency=False, speed_check=False, progress=False)
        record = lm.report["structured_pruning"]
        variants[f"graphopt pruned: {name}"] = CausalLMLogits(lm.source.model).eval()
        tuned = graphopt.finetune(lm, recovery, teacher=model, epochs=1, lr=3e-4, progress=False)
        variants[f"graphopt pruned: {name} + finetune ({len(recovery)} batches of 8×{SEQ})"] = \
            CausalLMLogits(tuned.source.model).eval()
        stats = record.stats
        costs = ", ".join(f"{group.removeprefix('model.layers.')} {layer['pruned_units']}/{layer['units']} "
                          f"{layer['kind']} {layer['perplexity_cost']:+.2f}"
                          for group, layer in stats["layers"].items() if layer["pruned_units"])
        notes.append(f"{name}: params {stats['params_before'] / 1e6:.2f}M → {stats['params_after'] / 1e6:.2f}M, "
                     f"calibration perplexity {stats['perplexity_before']:.2f} → {stats['perplexity_after']:.2f}; "
                     f"perplexity cost per group (pruned alone): {costs}; prune + finetune "
                     f"{time.perf_counter() - start:.0f} s")
    return {"variants": variants, "notes": notes}


def _hf_generate(model: nn.Module, **options: Any) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def run(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    return run


def _torchao_int8(model: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """torchao's int8 weight-only on a bfloat16 copy (its CPU path: on float32 activations it is slower than
    the float32 model, measured 11 ms against 0.8 ms for a 5632x2048 layer at M = 1)."""
    import copy
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    twin = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(twin, Int8WeightOnlyConfig())
    return _hf_generate(twin)


def _compiled_static(model: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Hugging Face's static KV cache with the forward under torch.compile (inductor), on a structural copy
    that shares the weights."""
    from graphopt.llm.capture import shared_eval_copy
    twin = shared_eval_copy(model)
    twin.forward = torch.compile(twin.forward, fullgraph=True)
    return _hf_generate(twin, cache_implementation="static")


def _optimized(model: nn.Module, ids: torch.Tensor, max_cache_len: int, **options: Any) -> nn.Module:
    lm = graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=max_cache_len,
                           progress=False, **options)
    rolled_back = [record.name for record in lm.report.rolled_back]
    print(f"  {options}: {lm.report.meta.get('total_s', 0):.0f} s; rolled back: {rolled_back}", flush=True)
    return lm


def _graphopt(lm: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda prompt, new: lm.generate(prompt, max_new_tokens=new, do_sample=False)


def _onnx(lm: nn.Module, ids: torch.Tensor, folder: str, ops: str = "standard"
          ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A generation module's decoder exported with past key values (`ops`: export_onnx's operator set),
    generated in ONNX Runtime (graphopt.llm.onnx)."""
    from graphopt.llm.generate import generate
    from graphopt.llm.onnx import OnnxDecoderStep
    path = os.path.join(folder, f"decoder_{ops}_{id(lm)}.onnx")
    graphopt.export_onnx(lm, (), path, example_kwargs={"input_ids": ids}, ops=ops)
    step = OnnxDecoderStep(path)      # one session for every call
    return lambda prompt, new: generate(step, step.spec, prompt, new, do_sample=False)


def decode(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tempfile
    import transformers
    quick = args.quick
    config = transformers.LlamaConfig(
        vocab_size=1000 if quick else 32000, hidden_size=256 if quick else 2048,
        intermediate_size=512 if quick else 5632, num_hidden_layers=2 if quick else 22,
        num_attention_heads=32 if not quick else 8, num_key_value_heads=8 if not quick else 2,
        max_position_embeddings=512, eos_token_id=None)   # random weights: no EOS, every row runs `new` steps
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    prompt, new = (16, 8) if quick else (128, 64)
    example = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = prompt + new
    o1 = functools.cache(lambda: _optimized(model, example, cache, level="O1"))   # its own row and the export's
    builders: dict[str, Callable[[], Callable[[torch.Tensor, int], torch.Tensor]]] = {
        "torch fp32 eager (HF generate)": lambda: _hf_generate(model),
        "HF static cache + torch.compile": lambda: _compiled_static(model),
        "graphopt O1": lambda: _graphopt(o1()),
    }
    folder = tempfile.TemporaryDirectory(prefix="bench_llm_")   # the export (GBs at full size) goes with it
    if not args.skip_onnx:   # built next to O1, before the other rows' weights fill memory (the export peaks at GBs)
        builders["ONNX Runtime on graphopt's O1 export"] = lambda: _onnx(o1(), example, folder.name)
    int4 = functools.cache(lambda: _optimized(model, example, cache, level="O2", quantize="int4-weight-only",
                                              verify=False))
    builders |= {
        "torchao int8-WO (bf16 model)": lambda: _torchao_int8(model),
        "graphopt int8-WO": lambda: _graphopt(_optimized(model, example, cache, level="O2",
                                                         quantize="int8-weight-only")),
        "graphopt int4-WO (g128, verify off)": lambda: _graphopt(int4()),
    }
    if not args.skip_onnx:
        builders["ONNX Runtime on graphopt's int4 export, ops=onnxruntime (MatMulNBits + GQA)"] = \
            lambda: _onnx(int4(), example, folder.name, ops="onnxruntime")
    anchor = next(iter(builders))
    if args.rows:   # a part of the table, always with its anchor
        builders = {name: build for name, build in builders.items()
                    if name == anchor or any(part in name for part in args.rows.split(","))}
    variants, build_s, peak_gib, failed = {}, {}, {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        try:
            variants[name] = build()
        except Exception as exc:     # a peer that does not run here is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"{name}: {failed[name]}", flush=True)
        build_s[name] = time.perf_counter() - start
        gc.collect()
        peak_gib[name] = peak_rss_gib()
        print(f"built {name} in {build_s[name]:.0f} s; peak RSS so far {peak_gib[name]:.1f} GiB", flush=True)
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference = variants["torch fp32 eager (HF generate)"](ids, new)[:, prompt:]
            agreement = {name: float((run(ids, new)[:, prompt:] == reference).float().mean())
                         for name, run in variants.items()}
        calls = {name: (lambda run=run: run(ids, new)) for name, run in variants.items()}
        calls.update({f"{name} prefill": (lambda run=run: run(ids, 1)) for name, run in variants.items()})
        timings = interleaved(calls, rounds=1 if quick else args.rounds)
        base = None
        for name in variants:
            total, prefill = timings[name], timings[f"{name} prefill"]
            tokens_s = batch * (new - 1) / max(total.median_s - prefill.median_s, 1e-9)
            base = base or tokens_s
            rows.append({"model": name, "params": params, "batch": batch, "prompt": prompt, "new tokens": new,
                         "decode tokens/s": tokens_s, "× fp32 eager": tokens_s / base,
                         "generate ms (median)": 1e3 * total.median_s,
                         "generate ms p10–p90": f"{1e3 * total.p10_s:.0f}–{1e3 * total.p90_s:.0f}",
                         "prefill ms (median)": 1e3 * prefill.median_s,
                         "prefill ms p10–p90": f"{1e3 * prefill.p10_s:.0f}–{1e3 * prefill.p90_s:.0f}",
                         "tokens equal to fp32": agreement[name], "build s": build_s[name],
                         "peak RSS GiB once built": peak_gib[name]})
            print(rows[-1], flush=True)
    rows += [{"model": name, "params": params, "failed": reason} for name, reason in failed.items()]
    folder.cleanup()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script end to end")
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-only", action="store_true",
                        help="(b) alone, written to llm_decode.md (llm.md keeps the whole run)")
    parser.add_argument("--rows", default="", help="comma-separated parts of decode row names to build and "
                                                   "time, besides the fp32 eager anchor (default: every row)")
    parser.add_argument("--batches", default="1,8", type=lambda text: [int(b) for b in text.split(",")])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per batch")
    parser.add_argument("--skip-onnx", nargs="?", const="skipped with --skip-onnx", default=None, metavar="WHY",
                        help="no ONNX Runtime row (its export takes minutes); WHY goes into the table's notes")
    args = parser.parse_args(argv)
    if args.train_seconds is None:
        args.train_seconds = 5.0 if args.quick else 240.0
    threads = pin_threads()
    load = os.getloadavg()
    rows, trained = ([], None) if args.decode_only else accuracy(args)
    decode_rows = [] if args.skip_decode else decode(args)
    name = "llm_quick" if args.quick else "llm_decode" if args.decode_only else "llm"
    if args.decode_only:    # a part of the table: the other rows of the last run stay, tagged with their run
        decode_rows = earlier_rows(name, [row["model"] for row in decode_rows]) + decode_rows
    notes = "" if trained is None else (
        f"(a) trained {trained['steps']} steps in {trained['seconds']} s, final train loss "
        f"{trained['final train loss']:.3f}; held-out = last 10 % of pydoc_data.topics, byte-level.\n"
        f"LLM pruning (graphopt.optimize(generation=True, level='O3', prune=…, calibration_data=8 windows "
        f"of 4×{SEQ}), then graphopt.finetune(lm, …, teacher=model, epochs=1, lr=3e-4)):\n"
        + "\n".join(f"- {line}" for line in trained["pruning"]) + "\n"
        f"{trained['kv_cache']}.\n")
    if decode_rows:
        notes += (f"(b) decode tokens/s = batch × (new − 1) / (median generate time − median 1-token generate "
                  f"time); × fp32 eager from the same medians; p10–p90 over the {args.rounds} interleaved rounds; "
                  f"build s: optimize, compile-free setup or export time (torch.compile compiles on the first "
                  f"calls, in the warm-up); peak RSS GiB once built: the process's peak resident memory after "
                  f"that row was built, rows built in table order (fp32 weights: params × 4 bytes).\n"
                  + (f"Rows: those named like {args.rows!r}, and the anchor.\n" if args.rows else "")
                  + (f"ONNX Runtime rows not run: {args.skip_onnx}.\n" if args.skip_onnx else ""))
    notes += f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; threads {threads}."
    path = write_results(name, "LLM weight-only quantization: perplexity and CPU decode", rows + decode_rows, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
