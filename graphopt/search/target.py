"""Where a tuned module runs, and how it is timed against the original there.

    target = Target("onnxruntime", model, example_inputs, example_kwargs, speed_check)
    timing = target.time(module)        # interleaved with the original on the same runtime

    "torch"        the module as graphopt.optimize returns it, against the model in eager PyTorch
    "inductor"     optimize(..., backend="inductor"), against torch.compile(model)
    "onnxruntime"  export_onnx(module) in an ONNX Runtime session, against the original exported the same way

Each comparison is the project's A/B timer (`graphopt.engine.speed.SpeedCheck.compare`: rounds interleaved
with the order rotating, a bootstrap 95 % interval of the ratio), so a loaded machine slows both alike;
the objective is the ratio t_module / t_original, not an absolute time measured at another moment.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.utils._pytree as pytree

from ..engine.speed import SpeedCheck, Verdict
from ..engine.timing import Interleaved
from ..errors import OptionError

TARGETS = ("torch", "inductor", "onnxruntime")


@dataclass(frozen=True)
class Timing:
    ratio: float            # median t_module / median t_original (below 1: faster)
    low: float              # 95 % interval of the ratio
    high: float
    latency_ms: float       # the module's median, for context
    original_ms: float
    verdict: str            # SpeedCheck's words: "1.62× faster (95 % CI 1.50–1.71×)"
    rounds: int
    size_bytes: int         # parameters and buffers (torch, inductor) or the ONNX file (onnxruntime)


class Target:
    def __init__(self, name: str, model: torch.nn.Module, example_inputs: tuple,
                 example_kwargs: Mapping[str, Any] | None, speed_check: SpeedCheck) -> None:
        if name not in TARGETS:
            raise OptionError(f"target={name!r}: choose one of {', '.join(TARGETS)}")
        self.name, self.args, self.kwargs, self.speed_check = name, example_inputs, dict(example_kwargs or {}), speed_check
        self.model = model
        self._directory = tempfile.TemporaryDirectory(prefix="graphopt-tune-")
        self._count = 0
        self._original: Callable[[], object] | None = None

    def _baseline(self) -> Callable[[], object]:
        """The original on the target, built on first use (a resumed, finished study needs none)."""
        if self._original is None:
            model = self.model
            if self.name == "onnxruntime":
                self._original = self._onnx(model)[0]
            elif self.name == "inductor":
                compiled = torch.compile(model)
                self._original = lambda: compiled(*self.args, **self.kwargs)
            else:
                self._original = lambda: model(*self.args, **self.kwargs)
        return self._original

    @property
    def backend(self) -> str | None:
        """The `backend=` option trials are optimized with."""
        return "inductor" if self.name == "inductor" else None

    def time(self, module: torch.nn.Module) -> Timing:
        run, size = self._runner(module)
        return _timing(self.speed_check.compare(self._baseline(), run), size)

    def race(self, modules: Mapping[int, torch.nn.Module], seconds: float) -> dict[int, Timing]:
        """Time several modules and the original in one interleaved run (one call of each per round, the order
        rotating), for about `seconds` (between the speed check's min_rounds and max_rounds rounds): each
        module's ratio to the original, all under the same load, so they compare with each other too."""
        runs = {key: self._runner(module) for key, module in modules.items()}
        calls = {"original": self._baseline(), **{key: run for key, (run, _) in runs.items()}}
        check = self.speed_check
        first = check.timer(calls, check.min_rounds)
        per_round = sum(sum(samples) for samples in first.samples.values()) / check.min_rounds
        more = min(check.max_rounds, int(seconds / max(per_round, 1e-9))) - check.min_rounds
        samples = {name: list(values) for name, values in first.samples.items()}
        if more > 0:
            for name, values in check.timer(calls, more).samples.items():
                samples[name] += values
        return {key: _timing(check.judge(Interleaved({"before": samples["original"], "after": samples[key]})), size)
                for key, (_, size) in runs.items()}

    def _runner(self, module: torch.nn.Module) -> tuple[Callable[[], object], int]:
        """One call of `module` on the target, and its size in bytes."""
        if self.name == "onnxruntime":
            return self._onnx(module)
        return (lambda: module(*self.args, **self.kwargs)), _param_bytes(module)

    def _onnx(self, module: torch.nn.Module) -> tuple[Callable[[], object], int]:
        from ..frontend.loaders import file_bytes
        from ..onnx import export_onnx
        self._count += 1
        path = Path(self._directory.name) / f"model{self._count}.onnx"
        export_onnx(module, self.args, path, example_kwargs=self.kwargs)
        return self.onnx_runner(path), file_bytes(path)

    def onnx_runner(self, path: str | Path) -> Callable[[], object]:
        """One call of the ONNX file at `path` on the example inputs, in a session fit for interleaved timing."""
        from ..onnx.sessions import session
        runtime = session(path, spin=False)   # interleaved sessions: no spinning threads slowing the other
        names = [i.name for i in runtime.get_inputs()]
        leaves = [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]
        feeds = {name: leaf.detach().cpu().numpy() for name, leaf in zip(names, leaves)}
        return lambda: runtime.run(None, feeds)

    def close(self) -> None:
        self._directory.cleanup()


def _timing(verdict: Verdict, size: int) -> Timing:
    return Timing(verdict.ratio, verdict.low, verdict.high, verdict.after.median_ms, verdict.before.median_ms,
                  verdict.describe(), verdict.after.samples, size)


def _param_bytes(module: torch.nn.Module) -> int:
    from ..api import OptimizedModule
    from ..engine import ir
    if isinstance(module, OptimizedModule) and module.graph_module is not None:
        return ir.param_bytes(module.graph_module)
    return ir.param_bytes(module)
