"""torch → ONNX: the module captured by torch.export and converted by torch.onnx (dynamo), its program
handed on as a proto whose large weights are by reference plus those weights (never serialized whole)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import numpy as np
import onnx
import torch
import torch.fx.experimental._config

from graphopt.errors import ExportError

from .ir import split_ir
from .signature import rename_outputs


def torch_export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                  opset: int, output_names: list[str], ops: str = "standard"
                  ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """torch.onnx's program as a proto with its large weights by reference, and those weights: views of the
    tensors the program holds (the module's parameters, the exporter's folded constants), not copies.
    `ops`: the operators graphopt's custom ops are written with (`translations.translation_table`)."""
    from .translations import translation_table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(capture(module, args, kwargs, dynamic_shapes), args,
                                        kwargs=kwargs or None, dynamo=True,
                                        dynamic_shapes=dynamic_shapes, opset_version=opset,
                                        custom_translation_table=translation_table(opset, ops),
                                        verbose=False, optimize=False,
                                        report=False)
            rename_outputs(program.model, output_names)
            with _without_quadratic_rewrites():
                program.optimize()
        except Exception as exc:
            text = " ".join(str(exc).split())[:600]
            raise ExportError(f"torch.onnx.export could not export the module: {type(exc).__name__}: {text}") from exc
    return split_ir(program.model)


#: onnxscript rewrite rules (in the optimizer torch.onnx runs) whose matcher walks the whole graph for each
#: candidate node: SlicesSplit (two Slices of one tensor ⇒ Split) has two output nodes, and onnxscript
#: matches those by listing every node of the graph per Slice, O(slices × nodes). On Swin-T (2,218 nodes,
#: 133 Slices) the optimizer took 12.5 s with it and 5.4 s without, to the same 613 nodes (the rule never
#: fired); ONNX Runtime splits such slices itself.
QUADRATIC_REWRITES = ("SlicesSplit",)


@contextlib.contextmanager
def _without_quadratic_rewrites() -> Iterator[None]:
    """torch.onnx's optimizer (`ONNXProgram.optimize`) with the default rewrite rules less QUADRATIC_REWRITES."""
    try:
        from onnxscript import rewriter
        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):     # another onnxscript: its defaults, unchanged
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in QUADRATIC_REWRITES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def capture(module: torch.nn.Module, args: tuple, kwargs: dict,
             dynamic_shapes: Any) -> torch.nn.Module | torch.export.ExportedProgram:
    """What torch.onnx.export is given: `module` captured as torch.onnx's first strategy does (torch.export,
    non-strict), with every `contiguous(x)` node written as `clone(x, contiguous_format)`.

    The same values: both return x's elements in a fresh contiguous tensor. torch.onnx's decomposition
    step retraces the graph more than once, and `contiguous` is dropped on a trace where x's strides say
    it is already contiguous: the strides of a kept scaled_dot_product_attention differ between those
    traces (its CPU kernel's layout on one, the standard one on the next), so the reshape after
    `transpose(attention).contiguous()` becomes a `view` of the transposed output, which the next trace
    refuses ("Cannot view a tensor with shape [B, S, H, D] …": T5's attention, Swin's windows). A clone is
    never dropped. The program is a fresh one: the module's own graph is not touched.

    Where torch.export fails, the module itself (torch.onnx then tries its other capture strategies and
    reports their errors)."""
    try:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):   # as torch.onnx: 0/1-sized axes
            program = torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes,
                                          strict=False)
    except Exception:  # noqa: BLE001  (torch.onnx's own strategies take over and raise what they find)
        return module
    contiguous = torch.ops.aten.contiguous.default
    for node in program.graph.nodes:
        if node.target is contiguous:
            node.target = torch.ops.aten.clone.default
            node.kwargs = {"memory_format": node.kwargs.get("memory_format", torch.contiguous_format)}
    program.graph_module.recompile()
    return program
