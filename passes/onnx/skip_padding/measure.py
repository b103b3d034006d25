"""Skip padding, measurement: which inputs can be the padding mask, and every tensor's shape at batch 1 and 2.

The graph runs with every intermediate tensor fetched (ONNX Runtime without optimizations), at batch sizes
1 and 2: a tensor whose leading dimensions follow the batch is a token tensor (row_ops.token_leads).
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from graphopt.onnx.ir import OnnxModel
from graphopt.onnx.sessions import session

#: Sequence positions the shape measurement runs on (it fetches every intermediate tensor); a prime, so
#: that no head count or width is mistaken for it.
SHAPE_TOKENS = 11


def mask_candidates(model: OnnxModel, feed: dict[str, np.ndarray]) -> list[str]:
    """Integer/boolean rank-2 inputs; names with 'mask' first."""
    names = [t.name for t in model.graph.inputs if t.name in feed and np.ndim(feed[t.name]) == 2
             and np.asarray(feed[t.name]).dtype.kind in "biu"]
    return sorted(names, key=lambda n: "mask" not in n.lower())


def row_shapes(model: OnnxModel, feed: dict[str, np.ndarray],
                seq: int) -> tuple[int, dict[str, tuple[tuple, tuple, np.dtype]]]:
    """(sequence length used, {tensor name: (shape at batch 1, shape at batch 2, dtype)}) for every tensor.

    Every intermediate tensor is fetched, so the graph runs on the first SHAPE_TOKENS positions of each
    sequence input when it accepts them (a large model at its full length would hold all its activations),
    else at full length."""
    proto, weights = model.shared_proto()
    names = [t.name for t in model.graph.tensors().values()
             if isinstance(t, gs.Variable) and t.inputs and t.name not in {o.name for o in proto.graph.output}]
    del proto.graph.value_info[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    sess = session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, weights=weights, prepack=False)
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
