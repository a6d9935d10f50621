"""Stream states: small immutable objects of tensors that streaming inference carries.

- ScanState: the inclusive prefix of an associative scan so far.
- TreeState: the paper's binary counter (PAPER.md §3) with cached partial folds, so that
  pushing a leaf costs about 2 Agg calls amortized and `prefix` is the exact tree prefix.
- ChunkStream: a ScanState/TreeState plus the tokens of the chunk being filled.
- TreeCache: the TreeState counter in fixed-shape slots, every row at its own count (serving:
  one compiled graph at every position).
- ScanCache: an exact scan's prefix per row, every row at its own count (a ChunkCache's inner
  state for a chunk op on an exact scan).
- ChunkCache: a chunk op's TreeCache (or ScanCache) over complete chunks plus each row's partial
  chunk, every row at its own position (serving a Transformer-PSM).

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

from psmc.runtime import torch_version
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


# Dynamo traces `obj.__dict__.update(...)` from torch 2.13 on; before, ScanState.make builds
# its state through the dataclass __init__ inside a graph (one more guard, no graph break)
_DYNAMO_TRACES_DICT_WRITES = torch_version.at_least(2, 13)


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
        if not _DYNAMO_TRACES_DICT_WRITES and torch.compiler.is_compiling():
            return cls(prefix=prefix, count=count, op=op)  # (a graph break otherwise: torch 2.11 on the H200)
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


def _lowest_bit(n: Tensor, levels: int) -> Tensor:
    """The index of each element's lowest set bit (0 < n < 2**levels): how many powers of two
    lie below `n & -n`. Integer compares, exact, and one fused op in a compiled graph (a float
    log2 may land 1 ulp under k and truncate to k - 1; Inductor's CPU code for frexp fails)."""
    powers = torch.ones(levels, dtype=torch.int64, device=n.device) << torch.arange(levels, device=n.device)
    return ((n & -n).unsqueeze(-1) > powers).sum(-1)


def _per_row(mask: Tensor, like: Tensor) -> Tensor:
    """A [B] or [B, L] mask shaped to broadcast over `like` ([B, ...] or [B, L, ...])."""
    return mask.reshape(tuple(mask.shape) + (1,) * (like.dim() - mask.dim()))


class _RowCache(StreamState):
    """What the per-row caches (`TreeCache`, `ScanCache`) share: a `[B]` int64 `count`, the
    fixed-shape slot fields named by `_SLOTS` (each a tuple of field tensors with the batch on
    axis 0, None until the first leaf; a field may be None: an exact scan's dead field), a
    capacity in leaves per row, and the row operations on them."""

    _SLOTS: tuple = ()
    _NOUN = ""  # in messages: "the tree cache is full"
    _UNIT = ""  # what a leaf is: "tokens", "chunks"

    @property
    def is_empty(self) -> bool:
        """Before the first leaf: no slots yet."""
        return getattr(self, self._SLOTS[0]) is None

    @property
    def sizes(self) -> list[int]:
        """Leaves each row has seen (a host read of the counts)."""
        return [int(c) for c in self.count.tolist()]

    def reset(self, rows):
        """The cache with `rows` (an int, a list, a slice or an index tensor) emptied, for new
        streams in those slots (continuous batching); their stale slots are never read."""
        count = self.count.clone()
        count[rows] = 0
        return dataclasses.replace(self, count=count)

    def slots_like(self, like):
        """This cache, which has no slots yet (no row has pushed), with every slot holding
        `like`'s first row: a valid element that no result reads (the rows' counts are 0)."""
        rows = self.count.shape[0]
        fill = lambda table: tuple(None if f is None else f[:1].expand(rows, *f.shape[1:]).clone()  # noqa: E731
                                   for f in table)
        return dataclasses.replace(self, **{name: fill(getattr(like, name)) for name in self._SLOTS})

    def put_rows(self, which: Tensor, rows):
        """The cache with its rows `which` (an int64 index) replaced by `rows` (a cache of
        `len(which)` rows and the same capacity)."""
        base = self.slots_like(rows) if self.is_empty else self  # (every row gets valid, unread slots first)
        put = lambda mine, theirs: tuple(None if m is None else m.index_copy(0, which, t.to(m.dtype))  # noqa: E731
                                         for m, t in zip(mine, theirs))
        return dataclasses.replace(base, count=base.count.index_copy(0, which, rows.count),
                                   **{name: put(getattr(base, name), getattr(rows, name)) for name in self._SLOTS})

    def _rows_for(self, leaf: Element) -> Tensor:
        """The counts sized for `leaf`'s batch (a cache made without a batch takes it now)."""
        batch = leaf[0].shape[0]
        count = self.count if self.count.numel() else self.count.new_zeros(batch).to(leaf[0].device)
        if count.shape[0] != batch:
            raise ValueError(f"the {self._NOUN} cache holds {count.shape[0]} rows but the token has batch {batch}")
        return count

    def _layout(self) -> str:
        """The capacity in words, for the error that says a row is full."""
        raise NotImplementedError

    def check_room(self, adds: Tensor | None = None) -> None:
        """Raise when a row's next leaf would pass the capacity: on the host for CPU counts
        outside a graph, else a device assert (no sync; it stops the stream with this message).
        `adds` ([B] int64, None: one each): the leaves each row takes."""
        after = self.count + (1 if adds is None else adds)
        if self.count.device.type == "cpu" and not torch.compiler.is_compiling():
            full = [c for c in after.tolist() if c > self.capacity]
            if full:
                raise ValueError(f"the {self._NOUN} cache is full: it holds {self.capacity} {self._UNIT} per row "
                                 f"({self._layout()}) and a row would reach {full[0]}: build it with a larger capacity "
                                 "(layer.init_state(batch, capacity=...)) or reset the row")
        else:
            torch._assert_async(after.le(self.capacity).all(),
                                f"psmc: a {self._NOUN} cache of {self._layout()} ({self.capacity} {self._UNIT} per "
                                "row) is full: build it with a larger capacity or reset the row")


@dataclasses.dataclass(frozen=True, eq=False)
class TreeCache(_RowCache):
    """The tree counter in fixed-shape tensors, for serving: every row at its own count.

    `TreeState` holds a root only where its count has a set bit, so its structure (and a
    compiled step's graph) changes with every token, and rows at different counts cannot share
    one. Here every level has a slot: `roots[i]` and `folds[i]` hold field i at every level,
    `[B, levels, *lanes, *field]`; level j of row b is occupied when bit j of `count[b]` is set
    (an unoccupied slot holds a stale element that no result reads). `count` is `[B]` int64.
    A push computes the merge at every level for every row and keeps the ones each row's count
    asks for (the merge depth differs per row), so it is one graph at every position: one
    torch.compile graph, capturable in a CUDA graph, for any mix of rows. The cost is `levels`
    Agg calls per token where `TreeState.push` makes one plus the merged levels; on CPU tensors
    outside a graph only the levels some row merges are computed. The brackets are
    `TreeState.push`'s, so the outputs equal it bit for bit.

    `roots` is None until the first token (`PsmLayer.init_state(capacity=...)`); `levels`
    slots hold counts up to `capacity = 2**levels - 1` tokens per row."""

    count: Tensor
    roots: Element | None = None
    folds: Element | None = None
    levels: int = 1
    op: str = ""
    _SLOTS = ("roots", "folds")
    _NOUN, _UNIT = "tree", "tokens"

    def __post_init__(self) -> None:
        if (self.roots is None) != (self.folds is None):
            raise ValueError("a tree cache holds both roots and folds, or neither (before its first token)")
        if self.levels < 1:
            raise ValueError(f"a tree cache needs at least one level, got {self.levels}")

    @staticmethod
    def levels_for(capacity: int) -> int:
        """Levels whose counter holds `capacity` tokens per row."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"a tree cache's capacity is a positive number of tokens per row, got {capacity!r}")
        return capacity.bit_length()

    @classmethod
    def empty(cls, capacity: int, batch: int | None = None, device=None, op: str = "") -> TreeCache:
        """A cache before any token for `capacity` tokens per row (`batch` rows; None: the
        first token's batch)."""
        count = torch.zeros(0 if batch is None else batch, dtype=torch.int64, device=device)
        return cls(count=count, levels=cls.levels_for(capacity), op=op)

    @property
    def capacity(self) -> int:
        """Tokens each row can hold."""
        return (1 << self.levels) - 1

    @staticmethod
    def chunks_for(capacity: int, chunk: int) -> int:
        """The capacity in chunks of the counter over a chunk op's complete chunks for `capacity`
        tokens per row in chunks of `chunk`: at least one level, a power of two less one (with
        a partial chunk, `chunk * 2**levels - 1` tokens per row)."""
        TreeCache.levels_for(capacity)  # (the same check of the number)
        return (1 << max(1, (capacity // chunk).bit_length())) - 1

    def _layout(self) -> str:
        return f"{self.levels} levels"

    def ready(self, leaf: Element) -> TreeCache:
        """The cache sized for `leaf`'s batch: an empty one gets its slots, each filled with the
        leaf (a valid element, so the Agg calls on unoccupied slots compute on finite values)."""
        count = self._rows_for(leaf)
        if self.roots is not None:
            return dataclasses.replace(self, count=count)
        slots = tuple(x.unsqueeze(1).expand(x.shape[0], self.levels, *x.shape[1:]).clone() for x in leaf)
        return dataclasses.replace(self, count=count, roots=slots, folds=slots)

    def before(self, identity: Element | None) -> Element | None:
        """Each row's prefix before the next token (its fold at the lowest occupied level),
        `identity` for rows that have seen no token (None: no identity, and a row at 0)."""
        n = self.count
        if self.roots is None:
            return identity
        rows = torch.arange(n.shape[0], device=n.device)
        at = tuple(f[rows, _lowest_bit(n.clamp_min(1), self.levels)] for f in self.folds)
        if identity is None:
            return at
        seen = n > 0
        return tuple(torch.where(_per_row(seen, f), f, e.to(f.dtype)) for f, e in zip(at, identity))

    def push(self, leaf: Element, agg: Combine, rows: Tensor | None = None) -> tuple[TreeCache, Element]:
        """(the cache after one more token per row, each row's prefix after it): the carry
        merges the roots at the trailing set bits of each row's count, older subtree on the
        left, lands at the first clear bit, and its fold is Agg(older fold, carry) as in
        `TreeState.push`. `rows` ([B] bool, None: all) names the rows that take their leaf;
        the others keep their count and slots (a `ChunkCache` pushes the rows whose chunk
        completed), and their prefix in the result is not theirs."""
        cache, pushing = self.ready(leaf), rows
        n, levels = cache.count, cache.levels
        cache.check_room(None if pushing is None else pushing.to(n.dtype))
        roots, folds = cache.roots, cache.folds
        leaf = tuple(x.expand(r.shape[:1] + r.shape[2:]) for x, r in zip(leaf, roots))
        after = n + 1
        land = _lowest_bit(after, levels + 1)  # the level the carry lands on: the count's trailing ones
        depth = levels
        if n.device.type == "cpu" and not torch.compiler.is_compiling():
            deepest = land if pushing is None else land[pushing]
            depth = int(deepest.max()) if deepest.numel() else 0  # (a CPU read costs no sync)
        carry = leaf
        for level in range(depth):
            merged = agg(tuple(r[:, level] for r in roots), carry)
            take = level < land
            carry = tuple(torch.where(_per_row(take, c), m, c) for m, c in zip(merged, carry))
        older_bits = after - (1 << land)  # the counter's set bits above the landing level
        rows = torch.arange(n.shape[0], device=n.device)
        older = tuple(f[rows, _lowest_bit(older_bits.clamp_min(1), levels)] for f in folds)
        folded = agg(older, carry)
        has_older = older_bits > 0
        fold = tuple(torch.where(_per_row(has_older, f), f, c) for f, c in zip(folded, carry))
        at = torch.arange(levels, device=n.device) == land.unsqueeze(1)  # [B, levels]
        if pushing is not None:
            at = at & pushing.unsqueeze(1)
            after = torch.where(pushing, after, n)
        new_roots = tuple(torch.where(_per_row(at, r), c.unsqueeze(1), r) for r, c in zip(roots, carry))
        new_folds = tuple(torch.where(_per_row(at, f), c.unsqueeze(1), f) for f, c in zip(folds, fold))
        return dataclasses.replace(cache, count=after, roots=new_roots, folds=new_folds), fold

    @classmethod
    def of(cls, state, capacity: int) -> TreeCache:
        """The cache holding `state` (a `TreeState`, or a `RaggedState` of tree states: a
        prefill with `cu_seqlens`) for `capacity` tokens per row."""
        levels = cls.levels_for(capacity)
        rows = getattr(state, "row_states", None)
        if rows is not None:  # one one-row state per row
            parts = [cls.of(r, capacity) for r in rows]
            like = next((p for p in parts if p.roots is not None), None)
            if like is None:
                return cls.empty(capacity, batch=len(parts), device=parts[0].count.device, op=state.op)
            # a row that has seen no token gets a valid element in its (unread) slots
            parts = [p if p.roots is not None else dataclasses.replace(
                like[0:1], count=torch.zeros(1, dtype=torch.int64, device=like.count.device)) for p in parts]
            return cls(count=torch.cat([p.count for p in parts]),
                       roots=tuple(torch.cat(f) for f in zip(*[p.roots for p in parts])),
                       folds=tuple(torch.cat(f) for f in zip(*[p.folds for p in parts])), levels=levels, op=state.op)
        if not isinstance(state, TreeState):
            raise TypeError(f"a tree cache holds a TreeState (or a RaggedState of them), got {type(state).__name__}")
        n = state.size
        if n > (1 << levels) - 1:
            raise ValueError(f"the state has seen {n} tokens, more than a cache of capacity {capacity} holds")
        occupied = [r for r in state.roots if r is not None]
        if not occupied:
            return cls.empty(capacity, device=state.count.device, op=state.op)
        batch = occupied[0][0].shape[0]
        filler = occupied[0]  # unoccupied slots: any valid element

        def slots(table):  # field i at every level: [B, levels, ...]
            at = [table[j] if j < len(table) and table[j] is not None else filler for j in range(levels)]
            return tuple(torch.stack([e[i].expand_as(filler[i]) for e in at], dim=1) for i in range(len(filler)))
        count = torch.full((batch,), n, dtype=torch.int64, device=state.count.device)
        return cls(count=count, roots=slots(state.roots), folds=slots(state.folds), levels=levels, op=state.op)

    def to_state(self):
        """The rows as `TreeState`s (one state when every row has the same count, else a
        `RaggedState`): what `forward` continues. Reads the counts on the host."""
        from psmc.runtime.batch import RaggedState, ragged_or_regular
        sizes = self.sizes
        if self.roots is None or not sizes or not any(sizes):
            return TreeState.empty(self.count.device)
        rows = []
        for b, n in enumerate(sizes):
            bits = [(n >> j) & 1 for j in range(n.bit_length())]
            roots = tuple(tuple(f[b:b + 1, j] for f in self.roots) if bit else None for j, bit in enumerate(bits))
            folds = tuple(tuple(f[b:b + 1, j] for f in self.folds) if bit else None for j, bit in enumerate(bits))
            rows.append(TreeState(count=torch.tensor(n, dtype=torch.int64, device=self.count.device), roots=roots,
                                  folds=folds, op=self.op))
        # (a row at 0, reset for a new stream, holds no tensor: a RaggedState keeps it as a row)
        return ragged_or_regular(rows) if len(set(sizes)) == 1 else RaggedState(rows=tuple(rows))


@dataclasses.dataclass(frozen=True, eq=False)
class ScanCache(_RowCache):
    """An exact scan's inclusive prefix per row, every row at its own count: the inner state of
    a `ChunkCache` for a chunk op on an exact scan (its leaves are the rows' complete chunks).

    A `ScanState` holds one prefix and one count for the whole batch; here `count` is `[B]`
    int64 and `prefix` holds each row's (`[B, *lanes, *field]` per field, None in a dead
    field's slot as in a stream prefix; None until the first leaf). A row at count 0 holds a
    stale element that no result reads (`before` gives it the identity). A push combines every
    row's prefix with its leaf and keeps the result for the rows asked (a row's first leaf is
    the leaf itself, as `ScanState.push` takes it), so it is one graph at every count, and the
    brackets are `ScanState.push`'s: each row's prefix is its stream's bit for bit.

    An exact scan's prefix has a fixed shape, so `capacity` (leaves per row) costs no memory:
    it is the limit a `ChunkCache` checks, as a tree counter's levels are."""

    count: Tensor
    prefix: Element | None = None
    capacity: int = 1
    op: str = ""
    _SLOTS = ("prefix",)
    _NOUN, _UNIT = "scan", "chunks"

    @staticmethod
    def chunks_for(capacity: int, chunk: int) -> int:
        """Complete chunks per row for `capacity` tokens per row in chunks of `chunk` (with a
        partial chunk, `chunk * (capacity // chunk + 1) - 1` tokens: the capacity rounded up to
        the end of its chunk)."""
        TreeCache.levels_for(capacity)  # (the same check of the number)
        return capacity // chunk

    @classmethod
    def empty(cls, capacity: int, batch: int | None = None, device=None, op: str = "") -> ScanCache:
        """A cache before any leaf for `capacity` leaves per row (`batch` rows; None: the first
        leaf's batch)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"a scan cache's capacity is a number of leaves per row, got {capacity!r}")
        count = torch.zeros(0 if batch is None else batch, dtype=torch.int64, device=device)
        return cls(count=count, capacity=capacity, op=op)

    def _layout(self) -> str:
        return f"an exact scan of {self.capacity} chunks"

    def ready(self, leaf: Element) -> ScanCache:
        """The cache sized for `leaf`'s batch: an empty one gets its slots, holding the leaf (a
        valid element, so the combine on a row at count 0 computes on finite values)."""
        count = self._rows_for(leaf)
        return dataclasses.replace(self, count=count, prefix=leaf if self.prefix is None else self.prefix)

    def before(self, identity: Element | None) -> Element | None:
        """Each row's prefix before the next leaf, `identity` for rows that have seen none
        (None: no identity, and a row at 0)."""
        if self.prefix is None:
            return identity
        if identity is None:
            return self.prefix
        seen = self.count > 0
        return tuple(None if p is None else torch.where(_per_row(seen, p), p, e.to(p.dtype))
                     for p, e in zip(self.prefix, identity))

    def push(self, leaf: Element, combine: Combine, rows: Tensor | None = None) -> tuple[ScanCache, Element]:
        """(the cache after one more leaf per row, each row's prefix after it): combine(prefix,
        leaf) for a row that has seen a leaf, the leaf itself for one that has not; `combine`
        gives None for a dead field (the layer's prefix combine), which the prefix keeps as
        None. `rows` ([B] bool, None: all) names the rows that take their leaf; the others keep
        their count and prefix (a `ChunkCache` pushes the rows whose chunk completed), and their
        prefix in the result is not theirs."""
        cache = self.ready(leaf)
        n = cache.count
        cache.check_room(None if rows is None else rows.to(n.dtype))
        seen = n > 0
        combined = combine(cache.prefix, leaf)
        prefix = tuple(None if c is None else torch.where(_per_row(seen, c), c, x)
                       for c, x in zip(combined, leaf))
        after = n + 1
        kept = prefix
        if rows is not None:
            kept = tuple(None if p is None else torch.where(_per_row(rows, p), p, old)
                         for p, old in zip(prefix, cache.prefix))
            after = torch.where(rows, after, n)
        return dataclasses.replace(cache, count=after, prefix=kept), prefix

    @classmethod
    def of(cls, state, capacity: int) -> ScanCache:
        """The cache holding `state` (a `ScanState`, or a `RaggedState` of them: a prefill with
        `cu_seqlens`) for `capacity` leaves per row."""
        rows = getattr(state, "row_states", None)
        rows = [state] if rows is None else list(rows)
        if not all(isinstance(r, ScanState) for r in rows):
            kinds = sorted({type(r).__name__ for r in rows})
            raise TypeError(f"a scan cache holds a ScanState (or a RaggedState of them), got {', '.join(kinds)}")
        device = rows[0].count.device
        seen = max(r.size for r in rows)
        if seen > capacity:
            raise ValueError(f"the state has seen {seen} leaves, more than a scan cache of capacity {capacity} holds")
        like = next((r.prefix for r in rows if r.prefix is not None), None)
        if like is None:  # no row has seen a leaf
            return cls.empty(capacity, batch=None if rows[0] is state else len(rows), device=device, op=state.op)
        # a row that has seen no leaf (one row of a RaggedState) gets a valid element in its (unread) slot
        filler = tuple(None if f is None else f[:1] for f in like)
        parts = [r.prefix if r.prefix is not None else filler for r in rows]
        count = torch.cat([r.count.reshape(1).expand(next(f for f in p if f is not None).shape[0])
                           for r, p in zip(rows, parts)])
        prefix = tuple(None if f[0] is None else torch.cat(f) for f in zip(*parts))
        return cls(count=count, prefix=prefix, capacity=capacity, op=state.op)

    def to_state(self):
        """The rows as `ScanState`s (one state when every row has the same count, else a
        `RaggedState`). Reads the counts on the host."""
        from psmc.runtime.batch import RaggedState, ragged_or_regular
        sizes = self.sizes
        if self.prefix is None or not sizes or not any(sizes):
            return ScanState(prefix=None, count=_as_count(0, self.count.device), op=self.op)
        rows = [ScanState(prefix=tuple(None if f is None else f[b:b + 1] for f in self.prefix) if n else None,
                          count=torch.tensor(n, dtype=torch.int64, device=self.count.device), op=self.op)
                for b, n in enumerate(sizes)]
        # (a row at 0, reset for a new stream, holds no tensor: a RaggedState keeps it as a row)
        return ragged_or_regular(rows) if len(set(sizes)) == 1 else RaggedState(rows=tuple(rows))


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkCache(StreamState):
    """A chunk op's stream for serving, every row at its own position: the per-row form of the
    scan's state over each row's complete chunks (`inner`, its counts are chunks: a `TreeCache`
    on the paper's tree, a `ScanCache` on an exact scan) and each row's partial chunk in fixed
    `[B, C, ...]` buffers with its own fill (`filled`, `[B]` int64).

    A `ChunkStream` keeps one fill for the whole batch, so rows at different positions cannot
    share it and a compiled step is a graph per fill. Here a token is written at each row's
    own slot, the readout runs once for the batch, and the rows whose chunk completes push it
    (a masked `inner.push`); the rest keep theirs. One graph at every position: the push's
    combine calls run at every token for every row in a graph (on CPU tensors outside one,
    only when some row completes a chunk). The slots after a row's fill are zeros, as the
    parallel pass pads a partial chunk, so a row decodes as its `ChunkStream` does.

    `buffer` is None until the first token (`PsmLayer.init_state(capacity=...)`); the cache
    holds `capacity = chunk * (inner.capacity + 1) - 1` tokens per row (`inner.capacity`
    complete chunks and a partial one): `chunk * 2**levels - 1` over a tree counter, the
    capacity asked rounded up to the end of its chunk over an exact scan."""

    inner: TreeCache | ScanCache
    filled: Tensor
    chunk: int = 1
    buffer: dict[str, Tensor] | None = None
    op: str = ""

    @staticmethod
    def levels_for(capacity: int, chunk: int) -> int:
        """Levels of the inner tree counter for `capacity` tokens per row in chunks of `chunk`."""
        return TreeCache.chunks_for(capacity, chunk).bit_length()

    @classmethod
    def empty(cls, capacity: int, chunk: int, batch: int | None = None, device=None, op: str = "",
              inner: type = TreeCache) -> ChunkCache:
        """A cache before any token for at least `capacity` tokens per row (`batch` rows; None:
        the first token's batch) over `inner` (`TreeCache`: a chunk op on the tree; `ScanCache`:
        on an exact scan)."""
        inner = inner.empty(inner.chunks_for(capacity, chunk), batch=batch, device=device)
        return cls(inner=inner, filled=inner.count.clone(), chunk=chunk, op=op)

    @property
    def capacity(self) -> int:
        """Tokens each row can hold: the inner state's chunks and a partial one."""
        return self.chunk * (self.inner.capacity + 1) - 1

    def _layout(self) -> str:
        """The capacity in words, for the errors that say a row is full."""
        if isinstance(self.inner, TreeCache):
            return f"{self.inner.levels} levels of chunks of {self.chunk}"
        return f"{self.inner.capacity} chunks of {self.chunk} and a partial one"

    @property
    def is_empty(self) -> bool:
        """Before the first token: no buffers yet."""
        return self.buffer is None

    @property
    def count(self) -> Tensor:
        """Complete chunks of each row, `[B]` int64."""
        return self.inner.count

    @property
    def sizes(self) -> list[int]:
        """Tokens each row has seen (a host read of the counts)."""
        return [c * self.chunk + f for c, f in zip(self.inner.count.tolist(), self.filled.tolist())]

    def reset(self, rows) -> ChunkCache:
        """The cache with `rows` (an int, a list, a slice or an index tensor) emptied, for new
        streams in those slots; their buffers are zeroed (a partial chunk is zero-padded)."""
        filled = self.filled.clone()
        filled[rows] = 0
        buffer = None
        if self.buffer is not None:
            buffer = {}
            for name, buf in self.buffer.items():
                buf = buf.clone()
                buf[rows] = 0
                buffer[name] = buf
        return dataclasses.replace(self, inner=self.inner.reset(rows), filled=filled, buffer=buffer)

    def check_room(self) -> None:
        """Raise when a row's next token would pass the capacity (as `TreeCache.check_room`)."""
        after = self.inner.count * self.chunk + self.filled + 1
        limit = self.capacity
        if after.device.type == "cpu" and not torch.compiler.is_compiling():
            full = [c for c in after.tolist() if c > limit]
            if full:
                raise ValueError(f"the chunk cache is full: it holds {limit} tokens per row ({self._layout()}) and a "
                                 f"row would reach {full[0]}: build it with a larger capacity "
                                 "(layer.init_state(batch, capacity=...)) or reset the row")
        else:
            torch._assert_async(after.le(limit).all(),
                                f"psmc: a chunk cache of {limit} tokens per row is full: build it with a larger "
                                "capacity or reset the row")

    def append(self, token: Mapping[str, Tensor]) -> ChunkCache:
        """The cache with `token[name]` (`[B, ...]`) written at each row's own slot (its fill)."""
        batch = next(iter(token.values())).shape[0]
        filled, inner = self.filled, self.inner
        if not filled.numel():  # the first token of a cache made without a batch
            filled = filled.new_zeros(batch).to(next(iter(token.values())).device)
            inner = dataclasses.replace(inner, count=filled.clone())
        if filled.shape[0] != batch:
            raise ValueError(f"the chunk cache holds {filled.shape[0]} rows but the token has batch {batch}")
        buffer = self.buffer
        if buffer is None:
            buffer = {name: t.new_zeros((t.shape[0], self.chunk, *t.shape[1:])) for name, t in token.items()}
        elif set(token) != set(buffer):
            raise ValueError(f"token names {sorted(token)} differ from the buffer's {sorted(buffer)}")
        cache = dataclasses.replace(self, inner=inner, filled=filled, buffer=buffer)
        cache.check_room()
        slots = torch.arange(self.chunk, device=filled.device) == filled.unsqueeze(1)  # [B, C]
        written = {name: torch.where(_per_row(slots, buf), token[name].unsqueeze(1).to(buf.dtype), buf)
                   for name, buf in buffer.items()}
        return dataclasses.replace(cache, buffer=written, filled=filled + 1)

    def restart(self, inner: TreeCache | ScanCache, rows: Tensor) -> ChunkCache:
        """After the rows `rows` ([B] bool) pushed their complete chunk into `inner`: their
        buffers zeroed and their fills 0."""
        buffer = {name: torch.where(_per_row(rows, buf), torch.zeros((), dtype=buf.dtype, device=buf.device), buf)
                  for name, buf in self.buffer.items()}
        return dataclasses.replace(self, inner=inner, buffer=buffer, filled=torch.where(rows, 0, self.filled))

    @classmethod
    def of(cls, state, capacity: int) -> ChunkCache:
        """The cache holding `state` (a `ChunkStream`, or a `RaggedState` of them: a prefill with
        `cu_seqlens`) for at least `capacity` tokens per row; its inner state is the per-row form
        of the streams' (a `TreeCache` of `TreeState`s, a `ScanCache` of `ScanState`s)."""
        rows = getattr(state, "row_states", None)
        if rows is None:
            rows = [state] if isinstance(state, ChunkStream) else []
        if not rows or not all(isinstance(r, ChunkStream) for r in rows):
            kinds = sorted({type(r).__name__ for r in rows}) or [type(state).__name__]
            raise TypeError(f"a chunk cache holds a chunk op's ChunkStream (or a RaggedState of them), got {', '.join(kinds)}")
        chunk = rows[0].chunk
        kind = TreeCache if isinstance(rows[0].inner, TreeState) else ScanCache
        chunks = kind.chunks_for(capacity, chunk)
        sizes = [r.inner.size * chunk + r.size for r in rows]
        limit = chunk * (chunks + 1) - 1
        if max(sizes) > limit:
            raise ValueError(f"the state has seen {max(sizes)} tokens, more than a chunk cache of capacity {capacity} "
                             f"holds ({limit} tokens per row)")
        from psmc.runtime.batch import RaggedState
        inner = kind.of(RaggedState(rows=tuple(r.inner for r in rows)), chunks) if len(rows) > 1 \
            else kind.of(rows[0].inner, chunks)
        batch = sum(next(iter(r.buffer.values())).shape[0] for r in rows)
        if inner.count.shape[0] != batch:  # an empty inner state has no rows: a count per row
            inner = dataclasses.replace(inner, count=inner.count.new_zeros(batch))
        filled = torch.cat([r.filled.expand(next(iter(r.buffer.values())).shape[0]) for r in rows])
        buffer = {name: torch.cat([r.buffer[name] for r in rows]) for name in rows[0].buffer}
        return cls(inner=inner, filled=filled, chunk=chunk, buffer=buffer, op=rows[0].op)

    def to_state(self):
        """The rows as `ChunkStream`s (one state when every row is at the same position, else a
        `RaggedState`): what `forward` continues. Reads the counts on the host."""
        from psmc.runtime.batch import ragged_or_regular
        rows = []
        for b, fill in enumerate(self.filled.tolist()):
            inner = self.inner[b:b + 1].to_state()  # (a row with no complete chunk: the empty state)
            buffer = {name: buf[b:b + 1] for name, buf in self.buffer.items()}
            rows.append(ChunkStream(inner=inner, buffer=buffer, filled=torch.tensor(fill, device=self.filled.device),
                                    op=self.op, n_filled=fill))
        return ragged_or_regular(rows)


# States are plain tensors in small dataclasses: let `torch.load` (weights_only=True, the
# default since torch 2.6) read them back.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([ScanState, TreeState, ChunkStream, TreeCache, ScanCache, ChunkCache])
