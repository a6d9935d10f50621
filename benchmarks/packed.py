"""Packed sequences (cu_seqlens) on this machine: one call against a call per sequence.

    python -m benchmarks.packed [--threads 1]

32 sequences of uneven lengths (benchmarks/gpu.py's `packed_lengths`) packed into 8,192
tokens, backend="torch" (the path that takes packed sequences in one call on a CPU; `auto`
takes the C++ kernels there, one sequence at a time), forward without gradients, median of 7.
The same comparison on a GPU is a group of benchmarks/gpu.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import load, packed_lengths  # noqa: E402

TOTAL, COUNT = 8192, 32


def median_ms(call, repeats: int = 7) -> float:
    with torch.no_grad():
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cases():
    g = torch.Generator().manual_seed(0)
    H, K = 4, 64
    attn = {n: torch.randn(1, TOTAL, H, K, generator=g) for n in ("q", "k", "v")}
    attn["gk"] = -torch.rand(1, TOTAL, H, K, generator=g) * 0.1
    first = {"x": torch.randn(1, TOTAL, 256, generator=g), "log_a": -torch.rand(1, TOTAL, 256, generator=g)}
    return [("linear_recurrence", "D=256", first, {}), ("gla", f"H={H} K=V={K}", attn, {"K": K, "V": K})]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = packed_lengths(TOTAL, COUNT)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    print(f"| op | shape | one call ms | a call per sequence ms | ratio |  ({COUNT} sequences, {TOTAL} tokens, "
          f"{args.threads} threads)")
    print("|---|---|---|---|---|")
    for name, shape, inputs, dims in cases():
        cls = load(name)
        packed = cls(backend="torch", check_finite=False, **dims)
        looped = cls(backend="torch", check_finite=False, **dims)
        looped._forward_packed = lambda *args, **kwargs: None  # (the layer then runs them by length)
        one = median_ms(lambda: packed(**inputs, cu_seqlens=cu))
        each = median_ms(lambda: looped(**inputs, cu_seqlens=cu))
        print(f"| {name} | {shape} | {one:.2f} | {each:.2f} | {one / each:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
