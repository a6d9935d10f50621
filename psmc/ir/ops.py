"""The IR's operation vocabulary as data: one row per op, derived from the rows of
psmc.ir.registry (every op is declared there once).

`kind` groups ops that the printers and the analysis treat alike:
  leaf        no operands (inputs, fields, params, dims, constants)
  unary       elementwise, one operand          binary   elementwise, two operands (broadcast)
  compare     elementwise, result bool          logical  elementwise on bools
  select      where(cond, a, b)                 cast / broadcast   dtype / shape changes
  reduce      over one declared axis            structure / layer  everything else
`elementwise` is True when every output entry depends only on the matching entries of the
operands (after broadcasting): the structure analysis and the Triton printer rely on it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .registry import BINARY_OPS, LEAF_OPS, REDUCTIONS, SELECT, STRUCTURE_OPS, UNARY, UNARY_OPERATOR


@dataclass(frozen=True)
class OpInfo:
    kind: str
    elementwise: bool
    arity: int  # -1: variadic


def _table() -> dict[str, OpInfo]:
    rows: dict[str, OpInfo] = {}
    for row in LEAF_OPS:  # inputs, fields, params, dims, literals, index, fills: psmc.ir.registry
        rows[row.name] = OpInfo("leaf", True, 0)
    rows["neg"] = OpInfo(UNARY_OPERATOR["neg"].kind, True, 1)  # the unary operators: psmc.ir.registry
    for name in UNARY:  # the elementwise math builtins: psmc.ir.registry
        rows[name] = OpInfo("unary", True, 1)
    for row in BINARY_OPS:  # the binary operators, comparisons, and/or, max/min: psmc.ir.registry
        rows[row.name] = OpInfo(row.kind, True, 2)
    rows["not"] = OpInfo(UNARY_OPERATOR["not"].kind, True, 1)
    rows[SELECT.name] = OpInfo("select", True, 3)
    for row in REDUCTIONS:  # psmc.ir.registry
        rows[row.name] = OpInfo("reduce", False, 1)
    for row in STRUCTURE_OPS:  # cast, broadcast, eye, the structure and layer ops: psmc.ir.registry
        rows[row.name] = OpInfo(row.kind, row.elementwise, row.arity)
    return rows


OPS: dict[str, OpInfo] = _table()

# DSL operator spelling -> IR op (binary operators of the expression grammar).
BINARY_OPERATORS = {**{row.spelling: row.name for row in BINARY_OPS if row.operator},
                    **{row.operator: row.name for row in STRUCTURE_OPS if row.operator}}
