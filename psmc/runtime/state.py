"""Stream states: small immutable objects of tensors that streaming inference carries.

- ScanState: the inclusive prefix of an associative scan so far.
- TreeState: the paper's binary counter (PAPER.md §3) with cached partial folds, so that
  pushing a leaf costs about 2 Agg calls amortized and `prefix` is the exact tree prefix.
- ChunkStream: a ScanState/TreeState plus the tokens of the chunk being filled.

All of them share one read API: `prefix` (the inclusive prefix over the leaves pushed so far,
a tuple of field tensors, None before the first leaf), `count` (those leaves, a 0-d int64
tensor), `size` (a Python int) and one tensor walker (`.to`, `.nbytes`, `detach`). The leaf count is a 0-d
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
    if isinstance(count, Tensor) and count.dtype == torch.int64 and count.dim() == 0:
        return count  # already a count: no dispatch (a decode step builds one per token)
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
        return self._all_tensors()

    def _all_tensors(self) -> list[Tensor]:
        return list({id(t): t for t in _tensors(self)}.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held, each tensor counted once."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors())

    # -- batch operations (psmc/runtime/batch.py holds the functions behind them)
    @property
    def batch_size(self) -> int:
        """Rows along the batch axis (axis 0 of every per-row tensor); 0 for an empty state."""
        from psmc.runtime.batch import batch_size
        return batch_size(self)

    def __getitem__(self, index):
        """A new state with the batch rows `index` (an int keeps the batch axis, a slice,
        a list or an int64/bool tensor: slicing, and reordering for beam search)."""
        from psmc.runtime.batch import select_rows
        return select_rows(self, index)


@dataclasses.dataclass(frozen=True, eq=False)
class ScanState(StreamState):
    """Inclusive prefix of an exact scan so far; `prefix` is None before the first leaf."""

    prefix: Element | None
    count: Tensor
    op: str = ""  # the layer that made it (checked when a layer is given a state)

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", _as_count(self.count))

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> ScanState:
        return cls(prefix=None, count=_as_count(0, device))

    @classmethod
    def make(cls, prefix, count: Tensor, op: str) -> ScanState:
        """The state a decode step returns (`count` already an int64 0-d tensor): built without
        the dataclass __init__ (a frozen dataclass sets each field through object.__setattr__)."""
        state = object.__new__(cls)
        state.__dict__.update(prefix=prefix, count=count, op=op)
        return state

    @property
    def size(self) -> int:
        """Leaves pushed so far, as a Python int."""
        return int(self.count)

    def push(self, x: Element, combine: Combine) -> ScanState:
        """Append one step element (1 combine call; none for the first leaf)."""
        prefix = x if self.prefix is None else combine(self.prefix, x)
        return ScanState(prefix=prefix, count=self.count + 1, op=self.op)

    def advanced(self, inclusive: Element) -> ScanState:
        """The state after a parallel pass whose inclusive scan (carry included) is `inclusive`."""
        last = clone_step(at(inclusive, length(inclusive) - 1))
        return ScanState(prefix=last, count=self.count + length(inclusive), op=self.op)

    def tensors(self) -> tuple[Tensor, ...]:
        """The live prefix fields as plain tensors `[B, *lanes, *field]`, in declared order
        (empty before the first token; a dead field, None in its slot, is left out);
        `ScanState.from_tensors(t, count=state.size)` rebuilds it for the layer."""
        return () if self.prefix is None else tuple(t for t in self.prefix if t is not None)

    @classmethod
    def from_tensors(cls, tensors, count: int | Tensor = 0, op: str = "") -> ScanState:
        """A state whose prefix is `tensors` (one per live field, e.g. an fla final state), having
        seen `count` tokens (matters only for ops that read the position)."""
        tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        device = tensors[0].device if tensors else None
        return cls(prefix=tensors or None, count=_as_count(count, device), op=op)


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
    op: str = ""

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
        """Leaves pushed so far, as a Python int, read off the counter's structure (bit j of the
        count is set exactly when level j holds a root): no host read of `count`, so a GPU
        stream does not synchronise and torch.compile traces it (the structure is a guard)."""
        n = sum(1 << level for level, root in enumerate(self.roots) if root is not None)
        count = self.count
        if count.device.type == "cpu" and not torch.compiler.is_compiling() and int(count) != n:
            # a state assembled by hand (CPU counts only: reading a GPU count would synchronise)
            held = [level for level, root in enumerate(self.roots) if root is not None]
            raise ValueError(f"a tree state after {int(count)} tokens needs a root at each set bit of "
                             f"{int(count)}, but this one lacks them: it holds roots at levels {held} (build it "
                             "with TreeState.from_tensors(tensors, count=n))")
        return n

    @property
    def prefix(self) -> Element | None:
        """P(count): the fold at the lowest occupied level; None for the formal identity (the
        same read as `ScanState.prefix`)."""
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
        return TreeState(count=self.count + 1, roots=tuple(roots), folds=tuple(folds), op=self.op)

    def tensors(self) -> tuple[Tensor, ...]:
        """Plain tensors: for each occupied level, lowest first, its root's fields then its
        fold's fields. `TreeState.from_tensors(t, count=state.size)` rebuilds the state."""
        out: list[Tensor] = []
        for root, fold in zip(self.roots, self.folds):
            if root is not None:
                out.extend(root)
                out.extend(fold)
        return tuple(out)

    @classmethod
    def from_tensors(cls, tensors, count: int, op: str = "") -> TreeState:
        """The inverse of `tensors()`: the counter after `count` leaves (its set bits say which
        levels hold a root and a fold)."""
        tensors = tuple(tensors)
        count = int(count)
        levels = [j for j in range(count.bit_length()) if (count >> j) & 1]
        if not levels:
            if tensors:
                raise ValueError(f"a tree state after 0 tokens holds no tensors, got {len(tensors)}")
            return cls.empty()
        n, rest = divmod(len(tensors), 2 * len(levels))
        if rest or not n:
            raise ValueError(f"a tree state after {count} tokens holds 2 x {len(levels)} elements (one root and "
                             f"one fold per set bit of {count}), so a multiple of {2 * len(levels)} tensors; "
                             f"got {len(tensors)}")
        roots: list = [None] * count.bit_length()
        folds: list = [None] * count.bit_length()
        for i, level in enumerate(levels):
            chunk = tensors[2 * n * i: 2 * n * (i + 1)]
            roots[level], folds[level] = tuple(chunk[:n]), tuple(chunk[n:])
        return cls(count=_as_count(count, tensors[0].device), roots=tuple(roots), folds=tuple(folds), op=op)


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkStream(StreamState):
    """A stream for chunk ops: `inner` holds the prefix over complete chunks, `buffer[name]`
    (`[B, C, ...]`) the current partial chunk's tokens, of which `filled` are valid.
    The generated step appends a token; when `is_complete` it lifts the chunk, pushes it to
    `inner` and calls `restart(new_inner)`."""

    inner: ScanState | TreeState
    buffer: dict[str, Tensor]
    filled: Tensor
    op: str = ""
    # `filled` as a Python int, kept beside the tensor (which moves and saves with the rest): the
    # step selects the token's slot with it, and a compiled step reads it without a host read of
    # a tensor (a graph break); Dynamo guards it like the tree counter's structure
    n_filled: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "filled", _as_count(self.filled))
        if self.n_filled is None:  # built by hand: read it once (append and restart pass it on)
            object.__setattr__(self, "n_filled", int(self.filled))
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
        return cls(inner=inner, buffer=buffer, filled=_as_count(0, device), n_filled=0)

    @property
    def prefix(self) -> Element | None:
        """The prefix over the complete chunks (the inner state's; a leaf is a lifted chunk)."""
        return self.inner.prefix

    @property
    def count(self) -> Tensor:
        """Complete chunks pushed (the inner state's leaf count); `filled` counts the partial one."""
        return self.inner.count

    @property
    def chunk(self) -> int:
        """Tokens per chunk (C)."""
        return next(iter(self.buffer.values())).shape[1]

    @property
    def size(self) -> int:
        """Valid tokens in the buffer, as a Python int."""
        n = self.n_filled
        return int(self.filled) if n is None else n  # (None: a state pickled before n_filled existed)

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
        return ChunkStream(inner=self.inner, buffer=buffer, filled=self.filled + 1, op=self.op,
                           n_filled=self.size + 1)

    def tokens(self, name: str) -> Tensor:
        """The valid tokens of input `name`: `[B, filled, ...]`."""
        return self.buffer[name][:, : self.size]

    def restart(self, inner: ScanState | TreeState) -> ChunkStream:
        """After the complete chunk was pushed into `inner`: an empty buffer (zeroed, so the
        old chunk's autograd graph is not kept alive)."""
        buffer = {name: torch.zeros_like(buf) for name, buf in self.buffer.items()}
        return ChunkStream(inner=inner, buffer=buffer, filled=torch.zeros_like(self.filled), op=self.op, n_filled=0)


# States are plain tensors in small dataclasses: let `torch.load` (weights_only=True, the
# default since torch 2.6) read them back.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([ScanState, TreeState, ChunkStream])
