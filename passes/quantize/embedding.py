"""Int8 embedding tables (level O2, with every int8 scheme): rows stored as int8, gathered, then scaled.

    embedding(W, ids)  ⇒  float(embedding(W_q, ids)) · embedding(s, ids)
    W_q[r] = clamp(round(W[r] / s[r]), ±127)      s[r] = max_d |W[r, d]| / 127      (one scale per row)

A lookup table does no arithmetic, so it only costs bytes, and in a
transformer it is a large share of them (all-MiniLM-L6-v2: 45 of 87 MiB).
Per-row symmetric int8 gives every token vector its own scale: a gathered row
is within s[r] / 2 per element of the float row, 0.4 % of that row's largest
magnitude. The table is stored at a quarter of its float32 size whatever the
scheme (the linears' activations are not involved). ONNX: Gather(int8) →
Cast → Mul(Gather(scale)), standard operators.

The pass has its own budget (cosine ≥ 0.999 against the graph before it,
rolled back as a whole otherwise); the accuracy-aware fallback of the
linears (`accuracy_budget=`) does not rank tables. Kept float, with the
reason in the report: tables with fewer than
`MIN_ELEMENTS` elements (the saving is negligible), non-float tables
(already quantized, or integer), tables that are not constants, and layers
matched by `quantize_options["exclude"]`.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject
from graphopt.engine.verify import Budget

from .calibrate import layer_name
from .config import QuantConfig
from .observers import quantize_rows, row_amax, scale_from_range
from .sites import FLOAT_DTYPES

aten = torch.ops.aten
#: Tables smaller than this (elements) stay float: 64 Ki elements is 256 KiB in float32.
MIN_ELEMENTS = 2**16


class QuantizeEmbeddings(Pass):
    name = "int8_embeddings"
    level = 2
    budget = Budget(min_cosine=0.999)    # per-row int8 of a lookup: a cosine far above the linears' own

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        log = RewriteLog()
        layers: list[dict[str, Any]] = []
        bytes_before = bytes_after = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.embedding.default:
                continue
            name = layer_name(gm, node)
            table = ir.const_value(gm, node.args[0])
            reason = self._reject(name, table)
            row: dict[str, Any] = {"layer": name, "op": "embedding",
                                   "shape": "×".join(map(str, table.shape)) if isinstance(table, torch.Tensor) else "?"}
            if reason:
                row.update(scheme="float", runs="torch float", reason=reason.message)
                log.rejected("embedding", node, reason)
            else:
                _rewrite(gm, node, table)
                row.update(scheme="int8 rows", runs="torch gather of int8 rows × row scale")
                bytes_before += table.numel() * table.element_size()
                bytes_after += table.numel() + 4 * table.shape[0]
                log.matched("embedding → int8 rows")
            layers.append(row)
        ir.drop_unused_attributes(gm)
        return log.result(gm, layers=layers, weight_bytes={"before": bytes_before, "after": bytes_after})

    def _reject(self, name: str, table: object) -> Reject | None:
        if any(fnmatch.fnmatch(name, pattern) for pattern in self.config.exclude):
            return Reject(Reason.EXCLUDED, "excluded by quantize_options['exclude']")
        why = self._why_not_eligible(table)
        return Reject(Reason.NOT_ELIGIBLE, why) if why else None

    @staticmethod
    def _why_not_eligible(table: object) -> str | None:
        if not isinstance(table, torch.Tensor):
            return "table is computed at run time, not a constant"
        if table.dtype not in FLOAT_DTYPES:
            return f"table dtype {table.dtype}: not a float table (already quantized or integer)"
        if table.dim() != 2 or table.numel() < MIN_ELEMENTS:
            return f"{table.numel()} elements < {MIN_ELEMENTS}: too small to gain"
        return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, table: torch.Tensor) -> None:
    """embedding(W, ids, …) → float(embedding(W_q, ids)) · embedding(s, ids), in the table's dtype."""
    scale = scale_from_range(row_amax(table))[:, None]      # [rows, 1]
    codes = quantize_rows(table, scale)
    hint = str(node.args[0].target)
    codes_node = ir.add_constant(gm, f"{hint}_int8", codes, parameter=False)
    scale_node = ir.add_constant(gm, f"{hint}_row_scale", scale, parameter=False)
    ids = node.args[1]
    graph = gm.graph
    with graph.inserting_before(node):
        rows = graph.call_function(aten.embedding.default, (codes_node, ids))
        row_scales = graph.call_function(aten.embedding.default, (scale_node, ids))
        as_float = graph.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
        out = graph.call_function(aten.mul.Tensor, (as_float, row_scales))
        if table.dtype != torch.float32:
            out = graph.call_function(aten._to_copy.default, (out,), {"dtype": table.dtype})
    ir.replace_all_uses(node, out)
    graph.erase_node(node)
