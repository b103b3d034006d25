"""Recalibration after pruning: re-estimate the statistics folded into each convolution (adaptive BatchNorm).

    conv(x', W, b)[c] ⇒ conv(x', s_c·W[c], s_c·(b[c] - m'_c) + m_c),   s_c = σ_c / σ'_c

m_c, σ_c: mean and standard deviation of output channel c of the convolution
in the unpruned graph (over batch and spatial positions of the calibration
data); m'_c, σ'_c: the same channel in the pruned graph, measured after every
earlier convolution has been recalibrated (topological order). The
convolution then gives every kept channel the first two moments it had
before pruning.

Why: at O3 BatchNorm is already folded into the convolutions, so its
running statistics — which pruning the inputs of a convolution makes wrong —
are constants of W and b. A BatchNorm re-estimated on a few batches after
pruning (adaptive BN) recovers most of the accuracy lost before any
fine-tune (digits ResNet, Torch-Pruning's 4x model: 17% → 90%); this is the
same correction on the folded graph, channel for channel: with BN folded,
conv output = γ·(z - μ)/σ + β, whose moments over the data are (β, |γ|) when
μ, σ are the data's statistics, so matching the unpruned moments sets μ, σ to
the statistics of the pruned z — what adaptive BN does.

A channel that is (nearly) constant in the pruned graph gets the mean shift
only (s_c = 1); a weight shared by several nodes is left alone; a
convolution without bias gains one. Linear layers are not touched (their
models normalize with LayerNorm, which re-normalizes on its own).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.engine import ir

aten = torch.ops.aten
CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
MIN_STD = 1e-6   # below this (relative to the unpruned std) a channel is taken as constant: shift only

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]   # conv node name -> (mean[C], std[C]), float64


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Convolutions whose weight (and bias, if any) are parameters of `gm` used by that node alone."""
    nodes = []
    for node in gm.graph.nodes:
        if not ir.is_op(node, *CONVS) or len(node.args) < 2:
            continue
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
        tensors = [weight] + ([bias] if bias is not None else [])
        if all(isinstance(t, fx.Node) and t.op == "get_attr" and len(t.users) == 1 for t in tensors):
            nodes.append(node)
    return nodes


class _Stop(Exception):
    """Raised by `_Probe` after the last watched node: the rest of the graph is not needed."""


class _Probe(fx.Interpreter):
    """Accumulates per-channel sums of the outputs of `targets`; stops after the last one."""

    def __init__(self, gm: fx.GraphModule, targets: Sequence[fx.Node]) -> None:
        super().__init__(gm)
        self.targets = set(targets)
        self.last = max(targets, key=list(gm.graph.nodes).index) if targets else None
        self.sums: dict[str, list[Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.targets:
            t = result.detach().double().movedim(1, 0).reshape(result.shape[1], -1)
            acc = self.sums.setdefault(n.name, [0, 0.0, 0.0])
            acc[0] += t.shape[1]
            acc[1] = acc[1] + t.sum(1)
            acc[2] = acc[2] + t.pow(2).sum(1)
        if n is self.last:
            raise _Stop
        return result


def _call(gm: fx.GraphModule, probe: _Probe, item: Any) -> None:
    args, kwargs = (item, {}) if isinstance(item, tuple) else ((), item) if isinstance(item, dict) else ((item,), {})
    with contextlib.suppress(_Stop):
        probe.run(*pytree.arg_tree_leaves(*args, **kwargs), enable_io_processing=False)


def statistics(gm: fx.GraphModule, nodes: Sequence[fx.Node], batches: Sequence[Any]) -> Stats:
    """Mean and std of every output channel of `nodes` over `batches` (one pass per batch)."""
    probe = _Probe(gm, nodes)
    with torch.no_grad():
        for item in batches:
            _call(gm, probe, item)
    stats: Stats = {}
    for name, (count, s, s2) in probe.sums.items():
        mean = s / count
        stats[name] = mean, (s2 / count - mean.pow(2)).clamp_min(0).sqrt()
    return stats


def bias_node(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The conv's bias node, created (zeros) when it has none."""
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None:
        return bias
    weight = ir.attr_path(gm, str(node.args[1].target))
    name = f"{str(node.args[1].target).replace('.', '_')}_recalibrated_bias"
    gm.register_parameter(name, torch.nn.Parameter(weight.new_zeros(weight.shape[0]),
                                                   requires_grad=weight.requires_grad))
    with gm.graph.inserting_before(node):
        bias = gm.graph.get_attr(name)
    bias.meta["val"] = ir.attr_path(gm, name).detach()
    args = list(node.args) + [None] * (3 - len(node.args))
    args[2] = bias
    node.args = tuple(args)
    return bias


def recalibrate(gm: fx.GraphModule, reference: Stats, batches: Sequence[Any],
                kept: Callable[[fx.Node], Sequence[int] | None] = lambda node: None,
                progress: bool = False) -> list[str]:
    """Give each conv's channels their unpruned moments (see the module docstring), in place.

    `reference`: statistics of the unpruned graph (same node names); `kept(node)`: the original
    indices of `node`'s remaining output channels (None: all of them, e.g. a masked graph).
    Returns the names of the convolutions rewritten.
    """
    from tqdm.auto import tqdm
    done = []
    nodes = [n for n in conv_nodes(gm) if n.name in reference]
    for node in tqdm(nodes, desc="pruning recalibration", unit="conv", disable=None if progress else True):
        mean_ref, std_ref = reference[node.name]
        index = kept(node)
        if index is not None:
            index = torch.as_tensor(list(index), dtype=torch.long)
            mean_ref, std_ref = mean_ref[index], std_ref[index]
        got = statistics(gm, [node], batches).get(node.name)
        if got is None or got[0].shape != mean_ref.shape:
            continue
        mean, std = got
        scale = torch.where(std > MIN_STD * std_ref.clamp_min(MIN_STD), std_ref / std.clamp_min(1e-30),
                            torch.ones_like(std))
        weight_attr = str(node.args[1].target)
        weight = ir.attr_path(gm, weight_attr)
        bias_attr = str(bias_node(gm, node).target)
        bias = ir.attr_path(gm, bias_attr)
        with torch.no_grad():
            shape = (-1,) + (1,) * (weight.dim() - 1)
            weight.mul_(scale.to(weight.dtype).view(shape))
            bias.copy_(((bias.double() - mean) * scale + mean_ref).to(bias.dtype))
        done.append(node.name)
    if done:
        gm.recompile()
    return done


def kept_channels(analysis: Any, pruned: Mapping[str, Sequence[int]],
                  reference: Stats) -> Callable[[fx.Node], list[int] | None]:
    """`kept` for a graph sliced with `pruned`: the original channel indices left at dim 1 of a node."""
    from .slice import seg_elements

    def kept(node: fx.Node) -> list[int] | None:
        removed: set[int] = set()
        for seg in analysis.segs(node, 1):
            removed.update(seg_elements(seg, pruned.get(seg.group, ())))
        size = reference[node.name][0].shape[0]
        return [c for c in range(size) if c not in removed]

    return kept
