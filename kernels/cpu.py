"""CPU paths of the graphopt kernel ops, in plain torch (they also run on any other device).

int8_linear computes the exact int32 product with float32 GEMMs: x_q and w_q
are converted to float32 and multiplied in K-chunks of ``K_CHUNK`` = 1024
columns. Every product is an integer of magnitude <= 128 * 128 = 2**14, so
every partial sum inside a chunk is an integer of magnitude <= 1024 * 2**14 =
2**24, which float32 represents exactly whatever the summation order or FMA
use of the BLAS: each chunk's GEMM is exact. Chunks are accumulated in float64
(exact for any K accepted) and the total is rounded once to float32, exactly
like the Triton kernel's int32 -> float32 conversion. The epilogue then runs in
float32 in the kernel's order (times x_scale, times w_scale, plus bias,
activation, cast).

Why this path (bench/results/kernels.md, 1-thread table: on the shared
2-core development machine the 2-thread timings are dominated by waits for
the second thread): it is the fastest exact option measured. Against a
float32 GEMM whose weight is already float32 it costs 1.1-4.8x by medians,
0.9-2.4x by minima (4.4x / 5.3x at M = 1 with a 4096 x 4096 weight, where
converting the weight dominates); a float64 GEMM, exact in one piece, costs
1.8-26x; ``torch._int_mm`` plus a separate dequantization 2-20x (medians).
fbgemm's u8 x s8 kernels are faster (0.15-1.2x) but
not exact here: without VNNI their int16 pair sums saturate when activations
use the full 8-bit range (measured: 8160 instead of 1032256 for 64 x 127 x
127), so an exact use would need a 7-bit split of x_q into two GEMMs, a
per-weight prepack held in a cache (hundreds of ms for 4096 x 4096), and
K-chunks again, because their float32 output rounds partial results above
2**24 and the two halves cancel inexactly.

quantize_per_token and w8a16_linear follow the formulas of their Triton
kernels (see quantize.py and w8a16.py) in float32; w8a16_linear uses the same
chunked GEMM (its float32 chunk sums are then accumulated in float64).
"""

from __future__ import annotations

from typing import Optional

import torch

from .activations import apply_activation
from .checks import SCALE_FLOOR, check_int8_linear_args, check_quantize_args, check_w8a16_args

K_CHUNK = 1024


def matmul_int8_weight(a: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``a @ w_q.T`` for float32 ``a``: float32 GEMMs over K-chunks of ``K_CHUNK``, summed in float64.

    Converting the weight a chunk at a time also keeps each float32 copy small
    (N x 1024), where a whole 4096 x 4096 copy would cost a fresh 64 MB
    allocation, page faults included, on every call.
    """
    k = a.shape[1]
    if k <= K_CHUNK:
        return a @ w_q.float().T
    acc = torch.zeros((a.shape[0], w_q.shape[0]), dtype=torch.float64, device=a.device)
    for start in range(0, k, K_CHUNK):
        stop = start + K_CHUNK
        acc += a[:, start:stop] @ w_q[:, start:stop].float().T
    return acc.float()


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``float32(x_q @ w_q.T)``: the exact int32 product, rounded once to float32."""
    return matmul_int8_weight(x_q.float(), w_q)


def int8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``act((x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias)`` as ``out_dtype[M, N]``."""
    check_int8_linear_args(x_q, w_q, x_scale, w_scale, bias, activation, out_dtype)
    y = int8_matmul(x_q, w_q)
    y.mul_(x_scale[:, None]).mul_(w_scale[None, :])
    if bias is not None:
        y.add_(bias.float())
    return apply_activation(y, activation).to(out_dtype)


def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q int8[M, K], scale float32[M])`` with ``x / smooth ~= x_q * scale[:, None]``."""
    check_quantize_args(x, smooth)
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    scale = (xf.abs().amax(dim=1) / 127.0).clamp_min_(SCALE_FLOOR)
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def w8a16_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale[None, :] + bias`` as ``x.dtype[M, N]``, accumulated in float32."""
    check_w8a16_args(x, w_q, w_scale, bias)
    y = matmul_int8_weight(x.float(), w_q)
    y.mul_(w_scale[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)
