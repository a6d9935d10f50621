"""Batch operations on stream states: row selection (`state[idx]`, beam search), concatenation
(`psmc.cat_states`), and `RaggedState`, a batch whose rows have seen different numbers of
tokens (a varlen prefill, or rows concatenated from different streams).

Every per-row tensor of a state has the batch on axis 0 (prefix fields `[B, *lanes, *field]`,
tree roots and folds alike, chunk buffers `[B, C, ...]`); the leaf counts are 0-d and shared
by the rows. A tree-scan state's structure (which roots exist) follows its count, so rows with
different counts cannot share one state: they are kept as a `RaggedState` of one-row states,
which `PsmLayer.step` and `forward` run group by group (rows with equal counts together), so
every row stays bracket-exact with running it alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from psmc.runtime.state import ChunkCache, ChunkStream, ScanState, StreamState, TreeCache, TreeState


def _row_tensors(state: StreamState):
    return [t for t in state._all_tensors() if t.dim() > 0]


def batch_size(state: StreamState) -> int:
    if isinstance(state, RaggedState):
        return len(state.counts) if state.batch is not None else len(state.rows)
    rows = _row_tensors(state)
    return rows[0].shape[0] if rows else 0


def _as_index(index, size: int):
    if isinstance(index, bool):
        raise TypeError("a state is indexed by batch rows: an int, a slice, a list or an integer/bool tensor")
    if isinstance(index, int):
        if not -size <= index < size:
            raise IndexError(f"batch row {index} is out of range for a state of {size} rows")
        index = index % size
        return slice(index, index + 1)
    if isinstance(index, slice):
        return index
    if isinstance(index, (list, tuple, range)):
        index = torch.as_tensor(list(index), dtype=torch.int64)
    if isinstance(index, Tensor):
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise TypeError(f"a state is indexed by a 1-D integer or bool tensor, got {index.dtype} "
                            f"of shape {tuple(index.shape)}")
        return index.to(torch.int64)
    raise TypeError(f"a state is indexed by batch rows: an int, a slice, a list or a tensor, got {type(index).__name__}")


def select_rows(state: StreamState, index) -> StreamState:
    """The rows `index` of a state's batch, as a new state (differentiable gathers)."""
    size = batch_size(state)
    index = _as_index(index, size)
    if isinstance(state, RaggedState):
        picked = list(range(size)[index]) if isinstance(index, slice) else index.tolist()
        if state.batch is not None:  # the compact form stays compact (beam search reorders rows each token)
            return one_count(select_rows(state.batch, torch.tensor(picked, dtype=torch.int64)),
                             [state.counts[i] for i in picked])
        rows = state.row_states
        return ragged_or_regular([rows[i] for i in picked])
    if isinstance(index, Tensor):
        index = index.to(next(iter(_row_tensors(state)), index).device)
        return state._map(lambda t: t.index_select(0, index) if t.dim() > 0 else t)
    return state._map(lambda t: t[index] if t.dim() > 0 else t)


def _counts(state: StreamState) -> tuple:
    """What must agree for rows to share one state: the leaf counts (and a chunk's fill)."""
    if isinstance(state, ChunkStream):
        return _counts(state.inner) + (int(state.filled),)
    return (int(state.count),)


def _merge(values: list, memo: dict) -> Any:
    first = values[0]
    key = tuple(id(v) for v in values)
    if isinstance(first, Tensor):
        if key not in memo:
            memo[key] = first if first.dim() == 0 else torch.cat(
                [v.to(device=first.device, dtype=torch.promote_types(first.dtype, v.dtype)) for v in values])
        return memo[key]
    if isinstance(first, StreamState):
        return dataclasses.replace(first, **{f.name: _merge([getattr(v, f.name) for v in values], memo)
                                             for f in dataclasses.fields(first)})
    if isinstance(first, tuple):
        return tuple(_merge(list(parts), memo) for parts in zip(*values))
    if isinstance(first, dict):
        return {k: _merge([v[k] for v in values], memo) for k in first}
    return first


def _describe(state: StreamState) -> str:
    op = getattr(state, "op", "") or "an unknown op"
    shapes = [tuple(t.shape[1:]) for t in _row_tensors(state)]
    return f"a {type(state).__name__} of {op} with per-row shapes {shapes}"


def cat_states(states: Sequence[StreamState]) -> StreamState:
    """Concatenate stream states along the batch. States of the same op and dims whose rows
    have seen the same number of tokens give one state of that kind; otherwise a
    `RaggedState` that keeps each row's count."""
    states = list(states)
    if not states:
        raise ValueError("cat_states needs at least one state")
    ragged = {id(s): s.row_states for s in states if isinstance(s, RaggedState)}  # (each made once)
    kinds = {type(ragged[id(s)][0]) if id(s) in ragged else type(s) for s in states}
    ops = {s.op for s in states} - {""}
    if len(kinds) > 1 or len(ops) > 1:
        raise ValueError("cat_states: the states come from different ops or plans: "
                         + "; ".join(_describe(s) for s in states))
    if kinds in ({TreeCache}, {ChunkCache}):
        return _cat_caches(states)
    rows = []
    for s in states:
        if id(s) in ragged:
            rows.extend(ragged[id(s)])
        elif batch_size(s) == 0:
            raise ValueError("cat_states: an empty state (init_state, no token yet) has no batch rows; "
                             "concatenate states that have seen at least one token")
        else:
            rows.append(s)
    # tags name op, dims and lanes; untagged scan states (from_tensors) are compared by shape
    shapes = {tuple(tuple(t.shape[1:]) for t in _row_tensors(s)) for s in rows if isinstance(s, ScanState)}
    if len(shapes) > 1:
        raise ValueError("cat_states: the states were built for different dims or lanes: "
                         + "; ".join(_describe(s) for s in states))
    return ragged_or_regular(rows)


def _cat_caches(caches: list):
    """Serving caches side by side: each row keeps its own position, so any rows share one."""
    noun = "chunk" if type(caches[0]) is ChunkCache else "tree"
    if len({c.capacity for c in caches}) > 1:
        raise ValueError(f"cat_states: the {noun} caches have different capacities: "
                         + ", ".join(str(c.capacity) for c in caches) + " tokens per row; build them with one capacity")
    if any(c.is_empty for c in caches):
        raise ValueError(f"cat_states: an empty {noun} cache (no token yet) has no slots to concatenate; "
                         "concatenate caches that have seen at least one token")
    if noun == "chunk":  # a chunk cache none of whose rows completed a chunk has no tree slots yet
        like = next((c.inner for c in caches if not c.inner.is_empty), None)
        if like is not None:
            caches = [dataclasses.replace(c, inner=c.inner.slots_like(like)) if c.inner.is_empty else c for c in caches]
    return _merge(caches, {})


def ragged_or_regular(rows: list) -> StreamState:
    """One state when every row has the same count, else a RaggedState of one-row states."""
    if not rows:
        raise ValueError("a state needs at least one row")
    if len({_counts(r) for r in rows}) == 1:
        return rows[0] if len(rows) == 1 else _merge(rows, {})
    singles = []
    for r in rows:
        singles.extend(select_rows(r, i) for i in range(batch_size(r)))
    return RaggedState(rows=tuple(singles))


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedState(StreamState):
    """A batch whose rows have seen different numbers of tokens. `step` and `forward` run the
    rows in groups of equal count, so a tree-scan row keeps its own bracketing. `state[idx]`,
    `cat_states`, `.to`, `.nbytes`, `.detach` work as for the other states.

    Two forms: `rows`, one one-row state per row; or, for an op whose count changes nothing but
    itself (`PsmLayer._count_free`), `batch`, every row in one state (its count the first
    row's), with `counts`, each row's. A layer keeps that form while it decodes and continues
    such a batch: one call per token for all rows. `row_states` gives the one-row states of
    either form."""

    rows: tuple = ()
    batch: Any = None
    counts: tuple = ()

    @property
    def row_states(self) -> tuple:
        if self.batch is None:
            return self.rows
        return tuple(dataclasses.replace(select_rows(self.batch, i), count=torch.tensor(c, dtype=torch.int64))
                     for i, c in enumerate(self.counts))

    @property
    def op(self) -> str:
        return (self.batch if self.batch is not None else self.rows[0]).op

    @property
    def sizes(self) -> list[int]:
        """Tokens each row has seen."""
        if self.batch is not None:
            return list(self.counts)
        return [_tokens_seen(r) for r in self.rows]

    def groups(self) -> list[tuple[list[int], StreamState]]:
        """(row indices, their merged state) for each set of rows with equal counts."""
        rows = self.row_states
        by_count: dict = {}
        for i, r in enumerate(rows):
            by_count.setdefault(_counts(r), []).append(i)
        return [(idx, _merge([rows[i] for i in idx], {}) if len(idx) > 1 else rows[idx[0]])
                for idx in by_count.values()]


def at_one_count(rows: Sequence[StreamState]) -> tuple:
    """One-row (or batch) states of a count-free op as one batch state at the first row's count,
    and every row's count: (batch, counts). The layer runs the batch and gives each row its
    count again (`one_count`)."""
    counts = [int(c) for r in rows for c in [r.count] * batch_size(r)]
    return cat_states([dataclasses.replace(r, count=rows[0].count) for r in rows]), counts


def one_count(batch: StreamState, counts: Sequence[int]) -> StreamState:
    """A count-free op's batch state (`RaggedState.batch`) whose rows have seen `counts` tokens:
    the batch itself when they are one count, else the compact `RaggedState`."""
    counts = tuple(int(c) for c in counts)
    batch = dataclasses.replace(batch, count=torch.tensor(counts[0], dtype=torch.int64))  # (the first row's)
    return batch if len(set(counts)) == 1 else RaggedState(batch=batch, counts=counts)


def _tokens_seen(state: StreamState) -> int:
    if isinstance(state, ChunkStream):
        return state.inner.size * state.chunk + state.size
    return state.size


if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([RaggedState])

__all__ = ["RaggedState", "cat_states", "select_rows", "batch_size", "at_one_count", "one_count", "ScanState",
           "TreeState", "TreeCache", "ChunkStream", "ChunkCache"]
