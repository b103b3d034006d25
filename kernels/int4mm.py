"""The fast CPU path of ``graphopt::w4a16_linear`` for decode-sized M: torch's int4 GEMM for CPU.

    y ≈ bfloat16(x) @ ((q − 8) · S + Z)ᵀ        S = bfloat16(s),  Z = bfloat16((8 − z) · s)

``torch.ops.aten._weight_int4pack_mm_for_cpu`` (ATen's vectorized int4 kernel,
the one torchao's CPU int4 layout calls) reads the packed weight and
dequantizes in registers; the weight is repacked once into its layout
(``_convert_weight_to_int4pack_for_cpu``, N padded to a multiple of 16, K
to a multiple of the group) and cached (``prepack.PackCache``). Our
``(q − z) · s`` is its ``(q − 8) · S + Z`` with ``Z = (8 − z) · s``.

Why bfloat16: on this class of CPU (AVX2, no AVX-512) its float32 and
float16 paths are scalar, 10-50x slower than a float32 GEMM, while the
bfloat16 path reads the weight once at int4 and beats the float32 GEMM for
small M (measured 2026-12, 1 thread, 2048 x 2048, M = 1: 0.7 ms against
1.1 ms; M = 64: about even). The price is rounding x, S, Z and the output to
bfloat16 (unit roundoff u = 2⁻⁹) with float32 accumulation: per output

    |Δy| ≤ (3u + γ_K) · Σ_k |x_k| (|q_k − 8| + |8 − z|) s + u · |y|

(x, S or Z, and the dequantized weight each rounded once; the output once),
which is small against int4's own step (s/2 on every weight, 1/30 of a
group's range). The ops' tests check this bound. Larger M runs the exact
float32 path of ``cpu.py`` instead (``FAST_ROWS``): that path pays for
dequantizing the weight once per call, which more rows amortize. Measured
(bench/results/w4a16_cpu.md, 2026-12 Xeon, 2 threads, Llama-1B shapes), as
time over the float32 GEMM's: M = 32 this kernel 0.87-1.06x against 1.7-2.1x
for the float32 path, M = 128 1.54-1.64x against 1.72-1.78x, M = 256
1.70-1.73x against 1.43-1.55x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .int4pack import unpack_int4
from .prepack import PackCache

#: Rows up to which the bfloat16 int4 kernel runs (decode, short prompts); beyond, the float32 GEMM on the
#: dequantized weight is faster (the crossover lies between 128 and 256 rows, module docstring) and exact.
FAST_ROWS = 128
N_MULTIPLE = 16


#: Whether this torch has the kernels (looked up once: an op lookup costs microseconds on every call).
AVAILABLE = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
    hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _pack(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
          k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = w_packed.shape[0]
    k_pad = -(-k // group_size) * group_size
    n_pad = -(-n // N_MULTIPLE) * N_MULTIPLE
    codes = F.pad(unpack_int4(w_packed, k).to(torch.int32), (0, k_pad - k, 0, n_pad - n), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = F.pad(scales, (0, 0, 0, n_pad - n), value=0.0)
    z = F.pad((8.0 - zeros.float()) * scales, (0, 0, 0, n_pad - n), value=0.0)
    scales_and_zeros = torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous()   # [G, N, 2]
    return packed, scales_and_zeros, k_pad


_CACHE = PackCache(_pack)


def matmul(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           group_size: int) -> torch.Tensor:
    """``x @ ((q − z) · s).T`` as float32 [M, N] through the bfloat16 int4 kernel (see the module docstring)."""
    k = x.shape[1]
    packed, scales_and_zeros, k_pad = _CACHE.get((w_packed, scales, zeros), group_size, k)
    xb = x.to(torch.bfloat16)
    if k_pad != k:
        xb = F.pad(xb, (0, k_pad - k))
    y: Any = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_and_zeros)
    return y[:, : w_packed.shape[0]].float()
