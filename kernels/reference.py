"""Float64 references of the graphopt kernel ops, for tests and benchmark checks.

Same signatures as the ops; every float result is returned in float64, before
any rounding to an output dtype, so a test can measure the error of an
implementation against the exact value:

    reference_int8_linear:  act(float64(x_q @ w_q.T) * x_scale * w_scale + bias)
    reference_quantize_per_token: (q int8, scale float64) with
        x' = x / smooth, scale = max(max|x'| / 127, SCALE_FLOOR),
        q = clamp(round_half_even(x' / scale), -127, 127)
    reference_w8a16_linear: float64(x) @ float64(w_q).T * w_scale + bias
    reference_layer_norm: (x - mean) / sqrt(var + eps) * weight + bias over the last dim (the
        LayerNorm half of layer_norm_quantize; its quantize half is reference_quantize_per_token)
    reference_w4a16_linear: float64(x) @ ((q − z) · s in float64).T + bias   (int4pack.py's format)

The int8 product is exact in float64: |partial sums| <= K * 2**14 < 2**53.
"""

from __future__ import annotations

from typing import Optional

import torch

from .activations import apply_activation
from .checks import (
    SCALE_FLOOR, check_int8_linear_args, check_layer_norm_args, check_quantize_args, check_w4a16_args,
    check_w8a16_args,
)
from .int4pack import dequantize_int4


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


def reference_int8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact value of ``int8_linear`` in float64 (``out_dtype`` is validated, not applied)."""
    check_int8_linear_args(x_q, w_q, x_scale, w_scale, bias, activation, out_dtype)
    y = (x_q.double() @ w_q.double().T) * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + _f64(bias)
    return apply_activation(y, activation)


def reference_quantize_per_token(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8[M, K], scale float64[M])`` computed in float64."""
    check_quantize_args(x, smooth)
    x64 = x.double()
    if smooth is not None:
        x64 = x64 / _f64(smooth)
    scale = (x64.abs().amax(dim=1) / 127.0).clamp_min(SCALE_FLOOR)
    q = torch.round(x64 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def reference_w8a16_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Exact-product value of ``w8a16_linear`` in float64."""
    check_w8a16_args(x, w_q, w_scale, bias)
    y = (x.double() @ w_q.double().T) * w_scale.double()[None, :]
    if bias is not None:
        y = y + _f64(bias)
    return y


def reference_layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim of a 2-D x in float64 (biased variance, as torch and ONNX)."""
    check_layer_norm_args(x, weight, bias, eps)
    x64 = x.double()
    centered = x64 - x64.mean(dim=1, keepdim=True)
    y = centered / torch.sqrt(centered.square().mean(dim=1, keepdim=True) + eps)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y


def reference_w4a16_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact-product value of ``w4a16_linear`` in float64."""
    _, _, k = check_w4a16_args(x, w_packed, scales, zeros, group_size, bias)
    y = x.double() @ dequantize_int4(w_packed, scales, zeros, group_size, k, torch.float64).T
    if bias is not None:
        y = y + _f64(bias)
    return y
