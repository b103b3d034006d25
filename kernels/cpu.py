"""CPU paths of the graphopt kernel ops, in plain torch (they also run on any other device).

int8_linear runs fbgemm's u8 x s8 GEMM (``fbgemm.py``) when the weight's
codes fit in 7 bits ([-64, 63], as the int8 rewrite makes them for CPU
targets): on this class of CPU (AVX2, no VNNI) it is 2-3x faster than a
float32 GEMM of the same shape and exact (bench/results/kernels.md). A weight
that uses the full 8-bit range would saturate fbgemm's int16 pair sums, so it
takes the exact path below instead, and so does every device but the CPU.

The exact path computes the int32 product with float32 GEMMs: x_q and w_q
are converted to float32 and multiplied in K-chunks of ``K_CHUNK`` = 1024
columns. Every product is an integer of magnitude <= 128 * 128 = 2**14, so
every partial sum inside a chunk is an integer of magnitude <= 1024 * 2**14 =
2**24, which float32 represents exactly whatever the summation order or FMA
use of the BLAS: each chunk's GEMM is exact. Chunks are accumulated in float64
(exact for any K accepted) and the total is rounded once to float32, exactly
like the Triton kernel's int32 -> float32 conversion (and fbgemm's). The exact
path then runs the float32 epilogue in the Triton kernel's order (times
x_scale, times w_scale, plus bias, activation, cast); the fbgemm path applies
w_scale inside its GEMM and x_scale with the bias in one more pass, a few
float32 ulps apart.

w4a16_linear runs torch's bfloat16 int4 kernel for decode-sized M on the CPU
(``int4mm.py``: faster than a float32 GEMM there, with the error bound stated
in that module), else float32 GEMMs on the weight dequantized a block of
``W4_BLOCK_ELEMENTS`` weights (whole rows) at a time, never the whole weight
at once: each block is still in the CPU's cache when its GEMM reads it. At
Llama-1B shapes (N x K = 5632 x 2048, 2048 x 5632, 2048 x 2048, M = 32 to
1024, 2 threads, this 2026-12 Xeon) that took 1.1-2.1x the time of the float32
GEMM, where dequantizing in K-chunks of 1024 columns took 1.3-10x.

w8a16_linear runs torch's bfloat16 int8 weight-only kernel for decode-sized
M on the CPU (``int8mm.py``: it streams the int8 weight, 2-5x faster than a
float32 GEMM there, with the error bound stated in that module), else the
formula of its Triton kernel (w8a16.py) in float32 with the chunked GEMM
above (its float32 chunk sums accumulated in float64). quantize_per_token
follows the formula of its Triton kernel (quantize.py) in float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import fbgemm, int4mm, int8mm
from .activations import apply_activation
from .checks import (
    SCALE_FLOOR, check_int8_linear_args, check_layer_norm_args, check_quantize_args, check_w4a16_args,
    check_w8a16_args,
)
from .int4pack import dequantize_int4

K_CHUNK = 1024
#: Most weight elements converted to float32 at once (16 MiB): taller weights go a block of rows at a time.
W_CHUNK_ELEMENTS = 1 << 22
#: int4 weights dequantized per block (4 MiB of float32; measured best of 2^16, 2^18, 2^20 at Llama-1B shapes).
W4_BLOCK_ELEMENTS = 1 << 20


def matmul_int8_weight(a: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``a @ w_q.T`` for float32 ``a``: float32 GEMMs over K-chunks of ``K_CHUNK``, summed in float64.

    Converting the weight a chunk at a time also keeps each float32 copy small
    (N x 1024), where a whole 4096 x 4096 copy would cost a fresh 64 MB
    allocation, page faults included, on every call; a weight of more than
    ``W_CHUNK_ELEMENTS`` such elements (an LLM's 32000-row head) goes a block
    of rows at a time.
    """
    k = a.shape[1]
    if w_q.shape[0] * min(k, K_CHUNK) > W_CHUNK_ELEMENTS:     # a tall weight (an LLM's head): rows in blocks
        rows = max(1, W_CHUNK_ELEMENTS // min(k, K_CHUNK))
        return torch.cat([matmul_int8_weight(a, part) for part in w_q.split(rows)], dim=1)
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
    packed = fbgemm.prepacked(w_q, w_scale)
    if packed is not None:   # one pass for the product and w_scale, one for x_scale and the bias
        y = fbgemm.scaled_matmul(x_q, packed)
        y = y.mul_(x_scale[:, None]) if bias is None else torch.addcmul(bias.float(), y, x_scale[:, None])
    else:
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
    # max|x| per row as max(max x, -min x): two vectorized reductions, 2-5x faster here than abs().amax()
    # or vector_norm(inf) (measured on 4096 x 1536: 2.0 ms against 4.4 and 11.5 ms)
    amax = torch.maximum(xf.amax(dim=1), xf.amin(dim=1).neg_())
    scale = (amax / 127.0).clamp_min_(SCALE_FLOOR)
    # |x / scale| <= 127 (1 + 2u) < 127.5 by the choice of scale, so rounding alone stays in [-127, 127]
    q = torch.div(xf, scale[:, None]).round_().to(torch.int8)
    return q, scale


def layer_norm_quantize(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, y_q, scale)``: torch's LayerNorm over the last dim, then ``quantize_per_token(y, smooth)``."""
    check_layer_norm_args(x, weight, bias, eps)
    y = torch.nn.functional.layer_norm(x, (x.shape[1],), weight, bias, eps)
    return (y, *quantize_per_token(y, smooth))


def w8a16_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale[None, :] + bias`` as ``x.dtype[M, N]``, accumulated in float32."""
    m, _, _ = check_w8a16_args(x, w_q, w_scale, bias)
    if x.device.type == "cpu" and m <= int8mm.FAST_ROWS and int8mm.AVAILABLE:
        y = int8mm.matmul(x, w_q, w_scale)
    else:
        y = matmul_int8_weight(x.float(), w_q)
        y.mul_(w_scale[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)


def matmul_int4_weight(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """``a @ ((q − z) · s).T`` for float32 ``a``: the weight dequantized in float32 blocks of whole rows."""
    n, k = w_packed.shape[0], a.shape[1]
    rows = max(1, W4_BLOCK_ELEMENTS // k)
    out = torch.empty(n, a.shape[0], dtype=torch.float32, device=a.device)     # yᵀ: a block's rows are contiguous
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        w = dequantize_int4(w_packed[block], scales[block], zeros[block], group_size, k)
        torch.mm(w, a.T, out=out[block])
    return out.T.contiguous()


def w4a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ ((q − z) · s).T + bias`` as ``x.dtype[M, N]`` (int4 weights in the format of ``int4pack.py``)."""
    m, _, _ = check_w4a16_args(x, w_packed, scales, zeros, group_size, bias)
    if x.device.type == "cpu" and m <= int4mm.FAST_ROWS and int4mm.AVAILABLE:
        y = int4mm.matmul(x, w_packed, scales, zeros, group_size)
    else:
        y = matmul_int4_weight(x.float(), w_packed, scales, zeros, group_size)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)
