"""W8A8 GEMM: the Triton kernel (interpreted on CPU) and the CPU path against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import BlockConfig, cpu, reference_int8_linear, triton_int8_linear
from graphopt.kernels.activations import ACTIVATIONS
from graphopt.kernels.configs import INT8_LINEAR_TABLE
from graphopt.kernels.launch import interpreting

from .helpers import (
    DEVICES, assert_within, epilogue_tolerance, generator, int8_nonzero, log_uniform, nan_like, needs_a_device,
    randn, to_device
)

# sigmoid(z) = 1 / (1 + exp(-z)) overflows exp to inf for very negative z in the
# interpreter's numpy, giving the correct limit 0; the warning is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"), needs_a_device]

# Sizes that are multiples of no block size, and K below every BLOCK_K (the smallest is 32).
ODD_SIZES = st.sampled_from([1, 7, 31, 33, 100])
# Small tiles so a modest shape spans several tiles in M, N and K, with GROUP_M bands > 1.
SMALL_CONFIGS = [
    BlockConfig(16, 16, 32, group_m=1),
    BlockConfig(16, 32, 32, group_m=3),
    BlockConfig(32, 16, 64, group_m=2),
]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def operands(m: int, n: int, k: int, seed: int, with_bias: bool, bias_dtype: torch.dtype = torch.float32):
    g = generator(seed)
    x_q, w_q = int8_nonzero((m, k), g), int8_nonzero((n, k), g)
    # Scales around 1/127 .. 1/2000 keep |y| far below the float16 maximum (|acc| <= K * 2**14).
    x_scale, w_scale = log_uniform((m,), -7.5, -4.5, g), log_uniform((n,), -7.5, -4.5, g)
    bias = randn((n,), g, bias_dtype) if with_bias else None
    return x_q, w_q, x_scale, w_scale, bias


@settings(max_examples=25, deadline=None)
@given(
    m=st.one_of(ODD_SIZES, st.integers(1, 300)),
    n=st.one_of(ODD_SIZES, st.integers(1, 160)),
    k=st.one_of(ODD_SIZES, st.integers(1, 300)),
    table=st.booleans(),
    config=st.sampled_from(SMALL_CONFIGS),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_int32_product_is_exact(m, n, k, table: bool, config: BlockConfig, device: str, seed: int) -> None:
    """Unit scales, no bias: the float32 output is float32(acc), exact because |acc| <= 300 * 2**14 < 2**24."""
    if not table and m * n > 64 * 64:
        m, n = min(m, 64), min(n, 64)  # keep the small-tile grids quick in the interpreter
    g = generator(seed)
    x_q, w_q = int8_nonzero((m, k), g), int8_nonzero((n, k), g)
    args = to_device(device, x_q, w_q, torch.ones(m), torch.ones(n))
    out = nan_like((m, n), torch.float32).to(device)
    triton_int8_linear(*args, out=out, config=None if table else config)
    exact = x_q.double() @ w_q.double().T
    assert torch.equal(out.cpu().double(), exact)


@settings(max_examples=30, deadline=None)
@given(
    m=st.one_of(ODD_SIZES, st.integers(1, 300)),
    n=st.one_of(ODD_SIZES, st.integers(1, 160)),
    k=st.one_of(ODD_SIZES, st.integers(1, 300)),
    activation=st.sampled_from(ACTIVATIONS),
    out_dtype=st.sampled_from(OUT_DTYPES),
    with_bias=st.booleans(),
    bias_dtype=st.sampled_from(OUT_DTYPES),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_epilogue_matches_reference(m, n, k, activation, out_dtype, with_bias, bias_dtype, device, seed) -> None:
    args = operands(m, n, k, seed, with_bias, bias_dtype)
    expected = reference_int8_linear(*args, activation, out_dtype)
    interpreted = interpreting(torch.device(device))
    out = nan_like((m, n), out_dtype).to(device)
    triton_int8_linear(*to_device(device, *args), activation, out_dtype, out=out)
    assert_within(out.cpu(), expected, epilogue_tolerance(*args, out_dtype, interpreted))
    on_cpu = cpu.int8_linear(*args, activation, out_dtype)
    assert on_cpu.dtype == out_dtype
    assert_within(on_cpu, expected, epilogue_tolerance(*args, out_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", SMALL_CONFIGS + [cfg for _, cfg in INT8_LINEAR_TABLE], ids=str)
def test_every_config_with_all_activations(config: BlockConfig, device: str) -> None:
    """Each tile shape (small ones and the table's) on a shape that is ragged in M, N and K."""
    m, n, k = 37, 45, 77
    for seed, activation in enumerate(ACTIVATIONS):
        args = operands(m, n, k, seed, with_bias=True)
        out = nan_like((m, n), torch.float32).to(device)
        triton_int8_linear(*to_device(device, *args), activation, out=out, config=config)
        assert_within(out.cpu(), reference_int8_linear(*args, activation), epilogue_tolerance(*args, torch.float32))


def test_cpu_path_is_exact_beyond_one_k_chunk() -> None:
    """K = 2500 spans three float32 chunks; with |acc| < 2**24 the chunked sum must equal the exact product."""
    g = generator(0)
    x_q, w_q = int8_nonzero((3, 2500), g), int8_nonzero((5, 2500), g)
    exact = x_q.double() @ w_q.double().T
    assert exact.abs().max() < 2**24
    assert torch.equal(cpu.int8_matmul(x_q, w_q).double(), exact)


def test_cpu_path_rounds_large_products_once() -> None:
    """All-(-128) operands: |acc| = K * 2**14 = 2**31 - 2**14 at the largest K allowed; float32 rounds it once."""
    k = (2**31 - 1) // 2**14
    x_q = torch.full((1, k), -128, dtype=torch.int8)
    w_q = torch.full((2, k), -128, dtype=torch.int8)
    exact = float(k * 2**14)
    assert cpu.int8_matmul(x_q, w_q).tolist() == [[torch.tensor(exact, dtype=torch.float32).item()] * 2]


@pytest.mark.parametrize("device", DEVICES)
def test_row_slices_and_expanded_scales(device: str) -> None:
    """Row-strided operands (a slice of wider rows) and a stride-0 scale (a per-tensor scale expanded to [M])."""
    g = generator(1)
    wide_x, wide_w = int8_nonzero((20, 50), g), int8_nonzero((9, 50), g)
    x_q, w_q = wide_x[:, 5:45], wide_w[:, 3:43]
    x_scale = torch.tensor([0.01]).expand(20)
    w_scale = log_uniform((9,), -6, -4, g)
    expected = reference_int8_linear(x_q, w_q, x_scale, w_scale)
    tolerance = epilogue_tolerance(x_q, w_q, x_scale, w_scale, None, torch.float32)
    on_device = [t.to(device) for t in (wide_x, wide_w)]
    y = triton_int8_linear(on_device[0][:, 5:45], on_device[1][:, 3:43], x_scale.to(device), w_scale.to(device))
    assert_within(y.cpu(), expected, tolerance)
    assert_within(cpu.int8_linear(x_q, w_q, x_scale, w_scale), expected, tolerance)


def test_empty_m_returns_empty() -> None:
    w_q = int8_nonzero((4, 8), generator(2))
    out = triton_int8_linear(torch.empty((0, 8), dtype=torch.int8), w_q, torch.empty(0), torch.ones(4))
    assert out.shape == (0, 4)
