"""Skip padding (O1, exact where the outputs ignore padded tokens): row-wise work runs on real tokens only.

    m: [B, S] padding mask (0 = padding); x: a token tensor, [B·S, …] or [B, S, …]
    idx = nonzero(m.flatten()).flatten()                                  the n real rows
    segment(x)  ⇒  index_put(zeros [B·S, …], [idx], segment(index_select(x.flatten(0, 1), 0, idx)))
                                                                          (viewed as [B, S, …] again)

A segment is a connected set of row-wise ATen ops (`rows.py`: each token row
computed from the same row alone: linears, graphopt's per-row int8 kernels,
activations, residual adds, LayerNorm, row-keeping reshapes, …) holding at
least one matrix product (a gather and a scatter cost a copy each). On batches
padded to a fixed length it does a fraction of the work: 32 sentences of
all-MiniLM-L6-v2's benchmark padded to 128 tokens are 22 % real tokens.
Attention, which mixes tokens, stays padded. It runs before int8, so the int8
layers inside a segment quantize and multiply packed rows too.

n is data-dependent: torch.export and FakeTensor propagation carry it as an
unbacked symbolic size, which no op in a segment branches on, so B and S stay
symbolic (other batch sizes and lengths run) and the graph still exports to
ONNX (NonZero, Gather, ScatterND).

Exactness: a segment computes its real rows with the same ops as before, and
its padded rows become zeros. That is exact iff the model's outputs never read
those rows: attention masks padded keys, a masked mean-pool multiplies them by
zero. It is a property of the model, so the pass checks it: the rewritten graph
must match the original within float32 rounding (the pass manager's LOSSLESS
verification) on the example batch's own masks and on random padding patterns
(right-padded lengths down to one token, scattered holes), else nothing is
rewritten and the report says why (`Reason.READS_PADDING`): a model returning
every token's state, padded ones included, is refused this way. A model that
reads each sequence's first position whatever its mask (a classifier on the
[CLS] token) passes on a second try that computes those B rows too.

The mask is the integer or boolean [B, S] placeholder for which the check
passes (only those named like masks where there are some). The pass reads the
example inputs the pass manager binds (`Pass.bind`).

Modules: `rows.py` (which ops are row-wise, and their arguments on packed rows),
`plan.py` (the segments and their boundary tensors), `emit.py` (the graph
surgery), `check.py` (the exactness check, through the pass manager's verification).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject

from .check import check, probe_inputs
from .emit import apply
from .plan import Plan, plan_rewrite


class SkipPadding(Pass):
    """inputs: example inputs ((args, kwargs) pairs, the first is used); the pass manager binds its own."""
    name = "skip_padding"

    def __init__(self, inputs: Sequence[tuple[tuple, dict]] = ()) -> None:
        self.inputs = list(inputs)

    def bind(self, inputs: Sequence[tuple[tuple, dict]]) -> None:
        self.inputs = list(inputs)

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        masks = mask_candidates(gm)
        if not masks:       # not a token model: not a candidate, nothing to report
            return log.result(gm)
        if not self.inputs:
            log.rejected("skip padding", "model", Reject(Reason.NOT_ELIGIBLE, "no example inputs to check "
                                                         "exactness on"))
            return log.result(gm)
        for mask in masks:
            plan = plan_rewrite(gm, mask)
            probes = probe_inputs(gm, self.inputs[0], mask)
            if isinstance(plan, Reject) or probes is None:
                log.rejected("skip padding", mask, plan if isinstance(plan, Reject) else Reject(
                    Reason.UNSUPPORTED_FORM, "the example inputs do not match the graph's placeholders"))
                continue
            reason = check(gm, mask, False, probes)
            if reason is not None:   # an output may read position 0 whatever the mask (a [CLS] classifier)
                first = check(gm, mask, True, probes)
                reason = reason if first is not None else None
                if reason is None:
                    plan = plan_rewrite(gm, mask, keep_first=True)
            if reason is not None:
                log.rejected("skip padding", mask, reason)
                continue
            assert isinstance(plan, Plan)
            apply(gm, plan)
            log.matched("token rows scattered back", len(plan.sinks))
            return log.result(gm, mask_input=mask, segment_nodes=len(plan.nodes),
                              first_position_kept=plan.keep_first)
        return log.result(gm)


def mask_candidates(gm: fx.GraphModule) -> list[str]:
    """Integer or boolean [B, S] placeholders named like masks, else every one (token ids are one too)."""
    found = [n.name for n in gm.graph.nodes if n.op == "placeholder" and _mask_like(ir.val(n))]
    named = [name for name in found if "mask" in name.lower()]
    return named or found


def _mask_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point() \
        and not value.is_complex()


def passes() -> list[Pass]:
    return [SkipPadding()]


__all__ = ["SkipPadding", "mask_candidates", "passes"]
