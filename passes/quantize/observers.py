"""Symmetric int8 quantization math and the observers that choose its range.

Symmetric int8 with a clipping range c > 0 (c = 127·scale):

    q = clamp(round(x / scale), -127, 127)      x̂ = q · scale      scale = c / 127

Inside the range (|x| ≤ c) the error |x̂ − x| is at most scale/2 (half a step);
outside it the value is clipped to ±c. Observers pick c from the values seen
during calibration:

    minmax          c = max|x| over all batches
    moving_average  c = EMA over batches of each batch's max|x| (smoothing constant a)
    percentile      c = the p-th percentile of |x| (histogram of |x|)
    mse             c minimising E[(x̂ − x)²] over a histogram of |x|: x² for |x| < step/2
                    (rounds to 0), rounding noise step²/12 up to c, (|x| − c)² beyond

The histogram keeps `bins` equal bins over [0, upper]; when a batch exceeds
`upper` the range doubles (adjacent bins merge), so memory stays fixed.
Scales are floored at `MIN_SCALE`: an all-zero or constant-zero activation
gets a tiny positive finite scale, never 0 or inf.

Weights are quantized per output channel (row of W[N, K]) with the same
math, c_n = max_k |W[n, k]| ("minmax") or the per-row MSE-optimal clip ("mse"),
on 8 bits (q in ±127) or 7 bits (q in ±63, scale = c / 63: the step doubles).
7-bit weights are what CPUs without VNNI multiply exactly against 8-bit
activations (see graphopt/kernels/fbgemm.py); the per-layer error bound below
then has s_W = c / 63.
"""
from __future__ import annotations

import math

import torch

from graphopt.errors import OptionError

QMAX = 127
#: Largest weight code for `bits`-bit symmetric weights.
WEIGHT_QMAX = {8: 127, 7: 63}


def default_weight_bits(device: torch.device, w8a8: bool = True) -> int:
    """7 bits for W8A8 weights on the CPU (fbgemm's u8 x s8 GEMM is exact only then, see kernels/fbgemm.py), else 8."""
    return 7 if w8a8 and device.type == "cpu" else 8
#: Smallest scale used: keeps x / scale finite for all-zero tensors (fp32 normal range, with margin).
MIN_SCALE = 1e-12


def scale_from_range(amax: torch.Tensor | float, qmax: int = QMAX) -> torch.Tensor:
    """scale = c / qmax, floored at MIN_SCALE (so it is positive and finite)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    amax = torch.nan_to_num(amax, nan=0.0, posinf=torch.finfo(torch.float32).max / 2)
    return (amax / qmax).clamp(min=MIN_SCALE)


def row_amax(w: torch.Tensor) -> torch.Tensor:
    """max_k |W[n, k]| per row, as the ∞-norm: reduced without a |W| temporary the size of W."""
    return torch.linalg.vector_norm(w.detach().float(), ord=math.inf, dim=1)


def quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """int8 codes of `x` for `scale` (broadcast against x), in [-qmax, qmax]. Rounded and clipped in place: one
    float32 temporary the size of x (an LLM's embedding table or head is a large share of the model)."""
    codes = x.float() / scale
    return codes.round_().clamp_(-qmax, qmax).to(torch.int8)


#: Elements `quantize_rows` converts to float32 at a time (4 MiB).
ROW_BLOCK_ELEMENTS = 1 << 20


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """`quantize(w, scale)` for a 2-D w and a per-row scale [rows, 1], a block of rows at a time: one float32
    temporary of a block, where the whole of an LLM's embedding table or head is half its fp32 size."""
    out = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        out[start:start + rows] = quantize(w[start:start + rows], scale[start:start + rows], qmax)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    return dequantize(quantize(x, scale, qmax), scale)


def per_token_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row quantization of a 2-D activation, as `quantize_per_token` does it."""
    return fake_quantize(x, scale_from_range(x.abs().amax(dim=-1, keepdim=True)))


WEIGHT_OBSERVERS = ("minmax", "mse")
_CLIP_RATIOS = torch.linspace(1.0, 0.5, 51)


def quantize_weight(w: torch.Tensor, observer: str = "minmax", bits: int = 8,
                    axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8, the one weight quantizer of both IRs: W with its output channels
    on `axis` (W[N, K] for a linear: axis 0; an ONNX MatMul's W[K, N]: axis 1; a conv's W[C_out, …]: axis 0)
    -> (int8 codes of W's shape in ±WEIGHT_QMAX[bits], float32[N] scale); each channel's clip comes from all
    its other elements."""
    if observer not in WEIGHT_OBSERVERS:
        raise OptionError(f"weight_observer={observer!r}: choose one of {', '.join(WEIGHT_OBSERVERS)}")
    qmax = WEIGHT_QMAX[bits]
    rows = w.detach().float().movedim(axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    amax = row_amax(flat)
    if observer == "mse":
        amax = _mse_row_clip(flat, amax, qmax)
    scale = scale_from_range(amax, qmax)
    return quantize_rows(flat, scale[:, None], qmax).reshape(rows.shape).movedim(0, axis), scale


def _mse_row_clip(w: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row, the clip c = r·max|W_row| (r in [0.5, 1]) with the least squared error."""
    best, best_err = amax.clone(), torch.full_like(amax, math.inf)
    for ratio in _CLIP_RATIOS.tolist():
        clip = amax * ratio
        scale = scale_from_range(clip, qmax)[:, None]
        err = (fake_quantize(w, scale, qmax) - w).pow(2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best


class Observer:
    """Accumulates activation statistics over calibration batches; `scale()` gives the int8 scale."""

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def clip(self) -> float:
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        return scale_from_range(self.clip())


class MinMaxObserver(Observer):
    def __init__(self) -> None:
        self.amax = 0.0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.amax = max(self.amax, x.detach().abs().max().item())

    def clip(self) -> float:
        return self.amax


class MovingAverageObserver(Observer):
    """c ← (1 − a)·c + a·max|x_batch| (the first batch sets c)."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        self.a = averaging_constant
        self.amax: float | None = None

    def observe(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        batch = x.detach().abs().max().item()
        self.amax = batch if self.amax is None else (1 - self.a) * self.amax + self.a * batch

    def clip(self) -> float:
        return self.amax or 0.0


class HistogramObserver(Observer):
    """Histogram of |x| over [0, upper], `bins` bins; the range doubles when exceeded."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.upper = 0.0

    def observe(self, x: torch.Tensor) -> None:
        values = x.detach().abs().flatten().float()
        if not values.numel():
            return
        top = values.max().item()
        if top <= 0 and self.upper == 0:
            self.counts[0] += values.numel()
            return
        if self.upper == 0:
            self.upper = top
        while top > self.upper:
            self._double()
        self.counts += torch.histc(values, bins=self.bins, min=0.0, max=self.upper).double()

    def _double(self) -> None:
        merged = self.counts.view(-1, 2).sum(dim=1)
        self.counts = torch.cat([merged, torch.zeros(self.bins - merged.numel(), dtype=torch.float64)])
        self.upper *= 2

    def _edges(self) -> torch.Tensor:
        """Upper edge of each bin."""
        return torch.arange(1, self.bins + 1, dtype=torch.float64) * (self.upper / self.bins)


class PercentileObserver(HistogramObserver):
    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def clip(self) -> float:
        total = self.counts.sum()
        if self.upper == 0 or total == 0:
            return 0.0
        cumulative = torch.cumsum(self.counts, 0) / total
        index = int(torch.searchsorted(cumulative, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return self._edges()[min(index, self.bins - 1)].item()


class MSEObserver(HistogramObserver):
    """The clip minimising the expected squared int8 error over the observed histogram."""

    def clip(self) -> float:
        if self.upper == 0 or self.counts.sum() == 0:
            return 0.0
        width = self.upper / self.bins
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        clips = self._edges()                         # candidate i clips at the upper edge of bin i
        n = self.counts

        def tail(v: torch.Tensor) -> torch.Tensor:    # sum over bins j > i
            return torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0]) - v

        # inside the range: values below half a step round to 0 (error v²), the rest carry
        # uniform rounding noise step²/12; `small` counts the bins below half a step
        steps = clips / QMAX
        small = torch.searchsorted(centers, steps / 2)
        counts, squares = _cumsum0(n), _cumsum0(n * centers ** 2)
        inside = torch.arange(1, self.bins + 1)
        rounding = squares[small] + (counts[inside] - counts[small]) * steps ** 2 / 12
        clipped = tail(n * centers ** 2) - 2 * clips * tail(n * centers) + clips ** 2 * tail(n)
        error = (rounding + clipped)[self.bins // 64:]  # clips below 1/64 of the range never win
        return clips[self.bins // 64 + int(error.argmin())].item()


def _cumsum0(v: torch.Tensor) -> torch.Tensor:
    """[0, v0, v0+v1, …]: sums of the first i entries."""
    return torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])


OBSERVERS = ("minmax", "moving_average", "percentile", "mse")


def make_observer(name: str, percentile: float = 99.99, averaging_constant: float = 0.01) -> Observer:
    """An activation observer by name (see the module docstring)."""
    if name == "minmax":
        return MinMaxObserver()
    if name == "moving_average":
        return MovingAverageObserver(averaging_constant)
    if name == "percentile":
        return PercentileObserver(percentile)
    if name == "mse":
        return MSEObserver()
    raise OptionError(f"observer={name!r}: choose one of {', '.join(OBSERVERS)}")
