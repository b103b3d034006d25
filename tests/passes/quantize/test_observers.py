"""Observers and the int8 math: scales positive and finite, error ≤ half a step inside the range,
per-output-channel weight scales."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.passes.quantize.observers import (MIN_SCALE, OBSERVERS, QMAX, MSEObserver, dequantize,
                                                make_observer, quantize, quantize_weight)

# float32 rounding of x / scale and of q · scale: a few ulps of the range, far below a step
ROUNDING = 1e-5


@st.composite
def tensors(draw, min_dims=1):
    shape = draw(st.lists(st.integers(1, 16), min_size=min_dims, max_size=3))
    seed = draw(st.integers(0, 2**16))
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    kind = draw(st.sampled_from(["normal", "uniform", "zeros", "constant", "outlier"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * magnitude
    if kind == "uniform":
        x = (torch.rand(shape, generator=g) * 2 - 1) * magnitude
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "constant":
        x = torch.full(shape, magnitude)
    elif kind == "outlier":
        x.view(-1)[0] = 100 * magnitude
    return x


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(tensors(), min_size=1, max_size=3), name=st.sampled_from(OBSERVERS))
def test_observer_scale_positive_finite_and_error_within_half_step(batches, name):
    observer = make_observer(name)
    for x in batches:
        observer.observe(x)
    scale = observer.scale()
    assert scale.numel() == 1 and math.isfinite(scale.item()) and scale.item() > 0
    clip = QMAX * scale.item()
    for x in batches:
        inside = x.abs() <= clip
        error = (dequantize(quantize(x, scale), scale) - x).abs()
        assert (error[inside] <= scale * (0.5 + ROUNDING)).all()
        # outside the range the value is clipped to ±clip, never beyond
        assert (dequantize(quantize(x, scale), scale).abs() <= clip * (1 + ROUNDING)).all()


@settings(max_examples=40, deadline=None)
@given(x=tensors(min_dims=1))
def test_minmax_covers_everything(x):
    observer = make_observer("minmax")
    observer.observe(x)
    assert observer.clip() == x.abs().max().item()


def test_mse_clips_the_gaussian_tail_and_beats_minmax():
    # 1e5 normal samples: the range up to max|x| ≈ 4.5σ costs more rounding error on every
    # sample than clipping the few beyond ≈ 4σ, so the MSE-optimal clip lies below the max
    x = torch.randn(100000, generator=torch.Generator().manual_seed(0))
    mse, minmax = MSEObserver(), make_observer("minmax")
    mse.observe(x)
    minmax.observe(x)
    assert mse.clip() < 0.95 * minmax.clip()
    error = {o: (dequantize(quantize(x, o.scale()), o.scale()) - x).pow(2).mean().item() for o in (mse, minmax)}
    assert error[mse] < error[minmax]


def test_percentile_ignores_the_top_tail():
    x = torch.cat([torch.linspace(0, 1, 9999), torch.tensor([1000.0])])
    observer = make_observer("percentile", percentile=99.9)
    observer.observe(x)
    assert observer.clip() < 2.0


def test_moving_average_follows_batches():
    observer = make_observer("moving_average", averaging_constant=0.5)
    observer.observe(torch.tensor([4.0]))
    observer.observe(torch.tensor([2.0]))
    assert observer.clip() == 3.0


@settings(max_examples=50, deadline=None)
@given(w=tensors(min_dims=2).filter(lambda t: t.dim() == 2), observer=st.sampled_from(["minmax", "mse"]))
def test_weight_scales_are_per_output_channel(w, observer):
    w_q, scale = quantize_weight(w, observer)
    assert w_q.dtype == torch.int8 and w_q.shape == w.shape and scale.shape == (w.shape[0],)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    if observer == "minmax":
        expected = (w.abs().amax(dim=1) / QMAX).clamp(min=MIN_SCALE)
        assert torch.allclose(scale, expected, rtol=1e-6, atol=0)
        error = (w_q.float() * scale[:, None] - w).abs()
        assert (error <= scale[:, None] * (0.5 + ROUNDING)).all()
    # each row is scaled on its own: scaling one row leaves the others' codes unchanged
    w2 = w.clone()
    w2[0] *= 1000
    w2_q, _ = quantize_weight(w2, observer)
    assert torch.equal(w2_q[1:], w_q[1:])
