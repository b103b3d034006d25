"""SmoothQuant (level O2, float-exact): move activation outliers into the weights.

For linears sharing an input X[·, K] with weights W_i[N_i, K], per input channel j

    s_j = max|X_j|^α / max_i max_n |W_i[n, j]|^(1−α)
    X W_iᵀ = (X · diag(s)⁻¹) (W_i · diag(s))ᵀ

so the float result is unchanged (to rounding) while the activation's
per-channel range is flattened and int8 per-token activations lose less.
diag(s)⁻¹ is folded into what produces X when it can be:

    layer_norm(x, γ, β) → linears     ⇒  layer_norm(x, γ/s, β/s)     (every user is a smoothed linear)
    linear(z, V, c)     → linears     ⇒  linear(z, V/s[:, None], c/s)
    otherwise                          ⇒  div(X, s) before the linears; the int8 rewrite absorbs
                                          it into the activation quantization (no extra pass over X)

α is given (`quantize_options["alpha"]`) or searched per group over
`alpha_grid`: the α whose simulated W8A8 output error ‖Q(X/s) Q(W·s)ᵀ − X Wᵀ‖²
on held-out calibration rows is least (s fitted on the other rows), kept only if it
beats no smoothing at all.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject

from .calibrate import as_inputs, calibrate
from .config import QuantConfig
from .observers import fake_quantize, per_token_fake_quantize, quantize_weight, scale_from_range
from .sites import Site, find_sites

aten = torch.ops.aten
#: Bounds of s: keeps both X/s and W·s within float range for dead (all-zero) channels.
S_MIN, S_MAX = 1e-4, 1e4
#: Floor of a channel's calibrated range, relative to the mean channel range (see smoothing_factors).
SILENT_FLOOR = 0.1
#: Calibration rows kept per group for the α search.
SAMPLE_ROWS = 512


class ChannelStats:
    """Per-input-channel max|X_j| over all rows, plus a sample of rows for the α search."""

    def __init__(self, seed: int = 0) -> None:
        self.amax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        batch_max = flat.abs().amax(dim=0)
        self.amax = batch_max if self.amax is None else torch.maximum(self.amax, batch_max)
        keep = torch.randperm(flat.shape[0], generator=self.generator)[:SAMPLE_ROWS]
        self.rows.append(flat[keep])

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.randperm(rows.shape[0], generator=self.generator)[:SAMPLE_ROWS]]


def smoothing_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), clamped to [S_MIN, S_MAX].

    A channel (nearly) silent on the calibration data would get a tiny s_j and be
    amplified by 1/s_j on inputs where it is not silent; its max|X_j| is floored
    at SILENT_FLOOR × the mean channel range.
    """
    x_amax = x_amax.clamp(min=max(SILENT_FLOOR * x_amax.mean().item(), 1e-5))
    w_amax = w_amax.clamp(min=1e-5)
    return (x_amax.pow(alpha) / w_amax.pow(1 - alpha)).clamp(S_MIN, S_MAX)


def simulated_error(fit: torch.Tensor, held: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None,
                    static: bool, weight_bits: int = 8) -> float:
    """‖Q(X/s) Q(W·s)ᵀ − X Wᵀ‖² on the held-out rows, summed over the group.

    The activation quantizer is the scheme's: per token, or (static) one scale taken
    from the fitting rows, so a range that does not generalize is paid for in clipping.
    """
    xs = held if s is None else held / s
    if static:
        fitted = fit if s is None else fit / s
        xq = fake_quantize(xs, scale_from_range(fitted.abs().max()))
    else:
        xq = per_token_fake_quantize(xs)
    total = 0.0
    for w in weights:
        ws = w if s is None else w * s
        w_q, w_scale = quantize_weight(ws, bits=weight_bits)
        total += ((xq @ (w_q.float() * w_scale[:, None]).t()) - held @ w.t()).pow(2).sum().item()
    return total


class SmoothQuant(Pass):
    name = "smoothquant"
    level = 2

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        config = self.config
        log = RewriteLog()
        groups: dict[fx.Node, list[Site]] = {}
        for site in find_sites(gm, config.min_in_features, config.exclude):
            if site.reason is None:
                groups.setdefault(site.x, []).append(site)
        stats = {x: ChannelStats(i) for i, x in enumerate(groups)}
        batches = [as_inputs(gm, b) for b in config.batches]
        calibrate(gm, batches, {x.name: [stats[x].observe] for x in groups}, config.progress,
                  desc="SmoothQuant statistics")
        smoothed = []
        for x, group in groups.items():
            weights = [site.weight(gm).float() for site in group]
            alpha, s, gain = self._choose(stats[x], weights)
            names = [site.name for site in group]
            if s is None:
                log.rejected("smoothquant", x, Reject(Reason.NO_GAIN, "no α lowers the simulated int8 error on "
                                                                      f"held-out calibration rows of {', '.join(names)}"))
                continue
            target = _apply(gm, x, group, s.to(ir.dtype(x)))
            log.matched(f"smooth → {target}")
            smoothed.append({"layers": names, "alpha": alpha, "folded_into": target, "error_ratio": gain})
        ir.drop_unused_attributes(gm)
        return log.result(gm, smoothing=smoothed)

    def _choose(self, stats: ChannelStats, weights: list[torch.Tensor]) -> tuple[float | None, Any, float]:
        """(α, s, error with s / error without) — s None when smoothing does not help."""
        w_amax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        static = self.config.scheme == "int8-static"
        bits = self.config.weight_bits_for(weights[0].device)
        if self.config.alpha != "search":
            return self.config.alpha, smoothing_factors(stats.amax, w_amax, self.config.alpha), 1.0
        # α is fitted on half the sampled rows and judged on the other half, so smoothing
        # factors that only fit the calibration rows (e.g. few rows, silent channels) lose
        rows = stats.sample()
        fit, held = rows[0::2], rows[1::2]
        if held.shape[0] == 0:
            return None, None, 1.0
        fit_amax = fit.abs().amax(dim=0)
        baseline = simulated_error(fit, held, weights, None, static, bits)
        best: tuple[float | None, Any, float] = (None, None, baseline)
        for alpha in self.config.alpha_grid:
            error = simulated_error(fit, held, weights, smoothing_factors(fit_amax, w_amax, alpha), static, bits)
            if error < best[2]:
                best = (alpha, smoothing_factors(stats.amax, w_amax, alpha), error)
        alpha, s, error = best
        return alpha, s, (error / baseline if baseline > 0 else 1.0)


def _apply(gm: fx.GraphModule, x: fx.Node, group: list[Site], s: torch.Tensor) -> str:
    """Scale the group's weights by s and divide X by s where X is made; returns where."""
    for site in group:
        site.set_weight(gm, site.weight(gm) * s.to(site.weight(gm).dtype))
    users = set(x.users)
    group_nodes = {site.node for site in group}
    if users <= group_nodes and ir.is_op(x, aten.layer_norm) and _fold_layer_norm(gm, x, s):
        return "layer_norm"
    if users <= group_nodes and ir.is_op(x, aten.linear) and _fold_linear(gm, x, s):
        return "linear"
    first = min(group_nodes, key=_position(gm))
    s_node = ir.add_constant(gm, f"{x.name}_smooth", s, parameter=False)
    with gm.graph.inserting_before(first):
        div = gm.graph.call_function(aten.div.Tensor, (x, s_node))
    div.meta["val"] = ir.val(x)
    for node in group_nodes:
        node.replace_input_with(x, div)
    return "div"


def _position(gm: fx.GraphModule) -> Any:
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _fold_layer_norm(gm: fx.GraphModule, ln: fx.Node, s: torch.Tensor) -> bool:
    """γ, β ← γ/s, β/s when the LayerNorm normalizes the last axis and has constant affines."""
    args = list(ln.args) + [None] * (5 - len(ln.args))
    shape, gamma, beta = args[1], args[2], args[3]
    if len(shape) != 1 or not isinstance(gamma, fx.Node) or gamma.op != "get_attr":
        return False
    if beta is not None and (not isinstance(beta, fx.Node) or beta.op != "get_attr"):
        return False
    new_args = list(ln.args)
    for index, node in ((2, gamma), (3, beta)):
        if node is None:
            continue
        value = ir.get_attr_value(gm, node)
        new_args[index] = ir.add_constant(gm, f"{node.target}_smoothed", value / s.to(value.dtype), before=ln)
    ln.args = tuple(new_args)
    return True


def _fold_linear(gm: fx.GraphModule, lin: fx.Node, s: torch.Tensor) -> bool:
    """V, c ← V / s[:, None], c / s for the linear that produces X (constant weight and bias)."""
    weight, bias = lin.args[1], lin.args[2] if len(lin.args) > 2 else None
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return False
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return False
    new_args = list(lin.args)
    w = ir.get_attr_value(gm, weight)
    new_args[1] = ir.add_constant(gm, f"{weight.target}_smoothed", w / s.to(w.dtype)[:, None], before=lin)
    if bias is not None:
        b = ir.get_attr_value(gm, bias)
        new_args[2] = ir.add_constant(gm, f"{bias.target}_smoothed", b / s.to(b.dtype), before=lin)
    lin.args = tuple(new_args)
    return True
