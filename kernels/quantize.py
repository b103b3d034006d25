"""Per-token dynamic activation quantization (Triton), optionally SmoothQuant-smoothed.

For each row m of x (float[M, K]), in float32:

    x'[m, k]  = x[m, k] / smooth[k]                    (only when smooth is given)
    scale[m]  = max(max_k |x'[m, k]| / 127, SCALE_FLOOR)
    x_q[m, k] = clamp(round_half_even(x'[m, k] / scale[m]), -127, 127)   (int8)

so that ``x' ~= x_q * scale[:, None]``. SmoothQuant convention: with
``X' = X diag(s)^-1`` and ``W' = W diag(s)``, ``X' W'^T = X W^T``; this op
applies the ``diag(s)^-1`` half (divides by ``smooth``), the caller folds
``s`` into the weights before quantizing them.

Each program takes ROWS whole rows into registers (ROWS * BLOCK_K elements,
at most ``TILE`` of them, so short rows are batched): a single read of x, the
per-row absmax reduction, the scale and the int8 store in one pass. Rounding is
half-to-even (as ``torch.round`` and ONNX QuantizeLinear) through the
float32 identity ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for
``|v| < 2**22`` (here ``|v| <= 127``), which needs no libdevice call and so
also runs in Triton's interpreter. Divisions use ``div_rn`` (IEEE
round-to-nearest; Triton's ``/`` is an approximate division on NVIDIA GPUs),
so the kernel computes bit for bit what the float32 CPU path computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import SCALE_FLOOR, check_out, check_quantize_args
from .launch import triton_kernel

MAX_ROW = 2**17
"""Longest row the register-resident kernel takes (the CUDA op falls back to the torch path beyond it)."""
TILE = 8192
"""Elements per program when rows are short: ROWS = TILE // BLOCK_K rows at once."""


@triton_kernel
def _quantize_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr,
    M, K, stride_xm, stride_qm, stride_s, scale_floor,
    HAS_SMOOTH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        smooth = tl.load(smooth_ptr + cols * stride_s, mask=cols < K, other=1.0).to(tl.float32)
        x = tl.math.div_rn(x, smooth[None, :])
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0), scale_floor)
    v = tl.math.div_rn(x, scale[:, None])
    rounded = (v + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(rounded, -127.0), 127.0)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def triton_quantize_per_token(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q int8[M, K], scale float32[M])`` with ``x / smooth ~= x_q * scale[:, None]``.

    ``out`` (optional) is a ``(x_q, scale)`` pair that receives the result.
    CPU tensors run in Triton's interpreter. Rows longer than ``MAX_ROW``
    raise ``ValueError``.
    """
    m, k = check_quantize_args(x, smooth)
    if k > MAX_ROW:
        raise ValueError(f"x has K = {k} columns; the Triton kernel holds a row in registers and takes K <= {MAX_ROW}")
    q_out, scale_out = out if out is not None else (None, None)
    q = check_out(q_out, (m, k), torch.int8, x)
    scale = check_out(scale_out, (m,), torch.float32, x)
    if m == 0:
        return q, scale
    block_k = triton.next_power_of_2(k)
    rows = max(TILE // block_k, 1)
    _quantize_per_token_kernel.on(x.device)[(triton.cdiv(m, rows),)](
        x, smooth, q, scale,
        m, k, x.stride(0), q.stride(0), 0 if smooth is None else smooth.stride(0), SCALE_FLOOR,
        HAS_SMOOTH=smooth is not None,
        ROWS=rows,
        BLOCK_K=block_k,
        num_warps=min(max(rows * block_k // 1024, 1), 16),
    )
    return q, scale
