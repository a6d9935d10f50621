"""Every builtin of the language as one table row: arity, keywords, shape rule, dtype rule.

The lowering (`lower.py`) looks calls up here; `psmc check --builtins` and docs/language.md
print this table. A name missing from the table is an unknown builtin (a caret under the call).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .registry import BINARY_OPS, REDUCTIONS, SELECT, STRUCTURE_OPS, UNARY_MATH


@dataclass(frozen=True)
class Builtin:
    name: str
    min_args: int
    max_args: int | None  # None: variadic
    kwargs: dict = field(default_factory=dict)  # keyword -> (kind, default); kind: 'axis' 'int' 'bool'
    shape: str = "same"  # shape rule (a `ShapeRules` method in lower.py)
    dtype: str = "same"  # dtype rule: same | float | promote | bool | fill
    ir_op: str | None = None  # the IR op it lowers to (None: lowered by a rule of its own)
    doc: str = ""
    args: str = "x"  # the positional arguments as a user writes them (for messages and docs)


def usage(b: Builtin) -> str:
    """How to call a builtin, e.g. `split(x, n, axis=-1)`: shown when a call gets it wrong."""
    kws = [f"{k}={str(d).lower() if isinstance(d, bool) else d}" for k, (_, d) in b.kwargs.items()]
    return f"{b.name}({', '.join(([b.args] if b.args else []) + kws)})"


def _unary(name, dtype, doc, ir_op=None):
    return Builtin(name, 1, 1, shape="same", dtype=dtype, ir_op=ir_op or name, doc=doc)


def _reduce(name, dtype, doc):
    return Builtin(name, 1, 1, {"axis": ("axis", -1)}, shape="reduce", dtype=dtype, ir_op=name, doc=doc)


def _structure(row):
    c = row.call
    return Builtin(row.name, c.min_args, c.max_args, dict(c.kwargs), shape=c.shape, dtype=c.dtype,
                   ir_op=row.name if c.lowers_to_op else None, doc=c.doc, args=c.args)


_ROWS = [
    *(_unary(row.name, row.dtype, row.doc) for row in UNARY_MATH),  # psmc.ir.registry
    *(Builtin(row.spelling, 2, 2, shape="broadcast", dtype="promote", ir_op=row.name, doc=row.doc, args="a, b")
      for row in BINARY_OPS if not row.operator),  # max, min: psmc.ir.registry
    Builtin(SELECT.name, 3, 3, shape="broadcast", dtype="select", ir_op=SELECT.name, doc=SELECT.doc,
            args="c, a, b"),  # psmc.ir.registry
    *(_reduce(row.name, row.dtype, row.doc) for row in REDUCTIONS),  # sum, mean, ...: psmc.ir.registry
    *(_structure(row) for row in STRUCTURE_OPS if row.call),  # softmax, outer, ...: psmc.ir.registry
    Builtin("zeros", 0, None, shape="fill", dtype="fill", doc="zeros of a static shape; bare in identity",
            args="n, ..."),
    Builtin("ones", 0, None, shape="fill", dtype="fill", doc="ones of a static shape; bare in identity",
            args="n, ..."),
    Builtin("split", 2, 2, {"axis": ("axis", -1)}, shape="split", dtype="same",
            doc="n equal parts along an axis (a tuple)", args="x, n"),
]

BUILTINS: dict[str, Builtin] = {row.name: row for row in _ROWS}
