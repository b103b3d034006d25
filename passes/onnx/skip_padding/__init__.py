"""Skip padding (O1, exact where the outputs ignore padded tokens): row-wise work runs on real tokens only.

    m: [B, S] padding mask (0 = padding); x: a token tensor, [B·S, …] or [B, S, …]
    idx = NonZero(Reshape(m, [−1]))                                   the n real rows
    segment(x)  ⇒  ScatterND(zeros [B·S, …], idxᵀ, segment(Gather(Reshape(x, [−1, …]), idx)))  (then [B, S, …])

A segment is a connected set of row-wise ops (`row_ops`: each token row computed
from the same row alone: linears, per-token quantization, activations,
residual adds and LayerNorm, …) holding at least one matrix product (a gather
and a scatter cost a copy each). On batches padded to a fixed length it does a
fraction of the work: 32 sentences of all-MiniLM-L6-v2's benchmark padded to
128 tokens are 22 % real tokens. Attention, which mixes tokens, stays padded.

Exactness: a segment computes its real rows with the same ops as before, and
its padded rows become zeros. That is exact iff the model's outputs never read
those rows: attention masks padded keys, a pooling multiplies padded rows by
zero (or masks them out of a max). It is a property of the model, so the pass
checks it: the rewritten graph must match the original within float32 rounding
on the example batch's own masks and on random padding patterns (right-padded
lengths down to one token, scattered holes), else nothing is rewritten and the
report says why. A model returning every token's state, padded ones included,
is refused this way. A model that reads each sequence's first position whatever
its mask (a classifier on the [CLS] token) passes the check on a second try that
computes those B rows too. Both graphs run with
ONNX Runtime's basic (exact) optimizations: its extended fusions differ between
them (Add + LayerNorm becomes SkipLayerNormalization on [B, S, ·] tensors only),
and the last-bit differences flip int8 codes that sit on a rounding boundary.

Token tensors are recognized by running the graph at batch sizes 1 and 2. The
mask is the integer or boolean [B, S] input for which the check passes (inputs
named like masks are tried first).

Modules: `measure.py` (mask candidates, tensor shapes at batch 1 and 2), `plan.py`
(the segments and their boundary tensors), `emit.py` (the graph surgery), `check.py`
(the exactness check, through the pass manager's verification); `row_ops.py` beside
this package says which ops are row-wise.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from graphopt.errors import first_line
from graphopt.onnx.ir import OnnxModel, random_inputs
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from ..base import OnnxPass
from .check import check, probe_feeds
from .emit import apply
from .measure import mask_candidates, row_shapes
from .plan import plan_rewrite


class SkipPadding(OnnxPass):
    """feeds: example inputs ({input name: array}, the first is used); random look-alikes when empty."""
    name = "onnx_skip_padding"

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]] = ()) -> None:
        self.feeds = list(feeds)

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> dict[str, Any] | None:
        if model.opset < 15:        # not upgraded for this pass alone (min_opset would)
            log.rejected("skip padding", "model", f"opset {model.opset} < 15 (the rewrite reads Shape(start=…))")
            return None
        feed = dict(self.feeds[0]) if self.feeds else random_inputs(model, 1)[0][1]
        for i, node in enumerate(model.graph.nodes):
            node.name = node.name or f"skip_padding_unnamed_{i}"     # plans name nodes
        masks = mask_candidates(model, feed)
        if not masks:
            log.rejected("skip padding", "model", "no integer or boolean [batch, sequence] input to read padding from")
            return None
        packed = _packed_by(model, masks)
        if packed:
            log.rejected("skip padding", packed, Reject(Reason.ALREADY_DONE, (
                f"the graph already gathers the real tokens of {packed!r} (a NonZero on it: graphopt's torch-side "
                "skip_padding, or the model's own packing)")))
            return None
        try:
            seq, shapes = row_shapes(model, feed, feed[masks[0]].shape[1])
        except Exception as exc:  # noqa: BLE001  (a model ORT cannot run with every tensor exposed)
            log.rejected("skip padding", "model", f"could not measure tensor shapes: {first_line(exc, 300)}")
            return None
        for mask in masks:
            try:        # planned and checked on a copy: a graph this pass does not understand stays as it is
                plan, reason = plan_rewrite(model.graph, mask, seq, shapes)
                if plan is not None:
                    probes = probe_feeds(feed, mask)
                    reason = check(model, plan, probes)
                if reason and plan is not None:
                    plan.keep_first = True  # an output may read position 0 whatever the mask (a [CLS] classifier)
                    reason = check(model, plan, probes) and reason   # the first try's if both fail
            except Exception as exc:  # noqa: BLE001
                plan, reason = None, f"could not plan the rewrite: {type(exc).__name__}: {first_line(exc, 300)}"
            if plan is None or reason:
                log.rejected("skip padding", mask, reason)
                continue
            apply(model.graph, plan)
            model.invalidate()
            first = ", except each sequence's first position" if plan.keep_first else ""
            model.metadata["graphopt.skip_padding"] = (      # the file says what it does with padding
                f"{len(plan.nodes)} nodes run on the real tokens of input {mask!r} only "
                f"(rows where it is 0 are skipped{first})")
            log.matched("token rows scattered back", len(plan.sinks))
            return {"mask_input": mask, "segment_nodes": len(plan.nodes), "first_position_kept": plan.keep_first}
        return None


def _packed_by(model: OnnxModel, masks: Sequence[str]) -> str | None:
    """The mask input a NonZero already reads (within a few ops: compare, or, reshape), if any."""
    def reaches(variable: Any, depth: int) -> str | None:
        if variable.name in masks:
            return variable.name
        if depth == 0:
            return None
        return next((found for producer in variable.inputs for source in producer.inputs
                     if (found := reaches(source, depth - 1))), None)
    return next((found for node in model.graph.nodes if node.op == "NonZero"
                 if (found := reaches(node.inputs[0], PACKING_DEPTH))), None)


#: How many ops back from a NonZero the mask input may be (Equal, Not, Or, Cast, Reshape, …).
PACKING_DEPTH = 8

__all__ = ["SkipPadding"]
