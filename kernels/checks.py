"""Argument validation shared by every implementation of the graphopt kernel ops.

Each op has one ``check_*_args`` function that the Triton wrappers, the CPU
paths, the fake (meta) kernels and the references all call, so a bad input
gets the same clear ``TypeError`` (wrong type or dtype) or ``ValueError``
(wrong rank, shape, layout, device or value) naming the argument, whatever
implementation runs.

Constraints and why they exist:

- 2-D operands are row-major along K (``stride(-1) == 1``): the kernels read
  K-contiguous tiles; the row stride may be anything (row slices work).
- 1-D vectors (scales, bias, smooth) may have any stride: the kernels take
  it as an argument (a per-tensor scale expanded to [M] has stride 0).
- ``K <= INT8_K_MAX`` for the int8 GEMM: the int32 accumulator holds at most
  ``K * 128 * 128`` in magnitude, which must stay below ``2**31``.
- Scales and smoothing factors are positive and finite (a zero scale would
  silently turn a row or a channel into zeros). This is the only check that
  reads tensor data (once per tensor version): it runs on real tensors (not
  under fake tracing), is skipped while a CUDA graph is being captured (it
  needs a device sync), and can be switched off with ``GRAPHOPT_KERNEL_VALUE_CHECKS=0`` for peak GPU
  throughput.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .activations import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_FLOOR = torch.finfo(torch.float32).tiny
"""Smallest scale ``quantize_per_token`` produces (2**-126, the smallest normal
float32). An all-zero row gets this scale instead of 0, so dequantization
never divides by zero; being the smallest normal float32, it never coarsens a
row whose values are in the normal float32 range."""
INT8_K_MAX = (2**31 - 1) // (128 * 128)


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {t.dtype}")
    return t


def check_matrix(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A 2-D tensor of one of ``dtypes`` with unit stride along its last dim."""
    t = _check_tensor(name, t, dtypes)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} must be row-major with stride 1 along its last dim, got strides "
            f"{tuple(t.stride())} (call .contiguous())"
        )
    return t


def check_vector(name: str, t: object, length: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A 1-D tensor of ``length`` elements of one of ``dtypes``."""
    t = _check_tensor(name, t, dtypes)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


#: Tensors found positive, with the version counter they had then: a weight's scales are read once, not on
#: every call (on an LLM's decode step the read cost more than the product of a small layer), and again
#: only after something writes into them.
_CHECKED = WeakIdKeyDictionary()


def check_positive(name: str, t: torch.Tensor) -> None:
    """Raise if any element of ``t`` is zero, negative, NaN or infinite (reads data, once per version)."""
    if os.environ.get("GRAPHOPT_KERNEL_VALUE_CHECKS", "1") == "0":
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if t.numel() == 0 or (not t.is_inference() and _CHECKED.get(t) == t._version):
        return
    low, high = torch.stack(torch.aminmax(t)).tolist()  # one read; NaN makes both comparisons false
    if not (low > 0 and high < float("inf")):
        raise ValueError(f"{name} must be positive and finite everywhere (a zero scale loses the row or channel)")
    if not t.is_inference():      # an inference tensor has no version counter: checked on every call
        _CHECKED[t] = t._version  # views share their base's counter: a write through any alias is seen


def check_product(x_name: str, x: torch.Tensor, x_dtypes: tuple[torch.dtype, ...], w_name: str,
                  w: torch.Tensor) -> tuple[int, int, int]:
    """Check the operands of ``x @ w.T``: x [M, K] of `x_dtypes`, an int8 weight w [N, K], the same K >= 1;
    return ``(M, N, K)``."""
    check_matrix(x_name, x, x_dtypes)
    check_matrix(w_name, w, (torch.int8,))
    (m, k), (n, k_w) = x.shape, w.shape
    if k != k_w:
        raise ValueError(f"{x_name} is [M, K] = {tuple(x.shape)} and {w_name} is [N, K] = {tuple(w.shape)}: "
                         f"K differs")
    if k == 0:
        raise ValueError(f"{x_name} and {w_name} must have K >= 1 columns")
    return m, n, k


def check_int8_linear_args(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    out_dtype: torch.dtype,
    values: bool = True,
) -> tuple[int, int, int]:
    """Validate ``int8_linear`` arguments; return ``(M, N, K)``."""
    m, n, k = check_product("x_q", x_q, (torch.int8,), "w_q", w_q)
    if k > INT8_K_MAX:
        raise ValueError(f"K = {k} exceeds {INT8_K_MAX}, the largest K whose int32 accumulation cannot overflow")
    check_vector("x_scale", x_scale, m, (torch.float32,))
    check_vector("w_scale", w_scale, n, (torch.float32,))
    if bias is not None:
        check_vector("bias", bias, n, FLOAT_DTYPES)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    check_same_device(x_q=x_q, w_q=w_q, x_scale=x_scale, w_scale=w_scale, bias=bias)
    if values:
        check_positive("x_scale", x_scale)
        check_positive("w_scale", w_scale)
    return m, n, k


def check_quantize_args(x: torch.Tensor, smooth: Optional[torch.Tensor], values: bool = True) -> tuple[int, int]:
    """Validate ``quantize_per_token`` arguments; return ``(M, K)``."""
    check_matrix("x", x, FLOAT_DTYPES)
    m, k = x.shape
    if k == 0:
        raise ValueError("x must have K >= 1 columns")
    if smooth is not None:
        check_vector("smooth", smooth, k, FLOAT_DTYPES)
        check_same_device(x=x, smooth=smooth)
        if values:
            check_positive("smooth", smooth)
    return m, k


def check_layer_norm_args(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[int, int]:
    """Validate the LayerNorm half of ``layer_norm_quantize`` (over the last dim of a 2-D x); return ``(M, K)``."""
    check_matrix("x", x, FLOAT_DTYPES)
    m, k = x.shape
    if k == 0:
        raise ValueError("x must have K >= 1 columns")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_vector(name, t, k, FLOAT_DTYPES)
    check_same_device(x=x, weight=weight, bias=bias)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return m, k


def check_w8a16_args(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    values: bool = True,
) -> tuple[int, int, int]:
    """Validate ``w8a16_linear`` arguments; return ``(M, N, K)``."""
    m, n, k = check_product("x", x, FLOAT_DTYPES, "w_q", w_q)
    check_vector("w_scale", w_scale, n, (torch.float32,))
    if bias is not None:
        check_vector("bias", bias, n, FLOAT_DTYPES)
    check_same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    if values:
        check_positive("w_scale", w_scale)
    return m, n, k


def check_out(
    out: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor
) -> torch.Tensor:
    """Return ``out`` after checking it can receive the result, or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    _check_tensor("out", out, (dtype,))
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device != like.device:
        raise ValueError(f"out must be a contiguous {tuple(shape)} tensor on {like.device}, got {tuple(out.shape)}")
    return out


#: Group sizes of ``w4a16_linear``: powers of two, so a K block of the Triton kernel lies in one group,
#: and the sizes torch's CPU int4 GEMM accepts.
W4_GROUP_SIZES = (32, 64, 128, 256)


def check_w4a16_args(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
    values: bool = True,
) -> tuple[int, int, int]:
    """Validate ``w4a16_linear`` arguments; return ``(M, N, K)``.

    ``w_packed`` is uint8 [N, ceil(K / 2)] (two codes a byte), ``scales`` float32
    and ``zeros`` uint8 [N, ceil(K / group_size)] (see ``int4pack.py``).
    """
    check_matrix("x", x, FLOAT_DTYPES)
    check_matrix("w_packed", w_packed, (torch.uint8,))
    m, k = x.shape
    n = w_packed.shape[0]
    if k == 0:
        raise ValueError("x must have K >= 1 columns")
    if w_packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"x is [M, K] = {tuple(x.shape)}, so w_packed must be [N, ceil(K / 2)] = "
                         f"[N, {(k + 1) // 2}]; got {tuple(w_packed.shape)}")
    if isinstance(group_size, bool) or group_size not in W4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {W4_GROUP_SIZES}, got {group_size!r}")
    groups = -(-k // group_size)
    check_matrix("scales", scales, (torch.float32,))
    check_matrix("zeros", zeros, (torch.uint8,))
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must be [N, ceil(K / group_size)] = {(n, groups)}, got {tuple(t.shape)}")
    if bias is not None:
        check_vector("bias", bias, n, FLOAT_DTYPES)
    check_same_device(x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    if values:
        check_positive("scales", scales)
    return m, n, k
