"""Attention with its KV-cache write as ONNX Runtime's GroupQueryAttention (export, `ops="onnxruntime"`).

    K̂ = Transpose(ScatterND(Transpose(K, [2, 0, 1, 3]), Unsqueeze(c, −1), k), [1, 2, 0, 3])      (present key)
    V̂ = the same write of v into V at the same slots c
    Y = Attention(Q, K̂, V̂, M)            Q [B, H, q, D], K, V, K̂, V̂ [B, H_kv, L, D], M bool ⊆ (slot j ≤ c_i)
        ⇒ (Y', K̂, V̂) = com.microsoft.GroupQueryAttention(Q', k', v', K, V, seqlens_k, T, attention_bias=A,
                                                         query_seqlens=n, num_heads=H, kv_num_heads=H_kv, scale)
           Y = Transpose(Reshape(Y', [B, q, H, D]), [0, 2, 1, 3])    (folded into a following inverse Transpose)

    T = c[q − 1] + 1,   seqlens_k = [T − 1] · B,   n = [q] · B   (int32),   A = Where(M, 0, lowest)[…, :T],
    Q', k', v' = the same values as [B, q, heads · D]

The exported decoder step (graphopt.llm.decoder) writes the q new keys and values at cache slots c and
attends over the whole cache with M = (j ≤ c_i) ∧ attention_mask[j]. GroupQueryAttention with
query_seqlens n_b = q and seqlens_k + 1 = T keeps the P = T − q cached tokens of K and V, writes the new
rows at [P, T) and lets query row i (absolute position P + i) see keys j ≤ P + i, each score scaled and
added to A. When c is consecutive (c_i = c_0 + i, as generate feeds it: arange(S) at the prefill, then one
slot a step), P = c_0 and P + i = c_i: the same slots are written and the causal bound is M's own, so with
A = 0 where M holds and the lowest float elsewhere (exp(lowest − max) = 0 exactly in a row that sees any
key) the softmax weights are M's, for any pattern of left padding in attention_mask. Measured on ONNX
Runtime 1.32's CPU kernel against the decoder's formula computed in numpy (batch 3 with left-padded rows,
prefill, decode and multi-token steps after a cache): outputs within 3e-7, written slots exact; a query
row that sees no key at all (a pad at the prefill) comes out 0, as from torch's scaled_dot_product_attention.
query_seqlens makes a multi-token step on a filled cache legal at any batch (without it ONNX Runtime
requires batch 1 there). RoPE stays outside the op (do_rotary = 0), as the graph computes it.

What the file assumes, that the standard file does not: cache_position holds consecutive slots, and the
cache's slots after the step's last are unwritten. ONNX Runtime's present cache holds zeros there (the
ScatterND form copies past's values); a loop that starts from an empty cache, as generate does, has
zeros there in either file. The mask must provably contain the causal comparison (an And of
LessOrEqual(arange(L), Unsqueeze(c, −1)) with anything, through leading-axis Unsqueezes): M is then a
subset of what GroupQueryAttention's own causal mask lets through, and A restricts it to M.

Each rejected Attention node says why (`Reason` codes): no KV-cache write in front of it, a mask not proved
causal, attention options the op lacks (is_causal, softcap, past inputs), shapes ONNX Runtime refuses
(head_dim not a multiple of 8, H not a multiple of H_kv) or does not know.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.onnx.ir import OnnxModel
from graphopt.onnx.translations import CONTRIB_DOMAIN
from graphopt.engine.pass_manager import RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, constant, is_standard, replace_input

#: The first opset with the Attention operator this rewrite anchors on.
ATTENTION_OPSET = 23
#: Activation dtypes of ONNX Runtime's CPU GroupQueryAttention.
DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
#: GroupQueryAttention's head_size must be a multiple of this (ONNX Runtime's input check).
HEAD_MULTIPLE = 8
#: Attention's K and V as the cache write makes them: [L, B, H_kv, D] (the slot axis first, for ScatterND) → BNSH.
CACHE_TO_BNSH = [1, 2, 0, 3]
#: [B, heads, q, D] ↔ [B, q, heads, D]
SWAP_HEADS = [0, 2, 1, 3]
#: GroupQueryAttention's input order up to query_seqlens (index 16); absent optional inputs are empty.
INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
          "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
          "k_norm_weight", "query_seqlens")


@dataclass
class CacheWrite:
    """K̂ = Transpose(ScatterND(data, Unsqueeze(slots, −1), updates), [1, 2, 0, 3])."""
    present: gs.Tensor
    data: gs.Tensor          # the past cache as [L, B, H_kv, D]
    updates: gs.Tensor       # the new states as [q, B, H_kv, D]
    slots: gs.Tensor         # cache_position [q]


@dataclass
class Match:
    node: gs.Node
    query: gs.Tensor
    key: CacheWrite
    value: CacheWrite
    mask: gs.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    dtype: np.dtype


class GroupQueryAttentionFusion(OnnxPass):
    name = "onnx_group_query_attention"

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> None:
        graph = model.graph
        if model.opset < ATTENTION_OPSET:
            log.rejected("GroupQueryAttention", "the graph", Reject(
                Reason.OPSET, f"opset {model.opset} < {ATTENTION_OPSET}: attention is MatMul/Softmax, not one "
                              "Attention node to rewrite"))
            return
        shared = Shared(graph)
        for node in [n for n in graph.nodes if n.op == "Attention" and is_standard(n)]:
            match = _match(node)
            if isinstance(match, Reject):
                log.rejected("GroupQueryAttention", node.name, match)
                continue
            _emit(graph, match, shared)
            log.matched("Attention + KV-cache write → GroupQueryAttention")
        graph.cleanup(remove_unused_graph_inputs=False)


def _match(node: gs.Node) -> Match | Reject:
    if len(node.inputs) != 4 or any(t.is_empty() for t in node.inputs):
        return Reject(Reason.UNSUPPORTED_FORM, "Attention without a mask, or with past or sequence-length inputs")
    if len(node.outputs) != 1:
        return Reject(Reason.UNSUPPORTED_FORM, "Attention with present or QK outputs")
    if node.attrs.get("is_causal", 0) or node.attrs.get("softcap", 0.0):
        return Reject(Reason.UNSUPPORTED_FORM, "is_causal or softcap set: the mask is not the graph's own")
    query, key, value, mask = node.inputs
    writes = [_cache_write(t) for t in (key, value)]
    for write in writes:
        if isinstance(write, Reject):
            return write
    key_write, value_write = writes
    if key_write.slots is not value_write.slots:
        return Reject(Reason.NOT_THE_FORMULA, "keys and values are written at different slots")
    for write in writes:
        readers = [n for n in write.present.outputs if n is not node]
        if readers:
            return Reject(Reason.OTHER_USERS, f"{write.present.name} is also read by {readers[0].op} "
                                              f"{readers[0].name!r}")
    shape = _static(query, (1, 3)), _static(key, (1, 2, 3)), _static(value, (1, 2, 3))
    if any(s is None for s in shape):
        return Reject(Reason.UNKNOWN_SHAPE, "Q [B, H, q, D] or the cache [B, H_kv, L, D] has no static heads and "
                                            "head_dim")
    (_, heads, _, head_dim), (_, kv_heads, length, _) = shape[:2]
    if shape[2][1:] != shape[1][1:] or shape[0][3] != shape[1][3]:
        return Reject(Reason.SHAPE_MISMATCH, f"Q {shape[0]}, keys {shape[1]}, values {shape[2]}: "
                                             "GroupQueryAttention takes one head_dim and one cache shape")
    if heads % kv_heads or head_dim % HEAD_MULTIPLE:
        return Reject(Reason.SHAPE_MISMATCH, f"H = {heads}, H_kv = {kv_heads}, head_dim = {head_dim}: ONNX Runtime "
                                             f"needs H a multiple of H_kv and head_dim a multiple of {HEAD_MULTIPLE}")
    dtype = np.dtype(query.dtype) if query.dtype is not None else None
    if dtype not in DTYPES or key.dtype != query.dtype:
        return Reject(Reason.DTYPE_MISMATCH, f"Q is {query.dtype}, the cache {key.dtype}: GroupQueryAttention "
                                             "runs float32 or float16")
    if mask.dtype is None or np.dtype(mask.dtype) != np.bool_ or mask.shape is None or len(mask.shape) != 4:
        return Reject(Reason.UNSUPPORTED_FORM, "the mask is not a boolean [B|1, H|1, q, L] tensor")
    if not _causal(mask, key_write.slots, length):
        return Reject(Reason.NOT_THE_FORMULA, "the mask is not provably within slot ≤ cache_position "
                                              "(GroupQueryAttention is always causal)")
    scale = float(node.attrs.get("scale", 1.0 / np.sqrt(head_dim)))
    return Match(node, query, key_write, value_write, mask, heads, kv_heads, head_dim, scale, dtype)


def _cache_write(present: gs.Tensor) -> CacheWrite | Reject:
    transpose = _made_by(present, "Transpose")
    scatter = _made_by(transpose.inputs[0], "ScatterND") \
        if transpose is not None and transpose.attrs.get("perm") == CACHE_TO_BNSH else None
    if scatter is None:
        return Reject(Reason.WRONG_PRODUCER, f"{present.name} is not a KV-cache write (Transpose ← ScatterND)")
    if scatter.attrs.get("reduction", "none") != "none":
        return Reject(Reason.NOT_THE_FORMULA,
                      f"the cache write {scatter.name!r} reduces ({scatter.attrs['reduction']})")
    data, index, updates = scatter.inputs
    slots = _column(index)
    if slots is None:
        return Reject(Reason.WRONG_PRODUCER, f"the cache write {scatter.name!r} is not indexed by "
                                             "Unsqueeze(cache_position, −1)")
    return CacheWrite(present, data, updates, slots)


def _column(tensor: gs.Tensor) -> gs.Tensor | None:
    """c when `tensor` is Unsqueeze(c, −1) of a 1-D c (a column [q, 1]), else None."""
    node = _made_by(tensor, "Unsqueeze")
    if node is None or len(node.inputs) < 2:
        return None
    axes, source = constant(node.inputs[1]), node.inputs[0]
    if axes is None or np.asarray(axes).tolist() not in ([-1], [1]) or source.shape is None or len(source.shape) != 1:
        return None
    return source


def _causal(mask: gs.Tensor, slots: gs.Tensor, length: int) -> bool:
    """Whether `mask` [.., q, L] ⊆ (j ≤ slots[i]): an And of LessOrEqual(arange(L), Unsqueeze(slots, −1)) with
    anything, through Unsqueezes that add leading axes only (so the comparison stays on the last two)."""
    node = mask.inputs[0] if isinstance(mask, gs.Variable) and len(mask.inputs) == 1 else None
    if node is None or not is_standard(node):
        return False
    if node.op == "And":
        return any(_causal(t, slots, length) for t in node.inputs)
    if node.op == "Unsqueeze":
        axes = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        source = node.inputs[0]
        if axes is None or source.shape is None:
            return False
        rank = len(source.shape) + np.asarray(axes).size
        leading = all(int(a) % rank < rank - 2 for a in np.asarray(axes).reshape(-1))
        return leading and _causal(source, slots, length)
    if node.op == "LessOrEqual":
        positions, bound = node.inputs
        values = constant(positions)
        return (values is not None and np.asarray(values).shape in ((length,), (1, length))
                and np.array_equal(np.asarray(values).reshape(-1), np.arange(length)) and _column(bound) is slots)
    return False


class Shared:
    """The step's lengths (per cache_position tensor) and attention biases (per mask), made once for all layers."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.lengths: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]] = {}
        self.biases: dict[tuple[str, str], gs.Variable] = {}

    def lengths_of(self, slots: gs.Tensor, past: gs.Tensor
                   ) -> tuple[gs.Variable, gs.Variable, gs.Variable, gs.Variable]:
        """(seqlens_k [B] int32, T int32, query_seqlens [B] int32, T as int64 [1]) of a step writing `slots` into
        the cache `past` (its batch is the step's)."""
        if slots.name not in self.lengths:
            prefix = f"gqa_{slots.name}"
            last = self._node("Gather", [slots, _const(f"{prefix}_last_index", np.array(-1, np.int64))], np.int64,
                              f"{prefix}_last", {"axis": 0})
            total64 = self._node("Add", [last, _const(f"{prefix}_one", np.array(1, np.int64))], np.int64,
                                 f"{prefix}_total64")
            total = self._int32(total64, f"{prefix}_total")
            batch = self._node("Shape", [past], np.int64, f"{prefix}_batch", {"start": 0, "end": 1})
            seqlens = self._node("Expand", [self._int32(last, f"{prefix}_last32"), batch], np.int32,
                                 f"{prefix}_seqlens_k")
            count = self._int32(self._node("Shape", [slots], np.int64, f"{prefix}_q"), f"{prefix}_q32")
            query_lens = self._node("Expand", [count, batch], np.int32, f"{prefix}_query_seqlens")
            end = self._node("Unsqueeze", [total64, _const(f"{prefix}_axis0", np.array([0], np.int64))], np.int64,
                             f"{prefix}_end")
            self.lengths[slots.name] = seqlens, total, query_lens, end
        return self.lengths[slots.name]

    def bias_of(self, mask: gs.Tensor, slots: gs.Tensor, end: gs.Variable, dtype: np.dtype) -> gs.Variable:
        """Where(mask, 0, lowest)[..., :T]: the additive form of the mask over the step's T keys."""
        key = (mask.name, slots.name)
        if key not in self.biases:
            prefix = f"gqa_{mask.name}"
            full = self._node("Where", [mask, _const(f"{prefix}_zero", np.zeros((), dtype)),
                                        _const(f"{prefix}_lowest", np.array(np.finfo(dtype).min, dtype))],
                              dtype, f"{prefix}_bias_full")
            self.biases[key] = self._node("Slice", [full, _const(f"{prefix}_start", np.array([0], np.int64)), end,
                                                    _const(f"{prefix}_axis", np.array([-1], np.int64))],
                                          dtype, f"{prefix}_bias")
        return self.biases[key]

    def _node(self, op: str, inputs: list[gs.Tensor], dtype: type | np.dtype, name: str,
              attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(name, dtype=dtype)
        self.graph.layer(op=op, inputs=inputs, outputs=[out], attrs=attrs or {}, name=f"{name}_node")
        return out

    def _int32(self, tensor: gs.Tensor, name: str) -> gs.Variable:
        return self._node("Cast", [tensor], np.int32, name, {"to": onnx.TensorProto.INT32})


def _emit(graph: gs.Graph, match: Match, shared: Shared) -> None:
    """GroupQueryAttention in place of the Attention node and both cache writes (the module docstring's form)."""
    node, name, dtype = match.node, match.node.name, match.dtype
    query = _flat(graph, _transposed(graph, match.query, SWAP_HEADS, f"{name}_q"), match.heads * match.head_dim,
                  f"{name}_q")
    new_states = [_flat(graph, _transposed(graph, w.updates, [1, 0, 2, 3], f"{name}_{kind}"),
                        match.kv_heads * match.head_dim, f"{name}_{kind}")
                  for kind, w in (("k", match.key), ("v", match.value))]
    past = [_transposed(graph, w.data, CACHE_TO_BNSH, f"{name}_past_{kind}")
            for kind, w in (("k", match.key), ("v", match.value))]
    seqlens, total, query_lens, end = shared.lengths_of(match.key.slots, past[0])
    given = {"query": query, "key": new_states[0], "value": new_states[1], "past_key": past[0], "past_value": past[1],
             "seqlens_k": seqlens, "total_sequence_length": total,
             "attention_bias": shared.bias_of(match.mask, match.key.slots, end, dtype), "query_seqlens": query_lens}
    output = gs.Variable(f"{name}_gqa_output", dtype=dtype)
    presents = [match.key.present, match.value.present]
    for present in presents:
        present.inputs.clear()                      # made by GroupQueryAttention from here on
    graph.layer(op="GroupQueryAttention", domain=CONTRIB_DOMAIN, name=f"{name}_gqa",
                inputs=[given.get(i, gs.Variable.empty()) for i in INPUTS], outputs=[output, *presents],
                attrs={"num_heads": match.heads, "kv_num_heads": match.kv_heads, "scale": match.scale})
    heads = gs.Variable(f"{name}_gqa_heads", dtype=dtype)            # [B, q, H, D]
    graph.layer(op="Reshape", inputs=[output, _const(f"{name}_heads_shape", np.array([0, 0, match.heads,
                                                                                      match.head_dim], np.int64))],
                outputs=[heads], name=f"{name}_gqa_heads")
    result = node.outputs[0]
    node.outputs.clear()
    for reader in [n for n in result.outputs if n.op == "Transpose" and n.attrs.get("perm") == SWAP_HEADS]:
        swapped = reader.outputs[0]
        if swapped not in graph.outputs:            # Transpose(Transpose(heads, SWAP), SWAP) = heads
            for user in list(swapped.outputs):
                replace_input(user, swapped, heads)
            reader.inputs.clear()
    if result.outputs or result in graph.outputs:
        graph.layer(op="Transpose", inputs=[heads], outputs=[result], attrs={"perm": SWAP_HEADS},
                    name=f"{name}_gqa_bnsh")


def _transposed(graph: gs.Graph, tensor: gs.Tensor, perm: list[int], name: str) -> gs.Tensor:
    """`tensor` transposed by `perm`, looking through the Transpose that makes it (the two composed; none
    at all when they cancel)."""
    inner = _made_by(tensor, "Transpose")
    if inner is not None and "perm" in inner.attrs:
        tensor, perm = inner.inputs[0], [inner.attrs["perm"][p] for p in perm]
    if perm == list(range(len(perm))):
        return tensor
    out = gs.Variable(f"{name}_transposed", dtype=tensor.dtype)
    graph.layer(op="Transpose", inputs=[tensor], outputs=[out], attrs={"perm": perm}, name=f"{name}_transpose")
    return out


def _flat(graph: gs.Graph, tensor: gs.Tensor, width: int, name: str) -> gs.Variable:
    """[B, q, heads, D] as [B, q, heads · D]."""
    out = gs.Variable(f"{name}_flat", dtype=tensor.dtype)
    graph.layer(op="Reshape", inputs=[tensor, _const(f"{name}_flat_shape", np.array([0, 0, width], np.int64))],
                outputs=[out], name=f"{name}_flat")
    return out


def _made_by(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The standard-domain `op` node that makes `tensor`, if that is what makes it."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == op and is_standard(node):
            return node
    return None


def _static(tensor: gs.Tensor, axes: tuple[int, ...]) -> tuple | None:
    """`tensor`'s 4-D shape when its `axes` are static (heads, cache length, head_dim), else None."""
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(shape[a], int) for a in axes):
        return None
    return tuple(shape)


def _const(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, value)
