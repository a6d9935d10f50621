"""Spawned gloo ranks for the multi-process tests (DDP, context parallelism).

gloo's teardown has, rarely and only under CI load, killed a rank with SIGABRT ("terminate
called without an active exception", inside torch, after psmc's work was done and saved). A
death by signal gets one fresh try with a new port and a new results folder; an exception
raised by a rank's Python (a wrong result, a psmc error) fails at once, never retried."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable, world: int, args: Callable, tmp_path: Path, attempts: int = 2) -> Path:
    """Run `fn(rank, *args(port, out_dir))` on `world` processes; return the folder the ranks
    wrote their results to."""
    for attempt in range(attempts):
        out_dir = Path(tmp_path) / f"attempt{attempt}"
        out_dir.mkdir()
        try:
            mp.spawn(fn, args=args(free_port(), str(out_dir)), nprocs=world, join=True)
            return out_dir
        except mp.ProcessExitedException as death:
            if death.signal_name is None or attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")
