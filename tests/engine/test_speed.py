"""The speed check: its decisions with an injected, deterministic timer (never timing-flaky), and bad options."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import OptionError
from graphopt.engine.pass_manager import Pass, PassManager, PassResult
from graphopt.engine.speed import SpeedCheck, Verdict
from graphopt.engine.timing import Interleaved
from graphopt.engine.verify import Budget
from graphopt.engine.rules import Reason


@dataclass(frozen=True)
class Toy:
    """A module of the toy IR: its output value and the time one call of it takes."""
    value: float
    cost: float


class ToyIR:
    def copy(self, module: Toy) -> Toy:
        return module

    def finalize(self, module: Toy) -> None:
        pass

    def count_nodes(self, module: Toy) -> int:
        return 1

    def param_bytes(self, module: Toy) -> int:
        return 0

    def run(self, module: Toy, inputs) -> list[torch.Tensor]:
        Clock.last = module
        return [torch.tensor([module.value])]

    def dump(self, module: Toy, directory) -> None:
        pass


class Clock:
    """A timer that calls each candidate once (so it knows which module runs) and reports its cost times
    independent uniform noise in ±`noise` from a seeded generator (deterministic, reset by `manage`)."""
    last: Toy | None = None
    noise = 0.002
    rng = random.Random(0)

    @classmethod
    def timer(cls, calls, rounds: int) -> Interleaved:
        samples = {}
        for name, call in calls.items():
            call()
            cost = cls.last.cost
            samples[name] = [cost * (1 + cls.noise * cls.rng.uniform(-1, 1)) for _ in range(rounds)]
        return Interleaved(samples)


class SetCost(Pass):
    """A pass that multiplies the module's cost by `factor` (lossless unless given a budget)."""

    def __init__(self, name: str, factor: float, budget: Budget | None = None, noise: float | None = None):
        self.name, self.factor, self.noise = name, factor, noise
        if budget is not None:
            self.budget = budget

    def run(self, module: Toy) -> PassResult:
        if self.noise is not None:
            Clock.noise = self.noise
        return PassResult(replace(module, cost=module.cost * self.factor), True)


def manage(passes, check: SpeedCheck | None = None, on_record=None) -> tuple[Toy, graphopt.Report]:
    Clock.noise, Clock.rng = 0.002, random.Random(0)
    manager = PassManager(passes, ToyIR(), level=1, speed_check=check or SpeedCheck(timer=Clock.timer),
                          on_record=on_record)
    inputs = [((), {})]
    return manager.run(Toy(1.0, 1.0), inputs, [torch.tensor([1.0])])


def test_a_slower_pass_is_rolled_back_and_a_faster_one_kept() -> None:
    out, report = manage([SetCost("slow", 1.12), SetCost("fast", 0.5)])
    assert report["slow"].rolled_back and report["slow"].reason.startswith("rolled back: 1.12× slower")
    assert not report["fast"].rolled_back and report["fast"].speed.startswith("2.00× faster")
    assert out.cost == 0.5
    assert report.final.latency_ms == pytest.approx(500, rel=0.02)
    assert report.final.latency_p10_ms < report.final.latency_ms < report.final.latency_p90_ms


def test_noise_gives_not_measurable_and_never_a_rollback() -> None:
    """A timer whose spread (±40 %) dwarfs the change (5 % slower) cannot tell: the pass is kept, and the
    comparison used every round it was allowed."""
    rounds = []
    def counting(calls, n):
        rounds.append(n)
        return Clock.timer(calls, n)
    check = SpeedCheck(timer=counting, max_rounds=12, max_seconds=1e9)
    out, report = manage([SetCost("noisy", 1.05, noise=0.4)], check)
    assert report["noisy"].speed.startswith("not measurable") and not report["noisy"].rolled_back
    assert sum(rounds) >= 12
    assert out.cost == pytest.approx(1.05)


def test_no_change_within_tolerance() -> None:
    out, report = manage([SetCost("same", 1.005)])
    assert report["same"].speed.startswith("no change") and not report["same"].rolled_back


def test_lossy_pass_must_buy_min_gain() -> None:
    lossy = Budget(min_cosine=0.5)
    _, report = manage([SetCost("int8", 0.97, budget=lossy)], SpeedCheck(timer=Clock.timer, min_gain=0.1))
    assert report["int8"].rolled_back and report["int8"].code == Reason.SLOWER, report["int8"].reason
    _, report = manage([SetCost("int8", 0.8, budget=lossy)], SpeedCheck(timer=Clock.timer, min_gain=0.1))
    assert not report["int8"].rolled_back


def test_never_slower_than_the_captured_graph() -> None:
    """Each pass looks harmless to a noisy timer, but together they are slower: the result falls back to the
    fastest verified variant (here the lossless pass alone) and the report says why."""
    quiet = lambda record: setattr(Clock, "noise", 0.002)   # noqa: E731  (the noise ends with the noisy pass)
    out, report = manage([SetCost("o1", 0.9), SetCost("int8", 1.2, budget=Budget(min_cosine=0.5), noise=0.9)],
                         SpeedCheck(timer=Clock.timer, max_rounds=5), on_record=quiet)
    assert not report["int8"].rolled_back            # its own check could not tell
    fallback = report["speed check"]
    assert fallback.rolled_back and fallback.code == Reason.RESULT_SLOWER, fallback.reason
    assert out.cost == pytest.approx(0.9)
    assert "returned the fastest verified intermediate graph" in report.meta["speed"] \
        or "lossless passes alone" in report.meta["speed"]


def test_verdict_describes_its_interval() -> None:
    timing = graphopt.engine.timing.Timing(1.0, 0.9, 1.1, 5)
    text = Verdict("faster", 0.5, 0.45, 0.55, timing, timing).describe()
    assert text == "2.00× faster (95 % CI 1.82–2.22×)"


@pytest.mark.parametrize("value", ["fast", 1, {"min_gain": 2}, {"bogus": 1}, {"min_rounds": 1},
                                   {"max_rounds": 2, "min_rounds": 5}, {"min_gain": "x"}])
def test_bad_speed_check_options_are_refused(value) -> None:
    with pytest.raises(OptionError, match="speed_check"):
        graphopt.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), speed_check=value)


def test_speed_check_needs_timing() -> None:
    with pytest.raises(OptionError, match="measure_latency"):
        graphopt.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), speed_check=True, measure_latency=False)


def scripted(factors: list[float], noise: float = 0.002):
    """A timer whose n-th measurement times "after" at factors[n] × "before" (the last factor repeats)."""
    rng, calls = random.Random(0), []
    def timer(_calls, rounds: int) -> Interleaved:
        factor = factors[min(len(calls), len(factors) - 1)]
        calls.append(rounds)
        jitter = lambda: 1 + noise * rng.uniform(-1, 1)   # noqa: E731
        return Interleaved({"before": [jitter() for _ in range(rounds)],
                            "after": [factor * jitter() for _ in range(rounds)]})
    return timer, calls


def test_a_rollback_needs_a_second_measurement_that_agrees() -> None:
    """A transient (the first rounds 30 % slower, then equal) is not a rollback; a lasting slowdown is."""
    timer, calls = scripted([1.3, 1.0])
    check = SpeedCheck(timer=timer)
    verdict = check.compare(lambda: None, lambda: None)
    assert len(calls) == 2 and verdict.kind == "not measurable", verdict
    assert check.rollback_reason(verdict, lossy=False) is None
    timer, calls = scripted([1.3])
    verdict = SpeedCheck(timer=timer).compare(lambda: None, lambda: None)
    assert len(calls) == 2 and verdict.kind == "slower" and verdict.ratio == pytest.approx(1.3, rel=0.01)
    timer, calls = scripted([0.7])
    assert SpeedCheck(timer=timer).compare(lambda: None, lambda: None).kind == "faster" and len(calls) == 1


@pytest.mark.parametrize("noise", [0.05, 0.1])
def test_equally_fast_graphs_are_almost_never_rolled_back(noise: float) -> None:
    """Two equally fast graphs under seeded lognormal noise: one early-stopping measurement said "slower"
    in 1 (5 % noise) and 9 (10 %) of these 400 comparisons; with the confirming measurement none does."""
    rng = random.Random(7)
    def timer(calls, rounds: int) -> Interleaved:
        return Interleaved({name: [rng.lognormvariate(0, noise) for _ in range(rounds)] for name in calls})
    check = SpeedCheck(timer=timer, max_seconds=1e9)
    kinds = [check.compare(lambda: None, lambda: None).kind for _ in range(400)]
    assert kinds.count("slower") == 0, kinds.count("slower")
