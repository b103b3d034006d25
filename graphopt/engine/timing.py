"""Wall-clock timing shared by the report instruments and the benchmarks.

`measure(fn)` runs warm-up calls, then repeats until `repeats` samples or
`max_seconds` have been spent, and returns the median with its spread. It is
the one timer of the project: report latencies and bench tables agree.
A call counts until the GPU has finished its work too (`_call_and_wait`):
CUDA launches return before their kernels run, and timing the launches alone
would rank a graph by its Python overhead.
`measure_interleaved(fns)` times several callables in rotating round-robin (A/B tests:
`graphopt compare`) and gives their latency ratio with a bootstrap confidence interval.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative noise of the measurement."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0


def _call_and_wait(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds (of `clock`) from calling `fn` until it and the GPU work it queued are done."""
    waits = torch.cuda.is_available() and torch.cuda.is_initialized()
    if waits:
        torch.cuda.synchronize()
    start = clock()
    fn()
    if waits:
        torch.cuda.synchronize()
    return clock() - start


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 20,
            max_seconds: float = 10.0) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then up to `repeats` timed ones within `max_seconds`."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(samples) < repeats and (len(samples) < 3 or time.perf_counter() < budget_end):
        samples.append(_call_and_wait(fn))
    samples.sort()
    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]
    return Timing(statistics.median(samples), quantile(0.1), quantile(0.9), len(samples))


@dataclass(frozen=True)
class Interleaved:
    """Samples of several callables timed in round-robin (one call each per round, order rotating)."""
    samples: dict[str, list[float]]

    def timing(self, name: str) -> Timing:
        values = sorted(self.samples[name])
        def quantile(q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))]
        return Timing(statistics.median(values), quantile(0.1), quantile(0.9), len(values))

    def ratio(self, slow: str, fast: str, confidence: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
        """median(slow) / median(fast) and its bootstrap confidence interval over the paired rounds."""
        import random
        a, b = self.samples[slow], self.samples[fast]
        rng = random.Random(seed)
        estimates = []
        for _ in range(resamples):
            picks = [rng.randrange(len(a)) for _ in a]
            estimates.append(statistics.median(a[i] for i in picks) / statistics.median(b[i] for i in picks))
        estimates.sort()
        tail = (1 - confidence) / 2
        low = estimates[int(tail * resamples)]
        high = estimates[min(resamples - 1, int((1 - tail) * resamples))]
        return statistics.median(a) / statistics.median(b), low, high


def measure_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 2,
                        max_seconds: float = 60.0, clock: Callable[[], float] = time.perf_counter) -> Interleaved:
    """Time each of `fns` once per round, rotating the order, so drift on a busy machine hits all alike.
    `clock`: wall time by default; `time.process_time` measures the CPU time this process spent instead
    (with one torch thread, other processes' load on the cores then barely reaches the samples)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    budget_end = time.perf_counter() + max_seconds
    for round_index in range(rounds):
        if round_index >= 3 and time.perf_counter() > budget_end:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_call_and_wait(fns[name], clock))
    return Interleaved(samples)
