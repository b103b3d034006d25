"""Calibration through ONNX Runtime: the value range of chosen tensors over sample inputs.

The float model is run with the chosen intermediate tensors exposed as extra
graph outputs, once per calibration feed, and their running min/max kept
(the MinMax calibrator of ONNX Runtime's quantization tools, in a few lines).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

import onnxruntime as ort

from .ir import OnnxModel
from .sessions import session


def tensor_ranges(model: OnnxModel, names: Sequence[str],
                  feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """{name: (min, max)} of each tensor in `names` over all `feeds`."""
    proto, weights = model.shared_proto()
    present = {o.name for o in proto.graph.output}
    types = {t.name: t.dtype for t in model.graph.tensors().values()}
    for name in names:
        if name not in present:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(types.get(name) or np.float32))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    sess = session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, weights=weights, prepack=False)
    inputs = [i.name for i in sess.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    feeds = list(feeds)
    for feed in tqdm(feeds, desc="calibrating (ONNX Runtime)", unit="batch", leave=False, disable=None):
        values = sess.run(list(names), {k: feed[k] for k in inputs})
        for name, value in zip(names, values):
            low, high = float(np.min(value)), float(np.max(value))
            if name in ranges:
                low, high = min(low, ranges[name][0]), max(high, ranges[name][1])
            ranges[name] = (low, high)
    return ranges
