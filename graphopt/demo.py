"""`graphopt demo`: the whole pipeline on the built-in digits residual CNN.

1. load the digits CNN (bundled weights) and its held-out test split;
2. optimize at O1 (lossless: canonicalize + fusions), O2 (+ int8 with
   calibration) and O3 (+ structured pruning, then `finetune` by distillation);
3. print each level's pass report, then one table: test accuracy, latency,
   parameter bytes and nodes per level, against the fp32 model measured in
   the same run;
4. export the best model to ONNX with `export_onnx` and check ONNX Runtime's
   accuracy on the same test set.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from . import ir
from .api import OptimizedModule, optimize
from .timing import measure
from .zoo import Digits, accuracy, batches, trained_digits_resnet


def _latency_ms(module: Any, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return measure(lambda: module(x), warmup=3, repeats=30, max_seconds=5.0).median_ms


def _row(name: str, module: Any, data: Digits, x_bench: torch.Tensor) -> dict[str, Any]:
    graph = module.graph_module if isinstance(module, OptimizedModule) else None
    return {"model": name, "accuracy %": accuracy(module, data.x_test, data.y_test),
            "latency ms": _latency_ms(module, x_bench), "params": ir.param_bytes(module),
            "nodes": ir.count_nodes(graph) if graph is not None else None}


def _print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print(f"\n{'model':<34}{'test acc':>10}{'Δ acc':>8}{'latency ms':>12}{'speed-up':>10}{'params':>12}{'nodes':>7}")
    for row in rows:
        print(f"{row['model']:<34}{row['accuracy %']:>9.2f}%{row['accuracy %'] - base['accuracy %']:>+8.2f}"
              f"{row['latency ms']:>12.3f}{base['latency ms'] / row['latency ms']:>9.2f}×"
              f"{row['params'] / 1024:>9.1f} KiB{row['nodes'] if row['nodes'] is not None else '-':>7}")


def run(batch: int = 256, prune: float = 0.5, finetune_epochs: int = 3, out_dir: str | None = None,
        show_reports: bool = True) -> list[dict[str, Any]]:
    """Run the demo; returns the summary rows (also printed)."""
    from .finetune import finetune
    from .onnx import export_onnx
    torch.manual_seed(0)
    model, data = trained_digits_resnet()
    example = (data.x_train[:batch],)
    calibration = [(xb,) for xb, _ in batches(data.x_train, data.y_train, 64, seed=1)][:8]
    x_bench = data.x_test[:batch]
    rows = [_row("fp32 eager (original)", model, data, x_bench)]

    o1 = optimize(model, example, level="O1")
    o2 = optimize(model, example, level="O2", quantize="int8-dynamic", calibration_data=calibration)
    pruned = optimize(model, example, level="O3", prune=prune, quantize=None, calibration_data=calibration)
    train = list(batches(data.x_train, data.y_train, 64, seed=2))
    tuned = finetune(pruned, train, teacher=model, epochs=finetune_epochs)
    final = optimize(tuned, example, level="O2", quantize="int8-dynamic", calibration_data=calibration)
    stages = [("O1 lossless", o1), ("O2 int8-dynamic", o2), (f"O3 prune {prune:.0%} FLOPs", pruned),
              (f"O3 + finetune ({finetune_epochs} epochs)", tuned), ("O3 + finetune + int8 (O2)", final)]
    for name, opt in stages:
        if show_reports and opt.report.records:
            print(f"\n=== {name} ===\n{opt.report}")
        rows.append(_row(name, opt, data, x_bench))

    directory = Path(out_dir or tempfile.mkdtemp(prefix="graphopt-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "digits_o3_int8.onnx"
    export_onnx(final, example, str(onnx_path))
    rows.append(_onnx_row(onnx_path, data))
    _print_table(rows)
    print(f"\nONNX model written and verified: {onnx_path}")
    return rows


def _onnx_row(path: Path, data: Digits) -> dict[str, Any]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data.x_test.numpy()})[0]
    acc = float((torch.from_numpy(logits).argmax(-1) == data.y_test).float().mean()) * 100
    x = data.x_test[:256].numpy()
    latency = measure(lambda: session.run(None, {name: x}), warmup=3, repeats=30, max_seconds=5.0).median_ms
    return {"model": "  exported ONNX in ONNX Runtime", "accuracy %": acc, "latency ms": latency,
            "params": path.stat().st_size, "nodes": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphopt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prune", type=float, default=0.5, help="FLOPs fraction to remove at O3")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after pruning")
    parser.add_argument("--out", default=None, help="directory for the exported ONNX model")
    args = parser.parse_args(argv)
    run(prune=args.prune, finetune_epochs=args.epochs, out_dir=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
