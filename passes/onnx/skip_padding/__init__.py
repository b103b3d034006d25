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
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch

from graphopt.onnx.ir import OnnxModel, random_inputs, session
from graphopt.pass_manager import RewriteLog
from graphopt.verify import LOSSLESS, compare

from .base import OnnxPass
from .row_ops import PRODUCTS, Edits, Rows, row_wise, token_leads

#: Random padding patterns the exactness check runs on, besides the example batch's own masks.
PROBE_MASKS = 2
#: Rows of the example batch the check runs on (it runs the model twice per mask).
PROBE_ROWS = 4
#: Sequence positions the shape measurement runs on (it fetches every intermediate tensor); a prime, so
#: that no head count or width is mistaken for it.
SHAPE_TOKENS = 11


@dataclass
class Plan:
    """What to rewrite, by tensor and node names."""
    mask: str
    nodes: dict[str, Edits]                  # nodes that run on the real rows only, and their edits
    sources: list[str]                       # token tensors gathered on the way in
    source_leads: dict[str, int]             # 1: [B·S, …], 2: [B, S, …]
    sinks: dict[str, tuple[int, np.dtype]]   # token tensors scattered back on the way out: lead, dtype
    keep_first: bool = False                 # also compute each sequence's first position, real or not


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
        masks = _mask_candidates(model, feed)
        if not masks:
            log.rejected("skip padding", "model", "no integer or boolean [batch, sequence] input to read padding from")
            return None
        try:
            seq, shapes = _row_shapes(model, feed, feed[masks[0]].shape[1])
        except Exception as exc:  # noqa: BLE001  (a model ORT cannot run with every tensor exposed)
            log.rejected("skip padding", "model", f"could not measure tensor shapes: {_first_line(exc)}")
            return None
        for mask in masks:
            try:        # planned and checked on a copy: a graph this pass does not understand stays as it is
                plan, reason = _plan(model.graph, mask, seq, shapes)
                if plan is not None:
                    probes = _probe_feeds(feed, mask)
                    expected = [_run_exact(model, probe) for probe in probes]
                    reason = _check(model, plan, probes, expected)
                if reason and plan is not None:
                    plan.keep_first = True  # an output may read position 0 whatever the mask (a [CLS] classifier)
                    reason = _check(model, plan, probes, expected) and reason   # the first try's if both fail
            except Exception as exc:  # noqa: BLE001
                plan, reason = None, f"could not plan the rewrite: {type(exc).__name__}: {_first_line(exc)}"
            if plan is None or reason:
                log.rejected("skip padding", mask, reason)
                continue
            _apply(model.graph, plan)
            model.invalidate()
            first = ", except each sequence's first position" if plan.keep_first else ""
            model.metadata["graphopt.skip_padding"] = (      # the file says what it does with padding
                f"{len(plan.nodes)} nodes run on the real tokens of input {mask!r} only "
                f"(rows where it is 0 are skipped{first})")
            log.matched("token rows scattered back", len(plan.sinks))
            return {"mask_input": mask, "segment_nodes": len(plan.nodes), "first_position_kept": plan.keep_first}
        return None


def _mask_candidates(model: OnnxModel, feed: dict[str, np.ndarray]) -> list[str]:
    """Integer/boolean rank-2 inputs; names with 'mask' first."""
    names = [t.name for t in model.graph.inputs if t.name in feed and np.ndim(feed[t.name]) == 2
             and np.asarray(feed[t.name]).dtype.kind in "biu"]
    return sorted(names, key=lambda n: "mask" not in n.lower())


def _row_shapes(model: OnnxModel, feed: dict[str, np.ndarray],
                seq: int) -> tuple[int, dict[str, tuple[tuple, tuple, np.dtype]]]:
    """(sequence length used, {tensor name: (shape at batch 1, shape at batch 2, dtype)}) for every tensor.

    Every intermediate tensor is fetched, so the graph runs on the first SHAPE_TOKENS positions of each
    sequence input when it accepts them (a large model at its full length would hold all its activations),
    else at full length."""
    proto = model.to_proto()
    names = [t.name for t in model.graph.tensors().values()
             if isinstance(t, gs.Variable) and t.inputs and t.name not in {o.name for o in proto.graph.output}]
    del proto.graph.value_info[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    sess = session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if seq > SHAPE_TOKENS:
        with contextlib.suppress(Exception):    # a fixed sequence length: measured at the full length below
            return SHAPE_TOKENS, _measure(sess, feed, seq, SHAPE_TOKENS)
    return seq, _measure(sess, feed, seq, seq)


def _measure(sess: ort.InferenceSession, feed: dict[str, np.ndarray], seq: int,
             length: int) -> dict[str, tuple[tuple, tuple, np.dtype]]:
    cut = {name: (v[:, :length] if np.ndim(v) >= 2 and np.shape(v)[1] == seq else np.asarray(v))
           for name, v in feed.items()}
    outputs = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(outputs, sess.run(None, {i.name: _rows(cut[i.name], rows) for i in sess.get_inputs()})))
            for rows in (1, 2)]
    shapes = {name: (np.shape(runs[0][name]), np.shape(runs[1][name]), np.asarray(runs[0][name]).dtype)
              for name in outputs}
    for i in sess.get_inputs():
        one, two = _rows(cut[i.name], 1), _rows(cut[i.name], 2)
        shapes[i.name] = (one.shape, two.shape, one.dtype)
    return shapes


def _rows(value: np.ndarray, rows: int) -> np.ndarray:
    """The first `rows` rows of a batched input, repeated when the example has fewer."""
    value = np.asarray(value)
    if value.ndim == 0:
        return value
    return np.concatenate([value] * -(-rows // value.shape[0]))[:rows] if value.shape[0] < rows else value[:rows]


def _plan(graph: gs.Graph, mask: str, seq: int, shapes: dict) -> tuple[Plan | None, str]:
    """The segments to run on real rows, or (None, why none)."""
    rows = Rows({n: v[0] for n, v in shapes.items()}, token_leads({n: v[0] for n, v in shapes.items()},
                                                                  {n: v[1] for n, v in shapes.items()}, seq),
                _only_tokens_vary(graph, mask))
    nodes = {n.name: n for n in graph.nodes}
    edits = {name: e for name, e in ((n.name, row_wise(n, rows)) for n in graph.nodes) if e is not None}
    floats = {name for name, (_, _, dtype) in shapes.items() if np.dtype(dtype).kind == "f" and name in rows.leads}
    kept = _shapes_consistent(set(edits), nodes)
    kept = _shapes_consistent(_feeding_products(_on_float_activations(kept, graph, floats), nodes), nodes)
    if not kept:
        return None, "no matrix product runs on token rows ([batch·sequence, …] or [batch, sequence, …] tensors)"
    sources, sinks = [], []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.name not in kept:
            continue
        for tensor in node.inputs:
            if rows.lead(tensor) and (not tensor.inputs or tensor.inputs[0].name not in kept) \
                    and tensor.name not in sources:
                sources.append(tensor.name)
        for tensor in node.outputs:
            if tensor.name and (tensor.name in outputs or any(c.name not in kept for c in tensor.outputs)):
                sinks.append(tensor.name)
    return Plan(mask, {name: edits[name] for name in kept}, sources, {n: rows.leads[n] for n in sources},
                {n: (rows.leads[n], np.dtype(shapes[n][2])) for n in sinks}), ""


def _only_tokens_vary(graph: gs.Graph, mask: str) -> bool:
    """Whether every symbolic input dimension is one of the mask's (batch, sequence): then row shapes are fixed."""
    tokens = {d for d in graph.tensors()[mask].shape or () if not isinstance(d, int)}
    return all(isinstance(d, int) or d in tokens for t in graph.inputs for d in (t.shape or ()))


def _shapes_consistent(names: set[str], nodes: dict[str, gs.Node]) -> set[str]:
    """`names` less each Shape read outside it (its value would be the real rows') and each Expand whose shape
    is not such a Shape of `names` (until none is left)."""
    names = set(names)
    changed = True
    while changed:
        changed = False
        for name in list(names):
            node = nodes[name]
            if (node.op == "Shape" and any(c.name not in names for c in node.outputs[0].outputs)) \
                    or (node.op == "Expand" and node.inputs[1].inputs[0].name not in names):
                names.discard(name)
                changed = True
    return names


def _on_float_activations(names: set[str], graph: gs.Graph, floats: set[str]) -> set[str]:
    """The nodes of `names` that read a float token tensor or the output of such a node.

    Integer and boolean preprocessing (masks, position ids) stays padded: it is cheap, and often read along
    the sequence (RoBERTa's position ids are a cumsum over non-pad ids), where zeros would change it.
    A fixed point, not one sweep: a pass may have appended nodes out of topological order."""
    kept: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if node.name in names and node.name not in kept and any(
                    t.name in floats or (t.inputs and t.inputs[0].name in kept) for t in node.inputs):
                kept.add(node.name)
                changed = True
    return kept


def _feeding_products(names: set[str], nodes: dict[str, gs.Node]) -> set[str]:
    """The matrix products among `names` and the nodes that feed one through `names`.

    What follows the last product (an output's pooling, masking with −∞ for a max) stays padded: it may
    give padded rows values of its own, which zeros would not reproduce."""
    kept = {name for name in names if nodes[name].op in PRODUCTS}
    frontier = list(kept)
    while frontier:
        for tensor in nodes[frontier.pop()].inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is not None and producer.name in names and producer.name not in kept:
                kept.add(producer.name)
                frontier.append(producer.name)
    return kept


@dataclass
class RealRows:
    """The tensors every gather and scatter shares, built once per rewrite."""
    index: gs.Variable          # [n] row numbers of the computed rows in [B·S]
    column: gs.Variable         # the same as [n, 1], ScatterND's indices
    count: gs.Variable          # [B·S] as a shape
    tokens: gs.Variable         # [B, S] as a shape
    minus_one: gs.Constant


def _apply(graph: gs.Graph, plan: Plan) -> None:
    """Rewrite `graph` by `plan`: segments on real rows, padded rows of their outputs zeros."""
    tensors = graph.tensors()
    rows = _real_rows(graph, tensors[plan.mask], plan.keep_first)
    real: dict[str, gs.Variable] = {}
    for name in plan.sources:
        real[name] = gs.Variable(f"{name}_real_rows", dtype=tensors[name].dtype)
        flat = _flatten_rows(graph, tensors[name], rows) if plan.source_leads[name] == 2 else tensors[name]
        graph.nodes.append(gs.Node("Gather", f"{name}_gather_real_rows", attrs={"axis": 0},
                                   inputs=[flat, rows.index], outputs=[real[name]]))
    nodes = [n for n in graph.nodes if n.name in plan.nodes]
    for node in nodes:
        for i, tensor in enumerate(node.outputs):
            if tensor.name:
                real[tensor.name] = gs.Variable(f"{tensor.name}_real_rows", dtype=tensor.dtype)
                node.outputs[i] = real[tensor.name]
    for node in nodes:
        edits = plan.nodes[node.name]
        node.attrs.update(edits.attrs)
        for i, tensor in enumerate(node.inputs):
            if i in edits.inputs:
                node.inputs[i] = gs.Constant(f"{node.name}_input_{i}_on_real_rows", edits.inputs[i])
            elif tensor.name in real:
                node.inputs[i] = real[tensor.name]
    for name, (lead, dtype) in plan.sinks.items():
        _scatter(graph, tensors[name], real[name], rows, lead, dtype)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _real_rows(graph: gs.Graph, mask: gs.Tensor, keep_first: bool) -> RealRows:
    """The computed rows: the real tokens, and with `keep_first` each sequence's first position too."""
    minus_one = gs.Constant("skip_padding_minus_one", np.array([-1], np.int64))
    names = ("mask_flat", "nonzero", "index", "index_column", "row_count", "token_dims")
    flat, nonzero, index, column, count, tokens = (gs.Variable(f"skip_padding_{n}") for n in names)
    computed = _or_first_position(graph, mask) if keep_first else mask
    graph.nodes += [
        gs.Node("Reshape", "skip_padding_flatten", inputs=[computed, minus_one], outputs=[flat]),
        gs.Node("NonZero", "skip_padding_nonzero", inputs=[flat], outputs=[nonzero]),
        gs.Node("Reshape", "skip_padding_index", inputs=[nonzero, minus_one], outputs=[index]),
        gs.Node("Transpose", "skip_padding_column", attrs={"perm": [1, 0]}, inputs=[nonzero], outputs=[column]),
        gs.Node("Shape", "skip_padding_row_count", inputs=[flat], outputs=[count]),
        gs.Node("Shape", "skip_padding_token_dims", inputs=[mask], outputs=[tokens]),
    ]
    return RealRows(index, column, count, tokens, minus_one)


def _or_first_position(graph: gs.Graph, mask: gs.Tensor) -> gs.Variable:
    """mask ≠ 0 or position = 0, as a [B, S] boolean."""
    names = ("real", "shape", "length", "positions", "first", "kept")
    real, shape, length, positions, first, kept = (gs.Variable(f"skip_padding_{n}") for n in names)
    scalar = {v: gs.Constant(f"skip_padding_{v}", np.array(v, np.int64)) for v in (0, 1)}
    graph.nodes += [
        gs.Node("Cast", "skip_padding_real", attrs={"to": onnx.TensorProto.BOOL}, inputs=[mask], outputs=[real]),
        gs.Node("Shape", "skip_padding_shape", inputs=[mask], outputs=[shape]),
        gs.Node("Gather", "skip_padding_length", attrs={"axis": 0}, inputs=[shape, scalar[1]], outputs=[length]),
        gs.Node("Range", "skip_padding_positions", inputs=[scalar[0], length, scalar[1]], outputs=[positions]),
        gs.Node("Equal", "skip_padding_first", inputs=[positions, scalar[0]], outputs=[first]),
        gs.Node("Or", "skip_padding_kept", inputs=[real, first], outputs=[kept]),
    ]
    return kept


def _flatten_rows(graph: gs.Graph, tensor: gs.Tensor, rows: RealRows) -> gs.Variable:
    """[B, S, …] → [B·S, …]."""
    trailing, shape, flat = (gs.Variable(f"{tensor.name}_{s}") for s in ("row_dims", "rows_shape", "as_rows"))
    graph.nodes += [
        gs.Node("Shape", f"{tensor.name}_row_dims", attrs={"start": 2}, inputs=[tensor], outputs=[trailing]),
        gs.Node("Concat", f"{tensor.name}_rows_shape", attrs={"axis": 0}, inputs=[rows.minus_one, trailing],
                outputs=[shape]),
        gs.Node("Reshape", f"{tensor.name}_as_rows", inputs=[tensor, shape], outputs=[flat]),
    ]
    return flat


def _scatter(graph: gs.Graph, full: gs.Variable, real: gs.Variable, rows: RealRows, lead: int,
             dtype: np.dtype) -> None:
    """full = ScatterND(zeros [B·S, …], real row numbers, real), reshaped to [B, S, …] when `lead` is 2."""
    name = full.name
    trailing, shape, zeros = (gs.Variable(f"{name}_{s}") for s in ("row_dims", "padded_shape", "zeros"))
    graph.nodes += [
        gs.Node("Shape", f"{name}_row_dims", attrs={"start": 1}, inputs=[real], outputs=[trailing]),
        gs.Node("Concat", f"{name}_padded_shape", attrs={"axis": 0}, inputs=[rows.count, trailing], outputs=[shape]),
        gs.Node("ConstantOfShape", f"{name}_zeros", inputs=[shape], outputs=[zeros],
                attrs={"value": gs.Constant(f"{name}_zero", np.zeros(1, dtype))}),
    ]
    scattered = full if lead == 1 else gs.Variable(f"{name}_padded_rows", dtype=full.dtype)
    graph.nodes.append(gs.Node("ScatterND", f"{name}_scatter_real_rows", inputs=[zeros, rows.column, real],
                               outputs=[scattered]))
    if lead == 2:
        token_shape = gs.Variable(f"{name}_token_shape")
        graph.nodes += [
            gs.Node("Concat", f"{name}_token_shape", attrs={"axis": 0}, inputs=[rows.tokens, trailing],
                    outputs=[token_shape]),
            gs.Node("Reshape", f"{name}_as_tokens", inputs=[scattered, token_shape], outputs=[full]),
        ]


#: ONNX Runtime's exact rewrites only (see the module docstring).
EXACT = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def _run_exact(model: OnnxModel, feed: dict[str, np.ndarray], sess: ort.InferenceSession | None = None) -> list:
    sess = sess or session(model.to_proto(), EXACT)
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def _check(model: OnnxModel, plan: Plan, probes: list[dict[str, np.ndarray]], expected: list[list]) -> str:
    """'' if the rewritten graph gives the original's `expected` outputs on every probe feed, else why not."""
    rewritten = model.copy()
    _apply(rewritten.graph, plan)
    try:
        sess = session(rewritten.to_proto(), EXACT)
    except Exception as exc:  # noqa: BLE001
        return f"the rewritten graph does not run: {_first_line(exc)}"
    for probe, want in zip(probes, expected):
        try:
            got = _run_exact(rewritten, probe, sess)
        except Exception as exc:  # noqa: BLE001
            return f"the rewritten graph fails on a probe mask: {_first_line(exc)}"
        for g, w in zip(got, want):
            reason = LOSSLESS.check(compare(torch.from_numpy(np.asarray(g)), torch.from_numpy(np.asarray(w))))
            if reason:
                return f"outputs read padded rows ({reason} on a random padding mask): padding cannot be skipped"
    return ""


def _probe_feeds(feed: dict[str, np.ndarray], mask: str) -> list[dict[str, np.ndarray]]:
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


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
