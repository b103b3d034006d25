"""W4A16 kernel vs fp16 cuBLAS on a GPU: decode shapes M = 1, 4, 16 for (K, N) = (4096, 4096), (4096, 11008).

    python -m bench.kernels_w4 --gpu --out w4.md     # on a CUDA machine: times CUDA-graph replays (do_bench_cudagraph)
    python -m bench.kernels_w4 --out w4.md           # no GPU: small shapes in Triton's interpreter (checks only)

Each row: median times (triton.testing.do_bench_cudagraph: CUDA-graph replay, no launch cost, ms) of ``x @ W.T`` in float16 (cuBLAS via torch) and of
``graphopt.kernels.triton_w4a16_linear`` (group size 128, float16 activations), the speed-up, and the achieved
bandwidth: bytes the kernel must move (weights, scales, zero points, x, y) over its time, and the share of
the device's peak HBM bandwidth (``--peak-gbps``, default from the device name: H200 4800, H100 3350).
Every launch is first checked against float32 math on the dequantized weight (max relative error column).
Writes the table as markdown to ``--out`` and the same rows as JSON next to it (``.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
import triton

from graphopt.kernels import dequantize_int4, pack_int4, triton_w4a16_linear

GPU_SHAPES = ((4096, 4096), (4096, 11008))     # (K, N)
CPU_SHAPES = ((256, 96),)
ROWS = (1, 4, 16)
GROUP_SIZE = 128
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def operands(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(k * 7 + n)          # the same weight for every M of a shape
    groups = -(-k // GROUP_SIZE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    packed = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    scales = torch.exp(torch.empty(n, groups).uniform_(-6, -3, generator=g))
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    return tuple(t.to(device) for t in (x, packed, scales, zeros))


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        def bench(fn: Callable[[], object]) -> float:   # CUDA-graph replay: the kernel, not Python's launch cost
            fn()
            result = do_bench_cudagraph(fn, rep=100, return_mode="median")
            return float(result[0] if isinstance(result, (tuple, list)) else result)
        return bench

    def wall(fn: Callable[[], object]) -> float:        # interpreter: one timed call, for the table's shape only
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return wall


def peak_gbps(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for key, v in PEAK_GBPS.items() if key in name), None)


def run(device: str, shapes: tuple[tuple[int, int], ...], peak: float | None) -> list[dict[str, Any]]:
    bench = timer(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for k, n in shapes:
        w_fp = None
        for m in ROWS:
            x, packed, scales, zeros = operands(m, k, n, device, dtype)
            if w_fp is None:
                w_fp = dequantize_int4(packed, scales, zeros, GROUP_SIZE, k).to(dtype)
            y = triton_w4a16_linear(x, packed, scales, zeros, GROUP_SIZE)
            exact = x.float() @ w_fp.float().T
            rel_err = float((y.float() - exact).abs().max() / exact.abs().max())
            os.environ["GRAPHOPT_KERNEL_VALUE_CHECKS"] = "0"   # timing: no scale check (a device sync) per call
            t_w4 = bench(lambda: triton_w4a16_linear(x, packed, scales, zeros, GROUP_SIZE))
            t_fp = bench(lambda: x @ w_fp.T)
            moved = packed.numel() + scales.numel() * 4 + zeros.numel() + (m * k + m * n) * x.element_size()
            gbps = moved / (t_w4 * 1e-3) / 1e9
            row = {"K": k, "N": n, "M": m, "fp16 cuBLAS ms" if device == "cuda" else "fp32 torch ms": t_fp,
                   "W4A16 ms": t_w4, "speed-up": t_fp / t_w4, "W4A16 GB/s": gbps,
                   "max rel err": rel_err}
            if peak:
                row["% of HBM peak"] = 100 * gbps / peak
            os.environ.pop("GRAPHOPT_KERNEL_VALUE_CHECKS")
            rows.append(row)
            print(row, flush=True)
    return rows


def write(rows: list[dict[str, Any]], out: Path, info: dict[str, Any]) -> None:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)   # noqa: E731
    lines = ["# W4A16 (graphopt Triton) vs fp16 cuBLAS, decode shapes", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += ["", "Machine and versions: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="time on CUDA (else: interpreter check on small shapes)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels_w4.md"))
    parser.add_argument("--peak-gbps", type=float, default=None)
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    device = "cuda" if args.gpu else "cpu"
    name = torch.cuda.get_device_name(0) if args.gpu else platform.processor() or "cpu"
    peak = peak_gbps(name, args.peak_gbps) if args.gpu else None
    started = time.perf_counter()
    rows = run(device, GPU_SHAPES if args.gpu else CPU_SHAPES, peak)
    info = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "peak_gbps": peak,
            "group_size": GROUP_SIZE, "seconds": round(time.perf_counter() - started, 1)}
    write(rows, args.out, info)
    print(f"wrote {args.out} in {info['seconds']} s")


if __name__ == "__main__":
    main()
