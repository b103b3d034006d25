"""Int8 rewrite (level O2, lossy): linear layers onto the graphopt int8 kernels.

    linear(x, W, b) [→ act]  ⇒  x₂ = reshape(x, [-1, K])
        int8-dynamic:       x_q, s_x = quantize_per_token(x₂, smooth)         per-row scale at run time
        int8-static:        x_q = clamp(round(x₂ · (1 / (s·smooth))), ±127);  s_x = expand(s, [M])
        W8A8:               y₂ = int8_linear(x_q, W_q, s_x, s_W, b, act)      act ∈ relu, gelu, gelu_tanh, silu
        int8-weight-only:   y₂ = w8a16_linear(x₂, W_q, s_W, b)                 (act stays a separate node)
        int4-weight-only:   y₂ = w4a16_linear(x₂ · (1/c), P, s, z, group_size, b)   group-wise int4 of W·c
                            (int4.py: RTN, c = 1 or the activation-aware factor; the output head
                            takes the int8-weight-only form by default, quantize_options["head"])
                            y  = reshape(y₂, [*x.shape[:-1], N])

with W_q = clamp(round(W / s_W[:, None]), ±q) per output channel (s_W[n] =
max_k |W[n, k]| / q; q = 63 (7 bits) for W8A8 on the CPU, whose fast int8 GEMM
is exact only with 7-bit weights, else q = 127) and s_x per token (dynamic) or per tensor from the
calibration observer (static). `matmul(x, W[K, N])` with a constant W is the
same with W ← Wᵀ. A SmoothQuant `div(x, smooth)` in front of the layer is
absorbed into the quantization of x. The output error of one layer is bounded
by the steps: |Δy[m, n]| ≤ Σ_k (|x̂| s_W[n]/2 + |W| s_x[m]/2) (+ clipping for
static scales), which is what the tests check.

M is read from the graph with `sym_size`, so a dynamic batch stays dynamic.
The int8 weight and its scales are buffers (int8 bytes: the module shrinks
~4×) and survive `state_dict()`. Layers that cannot or should not run int8
stay float with their reason in the report (with a speed check, also a layer
whose int8 form is measurably slower on this target: layer_speed.py); convolutions stay float,
in torch (no int8 convolution kernel for CPU) and in the ONNX export (ONNX
Runtime ran ConvInteger ~40× and DequantizeLinear → Conv ~18× slower than a
float Conv on this CPU: `graphopt.passes.onnx.quantize.CONV_REASON`);
`optimize_onnx`'s int8-static quantizes them with calibrated QDQ.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject
from graphopt.engine.schemes import Scheme
from graphopt.engine.verify import Budget

from . import fallback, layer_speed
from .calibrate import as_inputs, calibrate, layer_name, run_batches
from .config import DEFAULT_MIN_COSINE, DEFAULT_MIN_COSINE_INT4, QuantConfig
from .int4 import Int4Plan, awq_scale, collect_rows, output_head, quantize_int4, quantized_bytes
from .observers import QMAX, WEIGHT_QMAX, make_observer, quantize_weight, row_amax
from .sites import Site, find_sites

aten = torch.ops.aten
ACTIVATIONS = {aten.relu: "relu", aten.silu: "silu"}   # gelu: by its `approximate` argument


def budget_for(config: QuantConfig) -> Budget:
    """The error the pass may add, checked by the pass manager on its verification inputs."""
    fidelity = config.fidelity
    if fidelity is None:
        return Budget(min_cosine=DEFAULT_MIN_COSINE_INT4 if config.scheme == "int4-weight-only" else DEFAULT_MIN_COSINE)
    if fidelity.kind == "cosine":
        return Budget(min_cosine=fidelity.threshold)
    if fidelity.kind == "sqnr":   # noise orthogonal to the signal: cos = 1 / sqrt(1 + 10^(−SQNR/10))
        return Budget(min_cosine=(1 + 10 ** (-fidelity.threshold / 10)) ** -0.5)
    return Budget()                # the user's metric is enforced by the fallback, on the user's data


class QuantizeLinears(Pass):
    level = 2

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.name = Scheme(config.scheme).pass_name          # int8_dynamic | int8_static | int8_weight_only
        self.budget = budget_for(config)

    def run(self, gm: fx.GraphModule) -> PassResult:
        config = self.config
        log = RewriteLog()
        sites = find_sites(gm, config.min_in_features, config.exclude)
        eligible = [s.node.name for s in sites if s.reason is None]
        batches = [as_inputs(gm, b) for b in config.batches]
        scales = self._calibrate(gm, sites, batches) if config.scheme == "int8-static" else {}
        if config.scheme == "int4-weight-only":
            scales = self._plan_int4(gm, sites, batches)
            eligible = [name for name in eligible if name in scales]
        selection = None
        if config.fidelity is not None and eligible:
            float_gm = ir.copy_sharing_tensors(gm)     # rewrites make new tensors: the copies share the weights
            reference = run_batches(float_gm, batches)
            selection = fallback.select(eligible, lambda names: quantized_copy(float_gm, names, config, scales),
                                        config.fidelity, batches, reference, config.progress)
            chosen = set(selection.quantized)
        else:
            chosen = set(eligible)
        slower = layer_speed.slower_layers(gm, [s for s in sites if s.node.name in chosen], config.scheme,
                                           lambda w: weight_bits(config, w), config.speed,
                                           config.group_size) if config.speed else {}
        chosen -= set(slower)
        bytes_before = bytes_after = 0
        layers = []
        for site in sites:
            row = {"layer": site.name, "op": ir.overload_packet(site.node.target).__name__,
                   "shape": _shape(gm, site)}
            float_bytes = _nbytes(ir.val(site.weight_node))
            bytes_before += float_bytes
            if site.reason is None and site.node.name in chosen:
                n, k = site.weight(gm).shape
                if _on_int8_grid(site.weight(gm), WEIGHT_QMAX[weight_bits(config, site.weight(gm))]):
                    row["note"] = "weight already quantized (on a per-channel int8 grid): requantized exactly"
                plan = scales.get(site.node.name)
                form = plan.form if isinstance(plan, Int4Plan) else "int8"
                row.update(scheme="int4-weight-only" if form == "int4" else
                           "int8-weight-only" if not config.w8a8 else config.scheme,
                           runs=rewrite_site(gm, site, config, plan))
                if isinstance(plan, Int4Plan) and form == "int8":
                    row["note"] = "output head: int8 per channel (quantize_options['head'])"
                bytes_after += quantized_bytes(form, n, k, config.group_size)
                log.matched(f"{row['op']} → int8")
            else:
                reason = site.reason or (
                    Reject(Reason.SLOWER, slower[site.node.name]) if site.node.name in slower else
                    Reject(Reason.NOT_ELIGIBLE, "output head kept float (quantize_options['head'])")
                    if config.scheme == "int4-weight-only" and site.node.name not in scales else
                    Reject(Reason.ACCURACY, "fell back to float: most sensitive layer, the accuracy budget needs it"))
                row.update(scheme="float", runs="torch float", reason=reason.message)
                bytes_after += float_bytes
                log.rejected(row["op"], site.node, reason)
            if selection is not None and site.node.name in selection.sensitivity:
                row.update(sensitivity=selection.sensitivity[site.node.name],
                           error_share=selection.share[site.node.name])
            layers.append(row)
        unsmoothed = unsmooth_float_layers(gm, [site for site in sites if site.node.name not in chosen])
        ir.drop_unused_attributes(gm)
        stats: dict[str, Any] = {"layers": layers, "scheme": config.scheme, "unsmoothed": unsmoothed,
                                 "weight_bytes": {"before": bytes_before, "after": bytes_after}}
        if selection is not None:
            stats["accuracy"] = {"budget": config.fidelity.describe(), "met": selection.met,
                                 "float": selection.float_score, "int8": selection.score,
                                 "history": selection.history, "fallback": _names(sites, selection.fallback)}
        return log.result(gm, **stats)

    def _calibrate(self, gm: fx.GraphModule, sites: list[Site], batches: list) -> dict[str, torch.Tensor]:
        """Static scale of every eligible layer's (smoothed) input, by linear node name."""
        config = self.config
        observers, watch = {}, {}
        for site in sites:
            if site.reason is None:
                observer = make_observer(config.observer, config.percentile, config.averaging_constant)
                observers[site.node.name] = observer
                watch.setdefault(site.x.name, []).append(observer.observe)
        calibrate(gm, batches, watch, config.progress, desc="int8 calibration")
        return {name: observer.scale() for name, observer in observers.items()}

    def _plan_int4(self, gm: fx.GraphModule, sites: list[Site], batches: list) -> dict[str, Int4Plan]:
        """Each eligible linear's int4 plan: the output head by its policy (left out when kept float), the
        others int4, with the activation-aware factor when `awq` is on."""
        config = self.config
        eligible = [s for s in sites if s.reason is None]
        head = output_head(gm, sites)
        rows = collect_rows(gm, eligible, batches, config.progress) if config.awq else {}
        plans = {}
        for site in eligible:
            if site.node.name == head and config.head != "int4":
                if config.head == "int8":
                    plans[site.node.name] = Int4Plan("int8")
                continue
            x_rows = rows.get(site.x.name)
            if x_rows is None:
                plans[site.node.name] = Int4Plan("int4")
                continue
            c, alpha, _, _ = awq_scale(site.weight(gm), x_rows, config.group_size)
            plans[site.node.name] = Int4Plan("int4", None if alpha == 0 else c, alpha)
        return plans


def quantized_copy(gm: fx.GraphModule, names: Sequence[str], config: QuantConfig,
                   scales: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of `gm` (sharing its tensors) with the linears named `names` (node names) rewritten to int8."""
    copied = ir.copy_sharing_tensors(gm)
    wanted = set(names)
    for site in find_sites(copied, config.min_in_features, config.exclude):
        if site.node.name in wanted:
            rewrite_site(copied, site, config, scales.get(site.node.name))
    copied.recompile()
    return copied


def rewrite_site(gm: fx.GraphModule, site: Site, config: QuantConfig, x_scale: torch.Tensor | None) -> str:
    """Replace one linear (and a fusable activation after it) by the int8 ops; says what runs."""
    if isinstance(x_scale, Int4Plan) and x_scale.form == "int4":
        return _rewrite_int4(gm, site, config.group_size, x_scale)
    graph, node = gm.graph, site.node
    x, smooth = _unsmoothed_input(gm, site) if config.w8a8 else (site.x, None)
    weight = site.weight(gm)
    w_q, w_scale = quantize_weight(weight, config.weight_observer, weight_bits(config, weight))
    n, k = w_q.shape
    out_dtype = ir.dtype(node)
    act_node, activation = _fusable_activation(node) if config.w8a8 else (None, "none")
    wq_node = ir.add_constant(gm, f"{site.name}_w_int8", w_q, parameter=False)
    ws_node = ir.add_constant(gm, f"{site.name}_w_scale", w_scale, parameter=False)
    bias = site.bias
    if bias is not None and ir.dtype(bias) != out_dtype:
        raise AssertionError(f"bias dtype {ir.dtype(bias)} differs from the output's {out_dtype}")
    with graph.inserting_before(node):
        x_shape = ir.shape(x)
        x2 = x if len(x_shape) == 2 else graph.call_function(aten.reshape.default, (x, [-1, k]))
        if not config.w8a8:
            y2 = graph.call_function(torch.ops.graphopt.w8a16_linear.default, (x2, wq_node, ws_node, bias))
            runs = "graphopt::w8a16_linear"
        else:
            if config.scheme == "int8-dynamic":
                x_q, s_x = _quantize_dynamic(gm, x2, smooth, site.name)
            else:
                x_q, s_x = _quantize_static(gm, x2, x_scale, smooth, out_dtype, site.name)
            y2 = graph.call_function(torch.ops.graphopt.int8_linear.default,
                                     (x_q, wq_node, s_x, ws_node, bias),
                                     {"activation": activation, "out_dtype": out_dtype})
            runs = "graphopt::int8_linear" + (f" + {activation} epilogue" if activation != "none" else "")
        y = y2 if len(x_shape) == 2 else graph.call_function(
            aten.reshape.default, (y2, [*_dims(graph, x, x_shape[:-1]), n]))
    last = act_node if act_node is not None else node
    ir.replace_all_uses(last, y)
    ir.erase_unused(graph, [n_ for n_ in (act_node, node, site.x if smooth is not None else None) if n_ is not None])
    return runs


def _rewrite_int4(gm: fx.GraphModule, site: Site, group_size: int, plan: Int4Plan) -> str:
    """linear(x, W, b) ⇒ w4a16_linear(x₂ · (1/c), int4(W · c), b), reshaped back; says what runs."""
    graph, node = gm.graph, site.node
    weight = site.weight(gm).float()
    c = plan.channel_scale
    packed, scales, zeros = quantize_int4(weight if c is None else weight * c[None, :], group_size)
    n, k = weight.shape
    nodes = [ir.add_constant(gm, f"{site.name}_w_int4", packed, parameter=False),
             ir.add_constant(gm, f"{site.name}_w_scales", scales, parameter=False),
             ir.add_constant(gm, f"{site.name}_w_zeros", zeros, parameter=False)]
    x = site.x
    with graph.inserting_before(node):
        x_shape = ir.shape(x)
        x2 = x if len(x_shape) == 2 else graph.call_function(aten.reshape.default, (x, [-1, k]))
        if c is not None:
            inverse = ir.add_constant(gm, f"{site.name}_awq_inv_scale", (1.0 / c).to(ir.dtype(x)), parameter=False)
            x2 = graph.call_function(aten.mul.Tensor, (x2, inverse))
        y2 = graph.call_function(torch.ops.graphopt.w4a16_linear.default, (x2, *nodes, group_size, site.bias))
        y = y2 if len(x_shape) == 2 else graph.call_function(
            aten.reshape.default, (y2, [*_dims(graph, x, x_shape[:-1]), n]))
    ir.replace_all_uses(node, y)
    ir.erase_unused(graph, [node])
    return f"graphopt::w4a16_linear g{group_size}" + ("" if c is None else f" (activation-aware α={plan.alpha:g})")


def weight_bits(config: QuantConfig, weight: torch.Tensor) -> int:
    """The configured bits, except that a weight already on an 8-bit per-channel grid keeps 8 bits when the
    default would pick 7: it is then requantized exactly (its own codes), which beats the 7-bit fast path."""
    bits = config.weight_bits_for(weight.device)
    if config.weight_bits is None and bits == 7 and _on_int8_grid(weight, WEIGHT_QMAX[8]):
        return 8
    return bits


def unsmooth_float_layers(gm: fx.GraphModule, float_sites: list[Site]) -> list[str]:
    """SmoothQuant's div(x, s) in front of layers that all stay float goes back into their weights:

        (x / s) (W · s)ᵀ = x Wᵀ      (per input channel k: x_k / s_k · W[n, k] s_k)

    so a float layer pays no elementwise pass over its input for a smoothing nothing quantizes. A divide
    that also feeds an int8 layer was absorbed into that layer's quantization already, and the others
    keep theirs. Returns the layers whose weights were restored."""
    groups: dict[fx.Node, tuple[fx.Node, torch.Tensor, list[Site]]] = {}
    for site in float_sites:
        x, smooth = _unsmoothed_input(gm, site)
        if smooth is not None:
            groups.setdefault(site.x, (x, smooth, []))[2].append(site)
    restored = []
    for div, (x, smooth, group) in groups.items():
        if set(div.users) != {site.node for site in group} or ir.is_mutated(div):
            continue
        for site in group:
            target = str(site.weight_node.target)
            site.set_weight(gm, site.weight(gm) / smooth.to(site.weight(gm).dtype),
                            name=target.removesuffix("_smoothed") if target.endswith("_smoothed") else None)
            site.node.replace_input_with(div, x)
            restored.append(site.name)
        gm.graph.erase_node(div)
    return restored


def _unsmoothed_input(gm: fx.GraphModule, site: Site) -> tuple[fx.Node, torch.Tensor | None]:
    """(x, s) if the layer's input is SmoothQuant's div(x, s) with a constant s[K], else (input, None)."""
    x = site.x
    if ir.is_op(x, aten.div) and len(x.args) == 2 and isinstance(x.args[1], fx.Node):
        s = ir.const_value(gm, x.args[1])
        if isinstance(s, torch.Tensor) and s.dim() == 1 and s.numel() == site.in_features:
            return x.args[0], s.float()
    return x, None


def _quantize_dynamic(gm: fx.GraphModule, x2: fx.Node, smooth: torch.Tensor | None,
                      name: str) -> tuple[fx.Node, fx.Node]:
    graph = gm.graph
    smooth_node = None if smooth is None else ir.add_constant(gm, f"{name}_smooth", smooth, parameter=False)
    pair = graph.call_function(torch.ops.graphopt.quantize_per_token.default, (x2, smooth_node))
    return graph.call_function(operator.getitem, (pair, 0)), graph.call_function(operator.getitem, (pair, 1))


def _quantize_static(gm: fx.GraphModule, x2: fx.Node, scale: torch.Tensor, smooth: torch.Tensor | None,
                     dtype: torch.dtype, name: str) -> tuple[fx.Node, fx.Node]:
    """x_q = clamp(round(x · 1/(scale·smooth)), ±127) as int8; s_x = scale expanded to [M]."""
    graph = gm.graph
    inverse = 1.0 / (scale.reshape(1) * (smooth if smooth is not None else 1.0))
    inv_node = ir.add_constant(gm, f"{name}_x_inv_scale", inverse.to(dtype), parameter=False)
    scale_node = ir.add_constant(gm, f"{name}_x_scale", scale.reshape(1).float(), parameter=False)
    scaled = graph.call_function(aten.mul.Tensor, (x2, inv_node))
    rounded = graph.call_function(aten.round.default, (scaled,))
    clamped = graph.call_function(aten.clamp.default, (rounded, -QMAX, QMAX))
    x_q = graph.call_function(aten._to_copy.default, (clamped,), {"dtype": torch.int8})
    m = graph.call_function(aten.sym_size.int, (x2, 0))
    s_x = graph.call_function(aten.expand.default, (scale_node, [m]))
    return x_q, s_x


def _dims(graph: fx.Graph, x: fx.Node, sizes: Sequence[Any]) -> list[Any]:
    """Leading sizes of x: ints where static, `sym_size` nodes where symbolic."""
    return [s if isinstance(s, int) else graph.call_function(aten.sym_size.int, (x, i)) for i, s in enumerate(sizes)]


def _fusable_activation(node: fx.Node) -> tuple[fx.Node | None, str]:
    """The relu/gelu/silu that alone consumes the linear's output, and its epilogue name."""
    user = ir.only_user(node)
    if user is None or user.args[0] is not node:
        return None, "none"
    if ir.is_op(user, *ACTIVATIONS):
        return user, ACTIVATIONS[ir.overload_packet(user.target)]
    if ir.is_op(user, aten.gelu):
        approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
        return user, "gelu_tanh" if approximate == "tanh" else "gelu"
    return None, "none"


def _shape(gm: fx.GraphModule, site: Site) -> str:
    s = ir.shape(site.weight_node)
    if s is None or len(s) != 2:
        return "?"
    n, k = (s[1], s[0]) if site.transposed else s
    return f"{n}×{k}"


#: Weight elements `_on_int8_grid` checks at a time (4 MiB of float32 per temporary).
GRID_CHECK_ELEMENTS = 1 << 20


def _on_int8_grid(w: torch.Tensor, qmax: int) -> bool:
    """True if every row of W is an integer multiple of its own max|W_row| / qmax (within 1e-3 of a step).

    Checked a block of rows at a time, with two temporaries a block: on the whole of an LLM's output head (its
    largest weight) the check's temporaries (|W|, the codes, their rounding, allclose's own) were 4× the head
    at once, 2× the model's fp32 size for a small Llama."""
    rows = max(1, GRID_CHECK_ELEMENTS // max(1, w.shape[1]))
    for block in w.split(rows):
        codes = block.float() / (row_amax(block)[:, None] / qmax).clamp(min=1e-30)
        if not bool(codes.sub_(codes.round()).abs_().max() <= 1e-3):
            return False
    return True


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _names(sites: list[Site], node_names: Sequence[str]) -> list[str]:
    by_node = {s.node.name: s.name for s in sites}
    return [by_node.get(n, n) for n in node_names]
