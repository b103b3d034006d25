"""The pass manager: run passes in order, verify after each, roll back on failure.

Modelled on TVM's PassContext (level, enable/disable by name, instruments),
torch.fx's pass infrastructure (a pass returns `PassResult`) and MLIR's pass
manager (verify after every pass, write a reproducer when a pass crashes).

A pass subclasses `Pass`, which holds the contract and its defaults:

    name: str            unique name, used by enable=/disable= and the report
    level: int           1 = O1 lossless, 2 = O2 int8, 3 = O3 pruning
    requires: tuple      names of passes that must have run before it
    fixed_point: bool    rerun until it reports no change (under a step cap)
    budget: Budget       error it may add (verify.LOSSLESS unless lossy)
    run(module) -> PassResult(module, modified, stats)
    bind(inputs)         called once before the passes run, with the verification
                         inputs (the example first); a pass that reads data keeps them

Names are unique within one manager (it refuses a list holding a name twice);
a pass that runs again later in a pipeline is `renamed` (`Pass.renamed`).

The manager is IR-agnostic: an `IR` adapter says how to copy, finalize, count,
run and dump a module, so the same manager drives FX graphs and ONNX graphs.
Each pass receives a copy; the copy is kept only if it lints, verifies and,
with a `speed_check` (graphopt/engine/speed.py), is not measurably slower than the
graph before it on the example inputs (timed interleaved against it). At the
end the result is timed against the captured graph the same way: where the
combination came out slower, the fastest verified variant is returned and
the report says why.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch.fx as fx

from ..errors import InputError, OptionError
from ..report import PassRecord, Report
from . import ir
from .rules import Reason, Reject
from .speed import SpeedCheck, Verdict, timing_context
from .timing import Timing, measure
from .verify import LOSSLESS, Budget, compare_runs

Inputs = Sequence[tuple[tuple, dict]]


@dataclass
class PassResult:
    module: Any
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base of every pass: the contract's fields with their defaults (O1, lossless, one run)."""
    name: str = "pass"
    level: int = 1
    requires: tuple[str, ...] = ()
    fixed_point: bool = False
    budget: Budget = LOSSLESS

    def run(self, module: Any) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def bind(self, inputs: "Inputs") -> None:
        """The verification inputs ((args, kwargs) pairs, the example first), before any pass runs."""

    def renamed(self, suffix: str) -> "Pass":
        """This pass under the name `name + suffix` (e.g. the pipeline's second canonicalization)."""
        self.name = f"{self.name}{suffix}"
        return self


class RewriteLog:
    """Matches and rejections of one pass run; becomes `PassResult.stats`.

    Every candidate a pattern looks at either matches or is rejected with a
    `Reject` (code and message), so the report (and a developer) can say why a
    rewrite did not fire, and a test can assert the code.
    """

    def __init__(self) -> None:
        self.matches: dict[str, int] = {}
        self.rejections: list[str] = []
        self.reasons: dict[Reason, int] = {}

    def matched(self, pattern: str, count: int = 1) -> None:
        self.matches[pattern] = self.matches.get(pattern, 0) + count

    def rejected(self, pattern: str, node: object, reason: Reject | str) -> None:
        """Log a rejection; a plain string is recorded under `Reason.OTHER`."""
        reason = reason if isinstance(reason, Reject) else Reject(Reason.OTHER, reason)
        self.rejections.append(f"{pattern} at {node}: {reason.message}")
        self.reasons[reason.code] = self.reasons.get(reason.code, 0) + 1

    @property
    def modified(self) -> bool:
        return bool(self.matches)

    def result(self, module: Any, **extra: Any) -> PassResult:
        stats = {"matches": dict(self.matches), "rejected": list(self.rejections), "reasons": dict(self.reasons),
                 **extra}
        return PassResult(module, self.modified, stats)


class IR(Protocol):
    """What the manager needs to know about one kind of module."""

    def copy(self, module: Any) -> Any: ...
    def finalize(self, module: Any) -> None: ...      # recompile + lint + refresh metadata
    def count_nodes(self, module: Any) -> int: ...
    def param_bytes(self, module: Any) -> int: ...
    def run(self, module: Any, inputs: Inputs) -> list[Any]: ...
    def dump(self, module: Any, directory: Path) -> None: ...  # for reproducers


class FxIR:
    """IR adapter for `torch.fx.GraphModule`s captured by torch.export."""

    def copy(self, module: fx.GraphModule) -> fx.GraphModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
            return copy.deepcopy(module)

    def finalize(self, module: fx.GraphModule) -> None:
        ir.lint(module)
        ir.refresh_meta(module)

    def count_nodes(self, module: fx.GraphModule) -> int:
        return ir.count_nodes(module)

    def param_bytes(self, module: fx.GraphModule) -> int:
        return ir.param_bytes(module)

    def run(self, module: fx.GraphModule, inputs: Inputs) -> list[Any]:
        from .verify import run_on
        return run_on(module, inputs)

    def dump(self, module: fx.GraphModule, directory: Path) -> None:
        (directory / "graph.py").write_text(module.code)
        (directory / "graph.txt").write_text(str(module.graph))


@dataclass
class PassManager:
    """Select passes by level and name, run them with verification and instruments.

    `inputs` are the verification inputs ((args, kwargs) pairs: the example
    inputs first, then random ones of the same shapes); `reference` the
    original model's outputs on them. Without `verify`, passes still lint.
    """
    passes: Sequence[Pass]
    ir: IR = field(default_factory=FxIR)
    level: int = 1
    enable: Sequence[str] = ()
    disable: Sequence[str] = ()
    verify: bool = True
    max_steps: int = 8
    reproducer_dir: str | os.PathLike | None = None
    measure_latency: bool = True
    progress: bool = False
    speed_check: SpeedCheck | None = None
    on_record: Callable[[PassRecord], None] | None = None   # called as each pass's record is made (live progress)

    def __post_init__(self) -> None:
        known = {p.name for p in self.passes}
        repeated = sorted({p.name for p in self.passes if sum(q.name == p.name for q in self.passes) > 1})
        if repeated:
            raise ValueError(f"pass names must be unique (report rows and enable=/disable= name them): "
                             f"{', '.join(repeated)} listed more than once")
        for option, names in (("enable", self.enable), ("disable", self.disable)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise OptionError(f"unknown pass name(s) in {option}=: {', '.join(unknown)}; "
                                  f"known passes: {', '.join(sorted(known))}")
        self.selected = [p for p in self.passes
                         if (p.level <= self.level or p.name in self.enable) and p.name not in self.disable]
        selected_names: list[str] = []
        for p in self.selected:
            missing = [r for r in p.requires if r not in selected_names]
            if missing:
                raise OptionError(f"pass {p.name!r} requires {', '.join(missing)} to run before it, "
                                  f"but it is disabled or below the level")
            selected_names.append(p.name)

    def run(self, module: Any, inputs: Inputs, reference: list[Any],
            report: Report | None = None) -> tuple[Any, Report]:
        report = report if report is not None else Report()
        self._latency_inputs = list(inputs[:1])  # latency is timed on the example inputs
        self._timings: list[tuple[Any, Timing]] = []   # latest timing of the modules still in play
        self._fastest: tuple[Any, Timing] | None = None  # fastest verified variant kept so far
        self._lossless: Any = module                     # the graph before the first lossy pass changed it
        if self.measure_latency:
            report.meta["timing"] = timing_context()
        for p in self.selected:
            if isinstance(p, Pass):
                p.bind(inputs)
        current, current_outputs = module, self.ir.run(module, inputs) if self.verify else None
        report.baseline = self._record("captured", current, 0.0, reference, current_outputs, {})
        steps = self._progress(self.selected)
        for p in steps:
            if hasattr(steps, "set_postfix_str"):
                steps.set_postfix_str(p.name)
            for step in range(self.max_steps if p.fixed_point else 1):
                current, current_outputs, record = self._run_one(p, current, current_outputs, inputs, reference)
                if step:
                    record.name = f"{p.name} (step {step + 1})"
                self._append(report, record)
                if record.rolled_back or not record.modified:
                    break
        if self.speed_check is not None and current is not module:
            current, current_outputs = self._never_slower(module, current, current_outputs, inputs, reference,
                                                          report)
        report.final = self._record("optimized", current, 0.0, reference, current_outputs, {})
        return current, report

    def _append(self, report: Report, record: PassRecord) -> None:
        report.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _never_slower(self, original: Any, final: Any, final_outputs: list[Any] | None, inputs: Inputs,
                      reference: list[Any], report: Report) -> tuple[Any, list[Any] | None]:
        """Time the result against the captured graph; if it is slower, return the fastest verified variant."""
        verdict = self._compare(original, final)
        report.meta["speed"] = f"optimized vs captured: {verdict.describe()}"
        if not verdict.low > 1.0:   # stricter than a pass's tolerance: the result may not be slower at all
            return final, final_outputs
        chosen, why = original, "the captured graph"
        candidates = {"the fastest verified intermediate graph": self._fastest[0] if self._fastest else None,
                      "the graph of the lossless passes alone": self._lossless}
        for name, candidate in candidates.items():
            if candidate is not None and candidate is not final and candidate is not original \
                    and not self._compare(original, candidate).low > 1.0:
                chosen, why = candidate, name
                break
        record = self._record("speed check", chosen, 0.0, reference, None, {})
        record.rolled_back, record.code = True, Reason.RESULT_SLOWER
        slower = f"{verdict.ratio:.2f}× slower, 95 % CI {verdict.low:.2f}–{verdict.high:.2f}×"
        record.reason = f"the optimized graph was slower than the captured one ({slower}): returned {why} instead"
        record.speed = slower
        self._append(report, record)
        report.meta["speed"] += f"; returned {why}"
        warnings.warn(f"graphopt: {record.reason}")
        return chosen, (self.ir.run(chosen, inputs) if self.verify else None)

    def _compare(self, before: Any, after: Any) -> Verdict:
        """Interleaved timing of two modules on the example inputs; remembers both timings."""
        verdict = self.speed_check.compare(lambda: self.ir.run(before, self._latency_inputs),
                                           lambda: self.ir.run(after, self._latency_inputs))
        self._remember(before, verdict.before)
        self._remember(after, verdict.after)
        return verdict

    def _remember(self, module: Any, timing: Timing) -> None:
        self._timings = [(m, t) for m, t in self._timings if m is not module][-3:] + [(module, timing)]

    def _progress(self, passes: Sequence[Pass]):
        if not self.progress:
            return passes
        from tqdm.auto import tqdm
        return tqdm(passes, desc="graphopt passes", unit="pass", leave=False, disable=None)  # hidden off a TTY

    def _run_one(self, p: Pass, current: Any, current_outputs: list[Any] | None,
                 inputs: Inputs, reference: list[Any]) -> tuple[Any, list[Any] | None, PassRecord]:
        start = time.perf_counter()
        try:
            result = p.run(self.ir.copy(current))
            outputs = current_outputs
            if result.modified:
                self.ir.finalize(result.module)
                outputs = self.ir.run(result.module, inputs) if self.verify else None
        except InputError:        # bad user data (e.g. NaN in calibration batches): the caller's to fix
            raise
        except OptionError:       # an option that does not fit this model (e.g. a pattern matching no layer)
            raise
        except Exception as exc:  # a crashing pass is rolled back, never fatal
            where = self._write_reproducer(p, current, exc)
            record = self._record(p.name, current, time.perf_counter() - start, reference, current_outputs, {})
            record.rolled_back, record.code = True, Reason.PASS_RAISED
            record.reason = f"pass raised {type(exc).__name__}: {exc}"
            record.reproducer = str(where)
            warnings.warn(f"graphopt: pass {p.name} raised and was rolled back; reproducer in {where}")
            return current, current_outputs, record
        elapsed = time.perf_counter() - start
        if not result.modified:
            return current, current_outputs, self._record(p.name, current, elapsed, reference,
                                                          current_outputs, result.stats)
        budget = p.budget
        reason = budget.check(compare_runs(outputs, current_outputs)) if self.verify else None
        if reason:  # errors are those of the rejected graph; size and latency those kept
            record = self._record(p.name, current, elapsed, reference, outputs, result.stats)
            record.modified = record.rolled_back = True
            record.code = Reason.BUDGET_EXCEEDED
            record.reason = f"{reason} (budget: {budget.describe()}); rolled back"
            return current, current_outputs, record
        verdict = self._compare(current, result.module) if self.speed_check is not None else None
        reason = verdict and self.speed_check.rollback_reason(verdict, lossy=budget != LOSSLESS)
        if reason:
            record = self._record(p.name, current, elapsed, reference, outputs, result.stats)
            record.modified = record.rolled_back = True
            record.code, record.reason, record.speed = Reason.SLOWER, reason, verdict.describe()
            return current, current_outputs, record
        if budget == LOSSLESS and self._lossless is current:
            self._lossless = result.module
        record = self._record(p.name, result.module, elapsed, reference, outputs, result.stats)
        record.modified = True
        if verdict is not None:
            record.speed = verdict.describe()
            if self._fastest is None or verdict.after.median_s < self._fastest[1].median_s:
                self._fastest = (result.module, verdict.after)
        return result.module, outputs, record

    def _record(self, name: str, module: Any, elapsed: float, reference: list[Any],
                outputs: list[Any] | None, stats: dict[str, Any]) -> PassRecord:
        errors = compare_runs(outputs, reference) if outputs is not None else None
        timing = self._latency(module)
        return PassRecord(
            name=name, wall_s=elapsed, nodes=self.ir.count_nodes(module),
            param_bytes=self.ir.param_bytes(module),
            latency_ms=timing.median_ms if timing else None,
            latency_p10_ms=timing.p10_s * 1e3 if timing else None,
            latency_p90_ms=timing.p90_s * 1e3 if timing else None,
            max_abs_err=errors.max_abs if errors else None,
            max_rel_err=errors.max_rel if errors else None,
            min_cosine=errors.min_cosine if errors else None,
            stats=stats)

    def _latency(self, module: Any) -> Timing | None:
        """Latency on the example inputs: the latest interleaved timing of `module`, else measured once now."""
        if not self.measure_latency:
            return None
        for known, timing in reversed(self._timings):
            if known is module:
                return timing
        timing = measure(lambda: self.ir.run(module, self._latency_inputs), warmup=1, repeats=5, max_seconds=2.0)
        self._remember(module, timing)
        return timing

    def _write_reproducer(self, p: Pass, module: Any, exc: Exception) -> Path:
        root = Path(self.reproducer_dir) if self.reproducer_dir else Path(tempfile.gettempdir()) / "graphopt-reproducers"
        root.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"{p.name}-", dir=root))
        self.ir.dump(module, directory)
        names = [q.name for q in self.selected]
        (directory / "passes.txt").write_text(
            "\n".join(f"{'>' if q == p.name else ' '} {q}" for q in names) + "\n")
        (directory / "exception.txt").write_text(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return directory
