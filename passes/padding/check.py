"""Skip padding, the exactness check: a plan is emitted by a pass of its own, `EmitPlan`, which a `PassManager`
runs and verifies like any other pass (LOSSLESS budget, rolled back when it fails), on probe inputs: the
example's own masks and random padding patterns (right-padded lengths down to one token, scattered holes).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.engine import ir
from graphopt.engine.pass_manager import FxIR, Pass, PassManager, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject

from .emit import apply
from .plan import Plan, plan_rewrite

#: Random padding patterns the check runs on, besides the example batch's own masks.
PROBE_MASKS = 2
#: Rows of the example batch the check runs on, where the batch is symbolic (it runs the model twice per probe).
PROBE_ROWS = 4

Inputs = Sequence[tuple[tuple, dict]]


class EmitPlan(Pass):
    """One plan's rewrite as a pass, so that the pass manager verifies it."""
    name = "skip_padding_candidate"

    def __init__(self, mask: str, keep_first: bool) -> None:
        self.mask, self.keep_first = mask, keep_first

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        plan = plan_rewrite(gm, self.mask, self.keep_first)
        if isinstance(plan, Plan):
            apply(gm, plan)
            log.matched("token rows scattered back", len(plan.sinks))
        return log.result(gm)


def check(gm: fx.GraphModule, mask: str, keep_first: bool, probes: Inputs) -> Reject | None:
    """None if `gm` rewritten for `mask` gives the original's outputs on every probe input, else why not."""
    manager = PassManager([EmitPlan(mask, keep_first)], FxIR(), verify=True, measure_latency=False)
    _, report = manager.run(gm, list(probes), [])
    record = report.records[-1]
    if not record.rolled_back:
        return None
    if record.reproducer:
        return Reject(Reason.UNSUPPORTED_FORM, f"the rewritten graph does not run: {record.reason}")
    return Reject(Reason.READS_PADDING, f"outputs read padded rows ({record.reason} on a random padding mask): "
                                        "padding cannot be skipped")


def probe_inputs(gm: fx.GraphModule, example: tuple[tuple, dict], mask: str) -> Inputs | None:
    """The example's first rows with their own mask, random right-padded lengths (the first row one token
    long), and scattered holes (the first row's first position padded);
    None when the mask placeholder cannot be matched to an example leaf."""
    leaves, spec = pytree.tree_flatten(example)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(names) != len(leaves) or mask not in names:
        return None
    position = names.index(mask)
    own = leaves[position]
    if not isinstance(own, torch.Tensor) or own.dim() != 2:
        return None
    batch, seq = own.shape
    placeholder = next(n for n in gm.graph.nodes if n.name == mask)
    rows = min(PROBE_ROWS, batch) if ir.is_symbolic(placeholder.meta["val"].shape[0]) else batch
    leaves = [leaf[:rows] if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] == batch else leaf
              for leaf in leaves]
    generator = torch.Generator().manual_seed(0)
    probes = [leaves]
    for k in range(PROBE_MASKS):
        if k % 2 == 0:
            lengths = torch.randint(1, seq + 1, (rows,), generator=generator)
            lengths[0] = 1
            pattern = torch.arange(seq)[None, :] < lengths[:, None]
        else:
            pattern = torch.rand((rows, seq), generator=generator) < 0.5
            pattern[torch.arange(rows), torch.randint(0, seq, (rows,), generator=generator)] = True
            if seq > 1:     # a padded first position with a real token after it (what a [CLS] head reads)
                pattern[0, 0], pattern[0, -1] = False, True
        probes.append([*leaves[:position], pattern.to(own.dtype), *leaves[position + 1:]])
    return [pytree.tree_unflatten(p, spec) for p in probes]


__all__ = ["EmitPlan", "check", "probe_inputs"]
