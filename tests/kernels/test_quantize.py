"""Per-token quantization: the Triton kernel (interpreted on CPU) and the CPU path against the float64 reference.

The comparison and its tolerance are in helpers.assert_quantized.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import SCALE_FLOOR, cpu, triton_quantize_per_token

from .helpers import DEVICES, assert_quantized, generator, log_uniform, needs_a_device, randn, sizes, to_device

pytestmark = needs_a_device
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=30, deadline=None)
@given(
    m=sizes([1, 7, 33], 300),
    k=sizes([1, 7, 33, 100], 600),
    dtype=st.sampled_from(FLOAT_DTYPES),
    smoothed=st.booleans(),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(m: int, k: int, dtype: torch.dtype, smoothed: bool, device: str, seed: int) -> None:
    g = generator(seed)
    # Rows of very different magnitudes (1e-3 .. 1e3) and a smoothing vector spanning 1e-2 .. 1e2.
    x = (randn((m, k), g) * log_uniform((m, 1), -7, 7, g)).to(dtype)
    smooth = log_uniform((k,), -4.6, 4.6, g) if smoothed else None
    q_out = torch.full((m, k), -128, dtype=torch.int8, device=device)  # -128 is never emitted
    scale_out = torch.full((m,), float("nan"), device=device)
    triton_quantize_per_token(*to_device(device, x, smooth), out=(q_out, scale_out))
    assert_quantized(q_out.cpu(), scale_out.cpu(), x, smooth)
    assert_quantized(*cpu.quantize_per_token(x, smooth), x, smooth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["triton", "cpu"])
def test_ties_round_to_even_and_zero_rows_get_the_floor(implementation: str, device: str) -> None:
    """Row 0 has absmax 127, so its scale is exactly 1 and x / scale are exact ties."""
    quantize = triton_quantize_per_token if implementation == "triton" else cpu.quantize_per_token
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5], [0.0] * 7], device=device)
    q, scale = quantize(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -126], [0] * 7]
    assert scale.tolist() == [1.0, SCALE_FLOOR]


@pytest.mark.parametrize("device", DEVICES)
def test_row_strided_input_and_expanded_smooth(device: str) -> None:
    g = generator(3)
    wide = randn((6, 40), g)
    x = wide[:, 4:30].to(device)
    smooth = torch.tensor([2.0]).expand(26).to(device)
    q, scale = triton_quantize_per_token(x, smooth)
    assert_quantized(q.cpu(), scale.cpu(), x.cpu(), smooth.cpu())
