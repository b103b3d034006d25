"""Split-K for the weight-only kernels (``w8a16.py``, ``w4a16.py``): the device side and the launch.

Program (n, m, s) of a launch grid (N tiles, M tiles, SPLIT_K) computes the output tile (m, n) over its share
of the K blocks, ``[s · per, min((s + 1) · per, k_blocks))`` with ``per = ⌈k_blocks / SPLIT_K⌉`` (``tile``),
and stores its float32 partial sum, plus the bias in split 0 only, in slice s of a [SPLIT_K, M, N] workspace
(``store``); ``launch`` then sums the slices in a fixed order (deterministic, unlike atomics). With one split
the slice is the output itself.

A weight-only kernel takes, in this order: ``x, *weights, bias, out, M, N, K``, the row strides of x and of
each weight, the split stride, out's row stride, the bias stride, then the constexprs ``HAS_BIAS, BLOCK_M,
BLOCK_N, BLOCK_K, SPLIT_K, DOT_DTYPE, INPUT_PRECISION`` and its own.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .configs import BlockConfig
from .launch import dot_dtype


@triton.jit
def tile(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's (split, first K block, end K block, row offsets, column offsets, row mask, column mask)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    first_block = pid_s * per_split
    last_block = tl.minimum(first_block + per_split, k_blocks)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_s, first_block, last_block, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def store(y, out_ptr, bias_ptr, pid_s, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_b,
          HAS_BIAS: tl.constexpr):
    """Adds the bias to the tile ``y`` (split 0 only) and stores it in this split's slice of the output."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
        y += tl.where(pid_s == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def launch(kernel: Any, config: BlockConfig, x: torch.Tensor, weights: tuple[torch.Tensor, ...],
           bias: Optional[torch.Tensor], out: torch.Tensor, k: int, block_k: int, **meta: Any) -> None:
    """Runs a weight-only kernel (launched as ``kernel[grid](…)``) with ``config`` into ``out`` [M, N]."""
    m, n = out.shape
    if config.split_k == 1:
        target, stride_split = out, 0
    else:
        target = torch.empty((config.split_k, m, n), dtype=torch.float32, device=out.device)
        stride_split = target.stride(0)
    dot = dot_dtype(x)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    kernel[grid](
        x, *weights, bias, target, m, n, k,
        x.stride(0), *(w.stride(0) for w in weights), stride_split, target.stride(-2),
        0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        SPLIT_K=config.split_k, DOT_DTYPE=dot, INPUT_PRECISION="ieee" if dot == tl.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **meta,
    )
    if target is not out:
        out.copy_(target.sum(dim=0))
