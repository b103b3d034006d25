"""Train-time BatchNorm around folded convolutions (graphopt.finetune's `renorm`): graph surgery in two steps.

    insert_norms:  conv(x, W, b)  ⇒  TrainNorm(conv(x, W, b))      γ = σ, β = μ, running stats (μ, σ²):
                                                                   the identity in eval mode, on real batches
    fold_norms:    TrainNorm(conv(x, W, b))  ⇒  conv(x, W', b')    after training, by its running statistics

At O1+ each BatchNorm is folded into its convolution, so a fine-tune loop would train with normalization
statistics that pruning made wrong. `insert_norms` puts a `TrainNorm` after every convolution that has its
own weight and bias and is not already followed by a normalization, initialized to the identity from the
conv output's mean and variance on the given batches (it then trains with batch statistics like any
BatchNorm). `fold_norms` rewrites each TrainNorm as an inference-mode `aten.batch_norm` reading its running
statistics and folds it with the BatchNorm fold of the fusion passes (`passes/fusion/batchnorm.py`, one fold
for everything):

    y = γ·(conv(x, W, b) − μ_run)/√(σ²_run + ε) + β  ⇒  conv(x, a·W, a·(b − μ_run) + β),  a = γ/√(σ²_run + ε)

so the graph has the same compute nodes as before `insert_norms` (the conv's weight and bias become new
attributes; a conv without a bias gets one).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.engine import ir

from .fusion.batchnorm import FoldBatchNormRule
from .rules import Match

aten = torch.ops.aten

CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
NORMS = (aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
         aten.native_batch_norm)
#: Inputs ((args, kwargs) pairs) whose statistics give the identity initialization of each normalization.
RENORM_BATCHES = 8


class TrainNorm(torch.nn.Module):
    """BatchNorm over dim 1 of a conv output, for the fine-tune loop; `calibrating` records statistics."""

    def __init__(self, channels: int, like: torch.Tensor, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum, self.calibrating = eps, momentum, False
        self.weight = torch.nn.Parameter(like.new_ones(channels))
        self.bias = torch.nn.Parameter(like.new_zeros(channels))
        self.register_buffer("running_mean", like.new_zeros(channels))
        self.register_buffer("running_var", like.new_ones(channels))
        self.sums: list[Any] = [0, 0.0, 0.0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            t = x.detach().double().movedim(1, 0).reshape(x.shape[1], -1)
            self.sums = [self.sums[0] + t.shape[1], self.sums[1] + t.sum(1), self.sums[2] + t.pow(2).sum(1)]
            return x
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)

    def start(self) -> None:
        """γ = σ, β = μ, running statistics = (μ, σ²): the identity in eval mode."""
        count, s, s2 = self.sums
        mean = s / count if count else torch.zeros_like(self.running_mean, dtype=torch.float64)
        var = (s2 / count - mean.pow(2)).clamp_min(0) if count else torch.ones_like(mean)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.weight.copy_((var + self.eps).sqrt())
            self.bias.copy_(mean)
        self.calibrating, self.sums = False, [0, 0.0, 0.0]


def renorm_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Convolutions with their own weight and bias attributes, not followed by a normalization."""
    sites = []
    for node in gm.graph.nodes:
        if not ir.is_op(node, *CONVS):
            continue
        tensors = [a for a in node.args[1:3] if a is not None]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in tensors):
            continue
        if any(ir.is_op(user, *NORMS) for user in node.users):
            continue
        sites.append(node)
    return sites


def insert_norms(gm: fx.GraphModule, inputs: Sequence[tuple[tuple, dict]]) -> list[tuple[fx.Node, str]]:
    """A TrainNorm after every renorm site, initialized to the identity on the first RENORM_BATCHES of
    `inputs` ((args, kwargs) pairs); returns (conv, submodule name) pairs for `fold_norms`."""
    sites = []
    for i, node in enumerate(renorm_sites(gm)):
        weight = ir.get_attr_value(gm, node.args[1])
        name = f"_finetune_norm_{i}"
        gm.add_module(name, TrainNorm(weight.shape[0], weight.detach()).train(gm.training))
        with gm.graph.inserting_after(node):
            norm = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(norm, delete_user_cb=lambda user: user is not norm)
        norm.meta["val"] = node.meta.get("val")
        sites.append((node, name))
    if not sites:
        return sites
    gm.recompile()
    norms = [gm.get_submodule(name) for _, name in sites]
    for norm in norms:
        norm.calibrating = True
    with torch.no_grad():
        for args, kwargs in inputs[:RENORM_BATCHES]:
            gm(*args, **kwargs)
    for norm in norms:
        norm.start()
    return sites


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    owner, _, attr = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, attr)


def fold_norms(gm: fx.GraphModule, sites: list[tuple[fx.Node, str]]) -> None:
    """Fold each TrainNorm (running statistics) into its convolution and remove it from the graph."""
    fold = FoldBatchNormRule()
    for conv, name in sites:
        norm = gm.get_submodule(name)
        (call,) = [u for u in conv.users if u.op == "call_module" and u.target == name]
        with gm.graph.inserting_before(call):
            stats = [gm.graph.get_attr(f"{name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
            bn = gm.graph.call_function(aten.batch_norm.default,
                                        (conv, *stats, False, norm.momentum, norm.eps, False))
        bn.meta["val"] = call.meta.get("val")
        call.replace_all_uses_with(bn)
        gm.graph.erase_node(call)
        replaced = [a for a in conv.args[1:3] if isinstance(a, fx.Node)]
        outcome = fold.apply(gm, bn)
        if not isinstance(outcome, Match):   # renorm_sites chose convs the fold accepts
            raise RuntimeError(f"finetune could not fold {name} back into {conv.name}: {outcome}")
        old_names = [str(node.target) for node in replaced]
        ir.erase_unused(gm.graph, [*outcome.dead, *stats, *replaced])
        read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for target in old_names:
            if target not in read:
                _delete_attr(gm, target)
        folded = [a for a in conv.args[1:3] if isinstance(a, fx.Node) and a.op == "get_attr"]   # the fold rewrote conv in place
        for node, target in zip(folded, old_names):   # the folded values keep the names the graph had
            if target not in read and len(node.users) == 1:
                value = ir.get_attr_value(gm, node)
                _delete_attr(gm, str(node.target))
                owner, _, attr = target.rpartition(".")
                (gm.get_submodule(owner) if owner else gm).register_buffer(attr, value) \
                    if not isinstance(value, torch.nn.Parameter) else \
                    (gm.get_submodule(owner) if owner else gm).register_parameter(attr, value)
                node.target = target
        delattr(gm, name)
    if sites:
        gm.recompile()
