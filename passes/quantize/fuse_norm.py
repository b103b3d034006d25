"""LayerNorm fused into the per-token quantization it feeds (level O2, CUDA graphs only).

    y = layer_norm(x, [K], w, b, eps);  x_q, s_x = quantize_per_token(reshape(y, [-1, K]), smooth)
    ⇒  y₂, x_q, s_x = layer_norm_quantize(reshape(x, [-1, K]), w, b, eps, smooth);  y = reshape(y₂, y.shape)

The fused kernel writes y (which residual adds and other layers still read)
and quantizes the y it wrote, so x_q and s_x are what quantize_per_token(y)
gives for that y: one read of y from memory is saved per fused pair. Its y
is a LayerNorm computed in float32 and rounded once to y's dtype, as torch's
kernel does, but the two sum in different orders: y can differ in the last
bit, and an int8 code next to a rounding boundary by one step. The pass
therefore declares a budget (cosine ≥ 0.9999 against the graph before it)
instead of claiming to be lossless.

Rejections (reason codes):
    DEVICE          the graph runs on the CPU: there the fused op is the same two
                    torch ops (no memory saved), so the graph is left as it is
    WRONG_AXIS      the LayerNorm normalizes more than the last dimension
    ALREADY_DONE    another quantize of the same LayerNorm output was fused already
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject
from graphopt.engine.verify import Budget

aten = torch.ops.aten
PATTERN = "layer_norm → quantize_per_token"


class FuseLayerNormQuantize(Pass):
    name = "fuse_layer_norm_quantize"
    level = 2
    budget = Budget(min_cosine=0.9999)   # last-bit differences of y flip codes next to a boundary (docstring)

    def __init__(self, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.devices = devices   # where the fused kernel pays (tests widen it to exercise the rewrite on CPU)

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        fused: set[fx.Node] = set()
        for quantize in ir.find_nodes(gm, torch.ops.graphopt.quantize_per_token.default):
            norm, reason = _layer_norm_feeding(quantize, fused, self.devices)
            if norm is None:
                if reason is not None:
                    log.rejected(PATTERN, quantize, reason)
                continue
            _fuse(gm.graph, norm, quantize)
            fused.add(norm)
            log.matched(PATTERN)
        gm.graph.eliminate_dead_code()
        return log.result(gm)


def _layer_norm_feeding(quantize: fx.Node, fused: set[fx.Node],
                        devices: tuple[str, ...]) -> tuple[fx.Node | None, Reject | None]:
    """The aten.layer_norm whose output (maybe reshaped to 2-D) quantize reads, or (None, why not);
    (None, None) when quantize's input is not a LayerNorm at all."""
    x2 = quantize.args[0]
    norm = x2.args[0] if ir.is_op(x2, aten.reshape, aten.view) else x2
    if not ir.is_op(norm, aten.layer_norm):
        return None, None
    value = ir.val(norm)
    if not isinstance(value, torch.Tensor) or value.device.type not in devices:
        return None, Reject(Reason.DEVICE, f"on {getattr(value, 'device', '?')}: the fused kernel is a CUDA kernel")
    if len(norm.args[1]) != 1:
        return None, Reject(Reason.WRONG_AXIS, "normalizes more than the last dimension")
    if norm in fused:
        return None, Reject(Reason.ALREADY_DONE, "this LayerNorm is fused with another quantize already")
    return norm, None


def _fuse(graph: fx.Graph, norm: fx.Node, quantize: fx.Node) -> None:
    x, shape = norm.args[0], norm.args[1]
    weight, bias = (list(norm.args[2:4]) + [None, None])[:2]
    eps = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("eps", 1e-5)
    smooth = quantize.args[1] if len(quantize.args) > 1 else quantize.kwargs.get("smooth")
    with graph.inserting_before(norm.next):   # y must exist before the LayerNorm's first user
        x2 = graph.call_function(aten.reshape.default, (x, [-1, shape[0]]))
        triple = graph.call_function(torch.ops.graphopt.layer_norm_quantize.default, (x2, weight, bias, eps, smooth))
        y2, q, s = (graph.call_function(operator.getitem, (triple, i)) for i in range(3))
        dims = [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (x, i))
                for i, d in enumerate(ir.shape(norm))]
        y = graph.call_function(aten.reshape.default, (y2, dims))
    for user in list(quantize.users):        # getitem 0 / 1 of the (x_q, s_x) pair
        user.replace_all_uses_with(q if user.args[1] == 0 else s)
    norm.replace_all_uses_with(y)
