"""ONNX Runtime sessions on the CPU, and sessions that share a model's weights instead of copying them.

A session built from a proto copies every initializer into ONNX Runtime (and repacks the MatMul and Conv
weights once more). For a model of gigabytes, a few such sessions (the pass manager verifies and times
two graphs, the export checks its file) do not fit in memory. `OnnxModel.shared_proto` writes large
initializers *by reference*, to an empty BY_REFERENCE file that ONNX Runtime and onnx.checker require to
exist but never read, and `session(proto, weights=…)` hands ONNX Runtime the arrays themselves
(`SessionOptions.add_initializer`), which it then reads in place.

ONNX Runtime's graph optimizers, though, read an initializer's TensorProto, not the array given for it:
constant folding (Reshape or Pad of a weight), the QDQ fusions (DequantizeLinear of a weight into
MatMulNBits) and the like fail at session start on a by-reference weight ("External initializer … out of
bounds", measured on 1.32). So a weight is shared only where every node reading it is one the optimizers
compute with, never rewrite from its values (`SHARED_CONSUMERS`, with a run-time input besides): the float
MatMul and Gemm weights, embedding tables and contrib MatMulNBits codes that hold nearly all of an LLM's
bytes. Other weights go into the proto, as without sharing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx_graphsurgeon.ir.tensor import LazyValues

from .files import PROTOBUF_LIMIT


def session(model: onnx.ModelProto | str | os.PathLike,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            providers: Sequence[str] = ("CPUExecutionProvider",), spin: bool = True,
            weights: Mapping[str, np.ndarray] | None = None, prepack: bool | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU (or `providers`), threads pinned to the machine's cores.

    `spin=False` stops idle worker threads from spin-waiting after a run: needed when several
    sessions take turns on the same cores (a benchmark interleaving them), else each one's
    spinning threads slow the next.

    `weights`: the arrays of a proto's by-reference initializers (`OnnxModel.shared_proto`), which the
    session reads in place instead of holding its own copy. `prepack=False` also stops ONNX Runtime from
    repacking weights for its kernels (a copy of every MatMul/Conv weight): for sessions that check values
    rather than time them. By default weights are repacked, as users run a model, unless the shared ones
    exceed PREPACK_MAX_BYTES.
    """
    if prepack is None:
        prepack = sum(array.nbytes for array in (weights or {}).values()) <= PREPACK_MAX_BYTES
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    shared = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
              for name, array in (weights or {}).items()}
    for name, value in shared.items():
        options.add_initializer(name, value)
    if isinstance(model, onnx.ModelProto) and (shared or model.ByteSize() >= PROTOBUF_LIMIT):
        with _model_file(model) as path:
            runtime = ort.InferenceSession(str(path), options, providers=list(providers))
    else:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        runtime = ort.InferenceSession(source, options, providers=list(providers))
    runtime.shared_weights = shared    # ONNX Runtime reads them in place: they live as long as the session
    return runtime


def check_model(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model`, through a file for models over protobuf's 2 GB limit or with by-reference
    weights (`OnnxModel.shared_proto`)."""
    if model.ByteSize() < PROTOBUF_LIMIT and not _holds_references(model):
        onnx.checker.check_model(model)
        return
    with _model_file(model) as path:
        onnx.checker.check_model(str(path))


#: Up to this size of shared weights a session repacks them (see `session`); above it, each repacked copy would
#: cost as much memory again (a 1B-parameter decoder: 4 GB per session, and a speed check holds two sessions),
#: so sessions read them as they lie. Both sides of a speed comparison are built the same way.
PREPACK_MAX_BYTES = 1 << 30

#: Where a by-reference initializer says its data lies: an empty file beside the model, which ONNX Runtime
#: and onnx.checker require to exist but never read (the arrays come through `SessionOptions.add_initializer`).
BY_REFERENCE = "graphopt-shared-weights"

#: Initializers from this size up are shared with ONNX Runtime sessions instead of copied into each one.
SHARED_MIN_BYTES = 1 << 16

#: Ops that read a shared weight without ONNX Runtime's optimizers reading its values (module docstring).
SHARED_CONSUMERS = ("MatMul", "Gemm", "Gather", "MatMulNBits")

#: numpy dtype kinds ONNX Runtime can read in place (ml_dtypes' 4-bit and bfloat16 arrays, kind V, go inline).
SHAREABLE_KINDS = "fiub"


def shareable(values: np.ndarray | LazyValues) -> bool:
    """Whether a constant's values are large and of a type ONNX Runtime reads in place."""
    if isinstance(values, LazyValues):
        if values.tensor.data_location == onnx.TensorProto.EXTERNAL:
            return False                                # a by-reference tensor: its array is bound elsewhere
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(values.tensor.data_type))
    elif isinstance(values, np.ndarray):
        dtype = values.dtype
    else:
        return False
    return values.nbytes >= SHARED_MIN_BYTES and dtype.kind in SHAREABLE_KINDS


def _holds_references(model: onnx.ModelProto) -> bool:
    return any(entry.value == BY_REFERENCE for tensor in model.graph.initializer for entry in tensor.external_data)


@contextlib.contextmanager
def _model_file(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` saved in a temporary folder (data over 2 GB in an external file), with the empty
    BY_REFERENCE file beside it."""
    with tempfile.TemporaryDirectory(prefix="graphopt-") as directory:
        path = Path(directory) / "model.onnx"
        (Path(directory) / BY_REFERENCE).touch()
        if model.ByteSize() >= PROTOBUF_LIMIT:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)        # onnx.save_model moves the data of the proto it is given out of it
            onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        else:
            onnx.save_model(model, str(path))
        yield path


def reference_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer with `array`'s name, type and shape whose data lies in the BY_REFERENCE file."""
    tensor = onnx.TensorProto(name=name, dims=array.shape,
                              data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                              data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=BY_REFERENCE)
    return tensor
