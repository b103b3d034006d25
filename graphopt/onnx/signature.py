"""The exported file's signature: which input axes stay dynamic (torch.export's `dynamic_shapes`, then
the names those axes get in the file) and the names of its outputs (the model's own, or the caller's)."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import onnx
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from graphopt.errors import InputError


def dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict,
                    dynamic_axes: str | Mapping[str, Mapping[int, str]] | None) -> Any:
    """torch.export dynamic_shapes: Dim.AUTO on the axes that may vary."""
    if dynamic_axes is None:
        return None
    symbolic = _symbolic_axes(module)
    names = _input_names(module, args, kwargs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    specs = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            specs.append(None)
            continue
        if isinstance(dynamic_axes, Mapping):
            axes = set(dynamic_axes.get(names[index], {}))
        else:
            axes = _auto_axes(leaf)
        if symbolic is not None:
            axes &= symbolic.get(index, set())
        specs.append({axis: Dim.AUTO for axis in sorted(axes)} or None)
    shaped_args, shaped_kwargs = pytree.tree_unflatten(specs, spec)
    return _by_parameter(module, shaped_args, shaped_kwargs)


def _auto_axes(leaf: torch.Tensor) -> set[int]:
    axes = {0}
    if not leaf.is_floating_point() and leaf.dim() >= 2:
        axes.add(1)   # token ids, masks: [batch, sequence]
    return axes


def _symbolic_axes(module: torch.nn.Module) -> dict[int, set[int]] | None:
    """For a captured GraphModule: the axes of each input leaf that are symbolic; None for eager modules."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    result = {}
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            result[index] = {axis for axis, size in enumerate(value.shape) if not isinstance(size, int)}
    return result


def _input_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """A name per flattened input leaf: the forward() parameter (with an index for nested inputs)."""
    import inspect
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError:
        bound = {f"input_{i}": a for i, a in enumerate(args)} | kwargs
    names = []
    for name, value in bound.items():
        leaves = pytree.tree_leaves(value)
        names += [name] if len(leaves) == 1 else [f"{name}_{i}" for i in range(len(leaves))]
    return names


def _by_parameter(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    import inspect
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        return dict(bound.arguments)
    except TypeError:
        return (*args, *kwargs.values())


def output_names(outputs: Any) -> list[str]:
    """A name per tensor leaf of a model's outputs, from where it sits: a `ModelOutput`'s or dict's key
    (`last_hidden_state`, `logits`), joined with `_` through nesting (`past_key_values_0_1`); a lone tensor
    is `output`, a tuple's items `output_0`, `output_1`, …"""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts or isinstance(path[0], pytree.SequenceKey):
            parts.insert(0, "output")
        names.append(re.sub(r"[^0-9A-Za-z_.]+", "_", "_".join(parts)))
    return names


def requested_names(requested: Sequence[str] | None, reference: Any) -> list[str]:
    names = output_names(reference)
    if requested is None:
        return names
    requested = list(requested)
    if len(requested) != len(names) or len(set(requested)) != len(requested) or not all(requested):
        raise InputError(f"output_names={requested!r}: give {len(names)} distinct non-empty names, one per output "
                         f"tensor (the model's own: {names})")
    return requested


def rename_outputs(model: Any, names: list[str]) -> None:
    """Name the graph outputs (an onnx_ir model, renamed before any rewrite so that they carry the names
    through). An output that is also a graph input or another output, or whose wanted name another
    value of the graph already has, keeps the exporter's name."""
    import onnx_ir as ir
    outputs = list(model.graph.outputs)
    if len(outputs) != len(names):
        return                                   # the check after export names the mismatch
    taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    taken |= {v.name for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs}
    inputs = set(map(id, model.graph.inputs))
    for value, name in zip(outputs, names):
        if value.name == name or name in taken or id(value) in inputs or outputs.count(value) > 1:
            continue
        taken.discard(value.name)
        value.name = name
        taken.add(name)


def name_dynamic_axes(proto: onnx.ModelProto, args: tuple, kwargs: dict,
                       dynamic_axes: str | Mapping[str, Mapping[int, str]] | None) -> None:
    """Rename the exporter's symbols (s0, s72, …) to `batch`, `sequence` or the requested names.

    ONNX Runtime takes axes that share a dim_param to have one size (and plans buffers on it). The exporter
    gives inputs that always agree (a mask beside its token ids) separate symbols too, so the default names
    join symbols whose example sizes agree; a symbol whose example size differs from the one a name already
    stands for (an encoder-decoder's `decoder_input_ids` after `input_ids`: two sequence lengths) is named
    after its input and axis instead."""
    if dynamic_axes is None:
        return
    rename: dict[str, str] = {}
    size_of_name: dict[str, int] = {}
    named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    positional = iter(t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
    for graph_input in proto.graph.input:
        example = named.get(graph_input.name)
        example = example if example is not None else next(positional, None)
        dims = graph_input.type.tensor_type.shape.dim
        floating = graph_input.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                               onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
        for axis, dim in enumerate(dims):
            if not dim.dim_param or dim.dim_param in rename:
                continue
            if isinstance(dynamic_axes, Mapping):
                wanted = dynamic_axes.get(graph_input.name, {}).get(axis, f"{graph_input.name}_{axis}")
            else:
                wanted = "batch" if axis == 0 else "sequence" if axis == 1 and not floating \
                    else f"{graph_input.name}_{axis}"
                size = example.shape[axis] if example is not None and axis < example.dim() else None
                if size_of_name.setdefault(wanted, size) != size:
                    wanted = f"{graph_input.name}_{axis}"
            rename[dim.dim_param] = wanted
    for info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
