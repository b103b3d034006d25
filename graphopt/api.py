"""`graphopt.optimize`: capture, run the pass pipeline, return a drop-in module.

    opt = graphopt.optimize(model)                       # lazy: captures on the first call
    opt = graphopt.optimize(model, example_inputs, ...)  # eager: captures now
    y = opt(*example_inputs); print(opt.report)

The returned `OptimizedModule` has the model's call signature and output
structure (tuples, dicts, Hugging Face ModelOutputs survive torch.export's
pytree specs). The caller's model is never modified: capture works on a
deep copy.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .compile.runner import InductorRunner
from .engine.config import Options, parse_options
from .engine.pass_manager import FxIR, PassManager
from .engine.pipeline import build_passes
from .engine.verify import run_on
from .errors import InputError
from .frontend.capture import capture
from .frontend.inputs import verification_inputs
from .report import Report


class OptimizedModule(torch.nn.Module):
    """The optimized model: call it like the original; `.report` says what changed."""

    def __init__(self, model: torch.nn.Module | None, options: Options) -> None:
        super().__init__()
        self.options = options
        self._manager = PassManager(  # built now so that bad options fail before any capture
            build_passes(options), FxIR(), level=options.level, enable=options.enable,
            disable=options.disable, verify=options.verify, reproducer_dir=options.reproducer_dir,
            measure_latency=options.measure_latency, progress=options.progress,
            speed_check=options.speed_check, on_record=options.on_record)
        self.graph_module: fx.GraphModule | None = None
        self.report = Report()
        self._pending = [model]   # lists, so the original is not registered as a submodule
        self._original: list[torch.nn.Module | None] = [None]
        self._in_spec: pytree.TreeSpec | None = None
        self._runner: Any = None   # the torch.compile'd graph when options.backend == "inductor"

    @property
    def captured(self) -> bool:
        return self.graph_module is not None

    @property
    def original(self) -> torch.nn.Module | None:
        """The model as given (in eval mode), once captured: what the export's speed check compares with."""
        return self._original[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.graph_module is None:
            self._optimize(args, kwargs)
        self._check_structure(args, kwargs)
        try:
            return (self._runner or self.graph_module)(*args, **kwargs)
        except AssertionError as exc:   # torch.export's input guards: a shape the graph was not captured for
            if "Guard failed" not in str(exc):
                raise
            raise InputError(f"the inputs do not have a shape the optimized graph accepts ({exc}); dimensions "
                             "other than the batch (and the sequence of integer inputs) are fixed at capture: "
                             "optimize again with example inputs of this shape") from exc

    def _optimize(self, args: tuple, kwargs: dict) -> None:
        model = self._pending[0]
        options = self.options
        start = time.perf_counter()
        captured = capture(model, args, kwargs)
        gm = captured.module
        inputs = verification_inputs(args, kwargs, options.verify_samples, options.seed,
                                     calibration=options.calibration_data, dynamic_batch=captured.dynamic_batch,
                                     other_shape=captured.other_shape)
        reference = run_on(captured.original, inputs) if options.verify else []
        manager = self._manager
        report = Report(meta={
            "level": options.level_name, "quantize": options.quantize, "prune": options.prune,
            "verify": options.verify, "dynamic_batch": captured.dynamic_batch, "notes": captured.notes,
            "passes": [p.name for p in manager.selected]})
        gm, report = manager.run(gm, inputs, reference, report)
        self.graph_module, self.report = gm, report
        runner = InductorRunner(gm, captured.dynamic_batch) if options.backend == "inductor" else None
        if options.speed_check is not None:
            runner = _never_slower_than_the_model(captured.original, runner or gm, args, kwargs, options,
                                                  report) or runner
        self._runner = runner
        report.meta["total_s"] = time.perf_counter() - start
        self._in_spec = pytree.tree_structure((args, kwargs))
        self._pending, self._original = [None], [captured.original]

    def _check_structure(self, args: tuple, kwargs: dict) -> None:
        spec = pytree.tree_structure((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise InputError(
                "the call's inputs do not have the structure the model was captured with: "
                f"expected {_describe(self._in_spec)}, got {_describe(spec)}")

    def train(self, mode: bool = True) -> "OptimizedModule":
        """The graph was captured in eval mode; train() only flips the flag (see finetune)."""
        self.training = mode
        return self


def _never_slower_than_the_model(model: torch.nn.Module, optimized: Callable[..., Any], args: tuple, kwargs: dict,
                                 options: Options, report: Report) -> torch.nn.Module | None:
    """The pass manager guarantees the result is not slower than the captured graph; capture itself can cost
    time (torch.export's calling convention and guards), and so can inductor's code for it (backend="inductor":
    the passes were timed on the eager graphs). Time the result as calls run it (`optimized`) against the model
    as given the same way; if it is measurably slower (whole 95 % interval above 1), calls run the model as
    given instead, and the report says so. Returns the module calls should run, or None for `optimized`."""
    verdict = options.speed_check.compare(lambda: model(*args, **kwargs), lambda: optimized(*args, **kwargs))
    report.meta["speed_vs_model"] = f"optimized vs the model as given: {verdict.describe()}"
    if not verdict.low > 1.0:
        return None
    why = (f"the optimized graph was slower than the model as given ({verdict.ratio:.2f}× slower, 95 % CI "
           f"{verdict.low:.2f}–{verdict.high:.2f}×): calls run the model as given (export_onnx still exports the "
           "optimized graph)")
    report.meta["speed"] = f"{report.meta.get('speed', '')}; {why}".lstrip("; ")
    warnings.warn(f"graphopt: {why}")
    return model


def _describe(spec: pytree.TreeSpec) -> str:
    text = str(spec)
    return text if len(text) < 200 else text[:200] + "…"


def optimize(model: torch.nn.Module, example_inputs: tuple | None = None, *,
             example_kwargs: Mapping[str, Any] | None = None,
             level: str | int | None = None, quantize: str | None = "auto",
             prune: float | Mapping[str, float] | None = None,
             calibration_data: Iterable[Any] | None = None,
             verify: bool = True, **options: Any) -> OptimizedModule:
    """Optimize `model`; see the module docstring and DESIGN.md for the options.

    With `example_inputs` (a tuple of positional args) and/or `example_kwargs`
    the model is captured and optimized now; without them, on the first call.
    `quantize="auto"` is "int8-dynamic" at O2/O3 and nothing below; None keeps
    the model float at any level.
    Further options: enable=/disable= (pass names), accuracy_budget=,
    backend=, reproducer_dir=, verify_samples=, measure_latency=, progress=, seed=,
    speed_check= (True: default; False: off; a dict of graphopt.engine.speed.SpeedCheck fields, e.g.
    {"min_gain": 0.05}), on_record= (called with each pass's PassRecord as it finishes),
    generation=True with max_cache_len= (a causal LM for .generate(): see graphopt.llm), and with it
    kv_cache="int8" (keys and values stored int8 per head and token; kept only if the next-token logits keep
    a cosine ≥ kv_cache_budget, default 0.99, to the float cache's).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"graphopt.optimize takes a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        if isinstance(example_inputs, list):
            example_inputs = tuple(example_inputs)
        else:
            raise InputError(f"example_inputs must be a tuple of positional arguments, got "
                             f"{type(example_inputs).__name__}; wrap a single tensor as (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise InputError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    parsed = parse_options(level=level, quantize=quantize, prune=prune,
                           calibration_data=calibration_data, verify=verify, **options)
    if parsed.generation:   # a causal LM for generate(): graphopt/llm
        from .llm import optimize_for_generation
        return optimize_for_generation(model, example_inputs, example_kwargs, parsed)
    opt = OptimizedModule(model, parsed)
    if example_inputs is not None or example_kwargs is not None:
        opt._optimize(tuple(example_inputs or ()), dict(example_kwargs or {}))
    return opt
