"""The fast CPU int8 path (fbgemm u8 x s8) against the exact path: the same product, never saturated, packed once."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import cpu, fbgemm, reference_int8_linear

from .helpers import assert_within, epilogue_tolerance, generator, log_uniform

pytestmark = pytest.mark.skipif(not fbgemm.available(), reason="torch built without fbgemm (not an x86 CPU)")
ops = torch.ops.graphopt


def activations(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Per-token int8 codes using the whole range [-127, 127], with one outlier channel pinned at ±127."""
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x_q[:, k // 2] = 127 * (1 - 2 * torch.randint(0, 2, (m,), generator=g, dtype=torch.int8))
    return x_q


def weights(n: int, k: int, low: int, high: int, g: torch.Generator) -> torch.Tensor:
    w_q = torch.randint(low, high + 1, (n, k), generator=g, dtype=torch.int8)
    w_q[:, 0] = high   # every row reaches the top of its range
    return w_q


@settings(max_examples=40, deadline=None)
@given(m=st.sampled_from([1, 2, 5, 17, 64]), n=st.sampled_from([1, 7, 16, 33]),
       k=st.sampled_from([1, 7, 63, 65, 127, 1025, 2049]), seed=st.integers(0, 2**16))
def test_fast_path_is_exact(m: int, n: int, k: int, seed: int) -> None:
    """7-bit weights: fbgemm's product (unit scales) equals the exact chunked product bit for bit (odd M, N, K)."""
    g = generator(seed)
    x_q, w_q = activations(m, k, g), weights(n, k, fbgemm.WEIGHT_MIN, fbgemm.WEIGHT_MAX, g)
    packed = fbgemm.prepacked(w_q, torch.ones(n))
    assert packed is not None, "a 7-bit weight must take the fast path"
    fast = fbgemm.scaled_matmul(x_q, packed)
    exact = cpu.matmul_int8_weight(x_q.float(), w_q)
    assert fast.dtype == torch.float32 and fast.shape == (m, n)
    assert torch.equal(fast, exact)


@settings(max_examples=20, deadline=None)
@given(m=st.sampled_from([1, 3, 64]), n=st.sampled_from([7, 32]), k=st.sampled_from([33, 256, 1000]),
       activation=st.sampled_from(["none", "relu", "gelu", "silu"]), seed=st.integers(0, 2**16))
def test_op_with_7_bit_weights_matches_the_reference(m: int, n: int, k: int, activation: str, seed: int) -> None:
    """The whole op on the fast path (scales, bias, activation) is within the epilogue's rounding of the
    float64 reference."""
    g = generator(seed)
    x_q, w_q = activations(m, k, g), weights(n, k, fbgemm.WEIGHT_MIN, fbgemm.WEIGHT_MAX, g)
    x_scale, w_scale, bias = log_uniform((m,), -6, -3, g), log_uniform((n,), -6, -3, g), torch.randn(n, generator=g)
    assert fbgemm.prepacked(w_q, w_scale) is not None
    y = ops.int8_linear(x_q, w_q, x_scale, w_scale, bias, activation=activation)
    expected = reference_int8_linear(x_q, w_q, x_scale, w_scale, bias, activation=activation)
    assert_within(y, expected, epilogue_tolerance(x_q, w_q, x_scale, w_scale, bias, torch.float32))


def test_8_bit_weights_never_reach_the_saturating_kernel() -> None:
    """Full-range operands (255 x 127 pairs overflow int16 without VNNI) must still give the exact product.

    On an AVX2 CPU this fails if 8-bit weights are sent through fbgemm: its int16 pair sums saturate.
    """
    g = generator(3)
    m, n, k = 8, 7, 130
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    x_q[1::2] = -127
    w_q = weights(n, k, -127, 127, g)
    w_q[:, :64] = 127
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    assert fbgemm.prepacked(w_q, ones_n) is None
    y = ops.int8_linear(x_q, w_q, ones_m, ones_n)
    exact = reference_int8_linear(x_q, w_q, ones_m, ones_n)
    assert torch.equal(y.double(), exact)


def test_weight_is_packed_once_and_repacked_after_an_in_place_change(monkeypatch) -> None:
    calls = []
    pack = fbgemm._pack
    monkeypatch.setattr(fbgemm, "_pack", lambda w, s: calls.append(1) or pack(w, s))
    g = generator(5)
    x_q, w_q = activations(4, 40, g), weights(6, 40, -63, 63, g)   # symmetric: its negation fits too
    w_scale = torch.ones(6)
    first = fbgemm.scaled_matmul(x_q, fbgemm.prepacked(w_q, w_scale))
    for _ in range(3):
        fbgemm.prepacked(w_q, w_scale)
    assert len(calls) == 1
    w_q.neg_()                                       # a new version of the same tensor: packed again
    second = fbgemm.scaled_matmul(x_q, fbgemm.prepacked(w_q, w_scale))
    assert len(calls) == 2 and torch.equal(second, -first)
    w_scale.mul_(2)                                  # new scales: packed again
    assert torch.equal(fbgemm.scaled_matmul(x_q, fbgemm.prepacked(w_q, w_scale)), -2 * first)
    assert len(calls) == 3


def test_cache_entry_dies_with_its_weight() -> None:
    g = generator(6)
    before = len(fbgemm._CACHE)
    w_q = weights(5, 16, -64, 63, g)
    fbgemm.prepacked(w_q, torch.ones(5))
    assert len(fbgemm._CACHE) == before + 1
    del w_q
    gc.collect()
    assert len(fbgemm._CACHE) == before
