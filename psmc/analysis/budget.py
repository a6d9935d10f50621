"""Time limits for the analysis: every example must be analysed in a few seconds.

Time here is this process's CPU time, not wall time, so a loaded machine gets about as much
work done as an idle one. Only about: CPU time itself grows with contention (caches, memory
bandwidth), and an op that needs nearly its whole budget was proven on one run and not on the
next (2026-12-04: log-space attention pooling with a vector accumulator, about 2.2 s). Such a
verdict says so (`ran_out`; psmc check names `assume associative;`). A budget counted in work
(SymPy steps), not seconds, would make every verdict reproducible; it is not built.
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


LIMIT_WORDS = "CPU-time limit"  # in every OutOfTime message (ran_out finds it in a verdict's reason)


class OutOfTime(Exception):
    """The analysis step ran past its budget."""


def ran_out(reason: str | None) -> bool:
    """Whether a verdict's reason says the analysis ran out of time (a verdict that another
    machine, or this one under another load, may reach: CPU time itself varies with contention)."""
    return bool(reason) and LIMIT_WORDS in reason


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.process_time() + seconds

    def left(self) -> float:
        return self.deadline - time.process_time()

    def check(self):
        if self.left() <= 0:
            raise OutOfTime(f"{LIMIT_WORDS} of {self.seconds:.2g} s reached")

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
        raise OutOfTime(f"a SymPy step ran past its {LIMIT_WORDS} of {seconds:.2g} s")

    previous = signal.signal(signal.SIGVTALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_VIRTUAL, old_delay, old_interval)
