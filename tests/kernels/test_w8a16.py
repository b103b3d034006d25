"""W8A16: the Triton kernel (interpreted on CPU, with and without split-K) and the CPU paths against float64.

Tolerances, with B = Σ_k |x_k| |q_nk| s_n + |bias_n| and u the unit roundoff:

- Triton, and the CPU for M > FAST_ROWS: float32 accumulation, bounded by γ_n · B (helpers.dot_tolerance),
  plus the cast to x's dtype. A split-K slice that was never written would leave another example's partial
  sums (or garbage) in the workspace, which this bound catches because every example draws new data.
- CPU, M ≤ FAST_ROWS (torch's bfloat16 int8 kernel, kernels/int8mm.py): x and s each rounded once to
  bfloat16 and the output once, float32 accumulation: (2 u_bf16 + γ_K) · B₀ + u_bf16 · |y₀| with B₀, y₀
  without the bias; then the bias add (u32) and the cast to x's dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import BlockConfig, int8mm, reference_w8a16_linear, triton_w8a16_linear
from graphopt.kernels.configs import W8A16_TABLE
from graphopt.kernels.launch import interpreting

from .helpers import (
    DEVICES, U32, assert_within, cast_roundoff, dot_tolerance, generator, int8_nonzero, log_uniform, nan_like,
    needs_a_device, randn, sizes, subnormal_half_spacing, to_device
)

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


U_BF16 = torch.finfo(torch.bfloat16).eps / 2


def cpu_tolerance(x, w_q, w_scale, bias, expected: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    if m > int8mm.FAST_ROWS or not int8mm.AVAILABLE:
        return dot_tolerance(x, w_q, w_scale, bias, expected, x.dtype)
    magnitude = x.double().abs() @ w_q.double().abs().T * w_scale.double()[None, :]
    no_bias = reference_w8a16_linear(x, w_q, w_scale, None).abs()
    gamma = k * U32 / (1 - k * U32)
    bound = (2 * U_BF16 + gamma) * magnitude + U_BF16 * no_bias
    if bias is not None:
        bound = bound + U32 * (no_bias + bias.double().abs())
    return bound + cast_roundoff(x.dtype, False) * expected.abs() + subnormal_half_spacing(x.dtype)


def check(x, w_q, w_scale, bias, device: str, config=None) -> None:
    m, n = x.shape[0], w_q.shape[0]
    expected = reference_w8a16_linear(x, w_q, w_scale, bias)
    split = config.split_k if config is not None else 1
    out = nan_like((m, n), x.dtype).to(device)
    triton_w8a16_linear(*to_device(device, x, w_q, w_scale, bias), out=out, config=config)
    interpreted = interpreting(torch.device(device))
    assert_within(out.cpu(), expected, dot_tolerance(x, w_q, w_scale, bias, expected, x.dtype, split, interpreted))


@needs_a_device
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
    check(*operands(m, n, k, dtype, with_bias, seed), device, config)


@settings(max_examples=30, deadline=None)
@given(
    m=sizes([1, 8, 16, 17], 300),
    n=sizes([1, 7, 33], 160),
    k=sizes([1, 7, 8, 16, 24, 33, 1100], 1300),
    dtype=st.sampled_from(X_DTYPES),
    with_bias=st.booleans(),
    views=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_op_matches_reference(m, n, k, dtype, with_bias, views, seed) -> None:
    """Both CPU paths (the bfloat16 int8 kernel for M ≤ 16, K padded to the vector block where it is not,
    unaligned operands copied; the chunked float32 one beyond), through the registered op. ``views``: x and
    w_q are row slices of larger tensors, so they start off a 32-byte boundary."""
    args = operands(m, n, k, dtype, with_bias, seed)
    if views:
        x, w_q, *rest = args
        args = (torch.cat((x[:1], x))[1:], torch.cat((w_q[:1], w_q))[1:], *rest)
    expected = reference_w8a16_linear(*args)
    out = torch.ops.graphopt.w8a16_linear(*args)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_within(out, expected, cpu_tolerance(*args, expected))


def test_cpu_decode_path_keeps_no_reference_to_the_weight() -> None:
    """The packed entry of a weight whose K needs no padding holds only its bfloat16 scales: the weight is
    freed with its module."""
    import gc
    import weakref
    x, w_q, w_scale, _ = operands(1, 7, 64, torch.float32, False, 3)
    assert w_q.data_ptr() % 64 == 0
    torch.ops.graphopt.w8a16_linear(x, w_q, w_scale)
    alive = weakref.ref(w_q)
    del w_q
    gc.collect()
    assert alive() is None


@needs_a_device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [2, 5, 16])
def test_split_k_with_uneven_slices(split: int, device: str) -> None:
    """K = 300 in blocks of 32 is 10 blocks: uneven slices, and with 16 slices some are empty."""
    config = BlockConfig(16, 32, 32, split_k=split)
    check(*operands(5, 40, 300, torch.float16, True, split), device, config)
