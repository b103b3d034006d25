"""What the speed check decides, architecture by architecture: `graphopt.optimize(model, level="O2")` with
the default speed check (int8-dynamic), then the result timed against the model as given, interleaved.

Columns: passes rolled back for speed (with the measured ratio), int8 layers kept float because their
int8 form is slower here (layer_speed), the speed check's own verdict of the result against the captured
graph, and the final speedup over eager with its 95 % bootstrap interval (graphopt.engine.timing.Interleaved).
Hugging Face architectures are built from small configs (random weights: fidelity is not the point here,
the verification budget still applies); the digits CNN is the bundled trained one.

    python -m bench.speed_check [--quick]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch
import transformers as tf

import graphopt
from bench.harness import pin_threads, write_results
from graphopt.engine.timing import measure_interleaved

TEXT = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)


def text_model(name: str, config: Any) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build() -> tuple[torch.nn.Module, tuple, dict]:
        model = tf.AutoModel.from_config(config).eval()
        ids = torch.randint(5, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
        return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return build


def vision_model(config: Any, size: int = 64) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build() -> tuple[torch.nn.Module, tuple, dict]:
        model = tf.AutoModel.from_config(config).eval()
        return model, (), {"pixel_values": torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))}
    return build


def digits() -> tuple[torch.nn.Module, tuple, dict]:
    from graphopt.data.zoo import trained_digits_resnet
    model, data = trained_digits_resnet(progress=False)
    return model.eval(), (data.x_test[:256],), {}


def architectures() -> dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict]]]:
    return {
        "BERT": text_model("bert", tf.BertConfig(**TEXT)),
        "DistilBERT": text_model("distilbert", tf.DistilBertConfig(vocab_size=1000, dim=256, n_layers=2, n_heads=4,
                                                                    hidden_dim=1024)),
        "RoBERTa": text_model("roberta", tf.RobertaConfig(**TEXT)),
        "ALBERT": text_model("albert", tf.AlbertConfig(embedding_size=128, **TEXT)),
        "ELECTRA": text_model("electra", tf.ElectraConfig(embedding_size=128, **TEXT)),
        "MobileBERT": text_model("mobilebert", tf.MobileBertConfig(vocab_size=1000, num_hidden_layers=2)),
        "GPT-2": text_model("gpt2", tf.GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, use_cache=False)),
        "Llama": text_model("llama", tf.LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=688, use_cache=False)),
        "ViT": vision_model(tf.ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=1024)),
        "ConvNeXt": vision_model(tf.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1])),
        "ResNet (HF)": vision_model(tf.ResNetConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                                    embedding_size=32)),
        "digits CNN": digits,
    }


def run_one(name: str, build: Callable[[], tuple[torch.nn.Module, tuple, dict]], rounds: int) -> dict[str, Any]:
    model, args, kwargs = build()
    start = time.perf_counter()
    opt = graphopt.optimize(model, args, example_kwargs=kwargs, level="O2", progress=False)
    optimize_s = time.perf_counter() - start
    report = opt.report
    speed_rollbacks = [f"{r.name}: {r.speed}" for r in report.records if r.rolled_back and r.speed]
    layers = [row for r in report.records if r.name.startswith("int8_") and not r.rolled_back
              for row in r.stats.get("layers", []) if isinstance(row, dict)]
    float_for_speed = [row for row in layers if "float is faster" in str(row.get("reason", ""))]
    int8_layers = sum(row.get("scheme") not in (None, "float", "float in torch") for row in layers)
    with torch.inference_mode():
        timings = measure_interleaved({"eager": lambda: model(*args, **kwargs), "graphopt": lambda: opt(*args, **kwargs)},
                                      rounds=rounds, warmup=2)
    speedup, low, high = timings.ratio("eager", "graphopt")
    return {"model": name, "optimize_s": optimize_s, "int8_layers": int8_layers,
            "float_for_speed": len(float_for_speed),
            "rolled_back_for_speed": "; ".join(speed_rollbacks) or "-",
            "check_vs_captured": report.meta.get("speed", "-"),
            "eager_ms": timings.timing("eager").median_ms, "eager p10–p90 ms": _spread(timings.timing("eager")),
            "graphopt_ms": timings.timing("graphopt").median_ms,
            "graphopt p10–p90 ms": _spread(timings.timing("graphopt")),
            "speedup_vs_eager": speedup, "ci_low": low, "ci_high": high,
            "no_slower": "yes" if high >= 1 or speedup >= 1 else "NO"}


def _spread(timing: Any) -> str:
    return f"{timing.p10_s * 1e3:.3g}–{timing.p90_s * 1e3:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="")
    args = parser.parse_args()
    pin_threads()
    chosen = {k: v for k, v in architectures().items() if not args.models or k in args.models.split(",")}
    rows = []
    for name, build in chosen.items():
        try:
            rows.append(run_one(name, build, rounds=5 if args.quick else 15))
        except Exception as exc:   # report, never invent a figure
            rows.append({"model": name, "rolled_back_for_speed": f"failed: {type(exc).__name__}: "
                                                                   f"{str(exc).splitlines()[0][:200]}"})
        print(rows[-1], flush=True)
    notes = (f"graphopt.optimize(model, level='O2') (int8-dynamic, default speed check), then eager vs graphopt "
             f"timed interleaved ({5 if args.quick else 15} rounds, order rotating). speedup_vs_eager = "
             f"median(eager) / median(graphopt) with its 95 % bootstrap interval [ci_low, ci_high]; no_slower: "
             f"'NO' only when the whole interval lies below 1. Load average at the end "
             f"{os.getloadavg()[0]:.2f}.")
    print(write_results("speed_check", "The speed check's decisions at O2, architecture by architecture", rows, notes))


if __name__ == "__main__":
    main()
