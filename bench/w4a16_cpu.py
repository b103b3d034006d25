"""graphopt::w4a16_linear on this CPU against the float32 GEMM it replaces, from decode to prefill sizes.

    python -m bench.w4a16_cpu

One linear layer y = x · Wᵀ at Llama-1B shapes (random int4 codes, group 128), M = 1 to 1024 rows (decode at
batch 1 and 8, a 128-token prompt, a prompt batch), 2 threads, timed round-robin in one run: the float32
GEMM on the float weight (the anchor, what the unquantized model runs); the op as graphopt dispatches it
(``kernels/cpu.py``: torch's bfloat16 int4 kernel up to ``int4mm.FAST_ROWS`` rows, else the float32 path);
and both CPU paths forced at every M: the float32 GEMM on the weight dequantized a block of rows at a time
(exact up to float32 GEMM rounding) and the bfloat16 int4 kernel (bfloat16 rounding of x, scales and output).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.harness import interleaved, pin_threads, rows_against, write_results
from graphopt.kernels import cpu, int4mm, pack_int4

SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))   # (K, N): attention, MLP up, MLP down
ROWS = (1, 8, 32, 64, 128, 256, 1024)
GROUP = 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    pin_threads()
    load = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for k, n in SHAPES:
        weight = torch.randn(n, k, generator=g)
        packed = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
        scales = torch.rand(n, k // GROUP, generator=g) * 0.01 + 1e-3
        zeros = torch.randint(0, 16, (n, k // GROUP), generator=g, dtype=torch.uint8)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            calls = {"float32 GEMM": lambda: F.linear(x, weight),
                     "graphopt::w4a16_linear": lambda: torch.ops.graphopt.w4a16_linear(x, packed, scales, zeros,
                                                                                       GROUP, None),
                     "float32 path (dequantized in row blocks)": lambda: cpu.matmul_int4_weight(x, packed, scales,
                                                                                                zeros, GROUP)}
            if int4mm.AVAILABLE:
                calls["bfloat16 int4 kernel"] = lambda: int4mm.matmul(x, packed, scales, zeros, GROUP)
            rows_out += rows_against(interleaved(calls, args.rounds), "float32 GEMM", "path",
                                     "× float32 GEMM (time)", K=k, N=n, M=m)
            print(*rows_out[-len(calls):], sep="\n", flush=True)
    notes = (f"Each row: the median of {args.rounds} interleaved rounds (one call of each path per round, order "
             f"rotating) and its p10–p90; × float32 GEMM = time ratio (< 1 is faster). The op dispatches to the "
             f"bfloat16 kernel up to M = {int4mm.FAST_ROWS}. Group {GROUP}, random codes, scales and zero points. "
             f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    print(f"wrote {write_results('w4a16_cpu', 'graphopt::w4a16_linear vs the float32 GEMM (CPU)', rows_out, notes)}")


if __name__ == "__main__":
    main()
