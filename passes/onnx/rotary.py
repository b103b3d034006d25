"""RotaryEmbedding caches at the batch of their input (export cleanup, exact).

    RotaryEmbedding(x, cos, sin)  with cos, sin: [1, S, D/2] and x: [B, …]
        ⇒ RotaryEmbedding(x, Expand(cos, [B, S, D/2]), Expand(sin, [B, S, D/2]))

The ONNX spec (opset 23) gives the caches, when no position_ids input is given,
the shape [batch, sequence, rotary_dim / 2]: no broadcasting. torch.onnx's
exporter fuses Hugging Face's rotary pattern (onnxscript's RotaryEmbedding23
fusion) with the caches it finds, which the Llama family computes from
position ids of batch 1 ([1, S, D/2]); ONNX Runtime then refuses every batch
but 1 ("cos_cache and sin_cache are expected to have the same shape as input
x"). Broadcasting the caches to x's batch first is what the unfused graph did
(the multiplication broadcast them), so the values are unchanged and the fused
kernel is kept. Caches whose batch provably equals x's are left alone.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, is_standard


class RotaryCachesAtBatch(OnnxPass):
    name = "onnx_rotary_caches"
    min_opset = 23

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        for node in [n for n in graph.nodes if n.op == "RotaryEmbedding" and is_standard(n)]:
            x, cos, sin = node.inputs[:3]
            if len(node.inputs) > 3 and not node.inputs[3].is_empty():
                log.rejected("rotary caches", node.name,
                             Reject(Reason.UNSUPPORTED_FORM, "position_ids given: the caches are 2-D tables"))
                continue
            if _same_batch(x, cos) and _same_batch(x, sin):
                log.rejected("rotary caches", node.name, Reject(Reason.ALREADY_DONE, "the caches already have x's batch"))
                continue
            batch = _shape_slice(graph, node.name, x, 0, 1)
            for index, cache in ((1, cos), (2, sin)):
                rest = _shape_slice(graph, node.name, cache, 1, None)
                target = gs.Variable(f"{node.name}_cache{index}_shape", dtype=np.int64, shape=[3])
                graph.layer(op="Concat", inputs=[batch, rest], outputs=[target], attrs={"axis": 0},
                            name=f"{node.name}_cache{index}_concat")
                expanded = gs.Variable(f"{node.name}_cache{index}_expanded", dtype=cache.dtype, shape=None)
                graph.layer(op="Expand", inputs=[cache, target], outputs=[expanded],
                            name=f"{node.name}_cache{index}_expand")
                node.inputs[index] = expanded
            log.matched("RotaryEmbedding caches expanded to the batch")


def _same_batch(x: gs.Tensor, cache: gs.Tensor) -> bool:
    xs, cs = x.shape, cache.shape
    return bool(xs and cs and isinstance(xs[0], int) and isinstance(cs[0], int) and xs[0] == cs[0])


def _shape_slice(graph: gs.Graph, prefix: str, tensor: gs.Tensor, start: int, end: int | None) -> gs.Variable:
    out = gs.Variable(f"{prefix}_{tensor.name}_shape_{start}", dtype=np.int64, shape=None)
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    graph.layer(op="Shape", inputs=[tensor], outputs=[out], attrs=attrs, name=f"{prefix}_{tensor.name}_shape_{start}")
    return out
