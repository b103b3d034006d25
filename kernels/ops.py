"""``torch.ops.graphopt.*``: the kernel ops registered with ``torch.library``.

    quantize_per_token(x, smooth=None) -> (x_q int8[M, K], scale float32[M])
    int8_linear(x_q, w_q, x_scale, w_scale, bias=None, activation="none", out_dtype=float32) -> out_dtype[M, N]
    w8a16_linear(x, w_q, w_scale, bias=None) -> x.dtype[M, N]
    layer_norm_quantize(x, weight, bias, eps, smooth=None) -> (y x.dtype[M, K], y_q int8[M, K], scale float32[M])
    w4a16_linear(x, w_packed, scales, zeros, group_size, bias=None) -> x.dtype[M, N]   (int4pack.py's format)

Dispatch: CUDA tensors run the Triton kernels (``quantize_per_token`` falls
back to the torch path for rows longer than ``quantize.MAX_ROW``); every other
device runs the torch path of ``cpu.py``. Each op has a fake (meta) kernel
that validates metadata and allocates the output, so modules calling the ops
can be captured by ``torch.export`` and compiled by ``torch.compile``. The
ops are pure functions (no mutation, outputs never alias inputs) and define
no autograd formula: they serve inference.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpu
from .checks import (
    check_int8_linear_args, check_layer_norm_args, check_quantize_args, check_w4a16_args, check_w8a16_args,
)
from .int8_linear import triton_int8_linear
from .quantize import MAX_ROW, triton_layer_norm_quantize, triton_quantize_per_token
from .w4a16 import triton_w4a16_linear
from .w8a16 import triton_w8a16_linear


@torch.library.custom_op("graphopt::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of ``x / smooth``."""
    return cpu.quantize_per_token(x, smooth)


@quantize_per_token.register_kernel("cuda")
def _quantize_per_token_cuda(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2 and x.shape[1] > MAX_ROW:
        return cpu.quantize_per_token(x, smooth)
    return triton_quantize_per_token(x, smooth)


@quantize_per_token.register_fake
def _quantize_per_token_fake(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = check_quantize_args(x, smooth, values=False)
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("graphopt::int8_linear", mutates_args=())
def int8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``act((x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] + bias)`` as ``out_dtype``."""
    return cpu.int8_linear(x_q, w_q, x_scale, w_scale, bias, activation, out_dtype)


int8_linear.register_kernel("cuda")(triton_int8_linear)


@int8_linear.register_fake
def _int8_linear_fake(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    m, n, _ = check_int8_linear_args(x_q, w_q, x_scale, w_scale, bias, activation, out_dtype, values=False)
    return x_q.new_empty((m, n), dtype=out_dtype)


@torch.library.custom_op("graphopt::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(x @ w_q.T) * w_scale[None, :] + bias`` as ``x.dtype``."""
    return cpu.w8a16_linear(x, w_q, w_scale, bias)


w8a16_linear.register_kernel("cuda")(triton_w8a16_linear)


@w8a16_linear.register_fake
def _w8a16_linear_fake(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    m, n, _ = check_w8a16_args(x, w_q, w_scale, bias, values=False)
    return x.new_empty((m, n))


@torch.library.custom_op("graphopt::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ ((q − z) · s).T + bias`` as ``x.dtype``, with int4 codes q packed two a byte (group-wise s, z)."""
    return cpu.w4a16_linear(x, w_packed, scales, zeros, group_size, bias)


w4a16_linear.register_kernel("cuda")(triton_w4a16_linear)


@w4a16_linear.register_fake
def _w4a16_linear_fake(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    m, n, _ = check_w4a16_args(x, w_packed, scales, zeros, group_size, bias, values=False)
    return x.new_empty((m, n))


@torch.library.custom_op("graphopt::layer_norm_quantize", mutates_args=())
def layer_norm_quantize(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = layer_norm(x)`` over the last dim and ``quantize_per_token(y, smooth)``: ``(y, y_q, scale)``."""
    return cpu.layer_norm_quantize(x, weight, bias, eps, smooth)


@layer_norm_quantize.register_kernel("cuda")
def _layer_norm_quantize_cuda(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() == 2 and x.shape[1] > MAX_ROW:
        return cpu.layer_norm_quantize(x, weight, bias, eps, smooth)
    return triton_layer_norm_quantize(x, weight, bias, eps, smooth)


@layer_norm_quantize.register_fake
def _layer_norm_quantize_fake(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    smooth: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = check_layer_norm_args(x, weight, bias, eps)
    check_quantize_args(x, smooth, values=False)
    return x.new_empty((m, k)), x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)
