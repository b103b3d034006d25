"""`graphopt.export_onnx`: an optimized (or any) torch module to a checked ONNX file.

    graphopt.export_onnx(opt, example_inputs, "model.onnx")

1. `torch.onnx.export(..., dynamo=True)` of the optimized graph, with
   graphopt's custom int8 ops translated to standard ONNX operators
   (`graphopt.onnx.translations`), so ONNX Runtime (CPU, CUDA) and TensorRT
   run the file without vendor domains (`torch_export.py`: the module captured
   by torch.export, its `contiguous` nodes written as clones, the program handed
   to torch.onnx and taken back without serializing its weights).
2. Cleanup through the ONNX passes, run by the pass manager (verified on the
   example inputs, rolled back if a pass changes the outputs; the records go
   to the optimized module's `report.meta["export_passes"]`): constant folding
   under the size guard, padding skipped, dead nodes, unused initializers,
   topological sort.
3. Dynamic axes: batch (axis 0) of every input, and sequence (axis 1) of
   integer token inputs, wherever the graph allows them; named `batch` and
   `sequence` in the file.
4. Checked before the file is moved into place: `onnx.checker`, an ONNX
   Runtime session, and ONNX Runtime's outputs against the torch module's on
   the example inputs, within the scheme's tolerance. The check runs with
   ONNX Runtime's basic (exact) graph optimizations, so it tests the file:
   its extended fusions may swap DequantizeLinear + MatMul for MatMulNBits,
   which also quantizes the activations (4e-3 relative error seen on a
   32-wide layer) — a runtime's choice, not the file's meaning. Written
   atomically; models over 2 GB get external data.

`ops="onnxruntime"` (opt-in) writes ONNX Runtime's contrib operators (domain com.microsoft) where they
apply, as onnxruntime-genai's builder does, for a file only ONNX Runtime runs: int4 and int8 weight-only
linears as MatMulNBits (`translations.py`: float32 activations, what the module computes), and a generation
module's attention with its KV-cache write as GroupQueryAttention (`graphopt.passes.onnx.gqa`, an export
pass: verified, recorded, timed like the cleanups; its docstring says which inputs it reads). The file's
inputs and outputs are the standard file's, so `graphopt.llm.onnx.generate_onnx` runs either. Its
default opset is 23 wherever ONNX Runtime runs it (attention is then one Attention node to rewrite).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

from graphopt.errors import ExportError, InputError, OptionError, VerificationError, first_line
from graphopt.engine.config import EXPORT_OPS
from graphopt.engine.verify import LOSSLESS, Budget, compare

from .export_speed import export_speed_check, faster_file
from .files import check_destination, save_model
from .ir import OnnxModel
from .sessions import session
from .signature import dynamic_shapes, name_dynamic_axes, requested_names
from .torch_export import torch_export
from .translations import opset_problem

#: Export tolerance per scheme, against the torch module on the example inputs.
#: Float: ONNX Runtime's fusions re-associate float32 sums (see verify.LOSSLESS).
#: Int8: the ONNX graph computes the same integer products, but a value that
#: lands on a rounding boundary in one runtime may round the other way in the
#: other (a different summation order before quantization): one int8 step,
#: 1/127 of a row's range, on a few elements. Through a deep model such flips
#: compound, so these are floors: `_budget` widens them to what the int8
#: module's own error against the float model allows (see there).
def default_opset(scheme: str | None, ops: str = "standard") -> int:
    """The opset `export_onnx` writes when none is asked for.

    An int8 graph, or a file of ONNX Runtime's contrib operators (`ops="onnxruntime"`, which only ONNX Runtime
    runs): 23 where the installed onnxruntime runs it (1.23 on), so that scaled_dot_product_attention is one
    Attention op (measured on all-MiniLM-L6-v2 int8, 2 threads, interleaved: the opset-23 file ran in 0.92×
    the time of the opset-20 one, which computes attention in ~8 ops with a softmax NaN guard; the
    GroupQueryAttention rewrite anchors on it). A float graph: 20, because it is often handed on to other tools,
    and ONNX Runtime's own quantize_dynamic (1.32) turns a default-domain Attention into an invalid
    QAttention (bench/results/onnx.md at opset 23)."""
    major, minor = (int(part) for part in ort.__version__.split(".")[:2])
    return 23 if (scheme is not None or ops == "onnxruntime") and (major, minor) >= (1, 23) else 20

TOLERANCES = {
    None: LOSSLESS,
    "int8-dynamic": Budget(max_rel_err=3e-2, min_cosine=0.999),
    "int8-static": Budget(max_rel_err=3e-2, min_cosine=0.999),
    # weight-only: the file dequantizes as the ops' float32 paths do (exact q or q − z, one rounding by the
    # scale), but at small M (≤ FAST_ROWS) the ops run torch's bfloat16 kernels (kernels/int8mm.py, int4mm.py): x,
    # scales and the output rounded to bfloat16 (u = 2⁻⁹), ≤ 3u · Σ|x||w| + u|y| per output — rounding errors
    # of random sign, a few u of the largest output, far below the weights' own step (1/254 of a row's range
    # for int8, 1/30 of a group's for int4).
    "int8-weight-only": Budget(max_rel_err=1e-2, min_cosine=0.9999),
    "int4-weight-only": Budget(max_rel_err=1e-2, min_cosine=0.9999),
}


def export_onnx(opt: torch.nn.Module, example_inputs: tuple, path: str | os.PathLike,
                example_kwargs: Mapping[str, Any] | None = None,
                dynamic_axes: str | Mapping[str, Mapping[int, str]] | None = "auto",
                opset: int | None = None, tolerance: Budget | None = None, skip_padding: bool = True,
                speed_check: Any = None, output_names: Sequence[str] | None = None,
                on_record: Callable[[Any], None] | None = None, ops: str = "standard") -> Path:
    """Export `opt` (an `OptimizedModule` or any `nn.Module`) to `path`; returns the path.

    opset: the ONNX opset (default: `default_opset(scheme, ops)`: 23 for int8 graphs and for ops="onnxruntime",
        20 for float ones).

    dynamic_axes: "auto" (batch, and sequence for integer inputs), None (all
    static), or {input name: {axis: symbol name}}.
    tolerance: overrides the scheme's export tolerance (`TOLERANCES`).
    skip_padding: run row-wise work on real tokens only where the outputs ignore padded ones
        (`graphopt.passes.onnx.skip_padding`; exact, checked on random padding masks).
    speed_check: True, False, a dict of `graphopt.engine.speed.SpeedCheck` fields (default: the optimized module's
        own option). Each cleanup pass is timed in ONNX Runtime and rolled back if measurably slower, and
        an int8 file is never measurably slower than the float export of the same model (export_speed.py).
    output_names: a name per output tensor; by default the model's own (`signature.output_names`): a Hugging
        Face model's `last_hidden_state`, `logits`, …, a dict's keys, `output` for a lone tensor.
    on_record: called with each export pass's PassRecord as it finishes (live progress, as optimize's).
    ops: "standard" (default): the default ONNX domain only, for any runtime; "onnxruntime": ONNX Runtime's
        contrib operators where they apply (MatMulNBits, GroupQueryAttention; see the module docstring).
    """
    if ops not in EXPORT_OPS:
        raise OptionError(f"ops={ops!r}: choose one of {', '.join(map(repr, EXPORT_OPS))}")
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tuple of positional arguments, got "
                         f"{type(example_inputs).__name__}; wrap a single tensor as (x,)")
    if not isinstance(opt, torch.nn.Module):
        raise InputError(f"export_onnx takes the module graphopt.optimize returned (or any torch.nn.Module), "
                         f"got {type(opt).__name__}")
    kwargs = dict(example_kwargs or {})
    if hasattr(opt, "decoder_inputs"):   # a generation module (graphopt.llm): the decoder step with its KV cache
        example_inputs, kwargs = opt.decoder_inputs(example_inputs, kwargs), {}
        skip_padding = False             # its attention_mask spans the cache: no padded rows to skip
    path = check_destination(None, path)
    module, scheme = _exportable(opt, example_inputs, kwargs)
    problem = opset_problem(module, opset or default_opset(scheme, ops), ops)
    if problem:
        raise InputError(problem)
    speed = export_speed_check(opt, speed_check)
    report = getattr(opt, "report", None)
    with torch.no_grad():
        reference = opt(*example_inputs, **kwargs)
    names = requested_names(output_names, reference)

    def build(source: torch.nn.Module, scheme_: str | None, timed: bool, opset_: int | None = None) -> OnnxModel:
        light, weights = torch_export(source, example_inputs, kwargs,
                                      dynamic_shapes(source, example_inputs, kwargs, dynamic_axes),
                                      opset_ or opset or default_opset(scheme_, ops), names, ops)
        name_dynamic_axes(light, example_inputs, kwargs, dynamic_axes)
        if hasattr(opt, "onnx_io_names"):     # a generation module names its decoder's inputs and outputs
            from graphopt.llm.onnx import rename_io
            light = rename_io(light, *opt.onnx_io_names())
        model = OnnxModel.bind(light, weights)
        return _cleanup(model, _feeds(model, example_inputs, kwargs), skip_padding, report if timed else None,
                        speed if timed else None, on_record if timed else None, ops)

    exported = build(module, scheme, True)
    feeds = _feeds(exported, example_inputs, kwargs)
    if opset is None and _refused_fully_optimized(exported, feeds):
        # ONNX Runtime's default (full) optimizations rewrite some opset-23 RotaryEmbedding nodes into a form
        # its kernel refuses (cos/sin caches of batch 1 again; seen on Llama): users run with the defaults, so
        # the file is written at opset 22, which has no RotaryEmbedding (the rotation stays plain ops).
        exported = build(module, scheme, True, ROTARY_FREE_OPSET)
        if report is not None and hasattr(report, "meta"):
            report.meta["export_opset"] = (f"opset {ROTARY_FREE_OPSET}: ONNX Runtime's default optimizations "
                                           "refused the opset-23 RotaryEmbedding form")
    budget = tolerance or _budget(opt, scheme)
    original = _original(opt)
    if speed is not None and scheme is not None and original is not None:
        float_model = faster_file(exported, lambda: build(original, None, False), feeds, speed, report)
        if float_model is not None:
            exported, budget = float_model, tolerance or TOLERANCES[None]
            with torch.no_grad():
                reference = original(*example_inputs, **kwargs)
            del float_model
    ops = _op_types(exported)

    def check(written: Path) -> None:
        try:
            onnx.checker.check_model(str(written))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported file fails onnx.checker: {first_line(exc)}; nothing was written") \
                from exc
        _check_outputs(_runtime_session(written, ops), feeds, reference, budget, ops)

    return save_model(exported, path, check=check)


ROTARY_FREE_OPSET = 22


def _refused_fully_optimized(model: OnnxModel, feeds: dict[str, np.ndarray]) -> bool:
    """Whether a file holding RotaryEmbedding fails to run under ONNX Runtime's default optimizations."""
    if not any(node.op == "RotaryEmbedding" for node in model.graph.nodes):
        return False
    try:
        runtime = model.new_session(prepack=False)
        runtime.run(None, {i.name: feeds[i.name] for i in runtime.get_inputs()})
    except Exception:  # noqa: BLE001  (any refusal of the runtime: the file must be written another way)
        return True
    return False


def _original(opt: torch.nn.Module) -> torch.nn.Module | None:
    """The model an OptimizedModule was made from (None for a plain module or a lazy one not yet run)."""
    return getattr(opt, "original", None)


def _exportable(opt: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.nn.Module, str | None]:
    """The module torch.onnx exports (the optimized graph when there is one) and its int8 scheme."""
    graph_module = getattr(opt, "graph_module", None)
    if hasattr(opt, "captured") and graph_module is None:
        with torch.no_grad():
            opt(*args, **kwargs)          # a lazy OptimizedModule captures on its first call
        graph_module = opt.graph_module
    if graph_module is None:
        return opt.eval() if not opt.training else _eval_copy(opt), None
    options = getattr(opt, "options", None)
    return graph_module, _scheme(graph_module, getattr(options, "quantize", None))


def _budget(opt: torch.nn.Module, scheme: str | None) -> Budget:
    """The scheme's tolerance, widened by the int8 module's own distance to the float model.

    An int8 graph run by ONNX Runtime rounds some activations the other way
    than torch does, so both are equally valid quantizations of the float
    model F. If the torch module T is within relative error e (angle θ) of F
    on the verification inputs (the report's final row), an export O that is
    no further from F than T is within 2e of T (triangle inequality), and at
    an angle ≤ 2θ, i.e. cosine ≥ 2 cos²θ − 1. A wrong translation lands far
    outside either bound.
    """
    floor = TOLERANCES.get(scheme, LOSSLESS)
    final = getattr(getattr(opt, "report", None), "final", None)
    if scheme is None or final is None or final.max_rel_err is None or final.min_cosine is None:
        return floor
    return Budget(max_rel_err=max(floor.max_rel_err, 2 * final.max_rel_err),
                  min_cosine=min(floor.min_cosine, 2 * final.min_cosine ** 2 - 1))


def _eval_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(module).eval()


def _scheme(graph_module: torch.fx.GraphModule, requested: str | None) -> str | None:
    """The int8 scheme whose ops are in the graph (None for a float graph)."""
    targets = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
    if not any("graphopt." in t for t in targets):
        return None
    return requested or "int8-dynamic"


def _cleanup(model: OnnxModel, feeds: dict[str, np.ndarray], skip_padding: bool,
             report: Any = None, speed_check: Any = None,
             on_record: Callable[[Any], None] | None = None, ops: str = "standard") -> OnnxModel:
    """The export's graph passes, run by the pass manager: first what makes the file runnable at all (rotary
    caches at the batch, opset 23: ONNX Runtime refuses the exporter's form, so that graph has no outputs to
    verify against; the export's final comparison with the torch module checks it), then the cleanups, each
    verified on the example feeds against the runnable graph, rolled back if it changes the outputs, and
    recorded: constant folding under the size guard, 4-bit weights as 4-bit initializers, padding skipped (exact,
    checked on random masks), with ops="onnxruntime" attention and its KV-cache write as GroupQueryAttention,
    dead nodes and unused initializers. With `speed_check`, each cleanup is also timed in ONNX Runtime and
    rolled back if it makes the file measurably slower.

    The records go to `report.meta["export_passes"]` when a report is given (the optimized module's)."""
    from graphopt.engine.pass_manager import PassManager
    from graphopt.passes.onnx import (ConstantFolding, DeadNodeElimination, GroupQueryAttentionFusion, Int4Weights,
                                      RotaryCachesAtBatch, SkipPadding)

    from .ir import OnnxIR
    ir, inputs = OnnxIR(), [((), feeds)]
    records = []
    if model.opset >= RotaryCachesAtBatch.min_opset:
        fixes = PassManager([RotaryCachesAtBatch()], ir, level=1, verify=False, measure_latency=False,
                            progress=False, on_record=on_record)
        model, fixed = fixes.run(model, inputs, None)
        records += fixed.records
    passes = [ConstantFolding(), Int4Weights(), *([SkipPadding([feeds])] if skip_padding else []),
              *([GroupQueryAttentionFusion()] if ops == "onnxruntime" else []), DeadNodeElimination()]
    manager = PassManager(passes, ir, level=1, measure_latency=speed_check is not None, progress=False,
                          speed_check=speed_check, on_record=on_record)
    try:
        reference = ir.run(model, inputs)
    except Exception as exc:  # onnxruntime's pybind errors: the exporter wrote a graph the runtime refuses
        raise ExportError(f"ONNX Runtime {ort.__version__} fails to run the exported graph on the example inputs: "
                          f"{_runtime_reason(exc, _op_types(model))}; nothing was written") from exc
    optimized, cleaned = manager.run(model, inputs, reference)
    records += cleaned.records
    if report is not None and hasattr(report, "meta"):
        report.meta["export_passes"] = [{"name": r.name, "modified": r.modified, "rolled_back": r.rolled_back,
                                         "code": r.code, "reason": r.reason, "matches": r.matches,
                                         "nodes": r.nodes} for r in records]
    optimized.graph.toposort()
    optimized.invalidate()
    return optimized


def _feeds(model: OnnxModel, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """The example inputs keyed by the ONNX graph's input names (tensor leaves, in order)."""
    leaves = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    names = [i.name for i in model.graph.inputs]
    if len(names) != len(leaves):
        raise InputError(f"the ONNX graph has {len(names)} inputs but the example inputs hold {len(leaves)} "
                         "tensors (a constant input was folded into the graph?)")
    return {name: leaf.detach().cpu().numpy() for name, leaf in zip(names, leaves)}


def _runtime_session(path: Path, ops: Mapping[str, str]) -> Any:
    """An ONNX Runtime session with basic (exact) graph optimizations, checking values (no weights repacked);
    `ExportError` if the runtime refuses."""
    try:
        return session(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, prepack=False)
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidGraph, NotImplemented, …)
        raise ExportError(f"ONNX Runtime {ort.__version__} cannot load the exported file: "
                          f"{_runtime_reason(exc, ops)}; nothing was written") from exc


def _op_types(model: OnnxModel) -> dict[str, str]:
    """{node name: operator type}."""
    return {n.name: n.op for n in model.graph.nodes}


def _runtime_reason(exc: Exception, ops: Mapping[str, str]) -> str:
    """ONNX Runtime's message, led by the operator type of the node it names (if it names one)."""
    text = first_line(exc)
    match = re.search(r"[Nn]ode[^']*'([^']+)'|Name:'([^']+)'", text)
    name = next((g for g in match.groups() if g), None) if match else None
    return f"{ops[name]} node {name!r}: {text}" if name in ops else text


def _check_outputs(sess: Any, feeds: dict[str, np.ndarray], reference: Any, budget: Budget,
                   ops: Mapping[str, str]) -> None:
    names = [o.name for o in sess.get_outputs()]
    try:
        outputs = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    except Exception as exc:  # onnxruntime's pybind errors
        raise ExportError(f"ONNX Runtime {ort.__version__} fails to run the exported file on the example inputs: "
                          f"{_runtime_reason(exc, ops)}; nothing was written") from exc
    expected = [leaf for leaf in pytree.tree_leaves(reference) if isinstance(leaf, torch.Tensor)]
    if len(outputs) != len(expected):
        raise VerificationError(f"the ONNX model has {len(outputs)} outputs, the torch module {len(expected)}")
    for name, got, want in zip(names, outputs, expected):
        errors = compare(torch.from_numpy(np.asarray(got)), want.detach().cpu())
        reason = budget.check(errors)
        if reason:
            raise VerificationError(
                f"ONNX Runtime output {name!r} differs from the torch module: {reason} "
                f"(max abs err {errors.max_abs:.3g}, max rel err {errors.max_rel:.3g}, "
                f"tolerance: {budget.describe()}); nothing was written")


__all__ = ["export_onnx", "TOLERANCES"]
