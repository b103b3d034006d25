"""Weight-only int8 GEMM (W8A16) for small M, with optional split-K (Triton).

    y[m, n] = (sum_k x[m, k] * w_q[n, k]) * w_scale[n] + bias[n]      -> x.dtype[M, N]

``x`` is float16, bfloat16 or float32; ``w_q`` int8 per-output-channel
quantized. Each weight tile is converted to x's dtype in registers (exact:
|w_q| <= 128 is representable in all three) and fed to ``tl.dot`` with float32
accumulation; the per-channel scale is applied once per output, after the K
reduction, since it does not depend on k. float32 inputs use
``input_precision="ieee"`` so they are not silently rounded to TF32 (float16
and bfloat16 tiles take the tensor-core path whatever the setting).

Split-K (for decode-like shapes, where the M x N output has fewer tiles than
the GPU has SMs): program (n, m, s) reduces K blocks
``[s * per, (s + 1) * per)`` and writes its scaled partial sum (plus the bias
when s == 0) in float32 to ``partials[s]``; the wrapper then sums the slices
in a fixed order (deterministic, unlike atomics) and casts to x's dtype.
With one slice the kernel writes the final output directly.

Triton 3.9's interpreter multiplies bfloat16 tiles as their raw uint16 bit
patterns and mis-converts int8 -> bfloat16, so when bfloat16 runs
interpreted the tiles are multiplied in float32 instead (``DOT_DTYPE``),
which gives the same values: a bfloat16 x int8 product has at most 16
significant bits, exact in float32, and the accumulation is float32 either
way. The weight always converts through float32, which the interpreter gets
right; compiled, the two conversions fold into one (for float16 the sm_90 PTX
has a single ``cvt.rn.f16.s16`` per element).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl

from . import configs, split_k
from .checks import check_out, check_w8a16_args
from .launch import triton_kernel


@triton_kernel
def _w8a16_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ws, stride_os, stride_om, stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_s, first_block, last_block, offs_m, offs_n, mask_m, mask_n = split_k.tile(
        M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(first_block, last_block):
        k = block * BLOCK_K + offs_k
        in_k = k < K
        a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None], mask=in_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(tl.float32).to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    y = acc * tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)[None, :]
    split_k.store(y, out_ptr, bias_ptr, pid_s, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_b,
                  HAS_BIAS)


def triton_w8a16_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[configs.BlockConfig] = None,
) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale[None, :] + bias`` as ``x.dtype[M, N]``.

    ``out`` (optional) receives the result; ``config`` overrides the block
    configuration and split-K (table + heuristic, or autotune). CPU tensors
    run in Triton's interpreter.
    """
    m, n, k = check_w8a16_args(x, w_q, w_scale, bias)
    out = check_out(out, (m, n), x.dtype, x)
    if m == 0 or n == 0:
        return out
    kernel = _w8a16_kernel.on(x.device)

    def run(cfg: configs.BlockConfig) -> None:
        split_k.launch(kernel, cfg, x, (w_q, w_scale), bias, out, k, cfg.block_k)

    if config is None:
        config = configs.pick(
            "w8a16_linear", configs.W8A16_TABLE, m, n, k, x.dtype, x.device, run,
            programs_wanted=2 * configs.compute_units(x.device), search=configs.W8A16_SEARCH,
        )
    run(config)
    return out
