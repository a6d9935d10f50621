"""Repeated measurement: warmup runs, then the median (and min) of N runs.

The clock is the wall clock unless `--clock cpu` chose this process's CPU time
(time.process_time: all its threads, kernel time included): on a shared machine a run that
waits for a core is not charged for the wait. With one torch thread the two agree on a quiet
machine; with more threads CPU time adds the threads up and is not a latency.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

# the clock measurements read; benchmarks/__main__.py sets it from --clock
CLOCK = {"name": "wall", "read": time.perf_counter}


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
    clock = CLOCK["read"]
    while len(samples) < repeat and (not samples or sum(samples) < budget_s * 1e3):
        start = clock()
        fn()
        samples.append((clock() - start) * 1e3)
    return Timing(statistics.median(samples), min(samples), len(samples))


def seconds(fn: Callable[[], object]) -> float:
    """One timed call, in seconds (for things that can only be measured once, like a compile)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
