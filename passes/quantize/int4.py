"""Group-wise int4 weights for `quantize="int4-weight-only"`, and the activation-aware scale search.

Round to nearest (RTN), per group g of K (``group_size`` columns) of each row n:

    lo = min(0, min W[n, g]),  hi = max(0, max W[n, g]),  s = (hi − lo) / 15,  z = round(−lo / s) ∈ [0, 15]
    q = clamp(round(W / s) + z, 0, 15),   Ŵ = (q − z) · s,   |Ŵ − W| ≤ s / 2

(the range holds 0, so z is a valid code and nothing is clipped: the error is
half a step everywhere).

Activation-aware scaling (AWQ-like; with calibration data, `quantize_options["awq"]`):
a weight column k that meets large activations |x_k| matters more. With
a_k = mean |x_k| over the calibration rows X and a per-channel factor
c = a^α / sqrt(max a^α · min a^α), the layer computes

    y = (x / c) · RTN(W · c)ᵀ          (exactly x Wᵀ before rounding)

so salient columns are scaled up before rounding and their relative error
shrinks. α is searched on the grid AWQ_GRID to minimise ‖X Ŵ_cᵀ − X Wᵀ‖²
on the calibration rows; α = 0 (c = 1) is plain RTN, so the chosen scaling
is never worse than RTN on those rows. The division by c is one
multiplication of the layer's input by a constant vector.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from graphopt.kernels import pack_int4

from .calibrate import calibrate
from .sites import Site

AWQ_GRID = tuple(i / 10 for i in range(11))
#: Calibration rows kept per layer input for the scale search (evenly subsampled beyond).
MAX_ROWS = 2048
MIN_SCALE = 1e-12


def int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of W[N, K]: (codes uint8 [N, K], scales float32 [N, G], zeros uint8 [N, G])."""
    w = w.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)
    lo = padded.amin(dim=2).clamp(max=0)
    hi = padded.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = torch.clamp(torch.round(padded / scale[:, :, None]) + zero[:, :, None], 0, 15)
    return codes.view(n, -1)[:, :k].to(torch.uint8), scale, zero.to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of W[N, K] in the kernel format: (packed uint8 [N, ceil(K/2)], scales [N, G], zeros uint8 [N, G])."""
    codes, scale, zero = int4_codes(w, group_size)
    return pack_int4(codes), scale, zero


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Ŵ = (q − z) · s of the RTN, as float32 [N, K]."""
    codes, scale, zero = int4_codes(w, group_size)
    k = w.shape[1]
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.float() - z) * s


def awq_scale(w: torch.Tensor, rows: torch.Tensor, group_size: int,
              grid: Sequence[float] = AWQ_GRID) -> tuple[torch.Tensor, float, float, float]:
    """(c [K], α, RTN error, chosen error): the per-channel factor minimising ‖X Ŵ_cᵀ − X Wᵀ‖² (see above)."""
    w = w.detach().float()
    x = rows.float()
    exact = x @ w.T
    a = x.abs().mean(dim=0).clamp(min=1e-6)
    best = (torch.ones_like(a), 0.0, float("inf"))
    rtn_error = float("inf")
    for alpha in grid:
        c = a.pow(alpha)
        c = c / (c.max() * c.min()).sqrt()
        approx = (x / c) @ fake_quantize_int4(w * c, group_size).T
        error = float((approx - exact).pow(2).sum())
        if alpha == 0:
            rtn_error = error
        if error < best[2]:
            best = (c, float(alpha), error)
    return best[0], best[1], rtn_error, best[2]


def collect_rows(gm: fx.GraphModule, sites: list[Site], batches: list, progress: bool) -> dict[str, torch.Tensor]:
    """Calibration rows [R ≤ MAX_ROWS, K] of each site's input, by input node name."""
    seen: dict[str, list[torch.Tensor]] = {}

    def keeper(name: str):
        def keep(value: torch.Tensor) -> None:
            seen[name].append(value.detach().reshape(-1, value.shape[-1]).float())
        return keep

    watch = {}
    for site in sites:
        if site.x.name not in watch:
            seen[site.x.name] = []
            watch[site.x.name] = [keeper(site.x.name)]
    calibrate(gm, batches, watch, progress, desc="int4 activation-aware calibration")
    rows = {}
    for name, parts in seen.items():
        if parts:
            x = torch.cat(parts)
            if x.shape[0] > MAX_ROWS:
                x = x[torch.linspace(0, x.shape[0] - 1, MAX_ROWS).long()]
            rows[name] = x
    return rows


def output_head(gm: fx.GraphModule, sites: list[Site]) -> str | None:
    """The node name of the output head: the last linear (graph order) whose result reaches a graph output
    without passing through another linear (an LM's lm_head, a classifier's last layer)."""
    site_nodes = {s.node for s in sites}
    for site in reversed(sites):
        stack, visited = [site.node], set()
        while stack:
            node = stack.pop()
            if node in visited:
                continue
            visited.add(node)
            if node.op == "output":
                return site.node.name
            stack.extend(u for u in node.users if u not in site_nodes)
    return None


class Int4Plan:
    """How one linear is rewritten under int4-weight-only: its form and its activation-aware factor."""

    def __init__(self, form: str, channel_scale: torch.Tensor | None = None, alpha: float | None = None) -> None:
        self.form = form                    # "int4" | "int8" (w8a16, the output head's default)
        self.channel_scale = channel_scale  # c [K] (None: plain RTN)
        self.alpha = alpha


def quantized_bytes(form: str, n: int, k: int, group_size: int) -> int:
    """Bytes of the quantized weight with its scales: int4 codes + float32 scale and uint8 zero per group."""
    if form == "int4":
        return n * ((k + 1) // 2) + 5 * n * (-(-k // group_size))
    return n * k + 4 * n
