"""Where int8 can go: the linear layers of a graph, each eligible or rejected with a reason.

A site is `aten.linear(x, W[N, K], b)` or `aten.matmul(x, W[K, N])` (and
`aten.mm`) with a constant weight; its weight is always seen in the [N, K]
layout (out_features × in_features). Convolutions are not sites: they stay
float (see `rewrite`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from .calibrate import layer_name

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Site:
    node: fx.Node
    name: str
    reason: Reject | None = None   # None: eligible for int8

    @property
    def x(self) -> fx.Node:
        return self.node.args[0]

    @property
    def weight_node(self) -> fx.Node:
        return self.node.args[1]

    @property
    def transposed(self) -> bool:
        """matmul/mm keep the weight as [K, N]."""
        return not ir.is_op(self.node, aten.linear)

    @property
    def bias(self) -> fx.Node | None:
        return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")

    def weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as [N, K]."""
        w = ir.get_attr_value(gm, self.weight_node).detach()
        return w.t() if self.transposed else w

    def set_weight(self, gm: fx.GraphModule, w_nk: torch.Tensor, name: str | None = None) -> None:
        """Point the site at a new float weight given as [N, K] (a constant named `name`, by default the old
        weight's name + "_smoothed")."""
        value = w_nk.t() if self.transposed else w_nk
        new = ir.add_constant(gm, name or f"{self.weight_node.target}_smoothed", value.to(ir.dtype(self.weight_node)),
                              before=self.node)
        self.node.replace_input_with(self.weight_node, new)

    @property
    def in_features(self) -> int:
        s = ir.shape(self.weight_node)
        return int(s[0] if self.transposed else s[1])


def find_sites(gm: fx.GraphModule, min_in_features: int = 16, exclude: tuple[str, ...] = ()) -> list[Site]:
    """Every linear-like node, in graph order, with the reason it cannot be quantized (or None)."""
    sites = []
    for node in ir.find_nodes(gm, aten.linear, aten.matmul, aten.mm):
        if len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
            continue
        if node.args[1].op != "get_attr" and ir.is_op(node, aten.matmul, aten.mm) \
                and not _derived_from_int8(gm, node.args[1]):
            continue            # activation × activation (attention scores): not a layer
        site = Site(node, layer_name(gm, node))
        site.reason = _reason(gm, site, min_in_features, exclude)
        sites.append(site)
    return sites


def _reason(gm: fx.GraphModule, site: Site, min_in_features: int, exclude: tuple[str, ...]) -> Reject | None:
    if any(fnmatch.fnmatchcase(site.name, pattern) for pattern in exclude):
        return Reject(Reason.EXCLUDED, "excluded by quantize_options['exclude']")
    why = _why_not_eligible(gm, site, min_in_features)
    return Reject(Reason.NOT_ELIGIBLE, why) if why else None


def _why_not_eligible(gm: fx.GraphModule, site: Site, min_in_features: int) -> str | None:
    w = site.weight_node
    if w.op != "get_attr":
        if _derived_from_int8(gm, w):
            return "weight already quantized (dequantized from an int8 tensor at run time)"
        return "weight is computed at run time, not a constant"
    value = ir.get_attr_value(gm, w)
    if not value.is_floating_point() or value.dtype not in FLOAT_DTYPES:
        if value.dtype in (torch.int8, torch.uint8) or getattr(value, "is_quantized", False):
            return f"weight already quantized ({value.dtype})"
        return f"unsupported dtype {value.dtype}: stays float"
    x_dtype = ir.dtype(site.x)
    if x_dtype not in FLOAT_DTYPES:
        return f"unsupported activation dtype {x_dtype}: stays float"
    if value.dim() != 2:
        return f"weight is {value.dim()}-D, not a 2-D matrix"
    if site.in_features <= min_in_features:
        return f"in_features={site.in_features} ≤ {min_in_features}: too small to gain from int8"
    return None


def _derived_from_int8(gm: fx.GraphModule, node: fx.Node, depth: int = 6) -> bool:
    """True if `node` is computed (within a few ops) from an int8/uint8 constant."""
    if node.op == "get_attr":
        return ir.get_attr_value(gm, node).dtype in (torch.int8, torch.uint8)
    if depth == 0 or node.op != "call_function":
        return False
    return any(_derived_from_int8(gm, a, depth - 1) for a in node.all_input_nodes)
