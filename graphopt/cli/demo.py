"""`graphopt demo`: the whole pipeline on the built-in digits residual CNN, explained as it runs.

1. say what the model and data are and what each stage will do;
2. optimize at O1 (lossless), O2 (+ int8 with calibration) and O3 (+ structured
   pruning, `finetune` by distillation with its own before/after table, then
   int8), up to `--level`, printing each stage's changed passes and its row
   (test accuracy, latency, parameter bytes, nodes) as soon as it is done;
3. export the last model to ONNX in `--out` (default ./graphopt-demo/) and
   check ONNX Runtime's accuracy on the same test set; print the summary.

The engine (torch and friends) loads only when the demo runs: `--help` is instant.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from ..engine.timing import measure


def _latency_ms(module: Any, x: Any) -> float:
    import torch
    with torch.inference_mode():
        return measure(lambda: module(x), warmup=3, repeats=30, max_seconds=5.0).median_ms


def _row(name: str, module: Any, data: Any, x_bench: Any) -> dict[str, Any]:
    from ..api import OptimizedModule
    from ..data.zoo import accuracy
    from ..engine import ir
    graph = module.graph_module if isinstance(module, OptimizedModule) else None
    return {"model": name, "accuracy %": accuracy(module, data.x_test, data.y_test),
            "latency ms": _latency_ms(module, x_bench), "params": ir.param_bytes(module),
            "nodes": ir.count_nodes(graph) if graph is not None else None}


INTRO = """graphopt demo: the whole pipeline on a small real model, explained as it runs.

Model: a residual CNN (DigitsResNet, bundled weights) trained on scikit-learn's digits,
1,797 real 8×8 handwritten digits; accuracy is measured on the held-out test split.
Stages, each printed as it finishes, up to --level:
  O1  lossless rewrites (canonicalize, fuse batch-norm into convolutions, …): same outputs, fewer ops
  O2  + int8 weights and activations (dynamic), calibrated on training images: smaller, usually faster
  O3  + structured pruning of --prune of the FLOPs, then --epochs of fine-tuning by distillation
      from the original (pruning alone costs accuracy; the fine-tune wins it back), then int8
Finally the last model is exported to ONNX in --out and checked in ONNX Runtime on the same test set.
Latencies are medians on a batch of {batch} test images, on this machine, now.
"""
HEADER = f"{'model':<34}{'test acc':>10}{'Δ acc':>8}{'latency ms':>12}{'speed-up':>10}{'params':>12}{'nodes':>7}"


def _print_row(row: dict[str, Any], base: dict[str, Any]) -> None:
    print(f"{row['model']:<34}{row['accuracy %']:>9.2f}%{row['accuracy %'] - base['accuracy %']:>+8.2f}"
          f"{row['latency ms']:>12.3f}{base['latency ms'] / row['latency ms']:>9.2f}×"
          f"{row['params'] / 1024:>9.1f} KiB{row['nodes'] if row['nodes'] is not None else '-':>7}", flush=True)


def run(batch: int = 256, prune: float = 0.5, finetune_epochs: int = 3, out_dir: str = "graphopt-demo",
        level: str = "O3", show_reports: bool = True) -> list[dict[str, Any]]:
    """Run the demo up to `level`, printing each stage as it finishes; returns the summary rows."""
    import torch

    from ..api import optimize
    from ..data.zoo import accuracy, batches, trained_digits_resnet
    from ..onnx import export_onnx
    from ..outputs import check_writable
    from ..training.finetuning import finetune
    from .progress import pass_line
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = check_writable(directory / f"digits_{level.lower()}.onnx")
    print(INTRO.format(batch=batch), flush=True)
    torch.manual_seed(0)
    model, data = trained_digits_resnet()
    example = (data.x_train[:batch],)
    calibration = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 64, seed=1)][:8]
    x_bench = data.x_test[:batch]
    print(f"data: {len(data.x_train)} training and {len(data.x_test)} test images\n\n{HEADER}", flush=True)
    rows = [_row("fp32 eager (original)", model, data, x_bench)]
    _print_row(rows[0], rows[0])

    def stage(name: str, opt: Any, why: str) -> Any:
        print(f"\n--- {name}: {why}", flush=True)
        if show_reports:
            for record in opt.report.records:
                if record.modified or record.rolled_back:
                    print(pass_line(record), flush=True)
        rows.append(_row(name, opt, data, x_bench))
        print(HEADER, flush=True)
        _print_row(rows[-1], rows[0])
        return opt

    last = stage("O1 lossless", optimize(model, example, level="O1", progress=False),
                 "rewrites that keep the outputs (passes that changed the graph below)")
    if level in ("O2", "O3"):
        last = stage("O2 int8-dynamic", optimize(model, example, level="O2", quantize="int8-dynamic",
                                                 calibration_data=calibration, progress=False),
                     "int8 weights, activations quantized per row at run time")
    if level == "O3":
        pruned = stage(f"O3 prune {prune:.0%} FLOPs", optimize(model, example, level="O3", prune=prune, quantize=None,
                                                               calibration_data=calibration, progress=False),
                       "whole channels removed, so the convolutions shrink")
        last = pruned
        if finetune_epochs > 0:
            print(f"\n--- fine-tune: {finetune_epochs} epoch(s) distilling the original into the pruned model",
                  flush=True)
            train = list(batches(data.x_train, data.y_train, 64, seed=2))
            tuned = finetune(pruned, train, teacher=model, epochs=finetune_epochs, progress=False)
            before, after = rows[-1]["accuracy %"], accuracy(tuned, data.x_test, data.y_test)
            print(f"{'':<4}{'epochs':>8}{'test acc before':>18}{'after':>10}{'recovered':>12}\n"
                  f"{'':<4}{finetune_epochs:>8}{before:>17.2f}%{after:>9.2f}%{after - before:>+11.2f}", flush=True)
            rows.append(_row(f"O3 + finetune ({finetune_epochs} epochs)", tuned, data, x_bench))
            _print_row(rows[-1], rows[0])
            last = tuned
        last = stage("O3 + int8 (O2 on the pruned model)",
                     optimize(last, example, level="O2", quantize="int8-dynamic", calibration_data=calibration,
                              progress=False), "the pruned model, quantized")
    print(f"\n--- export to ONNX: {onnx_path}", flush=True)
    export_onnx(last, example, str(onnx_path))
    rows.append(_onnx_row(onnx_path, data))
    print(f"\nsummary\n{HEADER}", flush=True)
    for row in rows:
        _print_row(row, rows[0])
    print(f"\nONNX model written and checked in ONNX Runtime: {onnx_path}")
    return rows


def _onnx_row(path: Path, data: Any) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data.x_test.numpy()})[0]
    acc = float((torch.from_numpy(logits).argmax(-1) == data.y_test).float().mean()) * 100
    x = data.x_test[:256].numpy()
    latency = measure(lambda: session.run(None, {name: x}), warmup=3, repeats=30, max_seconds=5.0).median_ms
    return {"model": "  exported ONNX in ONNX Runtime", "accuracy %": acc, "latency ms": latency,
            "params": path.stat().st_size, "nodes": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt demo", description=INTRO.splitlines()[0])
    parser.add_argument("--prune", type=float, default=0.5, help="FLOPs fraction to remove at O3")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after pruning")
    parser.add_argument("--out", default="graphopt-demo", help="folder for the exported ONNX model "
                        "(default ./graphopt-demo/)")
    parser.add_argument("--level", choices=["O1", "O2", "O3"], default="O3", help="the last stage to run")
    args = parser.parse_args(argv)
    if not 0 < args.prune < 1 or args.epochs < 0:
        parser.error("--prune is a fraction in (0, 1) and --epochs a count ≥ 0")
    run(prune=args.prune, finetune_epochs=args.epochs, out_dir=args.out, level=args.level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
