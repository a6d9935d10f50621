"""Shared pieces of the timed cases: run settings and forward / forward+backward callables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sys

import torch

from .report import Row
from .timing import measure


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeat: int
    warmup: int = 1
    compile_peers: bool = False
    budget_s: float = 15.0  # timed seconds per row before repeats stop early


def first(out):
    """A layer may return a tensor or a tuple (outputs, state); the output is what we time."""
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_backward(call: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """One training step's worth: forward, sum, backward; gradients cleared every time."""

    def step():
        for leaf in leaves:
            leaf.grad = None
        first(call()).sum().backward()

    return step


def with_grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def timed_row(settings: Settings, case: str, measure_name: str, impl: str, path: str,
              call: Callable[[], object] | None, *, is_psmc: bool = False, skip: str = "",
              detail: str = "") -> Row:
    """Measure `call` (None: a skipped row that says why)."""
    if call is None:
        return Row(case, measure_name, impl, path, None, is_psmc, skip)
    print(f"  {case} {measure_name} {impl} ...", end="", file=sys.stderr, flush=True)
    try:
        timing = measure(call, settings.repeat, settings.warmup, settings.budget_s)
    except Exception as exc:  # a peer that breaks on this machine is reported, not fatal
        print(" failed", file=sys.stderr)
        return Row(case, measure_name, impl, path, None, is_psmc, f"failed: {type(exc).__name__}: {exc}"[:200])
    print(f" {timing.median_ms:.2f} ms", file=sys.stderr, flush=True)
    if timing.runs < settings.repeat:
        detail = "; ".join(filter(None, [detail, f"{timing.runs} runs (time budget)"]))
    return Row(case, measure_name, impl, path, timing, is_psmc, detail)
