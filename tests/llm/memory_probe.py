"""Run as a script: peak RSS while optimizing a Llama-shaped model for generation (or exporting its O1 module
to ONNX: mode `export`), over the model's size.

Prints `ratio=<(model bytes + peak RSS while optimizing − RSS just before) / fp32 model bytes>`: the
model counted once, plus everything optimizing adds (copies, new weights, transients). RSS just before is
taken after the model was built (building it leaves allocator slack of its own, measured apart as
`build_ratio`). A warm-up run on a tiny model loads every library first, so code does not count. RSS is
sampled every 2 ms from /proc/self/statm by a thread.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch
import transformers as tf

import graphopt

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def lm(hidden: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def optimize(model: torch.nn.Module, mode: str | None) -> None:
    """mode: a scheme, or "<scheme>+budget": with calibration text and an accuracy budget (the int8 pass's
    per-layer sensitivity runs, one quantized copy of the graph per layer)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (1, 6), generator=generator)
    quantize, _, budget = (mode or "").partition("+")
    extra = {"calibration_data": [torch.randint(3, 90, (2, 12), generator=generator)], "accuracy_budget": 0.5} \
        if budget else {}
    graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=16,
                      level="O2" if quantize else "O1", quantize=quantize or None, measure_latency=False,
                      progress=False, **extra)


def export(model: torch.nn.Module, folder: str) -> None:
    """The O1 generation module (optimized before the measurement starts) to ONNX with past key values."""
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    graphopt.export_onnx(model, (), os.path.join(folder, "decoder.onnx"), example_kwargs={"input_ids": ids})


def main(mode: str | None) -> None:   # a mode of `optimize`, or "export"
    import tempfile
    torch.set_num_threads(1)
    folder = tempfile.TemporaryDirectory(prefix="memory_probe_")
    if mode == "export":
        def prepare(model: torch.nn.Module) -> torch.nn.Module:
            ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
            return graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=16,
                                     level="O1", measure_latency=False, progress=False)

        def work(module: torch.nn.Module) -> None:
            export(module, folder.name)
    else:
        def prepare(model: torch.nn.Module) -> torch.nn.Module:
            return model

        def work(module: torch.nn.Module) -> None:
            optimize(module, mode)
    work(prepare(lm(32, 96)))               # warm-up: imports, export machinery
    empty = rss()
    model = prepare(lm(256, 32000))
    size = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    base = rss()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    work(model)
    done.set()
    thread.join()
    print(f"ratio={(size + max(peak[0], rss()) - base) / size:.3f} build_ratio={(base - empty) / size:.3f} "
          f"model_mb={size / 2**20:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "none" else None)
