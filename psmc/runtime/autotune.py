"""Launch configurations chosen per shape by timing a short list on the GPU that runs the call.

A kernel family hands `launch(key, candidates, run)` its candidates (launch options: warps, a
tiling) in order of preference and `run(candidate)`, which launches with one of them. The
first call with a new key on a CUDA device runs every candidate once (compiling it), times
each `REPEATS` times and keeps the fastest for the key; later calls launch the kept one only.
The families list at most a handful of candidates, each compiled and checked ahead of time
(docs/triton.md, "Autotuning"), so a first call costs a few compiles and milliseconds.

`run` must be idempotent: it writes its outputs from its inputs and reads nothing it writes
from an earlier launch (the timing launches it again). Every family here is.

Nothing is timed where a time means nothing or a launch must not be repeated, and the first
candidate (the family's static choice) is launched instead:
- off a CUDA device (CPU tensors under TRITON_INTERPRET=1: the interpreter's time is Python's),
- while a CUDA graph is captured (a choice an eager call made earlier for the key is used
  there: run a call eagerly first to tune a captured one),
- while torch.compile traces (always the static choice: a graph holds no lookup of the kept
  choices, and the launch it records runs for every later call),
- with `PSMC_AUTOTUNE=0` in the environment (deterministic launches, no timing runs; choices
  kept before are not used while it is set).
Tests turn timing on for CPU tensors with `timed_by(clock)`, which also replaces the clock.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

ENV = "PSMC_AUTOTUNE"
REPEATS = 3  # timed launches per candidate after the compiling one; the fastest counts

_kept: dict[Hashable, Any] = {}
_every = False  # set by every_candidate
_clock: Callable[[Callable[[], Any], torch.device], float] | None = None  # set by timed_by


LONG = 1 << 16  # sequence lengths from here on share one bucket


def bucket(n: int, most: int | None = None) -> int:
    """A size as tuning keys hold it: the next power of two (`most` and up alike), so shapes
    in one bucket share a choice and packed batches of other lengths do not tune again."""
    n = int(n) if most is None else min(int(n), most)
    return 1 << max(0, n - 1).bit_length()


def off() -> bool:
    """PSMC_AUTOTUNE=0: every launch takes the static choice (kept choices are not used)."""
    return os.environ.get(ENV, "1").strip() == "0"


def enabled(device: torch.device) -> bool:
    """Whether a call on `device` may time its candidates now."""
    if off():
        return False
    if _clock is None and device.type != "cuda":
        return False
    return not _busy(device)


def _busy(device: torch.device) -> bool:
    """Capturing a CUDA graph: a launch here is recorded, not run, so it cannot be timed."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch(key: Hashable, candidates: Sequence, run: Callable[[Any], Any], device: torch.device):
    """run(the candidate kept for `key`) and its result; tunes the key on its first call."""
    if _every:
        for candidate in candidates[1:]:
            run(candidate)
        return run(candidates[0])
    if len(candidates) == 1 or torch.compiler.is_compiling() or off():
        return run(candidates[0])  # (a traced launch too: a graph holds no lookup of the kept choices)
    kept = _kept.get(key)
    if kept is None and enabled(device):
        kept = _kept[key] = _fastest(candidates, run, device)
    return run(kept if kept is not None else candidates[0])


def chosen(key: Hashable):
    """The candidate kept for `key` (None before it is tuned)."""
    return _kept.get(key)


def kept() -> dict:
    """Every tuned key and the candidate kept for it."""
    return dict(_kept)


def forget() -> None:
    """Drop every kept choice (the next call of each key tunes again)."""
    _kept.clear()


def _fastest(candidates: Sequence, run: Callable[[Any], Any], device: torch.device):
    """The candidate with the shortest time. One that fails to launch (e.g. Triton's
    OutOfResources on a smaller GPU) is left out; when all fail, the first one's error is
    raised by the launch that follows."""
    clock = _clock or _cuda_time
    best, best_time = candidates[0], float("inf")
    for candidate in candidates:
        try:
            run(candidate)  # compiles it: not timed
        except Exception:  # noqa: BLE001 -- any launch failure rules the candidate out
            continue
        seconds = min(clock(lambda c=candidate: run(c), device) for _ in range(REPEATS))
        if seconds < best_time:
            best, best_time = candidate, seconds
    return best


def _cuda_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one fn() takes on the device's current stream (CUDA events)."""
    stream = torch.cuda.current_stream(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def wall_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one fn() takes by the host's clock (for `timed_by` on CPU tensors)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def every_candidate():
    """Within: a tuned launch runs every candidate, the static choice last (its result is
    returned); nothing is timed or kept. psmc.triton_aot records launches this way, so every
    configuration the tuner may pick is compiled ahead of time."""
    global _every
    previous, _every = _every, True
    try:
        yield
    finally:
        _every = previous


@contextlib.contextmanager
def timed_by(clock: Callable[[Callable[[], Any], torch.device], float] = wall_time):
    """Within: calls on any device tune (tests on CPU tensors), timed by `clock(fn, device)`,
    starting from no kept choices; the choices made are dropped on exit."""
    global _clock
    previous, saved = _clock, dict(_kept)
    _clock = clock
    _kept.clear()
    try:
        yield
    finally:
        _clock = previous
        _kept.clear()
        _kept.update(saved)
