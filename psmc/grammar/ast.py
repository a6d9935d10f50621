"""The abstract syntax tree of a `.psm` file: frozen dataclasses, one span each.

The AST is what the text says, nothing more: names are unresolved and nothing is typed.
`psmc.ir.lower` turns it into the typed IR. Spans are ignored by equality so that two
programs that differ only in layout compare equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Span


def _span():
    return field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------- dimension expressions
@dataclass(frozen=True)
class DimInt:
    value: int
    span: Span | None = _span()


@dataclass(frozen=True)
class DimName:
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class DimBin:
    op: str  # '+', '-', '*'
    left: "DimExpr"
    right: "DimExpr"
    span: Span | None = _span()


DimExpr = DimInt | DimName | DimBin


@dataclass(frozen=True)
class TypeExpr:
    dtype: str
    shape: tuple[DimExpr, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Typed:
    name: str
    type: TypeExpr
    span: Span | None = _span()


# ----------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Number:
    text: str  # kept as written: '1', '0.9', '1e-5'
    span: Span | None = _span()


@dataclass(frozen=True)
class Inf:
    span: Span | None = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class Var:
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Field:
    value: "Expr"
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Slice:
    lo: "Expr | None"
    hi: "Expr | None"
    span: Span | None = _span()


@dataclass(frozen=True)
class NewAxis:
    span: Span | None = _span()


@dataclass(frozen=True)
class Subscript:
    value: "Expr"
    indices: tuple["Expr | Slice | NewAxis", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class TupleExpr:
    items: tuple["Expr", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Unary:
    op: str  # '-', 'not'
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / @ ** < <= > >= == != and or
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()
    op_span: Span | None = _span()


@dataclass(frozen=True)
class Select:
    cond: "Expr"
    then: "Expr"
    other: "Expr"
    span: Span | None = _span()


Expr = Number | Inf | Bool | Var | Call | Field | Subscript | TupleExpr | Unary | Binary | Select


# ----------------------------------------------------------------- statements and blocks
@dataclass(frozen=True)
class Let:
    targets: tuple[str, ...]  # one name, or several for a tuple target
    value: Expr
    span: Span | None = _span()
    target_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Block:
    lets: tuple[Let, ...]
    result: Expr
    span: Span | None = _span()


# ----------------------------------------------------------------- op members
@dataclass(frozen=True)
class ChunkDecl:
    size: DimExpr
    span: Span | None = _span()


@dataclass(frozen=True)
class ParamDecl:
    name: str
    type: TypeExpr
    init: Expr | None
    span: Span | None = _span()


@dataclass(frozen=True)
class StateDecl:
    fields: tuple[Typed, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class LiftDef:
    inputs: tuple[Typed, ...]
    body: Block
    span: Span | None = _span()


@dataclass(frozen=True)
class CombineDef:
    left: str
    right: str
    body: Block
    span: Span | None = _span()


@dataclass(frozen=True)
class IdentityDef:
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class ReadoutDef:
    state: str
    exclusive: bool
    inputs: tuple[Typed, ...]
    body: Block
    span: Span | None = _span()


@dataclass(frozen=True)
class AssumeDecl:
    properties: tuple[str, ...]
    span: Span | None = _span()


Member = ChunkDecl | ParamDecl | StateDecl | LiftDef | CombineDef | IdentityDef | ReadoutDef | AssumeDecl


@dataclass(frozen=True)
class OpDef:
    name: str
    dims: tuple[DimName, ...]
    members: tuple[Member, ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class FnDef:
    name: str
    params: tuple[str, ...]
    body: Block
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Module:
    items: tuple[OpDef | FnDef, ...]
    source: object = field(default=None, compare=False, repr=False)
