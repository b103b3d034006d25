"""LayerNorm fused with per-token quantization: the Triton kernel (interpreted on CPU) and the CPU path.

The LayerNorm output y is compared with the float64 reference within the bound below; the codes and
scales must be those of quantize_per_token applied to the stored y (helpers.assert_quantized), since
the fused kernel quantizes exactly what it writes.

Bound on |y - y_ref| (float32 arithmetic, u = 2**-24, a = max_k |x[m, k]|, r = the reference
1 / sqrt(var + eps), gamma_n = n u / (1 - n u)): the mean is a K-term sum (error <= gamma_K a), which
also shifts each centered value; the variance is a K-term sum of squares of those, so 1 / sqrt has
relative error <= gamma_{K+4} + 2 gamma_K a r; together |Δ((x - mean) r)| <= 4 gamma_{K+4} a r.
Weight and bias add two roundings of |y| + |bias|, and the store in x's dtype half an ulp of y.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import reference_layer_norm, triton_layer_norm_quantize

from .helpers import (
    DEVICES, U32, assert_quantized, assert_within, cast_roundoff, generator, log_uniform, needs_a_device, randn,
    sizes, subnormal_half_spacing, to_device
)

pytestmark = needs_a_device
ops = torch.ops.graphopt
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layer_norm_tolerance(x: torch.Tensor, weight, bias, eps: float, y_ref: torch.Tensor,
                         dtype: torch.dtype, interpreted: bool) -> torch.Tensor:
    k = x.shape[1] + 4
    gamma = k * U32 / (1 - k * U32)
    x64 = x.double()
    a = x64.abs().amax(dim=1, keepdim=True)
    r = 1 / torch.sqrt(x64.var(dim=1, unbiased=False, keepdim=True) + eps)
    w = weight.double().abs() if weight is not None else 1.0
    b = bias.double().abs() if bias is not None else 0.0
    return (4 * gamma * a * r * w + 2 * U32 * (y_ref.abs() + b)
            + cast_roundoff(dtype, interpreted) * y_ref.abs() + subnormal_half_spacing(dtype))


@settings(max_examples=25, deadline=None)
@given(
    m=sizes([1, 7, 33], 200),
    k=sizes([1, 7, 65, 100], 600),
    dtype=st.sampled_from(FLOAT_DTYPES),
    affine=st.sampled_from(["none", "weight", "both"]),
    smoothed=st.booleans(),
    eps=st.sampled_from([1e-12, 1e-5, 0.1]),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_layer_norm_then_quantize(m: int, k: int, dtype: torch.dtype, affine: str, smoothed: bool,
                                          eps: float, device: str, seed: int) -> None:
    g = generator(seed)
    # Rows of very different magnitudes and offsets, and a smoothing vector spanning 1e-2 .. 1e2.
    x = (randn((m, k), g) * log_uniform((m, 1), -5, 5, g) + randn((m, 1), g)).to(dtype)
    weight = randn((k,), g).to(dtype) if affine != "none" else None
    bias = randn((k,), g).to(dtype) if affine == "both" else None
    smooth = log_uniform((k,), -4.6, 4.6, g) if smoothed else None
    y_ref = reference_layer_norm(x, weight, bias, eps)
    for implementation in ("triton", "op"):
        args = to_device(device, x, weight, bias)
        smooth_d = None if smooth is None else smooth.to(device)
        if implementation == "triton":
            y, q, scale = triton_layer_norm_quantize(*args, eps, smooth_d)
        else:
            y, q, scale = ops.layer_norm_quantize(*args, eps, smooth_d)
        y, q, scale = y.cpu(), q.cpu(), scale.cpu()
        assert y.dtype == dtype
        interpreted = implementation == "triton" and device == "cpu"
        assert_within(y, y_ref, layer_norm_tolerance(x, weight, bias, eps, y_ref, dtype, interpreted))
        assert_quantized(q, scale, y, smooth)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_rows_give_the_bias_and_zero_rows_the_floor(device: str) -> None:
    x = torch.tensor([[3.0] * 5, [0.0] * 5, [1.0, -1.0, 2.0, -2.0, 0.5]], device=device)
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0, -1.0], device=device)
    y, q, scale = triton_layer_norm_quantize(x, None, bias, 1e-5)
    assert torch.equal(y[0].cpu(), bias.cpu()) and torch.equal(y[1].cpu(), bias.cpu())
    assert q[0].tolist() == [64, -32, 0, 127, -127]  # bias / (1 / 127) rounded half-to-even
    assert torch.isfinite(y[2]).all()


def test_rejects_bad_inputs() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm_quantize(x, torch.ones(7), None, 1e-5)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        triton_layer_norm_quantize(x, None, None, -1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.layer_norm_quantize(torch.randn(2, 4, 8), None, None, 1e-5)
