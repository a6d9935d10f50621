"""A tiny n-dimensional array of arbitrary Python objects (SymPy expressions, bools).

The symbolic evaluator needs NumPy-style broadcasting, indexing and matrix products over
SymPy entries; this is the small subset it uses, kept dependency-free. Entries are stored
flat in row-major order; a scalar is the 0-d grid with one entry.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, ...]
    items: tuple

    def __post_init__(self):
        assert len(self.items) == prod(self.shape), (self.shape, len(self.items))

    # ------------------------------------------------------------------ construction
    @staticmethod
    def scalar(value) -> "Grid":
        return Grid((), (value,))

    @staticmethod
    def full(shape: tuple[int, ...], value) -> "Grid":
        return Grid(tuple(shape), (value,) * prod(shape))

    @staticmethod
    def build(shape: tuple[int, ...], fn) -> "Grid":
        """The grid whose entry at index i is fn(i)."""
        return Grid(tuple(shape), tuple(fn(i) for i in indices(shape)))

    # ------------------------------------------------------------------ access
    @property
    def rank(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: tuple[int, ...]):
        return self.items[_offset(self.shape, index)]

    def item(self):
        assert not self.shape, "item() of a non-scalar grid"
        return self.items[0]

    def to_nested(self):
        if not self.shape:
            return self.items[0]
        return _nest(list(self.items), self.shape)

    def map(self, fn) -> "Grid":
        return Grid(self.shape, tuple(fn(x) for x in self.items))

    # ------------------------------------------------------------------ shape operations
    def broadcast_to(self, shape: tuple[int, ...]) -> "Grid":
        shape = tuple(shape)
        if shape == self.shape:
            return self
        pad = len(shape) - self.rank
        assert pad >= 0, (self.shape, shape)
        mine = (1,) * pad + self.shape
        for m, s in zip(mine, shape):
            assert m in (1, s), (self.shape, shape)
        return Grid.build(shape, lambda i: self.items[_offset(mine, tuple(0 if m == 1 else k for m, k in zip(mine, i)))])

    def reshape(self, shape: tuple[int, ...]) -> "Grid":
        return Grid(tuple(shape), self.items)

    def transpose(self) -> "Grid":
        shape = self.shape[:-2] + (self.shape[-1], self.shape[-2])
        return Grid.build(shape, lambda i: self[i[:-2] + (i[-1], i[-2])])

    def take(self, axis: int, positions) -> "Grid":
        """The sub-grid along `axis` at the given positions (a slice keeps the axis)."""
        positions = list(positions)
        shape = self.shape[:axis] + (len(positions),) + self.shape[axis + 1:]
        return Grid.build(shape, lambda i: self[i[:axis] + (positions[i[axis]],) + i[axis + 1:]])

    def lanes(self, axis: int) -> list[list]:
        """For every index of the other axes, the entries along `axis` (for reductions)."""
        rest = self.shape[:axis] + self.shape[axis + 1:]
        return [[self[i[:axis] + (k,) + i[axis:]] for k in range(self.shape[axis])] for i in indices(rest)]


def indices(shape: tuple[int, ...]):
    return itertools.product(*(range(n) for n in shape))


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        size = 1
        for s in shapes:
            j = axis - (rank - len(s))
            if j >= 0 and s[j] != 1:
                if size not in (1, s[j]):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                size = s[j]
        out.append(size)
    return tuple(out)


def zip_map(fn, *grids: Grid) -> Grid:
    """fn applied entry by entry after broadcasting the grids (NumPy rules)."""
    shape = broadcast_shape(*(g.shape for g in grids))
    spread = [g.broadcast_to(shape) for g in grids]
    return Grid(shape, tuple(fn(*xs) for xs in zip(*(g.items for g in spread))))


def reduce_axis(grid: Grid, axis: int, fn) -> Grid:
    """fn(list of entries along axis) for every position of the other axes."""
    rest = grid.shape[:axis] + grid.shape[axis + 1:]
    return Grid(rest, tuple(fn(lane) for lane in grid.lanes(axis)))


def matmul(a: Grid, b: Grid, add, mul) -> Grid:
    """NumPy's matmul for 1-D and 2-D operands with the given scalar + and *."""
    a2 = a if a.rank == 2 else Grid((1,) + a.shape, a.items)
    b2 = b if b.rank == 2 else Grid(b.shape + (1,), b.items)
    n, inner = a2.shape
    m = b2.shape[1]

    def entry(i):
        total = None
        for k in range(inner):
            term = mul(a2[(i[0], k)], b2[(k, i[1])])
            total = term if total is None else add(total, term)
        return total

    out = Grid.build((n, m), entry)
    shape = a.shape[:-1] + b.shape[1:]
    return Grid(shape, out.items)


def concat(grids, axis: int) -> Grid:
    first = grids[0]
    sizes = [g.shape[axis] for g in grids]
    shape = first.shape[:axis] + (sum(sizes),) + first.shape[axis + 1:]
    starts = list(itertools.accumulate([0] + sizes))

    def entry(i):
        k = i[axis]
        part = max(j for j in range(len(grids)) if starts[j] <= k)
        return grids[part][i[:axis] + (k - starts[part],) + i[axis + 1:]]

    return Grid.build(shape, entry)


def _offset(shape, index) -> int:
    off = 0
    for n, k in zip(shape, index):
        off = off * n + k
    return off


def _nest(flat, shape):
    if len(shape) == 1:
        return flat
    step = prod(shape[1:])
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]
