"""The counts a Triton decode lane makes (psmc.runtime.triton_lane._Counts): each new count
holds its stream's token count, whatever the order streams and branches are stepped in, and a
count the lane made is never read on the host again."""
from __future__ import annotations

import threading

import torch

from psmc.runtime import triton_lane


def test_a_stream_counts_on_across_blocks():
    counts = triton_lane._Counts()
    count = torch.tensor(5)
    for n in range(5, 5 + 3 * triton_lane.COUNT_BLOCK):
        new, value = counts.after(count)
        assert value == n and int(new) == n + 1
        count = new


def test_branches_off_one_state_each_count_from_it():
    counts = triton_lane._Counts()
    start, _ = counts.after(torch.tensor(0))
    first, _ = counts.after(start)
    second, value = counts.after(start)  # the chain's tip is `first` now: a chain of its own
    assert value == 1 and int(first) == int(second) == 2 and first is not second
    assert int(counts.after(first)[0]) == int(counts.after(second)[0]) == 3


def test_live_counts_survive_forgetting_the_dead_ones():
    """More live streams than the table's first limit: none of theirs is forgotten (stepping
    one again reads nothing on the host), and the dead ones are dropped."""
    counts = triton_lane._Counts()
    live = [counts.after(torch.tensor(i))[0] for i in range(3 * triton_lane.COUNT_BLOCK)]
    for _ in range(5 * triton_lane.COUNT_BLOCK):
        counts.after(torch.tensor(0))  # streams whose states are dropped at once
    assert all(id(c) in counts.known for c in live)
    assert len(counts.known) < 3 * triton_lane.COUNT_BLOCK + 5 * triton_lane.COUNT_BLOCK


def test_threads_stepping_one_state_each_get_its_next_count():
    """Two branches off the newest state of a chain, stepped from two threads at the same
    moment (a barrier, and a switch interval of a microsecond to interleave them inside
    `after`), many times over: each gets the state's count + 1; without the lock, both could
    take the chain's pre-made counts and one would get + 2."""
    import sys
    counts = triton_lane._Counts()
    tip, _ = counts.after(torch.tensor(10))
    results: list = []
    barrier = threading.Barrier(2)

    def branch(start):
        barrier.wait()
        results.append(int(counts.after(start)[0]) - int(start))
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(1000):
            tip, _ = counts.after(tip)  # the newest count of the chain: both threads step it
            threads = [threading.Thread(target=branch, args=(tip,)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(previous)
    assert results == [1] * 2000
