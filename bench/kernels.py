"""Benchmark of the graphopt int8 kernels: correctness checks, CPU-path timings, GPU throughput.

    python -m bench.kernels                 # everything this machine can run
    python -m bench.kernels --quick         # fewer shapes and repeats (a smoke run)
    python -m bench.kernels --gpu-only      # on a lent GPU machine: sections 1 (CUDA) and 3 only,
                                            # written to kernels_gpu.{md,json} (the CPU tables stay)

Writes bench/results/kernels.md and bench/results/kernels.json (machine and
versions included). Sections:

1. Correctness, in the same run: the Triton kernels against the float64
   references, interpreted on CPU tensors (small shapes) and, with a GPU,
   compiled on CUDA tensors (benchmark-sized shapes).
2. CPU paths, threads pinned to 2 (and again with 1 thread, which a shared
   machine cannot stall), median of interleaved repeats, each ratio
   against float32 ``torch.mm`` timed in the same loop: our exact CPU
   ``int8_linear`` (chunked float32), the exact float64 alternative,
   ``torch._int_mm`` + separate dequantization, fbgemm's dynamic quantized
   linear (a different, per-tensor-quantized computation: the speed anchor),
   the dynamic int8 pipeline (quantize_per_token + int8_linear), and
   ``w8a16_linear``. Also the facts behind the CPU choice: fbgemm's exactness
   on full-range int8 activations and its weight-prepack time.
3. GPU (only with CUDA): TOPS of the Triton int8 GEMM against bf16 cuBLAS
   ``torch.mm`` and ``torch._int_mm`` + separate dequantization, and of
   W8A16 against fp16 ``torch.mm``, for M in {1, 16, 128, 1024, 4096, 8192} x
   (K, N) in {(4096, 4096), (4096, 11008), (8192, 8192)}, timed with CUDA
   graphs so launch overhead does not count. Without a GPU the section says
   it was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import triton
from tqdm import tqdm

import graphopt.kernels as gk
from graphopt.engine.timing import measure_interleaved
from bench.harness import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
ops = torch.ops.graphopt
CPU_SHAPES_KN = [(384, 1536), (1536, 384), (4096, 4096)]
CPU_MS = [1, 16, 128, 1024]
GPU_SHAPES_KN = [(4096, 4096), (4096, 11008), (8192, 8192)]
GPU_MS = [1, 16, 128, 1024, 4096, 8192]


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, "
        + ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f} " in flags),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "autotune": os.environ.get("GRAPHOPT_AUTOTUNE", "0") == "1",
        "load_average_at_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- data


def int8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def scales(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * 2e-3 + 5e-4


def operands(m: int, k: int, n: int, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = {
        "x": torch.randn(m, k, generator=g),
        "x_q": int8((m, k), g),
        "w_q": int8((n, k), g),
        "x_scale": scales(m, g),
        "w_scale": scales(n, g),
        "bias": torch.randn(n, generator=g),
    }
    return {name: t.to(device) for name, t in data.items()}


# ----------------------------------------------------------------------------- correctness


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def check_kernels(device: str, shapes: list[tuple[int, int, int]]) -> list[dict]:
    """The Triton kernels against the float64 references on ``device``."""
    rows = []
    for m, k, n in tqdm(shapes, desc=f"correctness ({device})", leave=False):
        d = operands(m, k, n, seed=m + k + n, device=device)
        ones_m, ones_n = torch.ones(m, device=device), torch.ones(n, device=device)
        raw = gk.triton_int8_linear(d["x_q"], d["w_q"], ones_m, ones_n)
        exact = (d["x_q"].double() @ d["w_q"].double().T).float()  # float32(acc): one rounding of the exact int
        row = {"device": device, "M": m, "K": k, "N": n, "int32_product_exact": bool(torch.equal(raw, exact))}
        for out_dtype in (torch.float32, torch.bfloat16):
            y = gk.triton_int8_linear(d["x_q"], d["w_q"], d["x_scale"], d["w_scale"], d["bias"], "gelu", out_dtype)
            ref = gk.reference_int8_linear(d["x_q"], d["w_q"], d["x_scale"], d["w_scale"], d["bias"], "gelu")
            row[f"int8_linear_gelu_{str(out_dtype).split('.')[1]}_rel_err"] = relative_error(y, ref)
        q, s = gk.triton_quantize_per_token(d["x"])
        q_ref, s_ref = gk.reference_quantize_per_token(d["x"])
        row["quantize_codes_differing"] = int((q != q_ref).sum())
        row["quantize_scale_rel_err"] = relative_error(s, s_ref)
        x16 = d["x"].half()
        y = gk.triton_w8a16_linear(x16, d["w_q"], d["w_scale"], d["bias"].half())
        ref = gk.reference_w8a16_linear(x16, d["w_q"], d["w_scale"], d["bias"].half())
        row["w8a16_fp16_rel_err"] = relative_error(y, ref)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- CPU timings


def wall_times(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) per candidate from graphopt's interleaved timer: one warm-up call each, then `repeats`
    rounds of one call each (order rotating)."""
    timed = measure_interleaved(candidates, rounds=repeats, warmup=1, max_seconds=float("inf"))
    return {name: [s * 1e3 for s in samples] for name, samples in timed.samples.items()}


def fbgemm_packed(w_q: torch.Tensor, w_scale: torch.Tensor) -> object:
    qw = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), torch.zeros_like(w_scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def cpu_candidates(d: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    x, x_q, w_q, x_scale, w_scale, bias = (d[k] for k in ("x", "x_q", "w_q", "x_scale", "w_scale", "bias"))
    w_f = w_q.float() * w_scale[:, None]
    packed = fbgemm_packed(w_q, w_scale)

    def float64_exact() -> torch.Tensor:
        y = (x_q.double() @ w_q.double().T).float()
        return (y * x_scale[:, None] * w_scale[None, :] + bias)

    def int_mm_then_dequant() -> torch.Tensor:
        acc = torch._int_mm(x_q, w_q.T)
        return acc.float() * x_scale[:, None] * w_scale[None, :] + bias

    def dynamic_pipeline() -> torch.Tensor:
        q, s = ops.quantize_per_token(x)
        return ops.int8_linear(q, w_q, s, w_scale, bias)

    return {
        "fp32 torch.mm": lambda: x @ w_f.T,
        "graphopt::int8_linear (CPU path)": lambda: ops.int8_linear(x_q, w_q, x_scale, w_scale, bias),
        "float64 GEMM, exact": float64_exact,
        "torch._int_mm + dequant": int_mm_then_dequant,
        "fbgemm linear_dynamic (per-tensor, inexact)": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
        "quantize_per_token + int8_linear": dynamic_pipeline,
        "graphopt::w8a16_linear (fp32 x)": lambda: ops.w8a16_linear(x, w_q, w_scale, bias),
    }


SLOW_ON_CPU = "torch._int_mm + dequant"


def cpu_timings(quick: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    shapes = [(m, k, n) for k, n in CPU_SHAPES_KN for m in CPU_MS]
    if quick:
        shapes = [(m, k, n) for m, k, n in shapes if m <= 128 and k < 4096]
    for m, k, n in tqdm(shapes, desc=f"CPU timings, {threads} thread(s)"):
        d = operands(m, k, n)
        candidates = cpu_candidates(d)
        if m * k * n >= 2**24:  # torch._int_mm is tens of times slower than fp32 here: small shapes suffice
            candidates.pop(SLOW_ON_CPU)
        repeats = 5 if quick else max(7, min(51, int(2e9 / (m * k * n))))
        times = wall_times(candidates, repeats)
        median = {c: statistics.median(t) for c, t in times.items()}
        best = {c: min(t) for c, t in times.items()}
        rows.append({
            "threads": threads, "M": m, "K": k, "N": n, "repeats": repeats, "median_ms": median, "min_ms": best,
            "ratio_vs_fp32": {c: t / median["fp32 torch.mm"] for c, t in median.items()},
            "ratio_vs_fp32_of_min": {c: t / best["fp32 torch.mm"] for c, t in best.items()},
        })
    return rows


def cpu_facts() -> dict:
    """Measurements behind the choice of the CPU int8_linear path."""
    k, n = 64, 8
    w_q = torch.full((n, k), 127, dtype=torch.int8)
    packed = fbgemm_packed(w_q, torch.ones(n))
    x = torch.full((2, k), 127.0)
    # x_q = 127 fed as float with scale 1 and zero point 128: u8 = 255 x s8 = 127 pairs exceed int16.
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 128, packed)
    big = operands(1, 4096, 4096)
    start = time.perf_counter()
    fbgemm_packed(big["w_q"], big["w_scale"])
    prepack_ms = (time.perf_counter() - start) * 1e3
    return {
        "fbgemm_full_range_u8s8_result": float(y[0, 0]),
        "fbgemm_full_range_u8s8_exact": 127 * 127 * k,
        "fbgemm_prepack_4096x4096_ms": prepack_ms,
    }


# ----------------------------------------------------------------------------- GPU timings


def gpu_timings(quick: bool) -> list[dict]:
    from triton.testing import do_bench_cudagraph

    rows = []
    shapes = [(m, k, n) for k, n in GPU_SHAPES_KN for m in GPU_MS]
    if quick:
        shapes = shapes[:4]
    for m, k, n in tqdm(shapes, desc="GPU timings"):
        d = operands(m, k, n, device="cuda")
        x_q, w_q, x_scale, w_scale = d["x_q"], d["w_q"], d["x_scale"], d["w_scale"]
        bias16, x16 = d["bias"].bfloat16(), d["x"].half()
        xb, wb = d["x"].bfloat16(), (w_q.float() * w_scale[:, None]).bfloat16()
        w16, w_qt = wb.half(), w_q.T

        def int_mm_then_dequant() -> torch.Tensor:
            acc = torch._int_mm(x_q, w_qt)
            return (acc.float() * x_scale[:, None] * w_scale[None, :] + bias16).bfloat16()

        candidates = {
            "triton int8_linear (bf16 out)": lambda: gk.triton_int8_linear(
                x_q, w_q, x_scale, w_scale, bias16, "none", torch.bfloat16
            ),
            "bf16 torch.mm (cuBLAS)": lambda: xb @ wb.T,
            "triton w8a16_linear (fp16 x)": lambda: gk.triton_w8a16_linear(x16, w_q, w_scale),
            "fp16 torch.mm (cuBLAS)": lambda: x16 @ w16.T,
        }
        if m > 16:  # torch._int_mm on CUDA needs M > 16
            candidates["torch._int_mm + dequant"] = int_mm_then_dequant
        ms = {name: do_bench_cudagraph(fn, rep=20 if quick else 100) for name, fn in candidates.items()}
        tops = {name: 2 * m * n * k / (t * 1e-3) / 1e12 for name, t in ms.items()}
        rows.append({
            "M": m, "K": k, "N": n, "ms": ms, "TOPS": tops,
            "int8_vs_bf16_mm": ms["bf16 torch.mm (cuBLAS)"] / ms["triton int8_linear (bf16 out)"],
            "int8_vs_int_mm": (ms["torch._int_mm + dequant"] / ms["triton int8_linear (bf16 out)"]) if m > 16 else None,
            "w8a16_vs_fp16_mm": ms["fp16 torch.mm (cuBLAS)"] / ms["triton w8a16_linear (fp16 x)"],
        })
    return rows


# ----------------------------------------------------------------------------- report


def cpu_markdown(result: dict) -> list[str]:
    env, facts = result["environment"], result["cpu_facts"]
    lines = [
        "",
        "## CPU paths (median of interleaved repeats)",
        "",
        "Ratio = median time / median time of fp32 `torch.mm` with the same (M, K, N) in the same loop (lower",
        "is faster); the ratio of the minimum times follows in parentheses, and the fp32 median in ms is there",
        "for context. fbgemm `linear_dynamic` quantizes x per tensor itself (not our per-token x_q), so it is a",
        "speed anchor, not an implementation of `int8_linear`. Load average (1, 5, 15 min) at the start:",
        f"{', '.join(f'{v:.1f}' for v in env['load_average_at_start'])}; at the end:"
        f" {', '.join(f'{v:.1f}' for v in result['load_average_at_end'])}. On a shared machine (load above",
        "the 2 cores) a 2-thread op waits for its second thread to be scheduled, which can cost ~10-20 ms per",
        "parallel region, so the 1-thread table is also given: it has no such wait.",
    ]
    for threads in sorted({r["threads"] for r in result["cpu"]}, reverse=True):
        rows = [r for r in result["cpu"] if r["threads"] == threads]
        names = list(rows[0]["median_ms"])
        lines += ["", f"### {threads} thread(s)", ""]
        lines.append("| M | K | N | fp32 mm ms | " + " | ".join(names[1:]) + " |")
        lines.append("|---|---|---|---|" + "---|" * (len(names) - 1))
        for r in rows:
            ratio, of_min = r["ratio_vs_fp32"], r["ratio_vs_fp32_of_min"]
            cells = [f"{ratio[c]:.2f}x ({of_min[c]:.2f}x)" if c in ratio else "skipped" for c in names[1:]]
            fp32 = r["median_ms"]["fp32 torch.mm"]
            lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {fp32:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Facts behind the CPU path of `int8_linear`:",
        "",
        "- fbgemm u8 x s8 with full-range activations (64 x 127 x 127): got"
        f" {facts['fbgemm_full_range_u8s8_result']:.0f}, exact {facts['fbgemm_full_range_u8s8_exact']}"
        " (int16 pair sums saturate without VNNI).",
        f"- fbgemm weight prepack of a 4096 x 4096 int8 weight: {facts['fbgemm_prepack_4096x4096_ms']:.0f} ms"
        " (per call unless cached).",
    ]
    return lines


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# graphopt int8 kernels: benchmark",
        "",
        f"Command: `{result['command']}` ({env['date']})",
        "",
        f"- Machine: {env['machine']}; GPU: {env['gpu'] or 'none'}",
        f"- Python {env['python']}, torch {env['torch']}, triton {env['triton']}, numpy {env['numpy']};"
        f" torch threads {env['torch_threads']}; quantized engine {env['quantized_engine']};"
        f" block configs: {'autotuned (GRAPHOPT_AUTOTUNE=1)' if env.get('autotune') else 'the table in configs.py'}",
        "",
        "## Correctness (same run)",
        "",
        "Relative errors are max |y - ref| / max |ref| against the float64 references; the tests in",
        "tests/kernels hold the per-element bounds and their reasons.",
        "",
        "| device | M | K | N | int32 product exact | int8_linear+gelu fp32 | int8_linear+gelu bf16 "
        "| quantize codes differing | quantize scale | w8a16 fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["correctness"]:
        lines.append(
            f"| {r['device']} | {r['M']} | {r['K']} | {r['N']} | {'yes' if r['int32_product_exact'] else 'NO'} "
            f"| {r['int8_linear_gelu_float32_rel_err']:.1e} | {r['int8_linear_gelu_bfloat16_rel_err']:.1e} "
            f"| {r['quantize_codes_differing']} | {r['quantize_scale_rel_err']:.1e} | {r['w8a16_fp16_rel_err']:.1e} |"
        )
    if result["cpu_facts"] is not None:
        lines += cpu_markdown(result)
    lines += ["", "## GPU", ""]
    if not result["gpu"]:
        lines.append("Not measured in this run (no GPU on this machine); the GPU figures are in kernels_gpu.md "
                     "(`python -m bench.kernels --gpu-only` on a lent GPU).")
    else:
        lines += [
            "TOPS = 2 M N K / time, CUDA-graph timing; ratios > 1 mean the Triton kernel is faster.",
            "",
            "| M | K | N | int8_linear TOPS | bf16 mm TOPS | vs bf16 mm | vs _int_mm+dequant | w8a16 TOPS"
            " | fp16 mm TOPS | w8a16 vs fp16 mm |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["gpu"]:
            t = r["TOPS"]
            vs_int_mm = f"{r['int8_vs_int_mm']:.2f}x" if r["int8_vs_int_mm"] is not None else "n/a (M <= 16)"
            lines.append(
                f"| {r['M']} | {r['K']} | {r['N']} | {t['triton int8_linear (bf16 out)']:.1f}"
                f" | {t['bf16 torch.mm (cuBLAS)']:.1f} | {r['int8_vs_bf16_mm']:.2f}x | {vs_int_mm}"
                f" | {t['triton w8a16_linear (fp16 x)']:.1f} | {t['fp16 torch.mm (cuBLAS)']:.1f}"
                f" | {r['w8a16_vs_fp16_mm']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--gpu-only", action="store_true", help="CUDA correctness and GPU timings only")
    parser.add_argument("--out", type=Path, default=None, help="output path without extension")
    args = parser.parse_args(argv)
    if args.gpu_only and not torch.cuda.is_available():
        sys.exit("--gpu-only needs a CUDA GPU")
    out = args.out or RESULTS / ("kernels_gpu" if args.gpu_only else "kernels")
    warnings.filterwarnings("ignore", category=UserWarning)  # deprecation of quantized tensors (fbgemm anchor)
    os.environ["GRAPHOPT_KERNEL_VALUE_CHECKS"] = "0"  # timings measure the kernels, not the optional scale check
    torch.set_num_threads(2)
    torch.manual_seed(0)

    interpreted_shapes = [(1, 100, 72), (16, 257, 130), (100, 300, 96)]
    flags = "".join(f" --{name.replace('_', '-')}" for name in ("quick", "gpu_only") if getattr(args, name))
    result: dict = {"command": "python -m bench.kernels" + flags, "environment": environment(),
                    "correctness": [], "cpu_facts": None, "cpu": [], "gpu": []}
    if not args.gpu_only:
        result["correctness"] = check_kernels("cpu", interpreted_shapes)
        result["cpu_facts"] = cpu_facts()
        result["cpu"] = cpu_timings(args.quick, threads=2) + cpu_timings(args.quick, threads=1)
    torch.set_num_threads(2)
    if torch.cuda.is_available():
        gpu_shapes = [(m, 4096, 4096) for m in (1, 16, 128, 1024)] + [(100, 8192, 8192), (33, 4096, 11008)]
        result["correctness"] += check_kernels("cuda", gpu_shapes)
        result["gpu"] = gpu_timings(args.quick)
    result["load_average_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    bad = [r for r in result["correctness"] if not r["int32_product_exact"]]
    if bad:
        sys.exit(f"int32 product not exact for {[(r['device'], r['M'], r['K'], r['N']) for r in bad]}")


if __name__ == "__main__":
    main()
