"""Skip padding, the exactness check: a plan is emitted by a pass of its own, `EmitPlan`, which a `PassManager`
runs and verifies like any other pass (LOSSLESS budget, rolled back when it fails), on probe feeds: the
example's own masks and random padding patterns. Both graphs run at ONNX Runtime's exact optimization level.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.onnx.ir import OnnxIR, OnnxModel
from graphopt.engine.pass_manager import PassManager, RewriteLog

from ..base import OnnxPass
from .emit import apply
from .plan import Plan

#: Random padding patterns the exactness check runs on, besides the example batch's own masks.
PROBE_MASKS = 2
#: Rows of the example batch the check runs on (it runs the model twice per mask).
PROBE_ROWS = 4
#: ONNX Runtime's exact rewrites only (see the package docstring).
EXACT = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


class EmitPlan(OnnxPass):
    """One plan's rewrite as a pass, so that the pass manager verifies it."""
    name = "onnx_skip_padding_candidate"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> dict[str, Any] | None:
        apply(model.graph, self.plan)
        log.matched("token rows scattered back", len(self.plan.sinks))
        return None


def check(model: OnnxModel, plan: Plan, probes: list[dict[str, np.ndarray]]) -> str:
    """'' if the graph rewritten by `plan` gives the original's outputs on every probe feed, else why not."""
    manager = PassManager([EmitPlan(plan)], OnnxIR(EXACT), verify=True, measure_latency=False)
    _, report = manager.run(model, [((), probe) for probe in probes], [])
    record = report.records[-1]
    if not record.rolled_back:
        return ""
    if record.reproducer:
        return f"the rewritten graph does not run: {record.reason}"
    return f"outputs read padded rows ({record.reason} on a random padding mask): padding cannot be skipped"


def probe_feeds(feed: dict[str, np.ndarray], mask: str) -> list[dict[str, np.ndarray]]:
    """The example's first rows with their own mask, random right-padded lengths, and scattered holes."""
    rows = min(PROBE_ROWS, feed[mask].shape[0])
    batch = feed[mask].shape[0]
    base = {k: (np.asarray(v)[:rows] if np.ndim(v) and np.shape(v)[0] == batch else np.asarray(v))
            for k, v in feed.items()}
    rng = np.random.default_rng(0)
    seq = feed[mask].shape[1]
    dtype = feed[mask].dtype
    probes = [base]
    for k in range(PROBE_MASKS):
        if k % 2 == 0:
            lengths = rng.integers(1, seq + 1, size=rows)
            lengths[0] = 1
            pattern = np.arange(seq)[None, :] < lengths[:, None]
        else:
            pattern = rng.random((rows, seq)) < 0.5
            pattern[np.arange(rows), rng.integers(0, seq, size=rows)] = True
        probes.append({**base, mask: pattern.astype(dtype)})
    return probes
