"""How long `graphopt.export_onnx` takes on large graphs, against torch.onnx's own export of the same model.

    python -m bench.export_time            # ViT-B/16 and Swin-T (Hugging Face configs, random weights), batch 2

The sweep over public zoos found export_onnx slow on large graphs (the issue quotes 142 s for ViT-B/16 and more
than 150 s for Swin-T at batch 2). This table times, round-robin in one run (graphopt's interleaved timer, one
warm-up call each, then ROUNDS rounds with the order rotating):

    torch.onnx.export      torch.onnx.export(model, dynamo=True) and saving the file: what a user of torch alone
                           runs, with no check that the file computes what the model does
    graphopt.export_onnx   the same model through graphopt: torch.onnx, the export's ONNX passes (each verified in
                           ONNX Runtime on the example inputs), the file written whole and compared with the module

Weights are random: an export's time depends on the graph and the tensor sizes, not on the values.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from bench.harness import pin_threads, write_results
from graphopt.engine.timing import measure_interleaved

ROUNDS = 3
BATCH = 2


def models() -> dict[str, torch.nn.Module]:
    from transformers import SwinConfig, SwinModel, ViTConfig, ViTModel
    torch.manual_seed(0)
    return {"ViT-B/16": ViTModel(ViTConfig()).eval(),      # the defaults are ViT-B/16 at 224×224
            "Swin-T": SwinModel(SwinConfig()).eval()}      # the defaults are Swin-T (patch 4, window 7)


def exporters(model: torch.nn.Module, example: tuple, folder: Path) -> dict[str, Callable[[], object]]:
    import graphopt

    def plain() -> None:
        torch.onnx.export(model, example, dynamo=True, verbose=False).save(str(folder / "torch.onnx"))

    def ours() -> None:
        graphopt.export_onnx(model, example, folder / "graphopt.onnx")

    return {"torch.onnx.export": plain, "graphopt.export_onnx": ours}


def main() -> None:
    threads = pin_threads()
    rows: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    for name, model in models().items():
        example = (torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(1)),)
        with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
            calls, failed = {}, {}
            for engine, call in exporters(model, example, Path(folder)).items():   # the warm-up call of each
                try:
                    call()
                    calls[engine] = call
                except Exception as exc:   # an engine that cannot export this model gets its error as its row
                    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))   # torch's colour codes
                    failed[engine] = f"{type(exc).__name__}: {text[:200]}"
            timed = measure_interleaved(calls, rounds=ROUNDS, warmup=0, max_seconds=float("inf")) if calls else None
            sizes = {engine: (Path(folder) / file).stat().st_size / 2**20
                     for engine, file in (("torch.onnx.export", "torch.onnx"), ("graphopt.export_onnx", "graphopt.onnx"))
                     if engine in calls}
        plain = timed.timing("torch.onnx.export").median_s if "torch.onnx.export" in calls else None
        for engine in calls:
            timing = timed.timing(engine)
            rows.append({"model": name, "batch": BATCH, "engine": engine, "median s": timing.median_s,
                         "spread (min–max) s": f"{min(timed.samples[engine]):.1f}–{max(timed.samples[engine]):.1f}",
                         "× torch.onnx": timing.median_s / plain if plain else None, "file MiB": sizes[engine]})
        rows += [{"model": name, "batch": BATCH, "engine": engine, "error": error} for engine, error in failed.items()]
        load.append(os.getloadavg()[0])
        print(rows[-2:], flush=True)
    notes = (f"Each engine called once to warm up (an engine that fails there gets its error as its row), then {ROUNDS} interleaved rounds (graphopt.engine.timing."
             f"measure_interleaved, wall time); median and min–max of the {ROUNDS} rounds. torch threads: {threads}. "
             f"1-minute load average at the start and after each model: {', '.join(f'{x:.2f}' for x in load)}.")
    print(write_results("export_time", "export_onnx on large graphs vs torch.onnx.export", rows, notes).read_text())


if __name__ == "__main__":
    main()
