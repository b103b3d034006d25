"""Per-token dynamic activation quantization (Triton), optionally SmoothQuant-smoothed,
optionally fused with the LayerNorm that produces its input.

For each row m of x (float[M, K]), in float32:

    x'[m, k]  = x[m, k] / smooth[k]                    (only when smooth is given)
    scale[m]  = max(max_k |x'[m, k]| / 127, SCALE_FLOOR)
    x_q[m, k] = clamp(round_half_even(x'[m, k] / scale[m]), -127, 127)   (int8)

so that ``x' ~= x_q * scale[:, None]``. SmoothQuant convention: with
``X' = X diag(s)^-1`` and ``W' = W diag(s)``, ``X' W'^T = X W^T``; this op
applies the ``diag(s)^-1`` half (divides by ``smooth``), the caller folds
``s`` into the weights before quantizing them.

The fused form (``triton_layer_norm_quantize``) first normalizes the row,

    y[m, k] = (x[m, k] - mean_m) / sqrt(var_m + eps) * weight[k] + bias[k]   (biased variance)

stores y in x's dtype (the LayerNorm output other consumers read) and then
quantizes that stored y exactly as above: the codes are those that
``quantize_per_token(y)`` gives, and y is read from memory once instead of
twice (a LayerNorm kernel's write and a quantize kernel's read are saved).

Each program takes ROWS whole rows into registers (ROWS * BLOCK_K elements,
so short rows are batched): a single read of x, the per-row reductions, the
scale and the int8 store in one pass. ROWS and the warp count come from
``configs.quantize_config`` (a heuristic, or autotuned with
``GRAPHOPT_AUTOTUNE=1``). Rounding is half-to-even (as ``torch.round`` and
ONNX QuantizeLinear) through the float32 identity
``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for ``|v| < 2**22`` (here
``|v| <= 127``), which needs no libdevice call and so also runs in Triton's
interpreter. Divisions use ``div_rn`` (IEEE round-to-nearest; Triton's ``/``
is an approximate division on NVIDIA GPUs), so the quantization computes bit
for bit what the float32 CPU path computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .checks import SCALE_FLOOR, check_layer_norm_args, check_out, check_quantize_args
from .launch import triton_kernel

MAX_ROW = 2**17
"""Longest row the register-resident kernel takes (the CUDA op falls back to the torch path beyond it)."""


@triton_kernel
def _quantize_rows_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr, smooth_ptr, q_ptr, scale_ptr,
    M, K, k_float, stride_xm, stride_ym, stride_qm, stride_s, eps, scale_floor,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.math.div_rn(tl.sum(x, axis=1), k_float)   # exact for a constant row
        centered = tl.where(mask, x - mean[:, None], 0.0)
        variance = tl.math.div_rn(tl.sum(centered * centered, axis=1), k_float)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
        y = centered * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y, mask=mask)
        x = tl.where(mask, y.to(tl.float32), 0.0)
    if HAS_SMOOTH:
        smooth = tl.load(smooth_ptr + cols * stride_s, mask=col_ok, other=1.0).to(tl.float32)
        x = tl.math.div_rn(x, smooth[None, :])
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0), scale_floor)
    v = tl.math.div_rn(x, scale[:, None])
    rounded = (v + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(rounded, -127.0), 127.0)
    tl.store(q_ptr + rows64 * stride_qm + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def _launch(x: torch.Tensor, smooth: Optional[torch.Tensor], q: torch.Tensor, scale: torch.Tensor,
            norm: Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor], float, torch.Tensor]],
            config: Optional[configs.BlockConfig]) -> None:
    m, k = x.shape
    weight, bias, eps, y = norm if norm is not None else (None, None, 0.0, None)

    def run(c: configs.BlockConfig) -> None:
        _quantize_rows_kernel.on(x.device)[(triton.cdiv(m, c.block_m),)](
            x, weight, bias, y, smooth, q, scale,
            m, k, float(k), x.stride(0), 0 if y is None else y.stride(0), q.stride(0),
            0 if smooth is None else smooth.stride(0), eps, SCALE_FLOOR,
            NORM=norm is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SMOOTH=smooth is not None, ROWS=c.block_m, BLOCK_K=c.block_k, num_warps=c.num_warps,
        )

    kernel = "layer_norm_quantize" if norm is not None else "quantize_per_token"
    key = f"{kernel}|smooth{smooth is not None}"
    run(config or configs.quantize_config(key, m, k, x.dtype, x.device, run))


def _check_row(k: int) -> None:
    if k > MAX_ROW:
        raise ValueError(f"x has K = {k} columns; the Triton kernel holds a row in registers and takes K <= {MAX_ROW}")


def triton_quantize_per_token(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    config: Optional[configs.BlockConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q int8[M, K], scale float32[M])`` with ``x / smooth ~= x_q * scale[:, None]``.

    ``out`` (optional) is a ``(x_q, scale)`` pair that receives the result;
    ``config`` overrides the launch configuration (``block_m`` rows per
    program, ``block_k`` = next power of two >= K, ``num_warps``). CPU tensors
    run in Triton's interpreter. Rows longer than ``MAX_ROW`` raise ``ValueError``.
    """
    m, k = check_quantize_args(x, smooth)
    _check_row(k)
    q_out, scale_out = out if out is not None else (None, None)
    q = check_out(q_out, (m, k), torch.int8, x)
    scale = check_out(scale_out, (m,), torch.float32, x)
    if m:
        _launch(x, smooth, q, scale, None, config)
    return q, scale


def triton_layer_norm_quantize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    smooth: Optional[torch.Tensor] = None,
    *,
    config: Optional[configs.BlockConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, x_q, scale)``: ``y = layer_norm(x)`` over the last dim (in x's dtype) and
    ``(x_q, scale) = quantize_per_token(y, smooth)``, in one read of x."""
    m, k = check_layer_norm_args(x, weight, bias, eps)
    check_quantize_args(x, smooth)
    _check_row(k)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _launch(x, smooth, q, scale, (weight, bias, float(eps), y), config)
    return y, q, scale
