"""Wall-clock timing shared by the report instruments and the benchmarks.

`measure(fn)` runs warm-up calls, then repeats until `repeats` samples or
`max_seconds` have been spent, and returns the median with its spread. It is
the one timer of the project: report latencies and bench tables agree.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


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


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 20,
            max_seconds: float = 10.0) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then up to `repeats` timed ones within `max_seconds`."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(samples) < repeats and (len(samples) < 3 or time.perf_counter() < budget_end):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]
    return Timing(statistics.median(samples), quantile(0.1), quantile(0.9), len(samples))
