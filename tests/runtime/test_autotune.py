"""psmc.runtime.autotune: the per-shape choice among a kernel family's launch candidates,
driven with stand-in launches and clocks: which candidate is kept, how often each runs, and
where nothing is timed. The kernel families it tunes: tests/codegen/test_triton_autotune.py."""
from __future__ import annotations

import pytest
import torch

from psmc.runtime import autotune

CPU = torch.device("cpu")


class _Stand:
    """A launch that records its candidates and a clock that reads a time per candidate."""

    def __init__(self, times: dict, failing: tuple = ()):
        self.times, self.failing, self.runs = times, failing, []

    def run(self, candidate):
        self.runs.append(candidate)
        if candidate in self.failing:
            raise RuntimeError(f"{candidate} does not fit")
        return f"ran {candidate}"

    def clock(self, fn, device):
        fn()
        return self.times[self.runs[-1]]


def test_the_fastest_candidate_is_kept_and_launched_from_then_on():
    stand = _Stand({"a": 3.0, "b": 1.0, "c": 2.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("key", ("a", "b", "c"), stand.run, CPU) == "ran b"
        # each candidate: one compiling launch, REPEATS timed ones; then the kept one
        per = 1 + autotune.REPEATS
        assert stand.runs == ["a"] * per + ["b"] * per + ["c"] * per + ["b"]
        stand.runs.clear()
        assert autotune.launch("key", ("a", "b", "c"), stand.run, CPU) == "ran b"
        assert stand.runs == ["b"]
        assert autotune.chosen("key") == "b" and autotune.kept() == {"key": "b"}
        stand.times["c"] = 0.5  # another key tunes on its own
        assert autotune.launch("other", ("a", "b", "c"), stand.run, CPU) == "ran c"
    assert autotune.chosen("key") is None  # timed_by drops what it kept


def test_ties_keep_the_earlier_candidate():
    stand = _Stand({"a": 1.0, "b": 1.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("key", ("a", "b"), stand.run, CPU) == "ran a"


def test_a_candidate_that_fails_is_left_out():
    stand = _Stand({"a": 1.0, "b": 2.0}, failing=("a",))
    with autotune.timed_by(stand.clock):
        assert autotune.launch("key", ("a", "b"), stand.run, CPU) == "ran b"
        assert autotune.chosen("key") == "b"


def test_when_every_candidate_fails_the_first_ones_error_is_raised():
    stand = _Stand({}, failing=("a", "b"))
    with autotune.timed_by(stand.clock):
        with pytest.raises(RuntimeError, match="a does not fit"):
            autotune.launch("key", ("a", "b"), stand.run, CPU)


def test_a_single_candidate_is_launched_untimed():
    stand = _Stand({"a": 1.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("key", ("a",), stand.run, CPU) == "ran a"
        assert stand.runs == ["a"] and autotune.chosen("key") is None


def test_nothing_is_timed_on_cpu_tensors_without_timed_by():
    stand = _Stand({"a": 2.0, "b": 1.0})
    assert autotune.launch("untimed key", ("a", "b"), stand.run, CPU) == "ran a"
    assert stand.runs == ["a"] and autotune.chosen("untimed key") is None


def test_psmc_autotune_0_launches_the_static_choice(monkeypatch):
    stand = _Stand({"a": 2.0, "b": 1.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("kept", ("a", "b"), stand.run, CPU) == "ran b"
        monkeypatch.setenv(autotune.ENV, "0")
        stand.runs.clear()
        assert autotune.launch("key", ("a", "b"), stand.run, CPU) == "ran a"
        assert autotune.launch("kept", ("a", "b"), stand.run, CPU) == "ran a"  # a kept choice is not used
        assert stand.runs == ["a", "a"] and autotune.chosen("key") is None


def test_a_traced_call_launches_the_static_choice(monkeypatch):
    """Under torch.compile a launch is recorded into a graph that every later call replays:
    nothing is timed there, and the static choice is taken even where an eager call kept
    another (the graph holds no lookup)."""
    stand = _Stand({"a": 2.0, "b": 1.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("eager first", ("a", "b"), stand.run, CPU) == "ran b"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        stand.runs.clear()
        assert autotune.launch("eager first", ("a", "b"), stand.run, CPU) == "ran a"
        assert autotune.launch("traced first", ("a", "b"), stand.run, CPU) == "ran a"
        assert stand.runs == ["a", "a"] and autotune.chosen("traced first") is None


def test_a_captured_call_uses_the_kept_choice_or_the_static_one(monkeypatch):
    """While a CUDA graph is captured the launch runs eagerly but cannot be timed: a choice an
    eager call made before is used, else the static one."""
    stand = _Stand({"a": 2.0, "b": 1.0})
    with autotune.timed_by(stand.clock):
        assert autotune.launch("eager first", ("a", "b"), stand.run, CPU) == "ran b"
        monkeypatch.setattr(autotune, "_busy", lambda device: True)
        stand.runs.clear()
        assert autotune.launch("eager first", ("a", "b"), stand.run, CPU) == "ran b"
        assert autotune.launch("captured first", ("a", "b"), stand.run, CPU) == "ran a"
        assert stand.runs == ["b", "a"] and autotune.chosen("captured first") is None


def test_every_candidate_runs_each_and_returns_the_static_choices_result():
    stand = _Stand({"a": 2.0, "b": 1.0})
    with autotune.every_candidate():
        assert autotune.launch("key", ("a", "b", "c"), stand.run, CPU) == "ran a"
    assert stand.runs == ["b", "c", "a"] and autotune.chosen("key") is None
