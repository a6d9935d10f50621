"""Time limits for the analysis: every example must be analysed in a few seconds.

Time here is this process's CPU time, not wall time: on a loaded machine the analysis gets
as much work done as on an idle one, so verdicts do not depend on what else is running.
`Budget` is a deadline checked between steps. `limited(seconds)` additionally interrupts a
single long SymPy call (simplify can run for minutes) with SIGVTALRM where that is possible
(the main thread of a POSIX process); elsewhere it only bounds the steps around the call.
Running out of time never makes a verdict stronger: the caller falls back to `unknown`.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time


class OutOfTime(Exception):
    """The analysis step ran past its budget."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.process_time() + seconds

    def left(self) -> float:
        return self.deadline - time.process_time()

    def check(self):
        if self.left() <= 0:
            raise OutOfTime(f"CPU-time limit of {self.seconds:g} s reached")

    def part(self, fraction: float) -> "Budget":
        """A sub-budget: `fraction` of the time left (never past this deadline)."""
        return Budget(max(0.0, self.left() * fraction))


def _can_alarm() -> bool:
    return hasattr(signal, "ITIMER_VIRTUAL") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def limited(seconds: float):
    """Raise OutOfTime inside the block once `seconds` have passed (best effort)."""
    if seconds <= 0:
        raise OutOfTime("no time left")
    if not _can_alarm():
        yield
        return

    def on_alarm(signum, frame):
        raise OutOfTime(f"a SymPy step ran past {seconds:.2g} s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_VIRTUAL, old_delay, old_interval)
