"""W8A16: the Triton kernel (interpreted on CPU, with and without split-K) and the CPU path against float64.

Tolerance: float32 accumulation, bounded by gamma_n * sum |x| |w| * w_scale
(see helpers.dot_tolerance), plus the cast to x's dtype. A split-K slice that
was never written would leave another example's partial sums (or garbage) in
the workspace, which this bound catches because every example draws new data.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import BlockConfig, cpu, reference_w8a16_linear, triton_w8a16_linear
from graphopt.kernels.configs import W8A16_TABLE
from graphopt.kernels.launch import interpreting

from .helpers import (
    DEVICES, assert_within, dot_tolerance, generator, int8_nonzero, log_uniform, nan_like, needs_a_device, randn,
    sizes, to_device
)

pytestmark = needs_a_device
X_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CONFIGS = [
    BlockConfig(16, 32, 32, split_k=1),
    BlockConfig(16, 16, 32, split_k=3),
    BlockConfig(16, 64, 64, split_k=2),
] + [cfg for _, cfg in W8A16_TABLE]


def operands(m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool, seed: int):
    g = generator(seed)
    x = randn((m, k), g, dtype)
    w_q = int8_nonzero((n, k), g)
    w_scale = log_uniform((n,), -7, -4, g)
    bias = randn((n,), g, dtype) if with_bias else None
    return x, w_q, w_scale, bias


def check(x, w_q, w_scale, bias, device: str, config=None) -> None:
    m, n = x.shape[0], w_q.shape[0]
    expected = reference_w8a16_linear(x, w_q, w_scale, bias)
    split = config.split_k if config is not None else 1
    out = nan_like((m, n), x.dtype).to(device)
    triton_w8a16_linear(*to_device(device, x, w_q, w_scale, bias), out=out, config=config)
    interpreted = interpreting(torch.device(device))
    assert_within(out.cpu(), expected, dot_tolerance(x, w_q, w_scale, bias, expected, x.dtype, split, interpreted))


@settings(max_examples=25, deadline=None)
@given(
    m=sizes([1, 2, 7, 16], 300),
    n=sizes([1, 7, 33, 100], 160),
    k=sizes([1, 7, 33, 100], 300),
    dtype=st.sampled_from(X_DTYPES),
    with_bias=st.booleans(),
    config=st.sampled_from([None] + CONFIGS),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(m, n, k, dtype, with_bias, config, device, seed) -> None:
    if config is not None and config.block_m * config.block_n < 64 * 64:
        m, n = min(m, 16), min(n, 96)  # small tiles: keep the interpreted grid short
    args = operands(m, n, k, dtype, with_bias, seed)
    check(*args, device, config)
    expected = reference_w8a16_linear(*args)
    on_cpu = cpu.w8a16_linear(*args)
    assert on_cpu.dtype == dtype
    assert_within(on_cpu, expected, dot_tolerance(*args, expected, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [2, 5, 16])
def test_split_k_with_uneven_slices(split: int, device: str) -> None:
    """K = 300 in blocks of 32 is 10 blocks: uneven slices, and with 16 slices some are empty."""
    config = BlockConfig(16, 32, 32, split_k=split)
    check(*operands(5, 40, 300, torch.float16, True, split), device, config)
