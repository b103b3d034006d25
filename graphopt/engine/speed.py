"""Speed as a verified property: is a rewritten graph measurably faster or slower than the one before it?

    verdict = SpeedCheck().compare(run_before, run_after)

times the two callables in interleaved rounds (`graphopt.engine.timing.measure_interleaved`: one call of each
per round, the order rotating, so load on a shared machine hits both alike). It starts with `min_rounds`
and adds rounds while the bootstrap 95 % confidence interval of the ratio r = t_after / t_before still
straddles a decision threshold, until `max_rounds` or `max_seconds`. Then:

    slower          the interval lies above 1 + tolerance, and a second, independent measurement (a fresh
                    run of rounds) says so too                     → the pass is rolled back
    faster          the interval lies below 1 − tolerance
    no change       the interval lies inside [1 − tolerance, 1 + tolerance]
    not measurable  the interval is wider and straddles a threshold: the timer cannot tell (a model too fast
                    to time, a machine too loaded); the pass is kept, never rolled back at random

The second measurement guards the rollback: with noisy rounds and an early stop at the first clear interval,
0.25–2.3 % of comparisons of two equally fast graphs came out "slower" (seeded simulation, 5–10 % lognormal
noise: tests/engine/test_speed.py), so an optimize of a dozen checked passes rolled one back at random in
3–25 % of runs. Both measurements must agree (none of 400); where only the first says slower, the verdict
over all rounds is at most "not measurable".
A confirmed rollback may take up to 2 × `max_seconds`.

A lossy pass (int8, pruning) must also buy speed when `min_gain` > 0: it is kept only if the interval's
upper end is below 1 − min_gain (`rollback_reason`). The default min_gain 0 keeps a lossy pass that is not
measurably slower (it may still buy size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from ..errors import OptionError
from .timing import Interleaved, Timing, measure_interleaved

Timer = Callable[[dict[str, Callable[[], object]], int], Interleaved]


def interleaved_timer(calls: dict[str, Callable[[], object]], rounds: int) -> Interleaved:
    """The real timer: `rounds` interleaved rounds after one warm-up call of each (autograd off)."""
    import torch
    with torch.inference_mode():
        return measure_interleaved(calls, rounds=rounds, warmup=1, max_seconds=float("inf"))


@dataclass(frozen=True)
class Verdict:
    kind: str                     # "slower" | "faster" | "no change" | "not measurable"
    ratio: float                  # median t_after / median t_before
    low: float                    # 95 % bootstrap interval of the ratio
    high: float
    before: Timing
    after: Timing

    def describe(self) -> str:
        """`1.12× slower (95 % CI 1.08–1.17×)`, `1.40× faster (…)`, `no change (…)`, `not measurable (…)`."""
        if self.kind == "slower":
            return f"{self.ratio:.2f}× slower (95 % CI {self.low:.2f}–{self.high:.2f}×)"
        speedup, low, high = 1 / self.ratio, 1 / self.high, 1 / self.low
        interval = f"95 % CI {low:.2f}–{high:.2f}×"
        if self.kind == "faster":
            return f"{speedup:.2f}× faster ({interval})"
        return f"{self.kind} ({speedup:.2f}× faster, {interval})"


@dataclass
class SpeedCheck:
    """How passes are timed and judged; `speed_check=` of `graphopt.optimize` takes True, False, a dict of
    these fields, or an instance."""
    min_gain: float = 0.0          # a lossy pass must be at least this much faster (0.05: 5 %)
    tolerance: float = 0.03        # ratios within ±3 % count as "no change"
    min_rounds: int = 5
    max_rounds: int = 30
    max_seconds: float = 20.0      # per measurement (a rollback's confirmation is a second one)
    timer: Timer = field(default=interleaved_timer, repr=False)

    def __post_init__(self) -> None:
        numbers = all(isinstance(getattr(self, f), (int, float)) and not isinstance(getattr(self, f), bool)
                      for f in ("min_gain", "tolerance", "min_rounds", "max_rounds", "max_seconds"))
        checks = {"numbers": numbers} if not numbers else {"min_gain": 0 <= self.min_gain < 1, "tolerance": 0 <= self.tolerance < 1,
                  "min_rounds": isinstance(self.min_rounds, int) and self.min_rounds >= 3,
                  "max_rounds": isinstance(self.max_rounds, int) and self.max_rounds >= self.min_rounds,
                  "max_seconds": self.max_seconds > 0, "timer": callable(self.timer)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise OptionError(f"speed_check: bad value for {', '.join(bad)} ({self}); min_gain and tolerance "
                              "in [0, 1), min_rounds ≥ 3, max_rounds ≥ min_rounds, max_seconds > 0")

    def compare(self, run_before: Callable[[], object], run_after: Callable[[], object]) -> Verdict:
        calls = {"before": run_before, "after": run_after}
        first = self._measure(calls)
        verdict = self.judge(first)
        if verdict.kind != "slower":
            return verdict
        replicate = self._measure(calls)     # a rollback needs an independent measurement that agrees
        pooled = self.judge(Interleaved({name: first.samples[name] + replicate.samples[name] for name in calls}))
        if pooled.kind == "slower" and self.judge(replicate).kind != "slower":
            return replace(pooled, kind="not measurable")
        return pooled

    def _measure(self, calls: dict[str, Callable[[], object]]) -> Interleaved:
        """Rounds of `calls` from `min_rounds` on, until the verdict is clear, `max_rounds` or `max_seconds`."""
        samples: dict[str, list[float]] = {name: [] for name in calls}
        rounds = self.min_rounds
        while True:
            batch = self.timer(calls, rounds)
            for name in samples:
                samples[name] += batch.samples[name]
            timings = Interleaved(samples)
            spent = sum(samples["before"]) + sum(samples["after"])
            done = len(samples["before"])
            if self.judge(timings).kind != "not measurable" or done >= self.max_rounds or spent >= self.max_seconds:
                return timings
            per_round = spent / done
            rounds = max(1, min(done, self.max_rounds - done, int((self.max_seconds - spent) / per_round)))

    def judge(self, timings: Interleaved) -> Verdict:
        """The verdict on samples keyed "before" and "after" (see the module docstring)."""
        ratio, low, high = timings.ratio("after", "before")
        up, down = 1 + self.tolerance, 1 - self.tolerance
        if low > up:
            kind = "slower"
        elif high < down:
            kind = "faster"
        elif low >= down and high <= up:
            kind = "no change"
        else:
            kind = "not measurable"
        return Verdict(kind, ratio, low, high, timings.timing("before"), timings.timing("after"))

    def rollback_reason(self, verdict: Verdict, lossy: bool) -> str | None:
        """Why the pass timed by `verdict` must be rolled back, or None to keep it."""
        if verdict.kind == "slower":
            return f"rolled back: {verdict.describe()}"
        if lossy and self.min_gain > 0 and not verdict.high < 1 - self.min_gain:
            return (f"rolled back: a lossy pass must be ≥ {self.min_gain:.0%} faster (min_gain), "
                    f"measured {verdict.describe()}")
        return None


def parse_speed_check(value: Any, measure_latency: bool) -> SpeedCheck | None:
    """`speed_check=` of graphopt.optimize: True (default settings), False/None (off), a dict, or a SpeedCheck."""
    if value is None or value is False:
        return None
    if not measure_latency:
        raise OptionError("speed_check needs measure_latency=True (it times the graphs); pass speed_check=False "
                          "to optimize without timing")
    if value is True:
        return SpeedCheck()
    if isinstance(value, SpeedCheck):
        return value
    if isinstance(value, Mapping):
        known = set(SpeedCheck.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise OptionError(f"speed_check: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return SpeedCheck(**value)
        except TypeError as exc:
            raise OptionError(f"speed_check: {exc}") from exc
    raise OptionError(f"speed_check={value!r}: give True, False, a dict of SpeedCheck fields or a SpeedCheck")


def timing_context() -> dict[str, Any]:
    """Thread count and machine load when the timings were taken, for the report."""
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "load_1min": None if load is None else round(load, 2)}
