"""Splitting a law into independent parts before any case enumeration.

Two reductions, both exact (a law holds for the op iff it holds for every part):

- **Independent groups of fields.** Output field i of combine reads some fields of `l` and
  `r`; fields that read each other (transitively) form a group, found as the connected
  components of that dataflow graph. Each group's outputs read only the group's fields, so a
  law (associativity, commutativity, an identity law) holds for the op iff it holds for the
  combine restricted to each group, and each group is judged with only its own entries
  symbolic: the case splits of two groups multiply when judged together, and add when judged
  apart.
- **Entrywise groups.** When every node of a group's combine is elementwise (no reduction,
  view, index, dim or param), the group's fields have one shape S (or are scalars) and every
  node has shape S or is a scalar, then entry p of every output reads only entry p of the
  fields (scalars are shared by all positions) through the same scalar function for every p.
  The law then holds iff it holds for the scalar op with one entry per field: proved once,
  symbolically, instead of once per index (a `min` over a [K, D] field compares K*D entries
  per application; the scalar op compares one).

`parts(op)` gives the parts; the prover (`judge._prove`) proves each and combines the
verdicts; a counterexample found on a part is lifted back to a point of the whole op and
confirmed there before it refutes anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ir.nodes import Node, OpIR, walk
from ..ir.registry import LEAF_OPS
from ..ir.types import dims_equal, shapes_equal
from .grid import Grid

# elementwise in the ops table, yet not the same scalar function at every position
# (arg, param, dim, index; `eye` is not elementwise at all): psmc.ir.registry
_POSITIONAL = frozenset(row.name for row in LEAF_OPS if row.positional)


@dataclass(frozen=True)
class Part:
    fields: tuple[int, ...]  # indices into op.state
    op: OpIR  # the op restricted to these fields (scalar fields when `scalar`)
    scalar: bool  # an entrywise group, judged on one entry per field

    def restrict_fixed(self, whole_fixed, options: list[dict]):
        """The law's fixed elements (the identity e) restricted to this part (a function of the
        dims, like `whole_fixed`); None without fixed elements; NOT_UNIFORM when an entrywise
        part cannot take them (it needs e to be the same at every position and every size)."""
        if whole_fixed is None:
            return None
        if not self.scalar:
            return lambda dims: {k: tuple(v[i] for i in self.fields) for k, v in whole_fixed(dims).items()}
        values = None
        for dims in options:
            fixed = whole_fixed(dims)
            here = {k: tuple(_uniform(v[i]) for i in self.fields) for k, v in fixed.items()}
            if any(x is _MIXED for vs in here.values() for x in vs):
                return NOT_UNIFORM
            if values is not None and here != values:
                return NOT_UNIFORM
            values = here
        frozen = {k: tuple(Grid.scalar(x) for x in vs) for k, vs in (values or {}).items()}
        return lambda dims: frozen


_MIXED = object()
NOT_UNIFORM = object()


def _uniform(grid: Grid):
    first = grid.items[0] if grid.items else _MIXED
    return first if all(x == first and type(x) is type(first) for x in grid.items) else _MIXED


def field_groups(op) -> list[tuple[int, ...]]:
    """Connected components of 'output i reads field j' over the state fields (sorted)."""
    index = {f.name: i for i, f in enumerate(op.state)}
    parent = list(range(len(op.state)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, out in enumerate(op.combine):
        for n in walk((out,)):
            if n.op == "field" and n.attrs[0] in ("left", "right"):
                a, b = find(i), find(index[n.attrs[1]])
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(op.state)):
        groups.setdefault(find(i), []).append(i)
    return sorted(tuple(g) for g in groups.values())


def _is_scalar(shape) -> bool:
    return all(dims_equal(d, 1) for d in shape)


def entrywise(op, fields: tuple[int, ...]) -> bool:
    """Is the combine restricted to `fields` the same scalar function at every position?"""
    shapes = [op.state[i].shape for i in fields if not _is_scalar(op.state[i].shape)]
    if not shapes:
        return False  # scalars already: nothing to gain
    common = shapes[0]
    if not all(shapes_equal(s, common) for s in shapes):
        return False
    for n in walk(tuple(op.combine[i] for i in fields)):
        if n.op in _POSITIONAL or not n.info.elementwise:
            return False
        if not (_is_scalar(n.shape) or shapes_equal(n.shape, common)):
            return False
    return True


def _scalar_node(node: Node, memo: dict) -> Node:
    if node in memo:
        return memo[node]
    args = tuple(_scalar_node(a, memo) for a in node.args)
    if node.op == "broadcast":
        out = args[0]
    else:
        out = Node(node.op, args, node.attrs, node.dtype, (), node.span)
    memo[node] = out
    return out


def restrict(op, fields: tuple[int, ...], scalar: bool) -> OpIR:
    """The op with only `fields` in its state (one entry each when `scalar`)."""
    state = tuple(op.state[i] for i in fields)
    combine = tuple(op.combine[i] for i in fields)
    if scalar:
        memo: dict = {}
        state = tuple(dataclasses.replace(f, shape=()) for f in state)
        combine = tuple(_scalar_node(n, memo) for n in combine)
    used = {n.attrs[0] for n in walk(combine) if n.op == "param"}
    return dataclasses.replace(
        op, state=state, combine=combine, identity=None, lift=(), lift_inputs=(), readout_inputs=(),
        readout=(), outputs=(), params=tuple(p for p in op.params if p.name in used),
        dims=() if scalar else op.dims, let_names=())


def parts(op) -> list[Part]:
    """The independent parts of the op's combine (one part, the op itself, when it does not split)."""
    groups = field_groups(op)
    out = []
    for g in groups:
        scalar = entrywise(op, g)
        if len(groups) == 1 and not scalar:
            return [Part(g, op, False)]
        out.append(Part(g, restrict(op, g, scalar), scalar))
    return out
