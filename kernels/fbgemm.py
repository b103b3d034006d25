"""The fast CPU int8 GEMM behind ``graphopt::int8_linear``: fbgemm's u8 x s8 kernels via torch's quantized ops.

    y[m, n] = float32(sum_k x_q[m, k] * w_q[n, k]) * w_scale[n]

How: x_q (symmetric int8 per token) enters fbgemm as uint8 ``u = x_q + 128``
(scale 1, zero point 128) and ``w_q`` as a per-channel qint8 tensor with the
scales ``w_scale``, so fbgemm's output pipeline gives ``w_scale[n] * (sum_k u
* w - 128 * sum_k w)``: the exact int32 product of the int8 operands,
converted once to float32 (round to nearest, like the reference), times the
channel's scale, in one pass. The caller's epilogue then multiplies by the
per-token scale and adds the bias in one more (``torch.addcmul``): two
roundings in another order than the Triton kernel's, a few float32 ulps (the
ops' tests allow 16 u of the result).

Why 7-bit weights: on x86 CPUs without VNNI (AVX2) fbgemm multiplies with
``vpmaddubsw``, which adds pairs of u8 x s8 products in *saturating* int16:
255 * 127 * 2 = 64770 overflows int16 (32767), while with weights in
[-64, 63] a pair is at most 255 * 64 * 2 = 32640 and every int32 accumulator
is exact. ``prepacked`` therefore refuses (returns None for) a weight with a
code outside [-64, 63]; the caller then runs the exact float path. The int8
rewrite quantizes weights to 7 bits for CPU targets for this reason.

Prepacking (reordering the weight into fbgemm's blocked layout) costs far
more than one call, so each weight is packed once (``prepack.PackCache``,
keyed by the weight and its scales; an in-place change repacks).

torch marks quantized-tensor creation as deprecated: this module is the only
place that uses it, behind the op's CPU dispatch, so it can be replaced by
another library's u8 x s8 GEMM without touching the graphs.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .prepack import PackCache

WEIGHT_MIN, WEIGHT_MAX = -64, 63
ACTIVATION_ZERO_POINT = 128


def available() -> bool:
    """True where torch was built with fbgemm (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def fits_7_bits(w_q: torch.Tensor) -> bool:
    """True if every code of the int8 weight lies in [-64, 63] (no int16 pair saturation)."""
    if w_q.numel() == 0:
        return True
    low, high = torch.aminmax(w_q)
    return WEIGHT_MIN <= int(low) and int(high) <= WEIGHT_MAX


def _pack(w_q: torch.Tensor, w_scale: torch.Tensor) -> Any:
    saved = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # the quantized-tensor deprecation notice (see above)
            zero_points = torch.zeros(w_q.shape[0], dtype=torch.long)
            codes = torch._make_per_channel_quantized_tensor(w_q.contiguous(), w_scale.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(codes, None)
    finally:
        torch.backends.quantized.engine = saved


def _pack_if_exact(w_q: torch.Tensor, w_scale: torch.Tensor) -> Optional[Any]:
    return _pack(w_q, w_scale) if fits_7_bits(w_q) else None


_CACHE = PackCache(_pack_if_exact)


def prepacked(w_q: torch.Tensor, w_scale: torch.Tensor) -> Optional[Any]:
    """fbgemm's packed form of a CPU int8 weight [N, K] with its scales [N], or None where the fast path
    cannot be exact."""
    if w_q.device.type != "cpu" or not available():
        return None
    return _CACHE.get((w_q, w_scale))


def scaled_matmul(x_q: torch.Tensor, packed: Any) -> torch.Tensor:
    """``float32(x_q @ w_q.T) * w_scale[None, :]`` for int8 ``x_q[M, K]`` and the weight packed by `prepacked`."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x_q.float(), 1.0, ACTIVATION_ZERO_POINT, packed)
