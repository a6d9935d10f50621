"""Stream states: small immutable objects of tensors that streaming inference carries.

- ScanState: the inclusive prefix of an associative scan so far.
- TreeState: the paper's binary counter (PAPER.md §3) with cached partial folds, so that
  pushing a leaf costs about 2 Agg calls amortized and `prefix()` is the exact tree prefix.
- ChunkStream: a ScanState/TreeState plus the tokens of the chunk being filled.

All of them share one tensor walker (`.to`, `.nbytes`, `detach`). The leaf count is a 0-d
int64 tensor so it moves and saves with the rest; structure (which roots exist) depends only
on the count, never on data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from psmc.runtime.element import Combine, Element, at, clone_step, length


def _walk(value: Any, fn: Callable[[Tensor], Tensor], memo: dict[int, Tensor]) -> Any:
    """Apply fn to every tensor inside value, rebuilding the containers. The memo keeps a
    tensor held twice (a fold that is also a root) held once after the move."""
    if isinstance(value, Tensor):
        if id(value) not in memo:
            memo[id(value)] = fn(value)
        return memo[id(value)]
    if isinstance(value, StreamState):
        return value._map(fn, memo)
    if isinstance(value, tuple):
        return tuple(_walk(v, fn, memo) for v in value)
    if isinstance(value, dict):
        return {k: _walk(v, fn, memo) for k, v in value.items()}
    return value


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, StreamState):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))
    elif isinstance(value, tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _as_count(count: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    if isinstance(count, Tensor):
        return count.to(torch.int64).reshape(())
    return torch.tensor(count, dtype=torch.int64, device=device)


class StreamState:
    """Base of the stream-state dataclasses: the common tensor walking."""

    def _map(self, fn: Callable[[Tensor], Tensor], memo: dict[int, Tensor] | None = None):
        memo = {} if memo is None else memo
        changes = {f.name: _walk(getattr(self, f.name), fn, memo) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A new state on `device`; `dtype` applies to floating tensors only (counts stay int64)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def detach(self):
        """A new state cut from the autograd graph (e.g. between truncated-BPTT windows)."""
        return self._map(Tensor.detach)

    def tensors(self) -> list[Tensor]:
        """Every tensor held, each once (a fold may be its root), in field order."""
        return list({id(t): t for t in _tensors(self)}.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held, each tensor counted once."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclasses.dataclass(frozen=True, eq=False)
class ScanState(StreamState):
    """Inclusive prefix of an exact scan so far; `prefix` is None before the first leaf."""

    prefix: Element | None
    count: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", _as_count(self.count))

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> ScanState:
        return cls(prefix=None, count=_as_count(0, device))

    @property
    def size(self) -> int:
        """Leaves pushed so far, as a Python int."""
        return int(self.count)

    def push(self, x: Element, combine: Combine) -> ScanState:
        """Append one step element (1 combine call; none for the first leaf)."""
        prefix = x if self.prefix is None else combine(self.prefix, x)
        return ScanState(prefix=prefix, count=self.count + 1)

    def advanced(self, inclusive: Element) -> ScanState:
        """The state after a parallel pass whose inclusive scan (carry included) is `inclusive`."""
        last = clone_step(at(inclusive, length(inclusive) - 1))
        return ScanState(prefix=last, count=self.count + length(inclusive))


@dataclasses.dataclass(frozen=True, eq=False)
class TreeState(StreamState):
    """The binary counter over leaves pushed so far (PAPER.md §3).

    roots[j]: the balanced tree over 2^j leaves when bit j of count is set, else None.
    folds[j]: when roots[j] is set, the left fold of the roots at levels >= j, oldest (most
    significant) first, i.e. the exact prefix P(count with bits below j cleared); else None.
    Both tuples have count.bit_length() entries.
    """

    count: Tensor
    roots: tuple[Element | None, ...] = ()
    folds: tuple[Element | None, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", _as_count(self.count))
        # Checked without reading the count: that would sync a GPU on every construction.
        if len(self.roots) != len(self.folds):
            raise ValueError("roots and folds must cover the same levels")
        for level, (root, fold) in enumerate(zip(self.roots, self.folds)):
            if (root is None) != (fold is None):
                raise ValueError(f"level {level}: a root needs its fold and a fold its root")

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> TreeState:
        """The counter before any leaf (count 0, no roots)."""
        return cls(count=_as_count(0, device))

    @property
    def size(self) -> int:
        """Leaves pushed so far, as a Python int."""
        return int(self.count)

    def prefix(self) -> Element | None:
        """P(count): the fold at the lowest occupied level; None for the formal identity."""
        return next((fold for fold in self.folds if fold is not None), None)

    def push(self, x: Element, agg: Combine) -> TreeState:
        """Append one leaf (a step element). Merges carry like a binary increment, older
        subtree on the left; then one Agg refreshes the fold at the new root's level."""
        count = self.size
        levels = (count + 1).bit_length()
        roots = list(self.roots) + [None] * (levels - len(self.roots))
        folds = list(self.folds) + [None] * (levels - len(self.folds))
        tree, level = x, 0
        while (count >> level) & 1:
            tree = agg(roots[level], tree)
            roots[level] = folds[level] = None
            level += 1
        roots[level] = tree
        older = next((fold for fold in folds[level + 1 :] if fold is not None), None)
        folds[level] = tree if older is None else agg(older, tree)
        return TreeState(count=self.count + 1, roots=tuple(roots), folds=tuple(folds))


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkStream(StreamState):
    """A stream for chunk ops: `inner` holds the prefix over complete chunks, `buffer[name]`
    (`[B, C, ...]`) the current partial chunk's tokens, of which `filled` are valid.
    The generated step appends a token; when `is_complete` it lifts the chunk, pushes it to
    `inner` and calls `restart(new_inner)`."""

    inner: ScanState | TreeState
    buffer: dict[str, Tensor]
    filled: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "filled", _as_count(self.filled))
        if not self.buffer:
            raise ValueError("a chunk buffer needs at least one named input")
        sizes = {name: t.shape[1] for name, t in self.buffer.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"chunk buffers disagree on the chunk size: {sizes}")

    @classmethod
    def empty(
        cls, inner: ScanState | TreeState, token_like: Mapping[str, Tensor], chunk: int
    ) -> ChunkStream:
        """An empty chunk of `chunk` tokens shaped like one token `token_like[name]` ([B, ...])."""
        buffer = {
            name: t.new_zeros((t.shape[0], chunk, *t.shape[1:])) for name, t in token_like.items()
        }
        device = next(iter(buffer.values())).device
        return cls(inner=inner, buffer=buffer, filled=_as_count(0, device))

    @property
    def chunk(self) -> int:
        """Tokens per chunk (C)."""
        return next(iter(self.buffer.values())).shape[1]

    @property
    def size(self) -> int:
        """Valid tokens in the buffer, as a Python int."""
        return int(self.filled)

    @property
    def is_complete(self) -> bool:
        return self.size == self.chunk

    def append(self, token: Mapping[str, Tensor]) -> ChunkStream:
        """A new stream with one token (`token[name]` is `[B, ...]`) written at slot `filled`."""
        if set(token) != set(self.buffer):
            raise ValueError(f"token names {sorted(token)} differ from the buffer's {sorted(self.buffer)}")
        if self.is_complete:
            raise ValueError("the chunk is complete: push it to the inner state and restart first")
        slot = self.filled.reshape(1)  # a tensor index: no host sync needed to write
        buffer = {
            name: buf.index_copy(1, slot.to(buf.device), token[name].unsqueeze(1).to(buf.dtype))
            for name, buf in self.buffer.items()
        }
        return ChunkStream(inner=self.inner, buffer=buffer, filled=self.filled + 1)

    def tokens(self, name: str) -> Tensor:
        """The valid tokens of input `name`: `[B, filled, ...]`."""
        return self.buffer[name][:, : self.size]

    def restart(self, inner: ScanState | TreeState) -> ChunkStream:
        """After the complete chunk was pushed into `inner`: an empty buffer (zeroed, so the
        old chunk's autograd graph is not kept alive)."""
        buffer = {name: torch.zeros_like(buf) for name, buf in self.buffer.items()}
        return ChunkStream(inner=inner, buffer=buffer, filled=torch.zeros_like(self.filled))


# States are plain tensors in small dataclasses: let `torch.load` (weights_only=True, the
# default since torch 2.6) read them back.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([ScanState, TreeState, ChunkStream])
