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
Latency: a CUDA graph of the op over enough distinct inputs (about 256 MB in all, several times the
GPU's L2) that every call reads from HBM, replayed by triton.testing.do_bench_cudagraph; per call,
median with p20–p80. The graph removes the Python launch cost, which at these sizes is larger than
the kernel (the eager figures are the launch cost, not the kernel).

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


WORKING_SET = 256 * 2**20


def bench_us(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor]) -> tuple[float, float, float]:
    """Per-call (median, p20, p80) µs of fn over `inputs` in turn, captured in one CUDA graph."""
    from triton.testing import do_bench_cudagraph

    def sweep() -> None:
        for x in inputs:
            fn(x)
    sweep()
    p20, p50, p80 = do_bench_cudagraph(sweep, rep=100, quantiles=[0.2, 0.5, 0.8])
    return tuple(v * 1e3 / len(inputs) for v in (p50, p20, p80))


def copies(x: torch.Tensor, bytes_per_call: int) -> list[torch.Tensor]:
    """x and random siblings, enough that one sweep moves WORKING_SET bytes (at most 64 tensors)."""
    count = min(max(WORKING_SET // bytes_per_call, 1), 64)
    return [x] + [torch.randn_like(x) * 3 for _ in range(count - 1)]


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us, _, _ = bench_us(lambda s: dst.copy_(s), [src])
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

    def autotuned(fn: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], object]:
        def call(x_: torch.Tensor) -> object:
            os.environ["GRAPHOPT_AUTOTUNE"] = "1"
            try:
                return fn(x_)
            finally:
                os.environ["GRAPHOPT_AUTOTUNE"] = "0"
        return call

    def ln_then_quantize(x_: torch.Tensor) -> object:
        return gk.triton_quantize_per_token(torch.nn.functional.layer_norm(x_, (k,), weight, bias, 1e-12))

    cases = [
        ("quantize_per_token", "torch ops", quantize_bytes, cpu.quantize_per_token),
        ("quantize_per_token", "Triton, heuristic config", quantize_bytes, gk.triton_quantize_per_token),
        ("quantize_per_token", "Triton, autotuned", quantize_bytes, autotuned(gk.triton_quantize_per_token)),
        ("layer_norm + quantize", "torch layer_norm, Triton quantize (2 kernels)", fused_bytes + m * k * 2,
         ln_then_quantize),
        ("layer_norm + quantize", "fused, heuristic config", fused_bytes,
         lambda x_: gk.triton_layer_norm_quantize(x_, weight, bias, 1e-12)),
        ("layer_norm + quantize", "fused, autotuned", fused_bytes,
         autotuned(lambda x_: gk.triton_layer_norm_quantize(x_, weight, bias, 1e-12))),
    ]
    inputs = copies(x, quantize_bytes)
    rows = []
    for op, variant, nbytes, fn in cases:
        us, p20, p80 = bench_us(fn, inputs)
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
