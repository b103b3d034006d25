"""Split-K on the device side, shared by the weight-only kernels (``w8a16.py``, ``w4a16.py``).

Program (n, m, s) of a launch grid (N tiles, M tiles, SPLIT_K) computes the output tile (m, n) over its share
of the K blocks, ``[s · per, min((s + 1) · per, k_blocks))`` with ``per = ⌈k_blocks / SPLIT_K⌉``, and stores
its float32 partial sum, plus the bias in split 0 only, in slice s of the output; the wrapper sums the
slices in a fixed order (``launch.finish_split_k``). With one split the slice is the output itself.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
