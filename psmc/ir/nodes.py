"""The IR: one node type (`Node`) for every value, and `OpIR` for a whole operator.

A body (lift, combine, readout, identity) is a tuple of output `Node`s; the nodes form an SSA
DAG whose leaves are inputs, state fields, params, dims and constants. Structurally equal
nodes compare (and hash) equal, with spans ignored, so building the same expression twice
yields one value (hash-consing gives CSE for free in the printers).

Shapes are tuples of SymPy integer expressions over the op's dims (`K`, `2*D`, `C`); they
describe ONE position of ONE lane. Real tensors carry extra leading axes (batch, time, lanes)
that the IR never sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import sympy

from ..dtypes import DType
from ..errors import Span
from .ops import OPS
from .registry import LEAF_OPS

Shape = tuple  # tuple[sympy.Expr, ...]

# Leaves whose value differs per position (token, lane); everything else is the same for all.
BATCHED_LEAVES = frozenset(row.name for row in LEAF_OPS if row.batched)  # arg, field, index: the registry


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    args: tuple["Node", ...] = ()
    attrs: tuple = ()
    dtype: DType = DType.F32
    shape: Shape = ()
    span: Span | None = field(default=None, repr=False)

    def __post_init__(self):
        assert self.op in OPS, f"unknown IR op {self.op!r}"
        object.__setattr__(self, "dtype", DType.of(self.dtype))  # one dtype type, whoever built the node
        key = (self.op, self.args, self.attrs, self.dtype, self.shape)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))
        batched = self.op in BATCHED_LEAVES or any(a.batched for a in self.args)
        object.__setattr__(self, "batched", batched)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, Node) and self._hash == other._hash and self._key == other._key

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def info(self):
        return OPS[self.op]

    def __repr__(self) -> str:  # compact, for debugging and golden summaries
        return render(self)


def walk(outputs) -> Iterator[Node]:
    """Every node reachable from `outputs`, each once, operands before users (topological)."""
    seen: set[int] = set()
    order: list[Node] = []
    stack = [(n, False) for n in reversed(list(outputs))]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for a in reversed(node.args):
            if id(a) not in seen:
                stack.append((a, False))
    # structurally equal nodes built separately are one value
    unique: dict[Node, None] = {}
    for n in order:
        unique.setdefault(n, None)
    return iter(unique)


def leaves(outputs, op: str | None = None) -> list[Node]:
    return [n for n in walk(outputs) if not n.args and (op is None or n.op == op)]


def render(node: Node) -> str:
    """A one-line, deterministic, human-readable form of an expression tree."""
    if node.op in ("arg", "param", "dim"):
        return node.attrs[0]
    if node.op == "field":
        return f"{node.attrs[0]}.{node.attrs[1]}"
    if node.op == "const":
        return repr(node.attrs[0])
    if node.op == "index":
        return "index"
    if node.op == "fill":
        return f"fill({node.attrs[0]!r}, {shape_str(node.shape)})"
    inner = ", ".join(render(a) for a in node.args)
    extra = "".join(f", {a}" for a in node.attrs)
    return f"{node.op}({inner}{extra})"


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def type_str(dtype: DType, shape: Shape) -> str:
    return str(dtype) + (shape_str(shape) if shape else "")


@dataclass(frozen=True)
class Value:
    """A named, typed slot: a state field, an input, an output or a param."""

    name: str
    dtype: DType
    shape: Shape
    span: Span | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.of(self.dtype))

    def __str__(self) -> str:
        return f"{self.name}: {type_str(self.dtype, self.shape)}"


@dataclass(frozen=True)
class Param(Value):
    init: tuple = ("zeros",)  # ('zeros',) ('ones',) ('normal', std) ('uniform', lo, hi) ('xavier',)


@dataclass(frozen=True)
class OpIR:
    """One `op`: everything later stages need, typed and checked."""

    name: str
    dims: tuple[str, ...]
    chunk: object | None  # sympy expression, or None for token-level ops
    params: tuple[Param, ...]
    state: tuple[Value, ...]
    lift_inputs: tuple[Value, ...]
    lift: tuple[Node, ...]  # one node per state field (the inputs themselves without a lift)
    combine: tuple[Node, ...]  # one node per state field, over field('left'|'right', name)
    identity: tuple[Node, ...] | None
    readout_inputs: tuple[Value, ...]
    readout: tuple[Node, ...]  # one node per output, over field('state', name) and args
    outputs: tuple[Value, ...]
    exclusive: bool
    assumes: frozenset[str]
    has_lift: bool
    has_readout: bool
    span: Span | None = field(default=None, compare=False, repr=False)
    source_text: str = field(default="", compare=False, repr=False)
    # ((node, let name), ...): the first `let` name bound to each computed value, so generated
    # code can call it `v_NAME` rather than a numbered temporary (no effect on meaning)
    let_names: tuple = field(default=(), compare=False, repr=False)

    @property
    def inputs(self) -> tuple[Value, ...]:
        """All per-token inputs in call order: lift inputs, then readout inputs not already
        named by lift (a name in both is one tensor, e.g. rwkv6's k and v)."""
        names = {v.name for v in self.lift_inputs}
        return self.lift_inputs + tuple(v for v in self.readout_inputs if v.name not in names)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.state)

    def dim_symbol(self, name: str) -> sympy.Symbol:
        return dim_symbol(name)


def dim_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)
