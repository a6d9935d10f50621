"""Packed sequences (fla's `cu_seqlens` convention), shared by the layer and the chunk kernels.

N sequences of lengths T_0 .. T_{N-1} are packed along time as `[1, total_T, ...]`;
`cu_seqlens` holds the N + 1 offsets 0 = cu[0] < cu[1] < ... < cu[N] = total_T. A kernel
that runs them in one launch needs, besides the offsets, where each sequence's chunks start in
a buffer of all chunks (`Sequences`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["cu_seqlens_bounds", "lengths", "packed_bounds", "Offsets", "Sequences", "chunk_counts", "sequences", "segment_reverse_cumsum"]


@dataclass(frozen=True)
class Offsets:
    """`cu_seqlens` with its offsets already read and checked (`bounds`): what a layer hands the
    runtime functions it calls, which take it wherever they take `cu_seqlens`, so that one call
    reads the offsets off the device once (each read is a host sync on a GPU)."""

    tensor: Tensor
    bounds: tuple

    def stretched(self, factor: int) -> "Offsets":
        """The offsets of the same sequences with every token made `factor` tokens (a product
        of delta steps runs each token as that many delta-rule tokens)."""
        return Offsets(self.tensor * factor, tuple(b * factor for b in self.bounds))


def cu_seqlens_bounds(op: str, cu) -> list:
    """The offsets of `cu_seqlens` as Python ints (one host read per call, as in fla; none for
    `Offsets`), checked to be a 1-D int tensor starting at 0 and strictly increasing."""
    if isinstance(cu, Offsets):
        return list(cu.bounds)
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        shown = f"a {cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise TypeError(f"{op}: cu_seqlens must be a 1-D int32/int64 tensor of offsets [0, ..., total_T], got {shown}")
    bounds = [int(b) for b in cu.tolist()]
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and hold N + 1 offsets, got {bounds}")
    bad = [i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{op}: cu_seqlens must be strictly increasing (every sequence at least one token), but "
                         f"offset {i} is {bounds[i]} after {bounds[i - 1]}: {bounds}")
    return bounds


def lengths(bounds, device) -> Tensor:
    """Each packed sequence's number of tokens, [N] int64 on `device` (bounds from
    cu_seqlens_bounds); `x.repeat_interleave(lengths(...), dim)` spreads a per-sequence value
    over its tokens."""
    return torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.int64, device=device)


def packed_bounds(op: str, cu, batch: int, steps: int) -> list:
    """The offsets of packed sequences, checked against inputs [1, steps, ...]."""
    bounds = cu_seqlens_bounds(op, cu)
    if batch != 1 or bounds[-1] != steps:
        raise ValueError(f"{op}: with cu_seqlens the inputs are packed as [1, total_T, ...] with "
                         f"total_T = cu_seqlens[-1] = {bounds[-1]}; got batch {batch} and {steps} steps")
    return bounds


@dataclass(frozen=True)
class Sequences:
    """What a one-launch kernel over packed sequences reads, for chunks of `chunk` tokens.

    bounds: the offsets as Python ints; offsets: the same on the device (int32);
    first_chunk: [N + 1] int32, where sequence n's chunks start among all chunks (each
    sequence starts a new chunk); chunk_sequence: [total chunks] int32, the sequence of each
    chunk."""

    bounds: tuple
    offsets: Tensor
    first_chunk: Tensor
    chunk_sequence: Tensor
    chunk: int

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    @property
    def chunks(self) -> int:
        return int(self.chunk_sequence.numel())



def chunk_counts(bounds, chunk: int) -> list[int]:
    """How many chunks of `chunk` tokens each sequence of offsets `bounds` takes (each starts a
    new chunk)."""
    return [-(-(b - a) // chunk) for a, b in zip(bounds, bounds[1:])]


def sequences(bounds, chunk: int, device) -> Sequences:
    """The tables of `Sequences` for validated offsets `bounds` (from cu_seqlens_bounds)."""
    bounds = tuple(int(b) for b in bounds)
    counts = chunk_counts(bounds, chunk)
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    owner = [n for n, c in enumerate(counts) for _ in range(c)]
    i32 = dict(dtype=torch.int32, device=device)
    return Sequences(bounds, torch.tensor(bounds, **i32), torch.tensor(first, **i32), torch.tensor(owner, **i32), chunk)


def segment_reverse_cumsum(x: Tensor, bounds, dim: int = 1) -> Tensor:
    """The reverse cumulative sum of x along `dim` restarted at every sequence end: out[t] = sum of
    x over t..end of t's sequence. Summed in float64 (the difference of two running sums then
    loses nothing a float32 result keeps), returned in x's dtype."""
    wide = x.double().flip(dim).cumsum(dim).flip(dim)
    ends = torch.tensor(list(bounds[1:]), device=x.device)
    # the running sum from the next sequence's start, which every token of a sequence subtracts
    after = torch.cat([wide, torch.zeros_like(wide.narrow(dim, 0, 1))], dim)
    tail = after.index_select(dim, ends)  # [.., N, ..]: the sum over every later sequence
    tail = tail.repeat_interleave(lengths(bounds, x.device), dim=dim)
    return (wide - tail).to(x.dtype)
