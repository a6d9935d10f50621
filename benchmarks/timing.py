"""Repeated wall-clock measurement: warmup runs, then the median (and min) of N runs."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int


def measure(fn: Callable[[], object], repeat: int, warmup: int = 1, budget_s: float = float("inf")) -> Timing:
    """Call fn `warmup` times untimed, then up to `repeat` times; median and min in ms.

    The median is what tables compare (robust to a stray slow run on a shared machine); the
    min is printed beside it as the machine's best case. Repeats stop early once the timed runs
    have used `budget_s` (at least one run always counts): a per-token Python loop peer must
    not stretch the whole benchmark past its few minutes.
    """
    for _ in range(warmup):
        fn()
    samples = []
    while len(samples) < repeat and (not samples or sum(samples) < budget_s * 1e3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), min(samples), len(samples))


def seconds(fn: Callable[[], object]) -> float:
    """One timed call, in seconds (for things that can only be measured once, like a compile)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
