"""W8A8 GEMM with a fused dequantization epilogue (Triton).

    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                      (int8 x int8 -> int32, exact)
    y[m, n]   = act(acc[m, n] * x_scale[m] * w_scale[n] + bias[n])  (float32, then out_dtype)

``x_q`` holds per-token (per-row) quantized activations, ``w_q`` per-output-
channel quantized weights, both symmetric int8. The int32 accumulator is
exact while ``K * 128 * 128 < 2**31`` (checked). The epilogue runs in float32
in this order: int32 -> float32, times x_scale, times w_scale, plus bias,
activation, then one rounding to the output dtype (float32, float16 or
bfloat16).

Tiling: one program per BLOCK_M x BLOCK_N output tile, K reduced in
BLOCK_K steps with every load masked on M, N and K (no out-of-bounds read
when K is not a multiple of BLOCK_K, or smaller than it). Programs are
ordered in bands of GROUP_M tile rows so consecutive programs reuse the same
rows of ``x_q`` from L2. Row offsets (row * row_stride) are computed in int64
because M * K and M * N can exceed 2**31; in-tile offsets stay int32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .checks import check_int8_linear_args, check_out
from .launch import triton_kernel


@triton_kernel
def _int8_linear_kernel(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_xs, stride_ws, stride_b,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_height = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_height
    pid_n = (pid % band) // band_height

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        in_k = offs_k < K - k_start
        a = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0)
        b = tl.load(w_ptrs, mask=in_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    x_scale = tl.load(x_scale_ptr + offs_m * stride_xs, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACTIVATION == "silu":
        y = y * tl.sigmoid(y)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def triton_int8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[configs.BlockConfig] = None,
) -> torch.Tensor:
    """``act((x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias)`` as ``out_dtype[M, N]``.

    ``out`` (optional) receives the result; ``config`` overrides the block
    configuration (table or autotune). CPU tensors run in Triton's interpreter.
    """
    m, n, k = check_int8_linear_args(x_q, w_q, x_scale, w_scale, bias, activation, out_dtype)
    out = check_out(out, (m, n), out_dtype, x_q)
    if m == 0 or n == 0:
        return out
    kernel = _int8_linear_kernel.on(x_q.device)

    def run(cfg: configs.BlockConfig) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        kernel[grid](
            x_q, w_q, x_scale, w_scale, bias, out,
            m, n, k,
            x_q.stride(0), w_q.stride(0), out.stride(0),
            x_scale.stride(0), w_scale.stride(0), 0 if bias is None else bias.stride(0),
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    run(config or configs.pick("int8_linear", configs.INT8_LINEAR_TABLE, m, n, k, out_dtype, x_q.device, run,
                               search=configs.INT8_LINEAR_SEARCH))
    return out
