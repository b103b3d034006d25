"""The fast CPU path of ``graphopt::w8a16_linear`` for decode-sized M: torch's int8 weight-only GEMM for CPU.

    y ≈ bfloat16(x) @ w_qᵀ · bfloat16(s)

``torch.ops.aten._weight_int8pack_mm`` (ATen's vectorized kernel, the one
torchao's CPU int8 weight-only layout calls) reads the int8 weight as it is
stored and converts it in registers, so it streams 1 byte a weight where a
float32 GEMM streams 4. Its float32 activation path is scalar on this class of
CPU (AVX2, no AVX-512: 3-10x slower than a float32 GEMM), its bfloat16 one is
not: measured 2026-12, 2 threads, M = 1: 5632 x 2048 0.47 ms against 2.2 ms
for the float32 GEMM, 32000 x 2048 3.9 against 13.2 ms; M = 16: 4.4 against
8.1 ms; M = 32 1.4x; M = 128 0.76x (``FAST_ROWS``).

The kernel reads K in vector-wide blocks with aligned loads and no tail: 16
bfloat16 values a step on AVX-512, 8 on AVX2. A K that is not a multiple of the
block reads past the row (NaNs, garbage, or a crash), and a row that does not
start on a 32-byte boundary crashes. So a weight with such a K is padded with
zero columns once (``prepack.PackCache``) and x with zeros per call, and a
tensor that does not start on an ``ALIGNMENT``-byte boundary (a view into a
larger tensor) is copied; the scales are converted to bfloat16 once. The
price is rounding x, s and the output to bfloat16 (unit roundoff u = 2⁻⁹) with float32 accumulation: per output

    |Δy| ≤ (2u + γ_K) · Σ_k |x_k| |q_k| s + u · |y|

(x once, s once, the output once), small against int8's own step (s/2 on
every weight, 1/254 of a row's range). The ops' tests check this bound.
"""

from __future__ import annotations

import torch

from .prepack import PackCache

#: Rows up to which the bfloat16 int8 kernel runs (decode: batch x 1 token); beyond, the exact float32 path.
FAST_ROWS = 16
#: K is padded to this (the widest kernel's block: 16 bfloat16 in an AVX-512 register) …
K_MULTIPLE = 16
#: … and every operand starts on this boundary in bytes (torch's CPU allocator gives 64).
ALIGNMENT = 64


#: Whether this torch has the kernel (looked up once: an op lookup costs microseconds on every call).
AVAILABLE = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _fits(t: torch.Tensor) -> bool:
    """Whether the kernel can read ``t`` as it is: row-major, K a multiple of the block, aligned."""
    return t.is_contiguous() and t.shape[1] % K_MULTIPLE == 0 and t.data_ptr() % ALIGNMENT == 0


def _padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero columns up to a multiple of K_MULTIPLE, in a fresh (aligned) allocation."""
    rows, k = t.shape
    out = t.new_zeros(rows, k + -k % K_MULTIPLE)
    out[:, :k] = t
    return out


def _pack(w_q: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the weight as the kernel reads it, or None where ``w_q`` already is; bfloat16 scales). The entry
    never holds ``w_q`` itself: it would keep the weight alive past its module."""
    return (None if _fits(w_q) else _padded(w_q)), w_scale.to(torch.bfloat16)


_CACHE = PackCache(_pack)


def matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``(x @ w_qᵀ) · s`` as float32 [M, N] through the bfloat16 int8 kernel (see the module docstring)."""
    padded, scale = _CACHE.get((w_q, w_scale))
    weight = w_q if padded is None else padded
    xb = x.to(torch.bfloat16)
    if not _fits(xb):
        xb = _padded(xb)
    return torch.ops.aten._weight_int8pack_mm(xb, weight, scale).float()
