"""Quantization-aware training for `finetune(qat=True)`: fake int8 on the layers the int8 pass quantizes.

For every linear-like node the int8 pass would rewrite (passes/quantize/sites.find_sites),
its input and weight are replaced by their fake-quantized values, as the int8
kernels will see them:

    x̃ = x + (q_tok(x) - x).detach()     q_tok: per-token (per-row) symmetric int8, s = max|x_row| / 127
    W̃ = W + (q_ch(W) - W).detach()     q_ch:  per-output-channel symmetric, s = max|W_row| / q

(q(v) = clamp(round(v / s), ±q) · s, q = 127 for tokens; for weights the code
range the int8 pass will use on the weight's device: 63 (7 bits) on the CPU,
127 elsewhere; the straight-through estimator passes the
gradient of the rounding as identity.) `strip` removes the fake-quant nodes
after training, leaving a float graph whose weights the int8 pass then
quantizes with the same per-channel scheme.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.passes.quantize.observers import (WEIGHT_QMAX, default_weight_bits, fake_quantize,
                                                per_token_fake_quantize, scale_from_range)
from graphopt.passes.quantize.sites import find_sites


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 fake quantization with a straight-through gradient."""
    rows = x.reshape(-1, x.shape[-1])
    return x + (per_token_fake_quantize(rows).reshape(x.shape).to(x.dtype) - x).detach()


def fake_quant_channels(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Per-output-channel int8 fake quantization of W[N, K] (W[K, N] when `transposed`), straight-through."""
    rows = w.t() if transposed else w
    qmax = WEIGHT_QMAX[default_weight_bits(w.device)]
    q = fake_quantize(rows, scale_from_range(rows.detach().abs().amax(dim=1, keepdim=True), qmax), qmax)
    return w + ((q.t() if transposed else q).to(w.dtype) - w).detach()


QAT_OPS = (fake_quant_tokens, fake_quant_channels)


def insert(gm: fx.GraphModule, min_in_features: int = 16, exclude: tuple[str, ...] = ()) -> list[str]:
    """Fake-quantize the inputs and weights of the int8-eligible layers of `gm` in place; their names."""
    names = []
    for site in find_sites(gm, min_in_features, exclude):
        if site.reason is not None:
            continue
        node = site.node
        with gm.graph.inserting_before(node):
            x = gm.graph.call_function(fake_quant_tokens, (site.x,))
            w = gm.graph.call_function(fake_quant_channels, (site.weight_node, site.transposed))
        node.args = (x, w, *node.args[2:])
        names.append(site.name)
    gm.graph.lint()
    gm.recompile()
    return names


def strip(gm: fx.GraphModule) -> None:
    """Remove the fake-quant nodes `insert` added, in place."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in QAT_OPS:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
