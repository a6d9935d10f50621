"""Packed sequences (cu_seqlens) on this machine: one call against one pass per length, and
continuing the ragged batch a packed prefill leaves (rows at different counts).

    python -m benchmarks.packed [--threads 1]

32 sequences of uneven lengths (benchmarks/gpu.py's `packed_lengths`) packed into 8,192
tokens, forward without gradients, median of 7, for backend="torch" and backend="auto" (on a
CPU: the C++ kernels, which take packed sequences in one call too). The second table runs 64
more tokens for all 32 rows after that prefill: every row in one call where the op's count
changes nothing but itself (an exact scan that reads no `index`), against the rows of one
count together (32 calls: every count differs); the third decodes 16 tokens for all 32 rows
the same two ways (one step call per token, or 32); the fourth decodes a tree scan's rows (ema)
on a TreeCache (one call per token) against its RaggedState (by count), the fifth a chunk op's
(Transformer-PSM, C = 16) on a ChunkCache against its RaggedState of ChunkStreams. The same
comparisons on a GPU are groups of benchmarks/gpu.py.
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


def _pair(name: str, backend: str, dims: dict):
    """(the layer, the same layer made to run by length and by count: its one-pass routes off)."""
    cls = load(name)
    layer = cls(backend=backend, check_finite=False, **dims)
    looped = cls(backend=backend, check_finite=False, **dims)
    looped._forward_packed = lambda *args, **kwargs: None  # (the layer then runs them by length)
    looped._count_free = lambda: False  # (and ragged rows by count)
    return layer, looped


def continued(layer, inputs: dict, cu, tokens: int = 64):
    """A packed prefill, then a forward of `tokens` more for every row from the ragged state it
    leaves (the rows' next inputs are the prefill's first tokens again)."""
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    rows = len(cu) - 1
    more = {n: x[0, :rows * tokens].reshape(rows, tokens, *x.shape[2:]) for n, x in inputs.items()}
    return lambda: layer(**more, state=state)


def decode(layer, inputs: dict, cu, tokens: int = 16):
    """A packed prefill, then `tokens` decode steps of every row (the rows' next inputs are the
    prefill's first tokens again)."""
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    rows = len(cu) - 1
    token = {n: x[0, :rows] for n, x in inputs.items()}

    def run():
        s = state
        for _ in range(tokens):
            _, s = layer.step(s, **token)
    return run


def table(title: str, other: str, note: str, timed) -> None:
    """One markdown table: per op and backend, `timed(layer, inputs)` (a call to time) for the
    layer and for its by-length / by-count twin, and their ratio."""
    print(f"| op | shape | backend | {title} ms | {other} ms | ratio |  ({note})")
    print("|---|---|---|---|---|---|")
    for name, shape, inputs, dims in cases():
        for backend in ("torch", "auto"):
            packed, looped = _pair(name, backend, dims)
            one, each = median_ms(timed(packed, inputs)), median_ms(timed(looped, inputs))
            print(f"| {name} | {shape} | {backend} | {one:.2f} | {each:.2f} | {one / each:.2f}x |")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = packed_lengths(TOTAL, COUNT)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    table("one call", "by length", f"{COUNT} sequences, {TOTAL} tokens, {args.threads} threads",
          lambda layer, inputs: (lambda: layer(**inputs, cu_seqlens=cu)))
    table("64 more tokens, all rows in one call", "by count", f"{COUNT} rows after the prefill",
          lambda layer, inputs: continued(layer, inputs, cu))
    table("16 decode tokens, all rows per step", "by count", f"{COUNT} rows after the prefill",
          lambda layer, inputs: decode(layer, inputs, cu))
    tree_table(cu)
    chunk_table(cu)
    return 0


def cache_vs_ragged(layer, name: str, x, cu, cache_class, repeats: int = 7) -> tuple:
    """(ms of 16 decode tokens on a serving cache of the prefill's rows, ms on its RaggedState):
    the first COUNT tokens of `x` ([1, T, ...]) are the token stepped for every row."""
    with torch.no_grad():
        _, ragged = layer(**{name: x}, cu_seqlens=cu, return_state=True)
    token = x[0, :COUNT]

    def run(state):
        def steps():
            s = state
            for _ in range(16):
                _, s = layer.step(s, **{name: token})
        return steps
    return median_ms(run(cache_class.of(ragged, TOTAL + 16)), repeats), median_ms(run(ragged), repeats)


def tree_table(cu) -> None:
    """A tree scan's rows after the prefill (ema, D=256): 16 decode tokens stepped on a
    TreeCache (every row in one call) against the RaggedState of tree states (by count)."""
    from psmc.runtime.state import TreeCache
    x = torch.randn(1, TOTAL, 256, generator=torch.Generator().manual_seed(1))
    print(f"| op | shape | backend | 16 decode tokens, TreeCache ms | by count ms | ratio |  ({COUNT} rows after the "
          "prefill)")
    print("|---|---|---|---|---|---|")
    for backend in ("torch", "auto"):
        layer = load("ema")(backend=backend, check_finite=False)
        one, each = cache_vs_ragged(layer, "y", x, cu, TreeCache)
        print(f"| ema | D=256 | {backend} | {one:.2f} | {each:.2f} | {one / each:.2f}x |")
    print()


def chunk_table(cu) -> None:
    """A chunk op's rows after the prefill (transformer_psm, C=16, D=64, 4 heads): 16 decode
    tokens stepped on a ChunkCache (every row in one call; the rows complete their chunks at
    different tokens) against the RaggedState of ChunkStreams (by position)."""
    from psmc.runtime.state import ChunkCache
    torch.manual_seed(2)
    layer = load("transformer_psm")(C=16, D=64, H=4, check_finite=False)
    x = torch.randn(1, TOTAL, 64, generator=torch.Generator().manual_seed(3))
    one, each = cache_vs_ragged(layer, "x", x, cu, ChunkCache, repeats=3)
    print(f"| op | shape | 16 decode tokens, ChunkCache ms | by position ms | ratio |  ({COUNT} rows after the prefill)")
    print("|---|---|---|---|---|")
    print(f"| transformer_psm | C=16 D=64 H=4 | {one:.2f} | {each:.2f} | {one / each:.2f}x |")
    print()

if __name__ == "__main__":
    sys.exit(main())
