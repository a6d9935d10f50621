"""Context parallelism (`cp_group=`): 2 and 4 gloo processes on CPU, every example op, uneven
slices (lengths 1 included, T not a multiple of any block or chunk size), with and without an
initial state, the final state, and gradients, all against a single-process run over the whole
sequence; tree ops bit for bit. Then mismatched calls fail with the same message on every rank.

Few process groups, many ops per group: each spawn pays for process start-up and imports."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

import cp_worker
from cp_worker import Task
from layer_cases import CASES
from layer_harness import layer_class


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tasks(world: int) -> list:
    lengths = {2: ((4, 7), (1, 6)), 4: ((3, 1, 5, 2), (2, 6, 1, 4))}[world]
    tasks = []
    for i, (name, case) in enumerate(sorted(CASES.items())):
        dims = case.dim_sets[-1]
        tree = case.tree
        tasks.append(Task(name, dims, lengths[0], prefix=0, seed=i, exact_bits=tree))
        tasks.append(Task(name, dims, lengths[1], prefix=5, seed=100 + i, exact_bits=tree))
    return tasks


def _spawn(fn, world: int, *args):
    for name in CASES:  # compile into the cache once, not once per process
        layer_class(name)
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_every_example_matches_one_process(world, tmp_path):
    tasks = _tasks(world)
    _spawn(cp_worker.run_tasks, world, tasks, str(tmp_path))
    failures = [f for rank in range(world) for f in torch.load(tmp_path / f"rank{rank}.pt")]
    assert not failures, "\n".join(failures)
