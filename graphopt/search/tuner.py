"""`graphopt.tune`: search the optimization config under an accuracy budget, measured on the target.

    result = graphopt.tune(model, example_inputs, evaluate=accuracy, accuracy_budget=0.5, trials=40)
    result.best          # the fastest module within budget
    result.config        # graphopt.optimize kwargs that rebuild it (result.finetune: finetune kwargs or None)

Built on Optuna (imported here only): a TPE sampler (multivariate, grouped for the conditional space of
graphopt/search/space.py, a constant liar so parallel workers do not draw the same point) over one
objective or several (`objectives`: "latency" = t_module / t_original on the target, "size" = bytes,
"fidelity" = evaluate's score).

Each trial is real work: `graphopt.optimize(model, **config)` (+ `graphopt.finetune` from the original
as teacher when the config fine-tunes; graphopt/search/recipe.py), scored with `evaluate` and, when within
budget, timed against the original on the target with the project's interleaved A/B timer
(graphopt/search/target.py). A trial is pruned (Optuna's TrialPruned, recorded with its reason)

- after a fine-tune epoch, when its score is over budget and below the median of the other trials at
  that epoch (`BudgetPruner`; Optuna supports intermediate values for single-objective studies only);
- when its final score is over budget (it is never timed).

A trial that raises is recorded as failed with its error, and the search goes on. The first trials of a
new study are the fixed levels' defaults (`space.level_seeds`: O1, then O2 with every layer int8): O1 is
lossless, so there is a result within budget whenever evaluate is deterministic, and the search starts
from what a user gets without it.

The final: the search keeps its fastest trial, but that measurement is one draw among many (the winner's
curse: the trial that looked fastest is often the one its timing flattered). So the up to `FINALISTS`
fastest trials whose intervals overlap the fastest one's are timed again together with the original, in one
interleaved run, and `best` is the fastest there (`TuneResult.final` holds that run's figures).

Storage: None keeps the study in memory; a path (`tune.db`) is a SQLite file; any SQLAlchemy URL
Optuna accepts (`postgresql://user@host/db`) shares the study: the same call on N machines divides
`trials` (the study's total, counted over all workers) among them. Running again with the same storage
and `study_name` resumes the study. Database storages keep a heartbeat, so a trial whose worker died is
marked failed and skipped. Workers of a shared database study draw from their own seed
(seed, host, process) so they do not repeat each other's random start.

Length: over ~400 lines because the trial loop (`_Run`), its pruner and the final race share one state (the
study, the kept modules, the timer); the storage (storage.py), the space (space.py), building (recipe.py),
timing (target.py) and drawing (report.py) are their own modules.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import optuna
import torch

from graphopt.passes.quantize.layer_speed import shared_verdicts

from ..engine.speed import parse_speed_check
from ..errors import InputError, OptionError
from . import recipe
from .storage import open_storage
from .space import Sampler, default_space, level_seeds, live_modules, merge
from .target import TARGETS, Target

OBJECTIVES = {"latency": "minimize", "size": "minimize", "fidelity": "maximize"}
FINALISTS = 3
#: Every worker's finished trials: a running one (another worker's, or one a crash left running) may still turn
#: out to be a repeat of a measured config, so it counts towards `trials` only once it has finished.
FINISHED = tuple(state for state in optuna.trial.TrialState if state.is_finished())


@dataclass
class TuneResult:
    best: torch.nn.Module | None          # the fastest module within budget (None: no trial was)
    config: dict[str, Any] | None         # graphopt.optimize kwargs that rebuild `best`
    finetune: dict[str, Any] | None       # graphopt.finetune kwargs after optimize, or None
    pareto: list[dict[str, Any]]          # rows of the trials no other within-budget trial beats on
                                          # fidelity, latency and size at once
    trials: list[dict[str, Any]]          # one row per trial, in order
    study: Any                            # the optuna.Study
    reference_score: float
    accuracy_budget: float
    target: str
    best_trial: int | None = None
    final: list[dict[str, Any]] = field(default_factory=list)   # the finalists timed together, fastest first:
                                                                 # trial, latency_ratio, low, high, verdict
    _importance: dict[str, float] | None = field(default=None, repr=False)

    @property
    def importance(self) -> dict[str, float]:
        """Optuna's parameter importance for the latency ratio (computed on first use; {} with too few trials)."""
        if self._importance is None:
            self._importance = importance(self.study)
        return self._importance

    @property
    def best_row(self) -> dict[str, Any] | None:
        return next((row for row in self.trials if row["trial"] == self.best_trial), None)

    def to_json(self) -> dict[str, Any]:
        """The file `graphopt tune` writes and `graphopt optimize --config` reads (graphopt/search/recipe.py)."""
        row = self.best_row or {}
        return {"optimize": self.config, "finetune": self.finetune, "trial": self.best_trial,
                "score": row.get("score"), "reference_score": self.reference_score,
                "accuracy_budget": self.accuracy_budget, "target": self.target,
                "latency_ratio": row.get("latency_ratio"), "size_bytes": row.get("size_bytes"),
                "final": self.final}

    def to_html(self, path: str | os.PathLike) -> Path:
        from .report import write_html
        return write_html(self, path)


def tune(model: torch.nn.Module, example_inputs: tuple | None = None, *, evaluate: Callable[[Any], float],
         accuracy_budget: float, objectives: Sequence[str] = ("latency",), target: str = "torch",
         trials: int = 20, timeout: float | None = None, storage: str | os.PathLike | None = None,
         study_name: str | None = None, search_space: Mapping[str, Any] | None = None,
         calibration_data: Iterable[Any] | None = None, train_data: Iterable[Any] | None = None, seed: int = 0,
         example_kwargs: Mapping[str, Any] | None = None, speed_check: Any = None,
         progress: bool | Callable[[str], None] = True) -> TuneResult:
    """Search graphopt's options for the fastest module whose `evaluate` score drops by at most
    `accuracy_budget` from the original's (see the module docstring).

    evaluate(module) -> float, higher is better. `trials`: how many configs the study measures in all (a resumed
    or shared study runs only what is missing; a config drawn again is answered with its first result and
    does not count). `timeout`: seconds for this call. `speed_check`: how
    each trial is timed (a graphopt.engine.speed.SpeedCheck, or a dict of its fields; default SpeedCheck()).
    `progress`: True prints a line per trial to stderr; a callable receives each line.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"graphopt.tune takes a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None and example_kwargs is None:
        raise InputError("graphopt.tune needs example_inputs (a tuple) or example_kwargs: each trial captures now")
    example_inputs = tuple(example_inputs or ())
    if not callable(evaluate):
        raise OptionError("evaluate must be a callable evaluate(module) -> float, higher is better")
    if isinstance(accuracy_budget, bool) or not isinstance(accuracy_budget, (int, float)) \
            or not math.isfinite(accuracy_budget) or accuracy_budget < 0:
        raise OptionError(f"accuracy_budget={accuracy_budget!r}: the largest allowed drop of evaluate's score, ≥ 0")
    objectives = (objectives,) if isinstance(objectives, str) else tuple(objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if not objectives or unknown or len(set(objectives)) != len(objectives):
        raise OptionError(f"objectives={objectives!r}: choose distinct names among {', '.join(OBJECTIVES)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise OptionError(f"trials={trials!r} must be a positive integer")
    checker = parse_speed_check(True if speed_check is None else speed_check, measure_latency=True)
    calibration = list(calibration_data) if calibration_data is not None else None
    train = list(train_data) if train_data is not None else None
    say = _printer(progress)

    if target not in TARGETS:
        raise OptionError(f"target={target!r}: choose one of {', '.join(TARGETS)}")
    space = merge(default_space(model, live_modules(model, example_inputs, example_kwargs), target), search_space)
    reference = _score(evaluate, model, "the original model")
    study = _study(storage, study_name, objectives, seed, trials, accuracy_budget, reference, target)
    if not study.trials:
        for params in level_seeds(space)[:trials]:
            study.enqueue_trial(params, skip_if_exists=True)
    runtime = Target(target, model, example_inputs, example_kwargs, checker)
    sampler = Sampler(space, has_calibration=bool(calibration), has_train=bool(train), backend=runtime.backend)
    state = _Run(model, example_inputs, example_kwargs, evaluate, accuracy_budget, reference, objectives, sampler,
                 runtime, calibration, train, say)
    try:
        done = measured(study.get_trials(deepcopy=False, states=FINISHED))
        if len(done) < trials:
            say(f"study {study.study_name!r}: {len(done)} trial(s) so far, running up to {trials}; original scores "
                f"{reference:.4g}, budget {accuracy_budget:g} (floor {reference - accuracy_budget:.4g}), "
                f"target {target}")
            with shared_verdicts():   # the trials agree on which int8 layers pay here, each timed once
                study.optimize(state.objective, timeout=timeout, catch=(Exception,), gc_after_trial=True,
                               callbacks=[state.report, lambda study, _: _stop_at(study, trials)])
        return state.result(study)
    finally:
        runtime.close()


def measured(trials: list[Any]) -> list[Any]:
    """Those of `trials` that count towards tune's `trials`: not repeats answered with an earlier result."""
    return [t for t in trials if "reused_from" not in t.user_attrs]


def _stop_at(study: Any, trials: int) -> None:
    """Stop once `trials` configs are measured. A repeat of a measured config costs nothing (its result is
    reused) and does not count, so a sampler that has settled on a few points does not use up the search;
    once as many repeats as `trials` have come, the sampler has nothing new to propose and the search ends.
    Only finished trials count: with N workers the study ends with `trials` to `trials + N − 1` measured ones
    (each worker may have started one as another finished the total), never fewer."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    count = len(measured(finished))
    if count >= trials or len(finished) - count >= trials:
        study.stop()


def _printer(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        import sys
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None


def _score(evaluate: Callable[[Any], float], module: Any, what: str) -> float:
    with torch.no_grad():
        value = evaluate(module)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"evaluate({what}) returned {value!r}: it must return a finite number, higher is better")
    return float(value)


def _study(storage: Any, study_name: str | None, objectives: tuple[str, ...], seed: int, trials: int,
           budget: float, reference: float, target: str) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    rdb = open_storage(storage)
    shared = rdb is not None and not str(rdb.url).startswith("sqlite")
    worker_seed = seed if not shared else int(hashlib.sha256(
        f"{seed}:{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:8], 16)
    sampler = optuna.samplers.TPESampler(seed=worker_seed, multivariate=True, group=True, constant_liar=True,
                                         n_startup_trials=min(10, max(2, trials // 3)))
    directions = [OBJECTIVES[o] for o in objectives]
    study = optuna.create_study(storage=rdb, study_name=study_name or "graphopt-tune", directions=directions,
                                sampler=sampler, pruner=BudgetPruner(budget), load_if_exists=True)
    settings = {"objectives": list(objectives), "accuracy_budget": budget, "target": target}
    stored = {k: study.user_attrs.get(k) for k in settings}
    if any(v is not None for v in stored.values()) and stored != settings:
        raise OptionError(f"study {study.study_name!r} in this storage was run with {stored}, not {settings}: "
                          "give another study_name (a study's trials are comparable only under one setting)")
    for key, value in settings.items():
        study.set_user_attr(key, value)
    study.set_user_attr("reference_score", reference)
    return study


class BudgetPruner(optuna.pruners.BasePruner):
    """Prune a fine-tune after an epoch when its score is over budget AND below the median of the other
    trials at that epoch (Optuna's MedianPruner on the reported values): it is behind and still outside
    the budget. The reported value is the drop from the original's score for minimizing studies, the
    score for a study that maximizes fidelity."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.median = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        drops = trial.user_attrs.get("epoch_drops") or []
        return bool(drops) and drops[-1] > self.budget and self.median.prune(study, trial)


class _Run:
    """One call of tune: the objective, the per-trial line, and the result."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None,
                 evaluate: Callable[[Any], float], budget: float, reference: float, objectives: tuple[str, ...],
                 sampler: Sampler, runtime: Target, calibration: list | None, train: list | None,
                 say: Callable[[str], None]) -> None:
        self.model, self.args, self.kwargs, self.evaluate = model, args, kwargs, evaluate
        self.budget, self.reference, self.objectives = budget, reference, objectives
        self.sampler, self.runtime, self.calibration, self.train, self.say = sampler, runtime, calibration, train, say
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.kept: dict[int, tuple[float, Any]] = {}    # this process's fastest trials: number → (ratio, module)

    def build(self, config: dict[str, Any], finetune: dict[str, Any] | None,
              on_epoch: Callable[[int, Any], None] | None = None) -> Any:
        return recipe.build(self.model, self.args, config, finetune, example_kwargs=self.kwargs,
                            calibration_data=self.calibration, train_data=self.train, on_epoch=on_epoch)

    def objective(self, trial: Any) -> tuple[float, ...]:
        start = time.perf_counter()
        trial.set_user_attr("worker", self.worker)
        try:
            config, finetune = self.sampler.sample(trial)
            trial.set_user_attr("config", config)
            trial.set_user_attr("finetune", finetune)
            earlier = _same_config(trial, config, finetune)
            if earlier is not None:
                return self._reuse(trial, earlier)
            module = self.build(config, finetune, self._epoch_hook(trial, finetune))
            score = _score(self.evaluate, module, f"trial {trial.number}")
            drop = self.reference - score
            trial.set_user_attr("score", score)
            trial.set_user_attr("drop", drop)
            if drop > self.budget:
                trial.set_user_attr("note", f"over budget: drop {drop:.4g} > {self.budget:g}")
                raise optuna.TrialPruned(trial.user_attrs["note"])
            timing = self.runtime.time(module)
            for key in ("ratio", "low", "high", "latency_ms", "original_ms", "verdict", "rounds", "size_bytes"):
                trial.set_user_attr("latency_ratio" if key == "ratio" else key, getattr(timing, key))
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("note", f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
            raise
        finally:
            trial.set_user_attr("wall_s", time.perf_counter() - start)
        self._keep(trial.number, timing.ratio, module)
        values = {"latency": timing.ratio, "size": float(timing.size_bytes), "fidelity": score}
        return tuple(values[o] for o in self.objectives)

    def _keep(self, number: int, ratio: float, module: Any) -> None:
        """Hold the module while it is among this process's FINALISTS fastest (the final needs no rebuild)."""
        self.kept[number] = (ratio, module)
        if len(self.kept) > FINALISTS:
            del self.kept[max(self.kept, key=lambda n: (self.kept[n][0], n))]

    def _reuse(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> tuple[float, ...]:
        """A config measured before (the conditional space makes repeats likely, e.g. O1): its result, not a rerun."""
        for key, value in earlier.user_attrs.items():
            if key not in ("worker", "wall_s", "note"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("reused_from", earlier.number)
        note = f"same config as trial {earlier.number}: its result reused"
        if earlier.state == optuna.trial.TrialState.PRUNED:
            trial.set_user_attr("note", f"{note} ({earlier.user_attrs.get('note', 'pruned')})")
            raise optuna.TrialPruned(trial.user_attrs["note"])
        trial.set_user_attr("note", note)
        return tuple(earlier.values)

    def _epoch_hook(self, trial: Any, finetune: dict[str, Any] | None) -> Callable[[int, Any], None] | None:
        if not finetune:
            return None
        last = finetune["epochs"]
        single = len(self.objectives) == 1

        def on_epoch(epoch: int, module: Any) -> None:
            if epoch == last:   # the final score is taken after the fine-tune
                return
            score = _score(self.evaluate, module, f"trial {trial.number} after epoch {epoch}")
            drops = [*trial.user_attrs.get("epoch_drops", []), self.reference - score]
            trial.set_user_attr("epoch_drops", drops)
            if not single:
                return
            maximize = self.objectives[0] == "fidelity"
            trial.report(score if maximize else drops[-1], epoch)
            if trial.should_prune():
                trial.set_user_attr("note", f"pruned after fine-tune epoch {epoch}: drop {drops[-1]:.4g} > "
                                            f"{self.budget:g} and behind the median of other trials")
                raise optuna.TrialPruned(trial.user_attrs["note"])
        return on_epoch

    def report(self, study: Any, trial: Any) -> None:
        """The per-trial progress line, with the best so far."""
        from .report import describe_config
        attrs = trial.user_attrs
        head = f"trial {trial.number:>3}  {describe_config(attrs.get('config'), attrs.get('finetune')):<44}"
        if trial.state.name == "COMPLETE":
            line = (f"{head} score {attrs['score']:.4g} ({-attrs['drop']:+.3g})  latency {attrs['latency_ratio']:.3f}× "
                    f"of original ({attrs['verdict']})  {attrs['size_bytes'] / 1024:.0f} KiB  kept"
                    + (f" ({attrs['note']})" if attrs.get("note") else ""))
        elif trial.state.name == "PRUNED":
            line = f"{head} pruned: {attrs.get('note', '')}"
        else:
            line = f"{head} FAILED: {attrs.get('note', trial.system_attrs.get('fail_reason', 'unknown'))}"
        best = _best_trial(study.get_trials(deepcopy=False, states=None))
        tail = (f"   | best so far: trial {best.number}, {best.user_attrs['latency_ratio']:.3f}× of original, "
                f"score {best.user_attrs['score']:.4g}") if best is not None else "   | no trial within budget yet"
        self.say(line + tail)

    def result(self, study: Any) -> TuneResult:
        rows = [_row(t) for t in study.get_trials(deepcopy=False)]
        finalists = _finalists(study.get_trials(deepcopy=False))
        modules = {t.number: module for t in finalists if (module := self._module(t)) is not None}
        final: list[dict[str, Any]] = []
        if len(modules) > 1:
            seconds = self.runtime.speed_check.max_seconds * len(modules)
            self.say(f"final: trials {', '.join(map(str, modules))} (within each other's 95 % intervals) timed "
                     f"together with the original, ~{seconds:.0f} s")
            timings = self.runtime.race(modules, seconds)
            final = sorted(({"trial": n, "latency_ratio": t.ratio, "low": t.low, "high": t.high, "verdict": t.verdict}
                            for n, t in timings.items()), key=lambda r: (r["latency_ratio"], r["trial"]))
            self.say("final: " + "; ".join(f"trial {r['trial']} {r['latency_ratio']:.3f}× of original ({r['verdict']})"
                                           for r in final))
        best = final[0]["trial"] if final else next(iter(modules), None)
        config = finetune = None
        if best is not None:
            attrs = next(t for t in finalists if t.number == best).user_attrs
            config, finetune = attrs["config"], attrs["finetune"]
        return TuneResult(modules.get(best), config, finetune, pareto(rows), rows, study, self.reference,
                          self.budget, self.runtime.name, best, final)

    def _module(self, trial: Any) -> Any:
        """The trial's module: held since it was measured, or rebuilt from its config (measured by an earlier
        run or another worker) and scored again; None when the rebuilt module is over budget."""
        if trial.number in self.kept:
            return self.kept[trial.number][1]
        module = self.build(trial.user_attrs["config"], trial.user_attrs["finetune"])
        score = _score(self.evaluate, module, f"trial {trial.number} rebuilt")
        if self.reference - score > self.budget:
            warnings.warn(f"graphopt.tune: trial {trial.number} rebuilt from its config scores {score:.4g}, over "
                          f"budget (it scored {trial.user_attrs['score']:.4g} when measured): is evaluate "
                          "deterministic? It is left out of the final")
            return None
        return module


def _same_config(trial: optuna.Trial, config: dict[str, Any], finetune: dict[str, Any] | None) -> Any:
    """The first finished trial of the study with this config and fine-tune, or None."""
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    return next((t for t in done if t.user_attrs.get("config") == config and t.user_attrs.get("finetune") == finetune
                 and "reused_from" not in t.user_attrs), None)


def _best_trial(trials: list[Any]) -> Any:
    done = [t for t in trials if t.state.name == "COMPLETE" and "latency_ratio" in t.user_attrs]
    return min(done, key=lambda t: (t.user_attrs["latency_ratio"], t.number), default=None)


def _finalists(trials: list[Any]) -> list[Any]:
    """The up to FINALISTS fastest measured trials (distinct configs) whose 95 % interval reaches the fastest
    one's: the search cannot tell them apart from it."""
    done = sorted((t for t in trials if t.state.name == "COMPLETE" and "latency_ratio" in t.user_attrs
                   and "reused_from" not in t.user_attrs),
                  key=lambda t: (t.user_attrs["latency_ratio"], t.number))
    if not done:
        return []
    reach = done[0].user_attrs["high"]
    return [t for t in done if t.user_attrs["low"] <= reach][:FINALISTS]


def _row(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {"trial": trial.number, "state": trial.state.name.lower(), "worker": attrs.get("worker"),
            "config": attrs.get("config"), "finetune": attrs.get("finetune"), "params": dict(trial.params),
            "score": attrs.get("score"), "drop": attrs.get("drop"), "latency_ratio": attrs.get("latency_ratio"),
            "latency_ms": attrs.get("latency_ms"), "original_ms": attrs.get("original_ms"),
            "verdict": attrs.get("verdict"), "rounds": attrs.get("rounds"), "size_bytes": attrs.get("size_bytes"),
            "wall_s": attrs.get("wall_s"),
            "epoch_drops": attrs.get("epoch_drops"), "note": attrs.get("note")}


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed rows that no other completed row beats on score (≥), latency and size (≤) with one strictly better."""
    done = [r for r in rows if r["state"] == "complete" and r["latency_ratio"] is not None]

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        return -r["score"], r["latency_ratio"], r["size_bytes"]

    return [r for r in done if not any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r)
                                       for o in done)]


def importance(study: Any) -> dict[str, float]:
    """Optuna's parameter importance (its default evaluator) for the latency ratio over completed trials;
    {} when fewer than three trials completed or they share no parameter."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.params]
    if len(done) < 3:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "few trials in some regime": the report says how many trials there are
        try:
            return dict(optuna.importance.get_param_importances(study, target=lambda t: t.user_attrs["latency_ratio"]))
        except (RuntimeError, ValueError, ZeroDivisionError):   # no parameter common to the completed trials
            return {}
