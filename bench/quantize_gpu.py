"""Per-token quantization on a GPU: achieved memory bandwidth, alone and fused with its LayerNorm.

Rows, for BERT-base's activation shapes in fp16 (M = 32 x 128 tokens; K = 768 for the inputs of
QKV / output / FFN-up, 3072 for FFN-down) and a decode shape (M = 8):
- torch path: graphopt's CPU-path code run on CUDA tensors (torch ops: amax, amin, div, round, cast);
- Triton kernel with the heuristic launch config, and autotuned (GRAPHOPT_AUTOTUNE=1 for that row);
- LayerNorm → quantize as two kernels (torch layer_norm + the Triton quantize) and fused
  (graphopt::layer_norm_quantize, heuristic and autotuned).
Bytes moved: the input read, the int8 codes and float32 scales written (fused: plus the LayerNorm
output written). Bandwidth is shown against a device-to-device copy measured in the same run (the
roofline a kernel can reach) and against the data-sheet figure of the GPU when known.
Latency: triton.testing.do_bench (CUDA events, L2 flushed before each call): median with p20–p80.

    python -m bench.quantize_gpu [--out PATH]     # needs CUDA
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.harness import RESULTS, machine_info

SHAPES = ((4096, 768), (4096, 3072), (8, 4096))
NOMINAL_TBS = {"H200": 4.8, "H100 80GB HBM3": 3.35, "H100": 3.35, "A100": 2.0}


def bench_us(fn: Callable[[], object]) -> tuple[float, float, float]:
    from triton.testing import do_bench
    p20, p50, p80 = do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8])
    return p50 * 1e3, p20 * 1e3, p80 * 1e3


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us, _, _ = bench_us(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e12


def nominal(name: str) -> Optional[float]:
    return next((tbs for key, tbs in NOMINAL_TBS.items() if key in name), None)


def rows_for(m: int, k: int, roofline: float, peak: Optional[float]) -> list[dict]:
    import graphopt.kernels as gk
    from graphopt.kernels import cpu
    g = torch.Generator(device="cuda").manual_seed(m * k)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float16) * 3
    weight = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    bias = torch.randn(k, device="cuda", dtype=torch.float16)
    quantize_bytes = m * k * 2 + m * k + 4 * m
    fused_bytes = quantize_bytes + m * k * 2

    def autotuned(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            os.environ["GRAPHOPT_AUTOTUNE"] = "1"
            try:
                return fn()
            finally:
                os.environ["GRAPHOPT_AUTOTUNE"] = "0"
        call()   # tunes once (cached), outside the timed calls
        return call

    def ln_then_quantize() -> object:
        return gk.triton_quantize_per_token(torch.nn.functional.layer_norm(x, (k,), weight, bias, 1e-12))

    cases = [
        ("quantize_per_token", "torch ops", quantize_bytes, lambda: cpu.quantize_per_token(x)),
        ("quantize_per_token", "Triton, heuristic config", quantize_bytes, lambda: gk.triton_quantize_per_token(x)),
        ("quantize_per_token", "Triton, autotuned", quantize_bytes,
         autotuned(lambda: gk.triton_quantize_per_token(x))),
        ("layer_norm + quantize", "torch layer_norm, Triton quantize (2 kernels)", fused_bytes + m * k * 2,
         ln_then_quantize),
        ("layer_norm + quantize", "fused, heuristic config", fused_bytes,
         lambda: gk.triton_layer_norm_quantize(x, weight, bias, 1e-12)),
        ("layer_norm + quantize", "fused, autotuned", fused_bytes,
         autotuned(lambda: gk.triton_layer_norm_quantize(x, weight, bias, 1e-12))),
    ]
    rows = []
    for op, variant, nbytes, fn in cases:
        us, p20, p80 = bench_us(fn)
        tbs = nbytes / (us * 1e-6) / 1e12
        rows.append({"M x K": f"{m} x {k}", "op": op, "variant": variant, "us": us, "p20_us": p20, "p80_us": p80,
                     "MB moved": nbytes / 1e6, "TB/s": tbs, "% of copy": 100 * tbs / roofline,
                     "% of nominal": None if peak is None else 100 * tbs / peak})
        print(rows[-1], flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize_gpu", help="output path without extension")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.quantize_gpu needs a CUDA GPU")
    os.environ["GRAPHOPT_KERNEL_VALUE_CHECKS"] = "0"
    name = torch.cuda.get_device_name()
    roofline, peak = copy_bandwidth(), nominal(name)
    print(f"{name}: device copy {roofline:.2f} TB/s; nominal {peak} TB/s", flush=True)
    rows = [row for m, k in SHAPES for row in rows_for(m, k, roofline, peak)]
    write(args.out, rows, name, roofline, peak)


def write(out: Path, rows: list[dict], name: str, roofline: float, peak: Optional[float]) -> None:
    machine = machine_info()
    fmt = lambda v: "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    columns = list(rows[0])
    lines = [f"# Per-token quantization on {name}: bandwidth, alone and fused with LayerNorm", "",
             f"Device-to-device copy in this run: {roofline:.2f} TB/s; nominal HBM bandwidth: {peak} TB/s.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    lines += ["", (__doc__ or "").split("\n\n")[1].strip(), "",
              "Machine and versions: " + ", ".join(f"{k}={v}" for k, v in machine.items())]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "copy_tbs": roofline, "rows": rows},
                                                   indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
