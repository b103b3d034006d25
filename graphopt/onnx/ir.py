"""The ONNX IR adapter: an onnx-graphsurgeon graph the pass manager can drive.

`OnnxModel` wraps a `gs.Graph` (what passes rewrite) with a cached ONNX
Runtime session; `OnnxIR` implements the pass manager's IR protocol
(copy, finalize, count_nodes, param_bytes, run, dump). Inputs are
`((), {input_name: ndarray})` pairs and outputs are tuples of torch tensors,
so `graphopt.engine.verify.compare_runs` compares them like FX outputs.
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import ml_dtypes
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import onnx_ir
import onnxruntime as ort
from onnx_graphsurgeon.ir.tensor import LazyValues
import torch

from graphopt.errors import UnsupportedError, first_line
from graphopt.frontend.inputs import look_alike

from .files import PROTOBUF_LIMIT
from .sessions import BY_REFERENCE, SHARED_CONSUMERS, check_model, reference_tensor, session, shareable

Inputs = Sequence[tuple[tuple, dict]]

#: Custom or vendor ops are skipped by every pass; these domains are standard ONNX.
STANDARD_DOMAINS = ("", "ai.onnx")


class OnnxModel:
    """A `gs.Graph` plus the model-level fields graphsurgeon does not keep, and a cached session."""

    def __init__(self, graph: gs.Graph, ir_version: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.graph = graph
        self.ir_version = ir_version
        self.metadata = dict(metadata or {})
        self._session: ort.InferenceSession | None = None

    @classmethod
    def from_proto(cls, model: onnx.ModelProto) -> "OnnxModel":
        """Import `model`, with ONNX shape inference first so passes see intermediate shapes.

        Large initializers become arrays the graph holds once (read-only: a pass replaces a constant, never
        writes into it), so copies of the model and ONNX Runtime sessions share them (`shared_proto`);
        nothing refers to `model` afterwards."""
        metadata = {p.key: p.value for p in model.metadata_props}
        imported = cls(gs.import_onnx(model), model.ir_version, metadata)
        for tensor in imported.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and shareable(tensor._values):
                tensor.values = tensor.values          # loaded into an array of its own
        light, weights = imported.shared_proto()
        del imported
        return cls.bind(light, weights)

    @classmethod
    def from_ir(cls, model: onnx_ir.Model) -> "OnnxModel":
        """The model from onnx_ir (`to_ir`, or torch.onnx's program), its large weights the arrays it holds."""
        return cls.bind(*split_ir(model))

    @classmethod
    def bind(cls, light: onnx.ModelProto, weights: dict[str, np.ndarray]) -> "OnnxModel":
        """A model from a proto whose large initializers are by reference, bound to `weights`, shapes inferred."""
        metadata = {p.key: p.value for p in light.metadata_props}
        ir_version = light.ir_version
        with contextlib.suppress(Exception):           # custom ops: passes then see fewer shapes, and say so
            light = onnx.shape_inference.infer_shapes(light)
        graph = gs.import_onnx(light)
        for tensor in graph.tensors().values():
            if tensor.name in weights and isinstance(tensor, gs.Constant):
                tensor.values, tensor.data_location = weights[tensor.name], None   # in memory, not by reference
        gc.collect()      # a graph is a reference cycle (nodes ↔ tensors): what a caller dropped goes now
        return cls(graph, ir_version, metadata)

    def to_ir(self) -> onnx_ir.Model:
        """The model in onnx_ir (onnxscript's IR), its large weights the same arrays (not copied)."""
        proto, weights = self.shared_proto()
        model = onnx_ir.serde.deserialize_model(proto)
        for name, value in model.graph.initializers.items():
            if name in weights:
                value.const_value = onnx_ir.Tensor(weights[name], name=name)
        return model

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def to_proto(self) -> onnx.ModelProto:
        """The whole model, every weight's bytes in it (what a file holds)."""
        _pack_four_bit(self.graph)
        model = gs.export_onnx(self.graph, do_type_check=False)
        if self.ir_version is not None:
            model.ir_version = max(self.ir_version, _min_ir_version(model))
        for key, value in self.metadata.items():
            model.metadata_props.add(key=key, value=value)
        return model

    def shared_proto(self, optimizing_session: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The model with its large initializers by reference (`session(proto, weights=…)` reads them in
        place), and those arrays by name: a proto of kilobytes for a model of gigabytes. For a session that
        runs ONNX Runtime's graph optimizers (`optimizing_session`), only the weights those never read from
        the proto (graphopt.onnx.sessions); the others stay in it."""
        shared = [(tensor, tensor.values) for tensor in self.graph.tensors().values()
                  if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray)
                  and shareable(tensor._values)
                  and (not optimizing_session or all(map(_read_in_place, tensor.outputs)))]
        for tensor, array in shared:
            tensor.values = LazyValues(reference_tensor(tensor.name, array))
        try:
            return self.to_proto(), {tensor.name: array for tensor, array in shared}
        finally:
            for tensor, array in shared:
                tensor.values = array

    def save(self, path: Path, data_location: str) -> bool:
        """Write the model to `path`; whether its large weights went to `data_location` beside it.

        They do when the file would pass protobuf's 2 GB limit: written from the arrays one by one (4 KiB
        aligned, so ONNX Runtime can map them), never through a proto of that size."""
        proto, weights = self.shared_proto()
        if proto.ByteSize() + sum(array.nbytes for array in weights.values()) < PROTOBUF_LIMIT:
            onnx.save_model(self.to_proto(), str(path))
            return False
        places = {}
        with open(Path(path).parent / data_location, "wb") as data:
            for name, array in weights.items():
                data.write(bytes(-data.tell() % DATA_ALIGNMENT))
                places[name] = (data.tell(), array.nbytes)
                data.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        for tensor in proto.graph.initializer:
            if tensor.name in places:
                offset, length = places[tensor.name]
                del tensor.external_data[:]
                for key, value in (("location", data_location), ("offset", offset), ("length", length)):
                    tensor.external_data.add(key=key, value=str(value))
        onnx.save_model(proto, str(path))
        return True

    def new_session(self, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    prepack: bool | None = None) -> ort.InferenceSession:
        """A session that shares this model's weights (see `session`)."""
        proto, weights = self.shared_proto(optimizing_session=level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        return session(proto, level, weights=weights, prepack=prepack)

    def session(self) -> ort.InferenceSession:
        """The model's cached session, as users run it (all graph optimizations, weights repacked up to
        `sessions.PREPACK_MAX_BYTES`)."""
        if self._session is None:
            try:
                self._session = self.new_session()
            except Exception as exc:
                raise UnsupportedError(f"ONNX Runtime cannot run this model: {first_line(exc)}") from exc
        return self._session

    def invalidate(self) -> None:
        self._session = None

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        names = [i.name for i in self.session().get_inputs()]
        outputs = self.session().run(None, {name: feeds[name] for name in names})
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    def copy(self) -> "OnnxModel":
        return OnnxModel(self.graph.copy(), self.ir_version, self.metadata)


def _read_in_place(node: gs.Node) -> bool:
    """Whether ONNX Runtime reads this node's weights only as it runs (see graphopt.onnx.sessions)."""
    return node.op in SHARED_CONSUMERS and any(not isinstance(t, gs.Constant) for t in node.inputs)


def split_ir(model: onnx_ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` as a proto whose large initializers are by reference, and their arrays by name: numpy views of
    the tensors the IR holds (torch.onnx's are the module's own tensors), read-only, never copies."""
    swapped, weights = {}, {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, (onnx_ir.TensorProtoTensor, onnx_ir.ExternalTensor)):
            continue               # serialized as it is (a small or by-reference proto tensor)
        array = tensor.numpy()
        if not shareable(array):
            continue
        array = array.view()
        array.flags.writeable = False          # a view of a module's parameter: no pass writes into it
        swapped[name], weights[name] = tensor, array
        value.const_value = onnx_ir.ExternalTensor(BY_REFERENCE, 0, array.nbytes, tensor.dtype, shape=tensor.shape,
                                                   name=name)
    try:
        return onnx_ir.serde.serialize_model(model), weights
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor


#: Offsets of weights in an external-data file are multiples of this (a page: ONNX Runtime maps aligned data).
DATA_ALIGNMENT = 4096

#: ml_dtypes' 4-bit types (ONNX INT4/UINT4, two values a byte in a file).
FOUR_BIT = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


def _pack_four_bit(graph: gs.Graph) -> None:
    """4-bit constants as onnx's packed tensors: onnx-graphsurgeon writes a loaded array's bytes as they lie in
    memory, one byte a value, which a 4-bit tensor's size rejects; a tensor onnx converted it exports as is."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.dtype in FOUR_BIT:
            tensor.values = LazyValues(onnx.numpy_helper.from_array(np.asarray(tensor.values), tensor.name))


def _min_ir_version(model: onnx.ModelProto) -> int:
    """The IR version the model's opsets need (onnx's own table)."""
    try:
        return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except TypeError:  # older onnx without ignore_unknown
        return onnx.helper.find_min_ir_version_for(list(model.opset_import))


class OnnxIR:
    """The pass manager's IR protocol for `OnnxModel`s.

    `level`: ONNX Runtime's graph optimizations when running a module (default: all of them, through the
    model's cached session). A check that compares two graphs to float32 rounding runs them at
    ORT_ENABLE_BASIC, whose rewrites are exact (passes/onnx/skip_padding explains why).
    """

    #: Models that keep their cached session at once: a speed check times two against each other. Any other
    #: model the pass manager holds (the original, the fastest so far) drops its session until it runs again,
    #: so a large model's repacked weights are held at most twice.
    LIVE_SESSIONS = 2

    def __init__(self, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> None:
        self.level = level
        self._live: list[OnnxModel] = []

    def copy(self, module: OnnxModel) -> OnnxModel:
        return module.copy()

    def finalize(self, module: OnnxModel) -> None:
        """Drop dead nodes, sort topologically and check the model; the session is rebuilt lazily."""
        module.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        module.invalidate()
        check_model(module.shared_proto()[0])

    def count_nodes(self, module: OnnxModel) -> int:
        return len(module.graph.nodes)

    def param_bytes(self, module: OnnxModel) -> int:
        return sum(t.values.nbytes for t in module.graph.tensors().values()
                   if isinstance(t, gs.Constant)) + sum(
            _const_node_bytes(n) for n in module.graph.nodes if n.op == "Constant")

    def run(self, module: OnnxModel, inputs: Inputs) -> list[Any]:
        if self.level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            self._keep_live(module)
            return [module.run(kwargs) for _, kwargs in inputs]
        sess = module.new_session(self.level, prepack=False)
        names = [i.name for i in sess.get_inputs()]
        return [tuple(torch.from_numpy(np.asarray(o)) for o in sess.run(None, {n: kwargs[n] for n in names}))
                for _, kwargs in inputs]

    def _keep_live(self, module: OnnxModel) -> None:
        others = [m for m in self._live if m is not module]
        for model in others[:len(others) - (self.LIVE_SESSIONS - 1)]:
            model.invalidate()
        self._live = others[len(others) - (self.LIVE_SESSIONS - 1):] + [module]

    def dump(self, module: OnnxModel, directory: Path) -> None:
        onnx.save_model(module.to_proto(), str(directory / "graph.onnx"))
        (directory / "graph.txt").write_text(str(module.graph))


def _const_node_bytes(node: gs.Node) -> int:
    value = node.attrs.get("value")
    return value.values.nbytes if isinstance(value, gs.Constant) else 0


def random_inputs(model: OnnxModel, n: int, seed: int = 0, dims: dict[str, int] | None = None,
                  like: dict[str, np.ndarray] | None = None) -> list[tuple[tuple, dict]]:
    """`n` random feeds of the graph's declared input shapes and dtypes.

    With `like` (a calibration feed), each input is a look-alike of it: its
    shape, floats with its mean and spread, integers within its range
    (`graphopt.frontend.inputs.look_alike`, as for torch models), so verification exercises the
    value ranges the model is calibrated for. Otherwise symbolic dimensions
    take `dims[name]` when given, else 2 on axis 0 (batch) and 16 elsewhere
    (one value per symbol, so inputs sharing a sequence axis agree); floats
    are standard normal; integer inputs that index a constant table (`Gather`
    on an embedding) are drawn below its row count; integer inputs named like
    masks are all ones; other integers are 0/1.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    dims = dict(dims or {})
    feeds = []
    for _ in range(n):
        feed = {}
        for tensor in model.graph.inputs:
            if like is not None and tensor.name in like:
                feed[tensor.name] = look_alike(torch.as_tensor(np.array(like[tensor.name])), generator).numpy()
                continue
            shape = []
            for axis, dim in enumerate(tensor.shape or ()):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                else:
                    key = str(dim) if dim is not None else f"{tensor.name}:{axis}"
                    shape.append(dims.setdefault(key, 2 if axis == 0 else 16))
            dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
            feed[tensor.name] = _random_array(model, tensor, tuple(shape), dtype, rng)
        feeds.append(((), feed))
    return feeds


def _random_array(model: OnnxModel, tensor: gs.Variable, shape: tuple[int, ...], dtype: np.dtype,
                  rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype)
    if "mask" in tensor.name.lower():
        return np.ones(shape, dtype)
    rows = _gathered_rows(tensor)
    return rng.integers(0, rows if rows else 2, size=shape).astype(dtype)


def _gathered_rows(tensor: gs.Tensor, depth: int = 3) -> int | None:
    """Row count of the smallest constant table `tensor` indexes (through casts), if any."""
    rows = None
    for consumer in tensor.outputs:
        if consumer.op == "Gather" and len(consumer.inputs) > 1 and consumer.inputs[1] is tensor \
                and isinstance(consumer.inputs[0], gs.Constant):
            axis = consumer.attrs.get("axis", 0)
            found = consumer.inputs[0].shape[axis]
        elif consumer.op in ("Cast", "Unsqueeze", "Reshape", "Flatten") and depth > 0:
            found = _gathered_rows(consumer.outputs[0], depth - 1)
        else:
            found = None
        if found is not None:
            rows = found if rows is None else min(rows, found)
    return rows
