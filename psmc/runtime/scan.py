"""Exact (associative) inclusive scans along time, chunked into blocks.

Inside a block the scan is the work-efficient pairwise recursion (combine neighbours, scan the
pairs, fill in the even steps): about 2 combine calls per halving, no identity needed, any
length. The block totals are then scanned the same way (recursively, so very long sequences
stay O(log T) calls) and applied to every step of the later blocks with ONE batched combine.
Because the combine is associative, this bracketing equals the left-to-right loop.
"""

from __future__ import annotations

import torch

from psmc.runtime.element import (
    Combine,
    Element,
    interleave,
    join,
    length,
    put,
    step_like,
    strided,
    take,
    window,
    with_time,
)

# 64 keeps a block's pairwise recursion at 11 combine calls and needs one more level of
# blocks only every 64x in length, so T in the thousands takes about 2*log2(T) calls in all,
# while the gathered carry application stays a small share of the work.
DEFAULT_BLOCK = 64


def exact_scan(
    x: Element,
    combine: Combine,
    *,
    carry: Element | None = None,
    block: int | None = None,
) -> Element:
    """Inclusive prefix along axis 1: out_t = [carry ⊕] x_0 ⊕ ... ⊕ x_t (combine(earlier, later)).

    `x` is `[B, T, *lanes, *field]` per field, T >= 1; `carry` is a step element
    `[B, *lanes, *field]`. Combine calls: at most 2*log2(block) per level of blocks, and
    ceil(log_block(T)) levels, plus one when a carry is given.
    """
    block = DEFAULT_BLOCK if block is None else block
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
    if length(x) < 1:
        raise ValueError("exact_scan needs at least one time step")
    local = _scan_within_blocks(x, combine, block)
    return _apply_block_prefixes(local, combine, carry, block)


def exclusive_from_inclusive(incl: Element, first: Element) -> Element:
    """p_0 = first, p_t = incl_{t-1}. `first` is a step element or anything broadcastable to
    one step of `incl` (e.g. an identity with lead [])."""
    head = step_like(first, incl)
    return join([head, window(incl, 0, length(incl) - 1)])


def _scan_within_blocks(x: Element, combine: Combine, block: int) -> Element:
    """Inclusive scan restarted at every multiple of `block` (the last block may be short)."""
    n = length(x)
    if block == 1 or n == 1:
        return x
    pairs = combine(strided(x, 0, 2, n // 2), strided(x, 1, 2, n // 2))
    odds = _scan_within_blocks(pairs, combine, block // 2)  # pair k never straddles a block
    evens = strided(x, 0, 2, (n + 1) // 2)
    n_even = length(evens)
    if n_even == 1:
        return interleave(evens, odds)
    if n <= block:  # one block: every even step but the first follows the previous pair
        filled = combine(window(odds, 0, n_even - 1), window(evens, 1, n_even - 1))
        return interleave(join([window(evens, 0, 1), filled]), odds)
    # even steps 1 .. n_even - 1 except those that start a block (multiples of block / 2)
    # keep their own value; the m-th kept one is m + 1 + m // (half - 1) (no boolean mask:
    # the shape follows from Python ints, so a torch.compile graph needs no data-dependent size)
    half = block // 2
    count = 0 if half == 1 else (n_even - 1) - (n_even - 1) // half
    if count == 0:
        return interleave(evens, odds)
    m = torch.arange(count)
    k = m + 1 + m // (half - 1)
    filled = combine(take(odds, k - 1), take(evens, k))
    return interleave(put(evens, k, filled), odds)


def _apply_block_prefixes(local: Element, combine: Combine, carry: Element | None, block: int) -> Element:
    """Turn per-block scans into the full scan: combine each step of block b with the
    exclusive prefix of block b (carry ⊕ totals of blocks 0..b-1), in one batched call."""
    n = length(local)
    n_blocks = -(-n // block)
    if n_blocks == 1:
        return local if carry is None else combine(with_time(carry), local)
    last_steps = torch.arange(block - 1, (n_blocks - 1) * block, block)
    # Inclusive prefixes through blocks 0 .. n_blocks-2 = exclusive prefixes of blocks 1 ..
    running = exact_scan(take(local, last_steps), combine, carry=carry, block=block)
    if carry is None:
        start, prefixes = block, running
    else:
        start, prefixes = 0, join([step_like(carry, running), running])
    owner = torch.arange(n - start) // block  # which prefix each remaining step takes
    applied = combine(take(prefixes, owner), window(local, start, n - start))
    if start == 0:
        return applied
    return join([window(local, 0, start), applied])
