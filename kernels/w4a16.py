"""Weight-only int4 GEMM (W4A16) for small M, with optional split-K (Triton).

    y[m, n] = Σ_g s[n, g] · Σ_{k ∈ g} x[m, k] · (q[n, k] − z[n, g]) + bias[n]      -> x.dtype[M, N]

Weights in the format of ``int4pack.py`` (two codes a byte, group-wise scale
and integer zero point). A K block of ``BLOCK_K`` codes is ``BLOCK_K / 2``
bytes; the block size is capped at the group size (both powers of two), so
every block lies inside one group. Dequantization stays in registers: the
low nibbles (even k) and high nibbles (odd k) of a byte tile become
``q − z``, integers in [−15, 15] that are exact in x's dtype, and are
multiplied against x's even and odd columns (two ``tl.dot`` with float32
accumulation, so the weight is read once and never interleaved); the block's
partial sum is then multiplied by the group's scale and accumulated in
float32. The K loop is masked (odd K, K not a multiple of the block or the
group); the padding nibble of an odd K meets a masked-out x column (0).

Split-K (decode shapes, M ≤ 16: the M × N output has too few tiles for the
GPU's SMs) works as in ``w8a16.py``: program (n, m, s) reduces its share of K
blocks into a float32 partial, summed in a fixed order by the wrapper.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import triton.language as tl

from . import configs, split_k
from .checks import check_out, check_w4a16_args
from .launch import triton_kernel


@triton_kernel
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_os, stride_om, stride_b,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_s, first_block, last_block, offs_m, offs_n, mask_m, mask_n = split_k.tile(
        M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    offs_j = tl.arange(0, HALF)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for block in range(first_block, last_block):
        k_even = block * BLOCK_K + 2 * offs_j
        in_even = k_even < K
        in_odd = k_even + 1 < K
        x_even = tl.load(x_rows + k_even[None, :], mask=mask_m[:, None] & in_even[None, :], other=0.0)
        x_odd = tl.load(x_rows + (k_even + 1)[None, :], mask=mask_m[:, None] & in_odd[None, :], other=0.0)
        packed = tl.load(w_cols + (block * HALF + offs_j)[:, None], mask=in_even[:, None] & mask_n[None, :], other=0)
        group = (block * BLOCK_K) // GROUP_SIZE
        zero = tl.load(z_rows + group, mask=mask_n, other=0).to(tl.float32)
        scale = tl.load(s_rows + group, mask=mask_n, other=0.0)
        low = ((packed & 0xF).to(tl.float32) - zero[None, :]).to(DOT_DTYPE)
        high = ((packed >> 4).to(tl.float32) - zero[None, :]).to(DOT_DTYPE)
        part = tl.dot(x_even.to(DOT_DTYPE), low, input_precision=INPUT_PRECISION)
        part = tl.dot(x_odd.to(DOT_DTYPE), high, part, input_precision=INPUT_PRECISION)
        acc += part * scale[None, :]

    split_k.store(acc, out_ptr, bias_ptr, pid_s, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_b,
                  HAS_BIAS)


def triton_w4a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[configs.BlockConfig] = None,
) -> torch.Tensor:
    """``x @ dequantize(w_packed, scales, zeros, group_size).T + bias`` as ``x.dtype[M, N]``.

    ``out`` (optional) receives the result; ``config`` overrides the block
    configuration and split-K (its ``block_k`` is capped at ``group_size``).
    CPU tensors run in Triton's interpreter.
    """
    m, n, k = check_w4a16_args(x, w_packed, scales, zeros, group_size, bias)
    out = check_out(out, (m, n), x.dtype, x)
    if m == 0 or n == 0:
        return out
    kernel = _w4a16_kernel.on(x.device)

    def run(cfg: configs.BlockConfig) -> None:
        split_k.launch(kernel, cfg, x, (w_packed, scales, zeros), bias, out, k, min(cfg.block_k, group_size),
                       GROUP_SIZE=group_size)

    if config is None:
        table = tuple((largest, replace(c, block_k=min(c.block_k, group_size))) for largest, c in configs.W4A16_TABLE)
        config = configs.pick(
            f"w4a16_linear_g{group_size}", table, m, n, k, x.dtype, x.device, run,
            programs_wanted=2 * configs.compute_units(x.device), search=configs.W4A16_SEARCH,
        )
    elif config.block_k < 32 or config.block_k & (config.block_k - 1):
        raise ValueError(f"config.block_k must be a power of two >= 32 (two tl.dot of block_k / 2), got {config.block_k}")
    run(config)
    return out
