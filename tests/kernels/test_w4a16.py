"""W4A16: pack/unpack, the Triton kernel (interpreted on CPU, with and without split-K), the CPU paths and the
fake kernel, against the float64 reference.

Error bounds, with B = Σ_k |x_k| |Ŵ_nk| + |bias_n| (Ŵ = (q − z) · s exactly) and u the unit roundoff:

- Triton: q − z is an integer in [−15, 15], exact in every x dtype; the two block dots accumulate in float32,
  each block's partial is scaled (one rounding) and added (one more): the recursive-summation bound
  γ_n · B with n = K + 2 · (K blocks) + split slices + 2, plus the final cast (``cast_roundoff``).
- CPU, M ≤ FAST_ROWS (torch's bfloat16 int4 kernel, kernels/int4mm.py): x, S, Z and the dequantized weight
  each rounded once to bfloat16 and the output once, float32 accumulation: (3 u_bf16 + γ_K) · B' + u_bf16 · B
  with B' = Σ_k |x_k| (|q − 8| + |8 − z|) s; then the bias add and the cast to x's dtype.
- CPU, larger M: Ŵ rounded once to float32 (a block of rows at a time), one float32 GEMM over K, the bias:
  γ_{K + 3} · B plus the cast.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import (
    BlockConfig,
    cpu,
    dequantize_int4,
    int4mm,
    pack_int4,
    reference_w4a16_linear,
    triton_w4a16_linear,
    unpack_int4,
)
from graphopt.kernels.launch import interpreting

from .helpers import (
    DEVICES, U32, assert_within, cast_roundoff, generator, nan_like, needs_a_device, randn, sizes,
    subnormal_half_spacing, to_device
)

X_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUPS = [32, 64, 128]
CONFIGS = [BlockConfig(16, 32, 32, split_k=1), BlockConfig(16, 16, 64, split_k=3), BlockConfig(16, 64, 128, split_k=2)]
U_BF16 = torch.finfo(torch.bfloat16).eps / 2


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


def operands(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, with_bias: bool, seed: int):
    """Random non-zero-ish data: codes over [0, 15], zero points over [0, 15], log-uniform scales."""
    g = generator(seed)
    groups = -(-k // group_size)
    x = randn((m, k), g, dtype)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.exp(torch.empty(n, groups).uniform_(-6, -2, generator=g))
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    bias = randn((n,), g, dtype) if with_bias else None
    return x, pack_int4(codes), scales, zeros, group_size, bias


def magnitude(x, w_packed, scales, zeros, group_size, bias) -> torch.Tensor:
    w = dequantize_int4(w_packed, scales, zeros, group_size, x.shape[1], torch.float64)
    b = x.double().abs() @ w.abs().T
    return b if bias is None else b + bias.double().abs()


def triton_tolerance(args, expected, dtype, block_k: int, split: int, interpreted: bool) -> torch.Tensor:
    k = args[0].shape[1]
    n_sums = k + 2 * -(-k // block_k) + split + 2
    return gamma(n_sums) * magnitude(*args) + cast_roundoff(dtype, interpreted) * expected.abs() \
        + subnormal_half_spacing(dtype)


def cpu_tolerance(args, expected, dtype) -> torch.Tensor:
    x, w_packed, scales, zeros, group_size, bias = args
    m, k = x.shape
    if m <= int4mm.FAST_ROWS and int4mm.AVAILABLE:
        q = unpack_int4(w_packed, k).double()
        z = zeros.double().repeat_interleave(group_size, dim=1)[:, :k]
        s = scales.double().repeat_interleave(group_size, dim=1)[:, :k]
        spread = ((q - 8).abs() + (8 - z).abs()) * s
        no_bias = magnitude(x, w_packed, scales, zeros, group_size, None)
        bound = (3 * U_BF16 + gamma(k)) * (x.double().abs() @ spread.T) + U_BF16 * no_bias
        if bias is not None:
            bound = bound + U32 * (no_bias + bias.double().abs())
    else:
        bound = gamma(k + 3) * magnitude(*args)     # one GEMM over K, the dequantized weight, the bias
    return bound + cast_roundoff(dtype, False) * expected.abs() + subnormal_half_spacing(dtype)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), k=st.integers(1, 301), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n, k, seed) -> None:
    codes = torch.randint(0, 16, (n, k), generator=generator(seed), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (n, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, k), codes)
    if k % 2:
        assert not (packed[:, -1] >> 4).any(), "the padding nibble of an odd K is zero"


def test_pack_rejects_codes_outside_4_bits() -> None:
    with pytest.raises(ValueError, match="0, 15"):
        pack_int4(torch.tensor([[16, 0]]))


@needs_a_device
@settings(max_examples=20, deadline=None)
@given(
    m=sizes([1, 2, 16], 40),
    n=sizes([1, 7, 33], 80),
    k=sizes([1, 31, 33, 100, 129], 300),
    group_size=st.sampled_from(GROUPS),
    dtype=st.sampled_from(X_DTYPES),
    with_bias=st.booleans(),
    config=st.sampled_from([None] + CONFIGS),
    device=st.sampled_from(DEVICES),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference(m, n, k, group_size, dtype, with_bias, config, device, seed) -> None:
    args = operands(m, n, k, group_size, dtype, with_bias, seed)
    expected = reference_w4a16_linear(*args)
    out = nan_like((m, n), dtype).to(device)
    triton_w4a16_linear(*to_device(device, *args[:4]), group_size, *to_device(device, args[5]), out=out,
                        config=config)
    block_k = min(config.block_k if config else 128, group_size)
    split = config.split_k if config else 16
    tolerance = triton_tolerance(args, expected, dtype, block_k, split, interpreting(torch.device(device)))
    assert_within(out.cpu(), expected, tolerance)


@settings(max_examples=25, deadline=None)
@given(
    m=sizes([1, 8, int4mm.FAST_ROWS, int4mm.FAST_ROWS + 1], 2 * int4mm.FAST_ROWS),
    n=sizes([1, 7, 16, 33], 80),
    k=sizes([1, 31, 100, 1100], 300),
    group_size=st.sampled_from(GROUPS),
    dtype=st.sampled_from(X_DTYPES),
    with_bias=st.booleans(),
    block_rows=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_op_matches_reference(m, n, k, group_size, dtype, with_bias, block_rows, seed) -> None:
    """Both CPU paths (the bfloat16 int4 kernel for M ≤ FAST_ROWS, the float32 one beyond, dequantizing a block of
    `block_rows` rows at a time, the last block partial, or all rows at once), padded N and K."""
    args = operands(m, n, k, group_size, dtype, with_bias, seed)
    expected = reference_w4a16_linear(*args)
    block = cpu.W4_BLOCK_ELEMENTS if block_rows is None else block_rows * k
    with mock.patch.object(cpu, "W4_BLOCK_ELEMENTS", block):
        out = torch.ops.graphopt.w4a16_linear(*args)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_within(out, expected, cpu_tolerance(args, expected, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [2, 5, 16])
def test_split_k_with_uneven_slices(split: int, device: str) -> None:
    """K = 300 in blocks of 32 is 10 blocks: uneven slices, and with 16 slices some are empty."""
    args = operands(3, 40, 300, 32, torch.float16, True, split)
    expected = reference_w4a16_linear(*args)
    out = triton_w4a16_linear(*to_device(device, *args[:4]), 32, *to_device(device, args[5]),
                              config=BlockConfig(16, 32, 32, split_k=split))
    tolerance = triton_tolerance(args, expected, torch.float16, 32, split, interpreting(torch.device(device)))
    assert_within(out.cpu(), expected, tolerance)


def test_fake_kernel_and_schema() -> None:
    """torch.library.opcheck: schema, fake (meta) kernel against the real one, no aliasing, traceability."""
    args = operands(2, 16, 70, 32, torch.float32, True, 0)
    torch.library.opcheck(torch.ops.graphopt.w4a16_linear.default, args)


@pytest.mark.parametrize("bad, match", [
    ({"group_size": 48}, "group_size"),
    ({"k_packed": 3}, "ceil"),
    ({"scales_groups": 1}, "scales must be"),
    ({"zero_scale": True}, "positive"),
])
def test_bad_arguments_are_named(bad, match) -> None:
    x, w_packed, scales, zeros, group_size, bias = operands(2, 8, 100, 32, torch.float32, False, 1)
    group_size = bad.get("group_size", group_size)
    if "k_packed" in bad:
        w_packed = w_packed[:, : bad["k_packed"]].contiguous()
    if "scales_groups" in bad:
        scales = scales[:, :1].contiguous()
    if bad.get("zero_scale"):
        scales = scales.clone()
        scales[0, 0] = 0
    with pytest.raises(ValueError, match=match):
        torch.ops.graphopt.w4a16_linear(x, w_packed, scales, zeros, group_size, bias)
