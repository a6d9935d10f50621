"""Dtype and shape facts: promotion, broadcasting, shape equality over symbolic dims."""
from __future__ import annotations

import sympy

from ..dtypes import DType

FLOATS = (DType.F16, DType.BF16, DType.F32, DType.F64)
INTS = (DType.I32, DType.I64)
DTYPES = FLOATS + INTS + (DType.BOOL,)
# Wider wins; bf16 and f16 meet at f32 (as in torch).
_FLOAT_RANK = {DType.F16: 1, DType.BF16: 1, DType.F32: 2, DType.F64: 3}
_INT_RANK = {DType.I32: 1, DType.I64: 2}


def is_float(dtype) -> bool:
    return DType.of(dtype).is_float


def is_int(dtype) -> bool:
    return DType.of(dtype).is_int


def promote(a, b, weak_a: bool = False, weak_b: bool = False) -> DType:
    """Result dtype of arithmetic on `a` and `b`. A weak operand (a literal) never widens a
    strong one of its own category, as with Python scalars in torch."""
    a, b = DType.of(a), DType.of(b)
    if a == b:
        return a
    if weak_a and not weak_b and a.category <= b.category:
        return b
    if weak_b and not weak_a and b.category <= a.category:
        return a
    if a.is_float or b.is_float:
        if a.is_float and b.is_float:
            if {a, b} == {DType.F16, DType.BF16}:
                return DType.F32
            return a if _FLOAT_RANK[a] >= _FLOAT_RANK[b] else b
        return a if a.is_float else b
    if a.is_int or b.is_int:
        if a.is_int and b.is_int:
            return a if _INT_RANK[a] >= _INT_RANK[b] else b
        return a if a.is_int else b
    return DType.BOOL


def float_of(dtype) -> DType:
    """The dtype of a transcendental function of `dtype` (ints and bools become f32)."""
    dtype = DType.of(dtype)
    return dtype if dtype.is_float else DType.F32


def can_store(value, slot) -> bool:
    """Can a value of dtype `value` be stored in a field/output of dtype `slot`?"""
    return DType.of(value).category <= DType.of(slot).category


def dims_equal(a, b) -> bool:
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def shapes_equal(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def broadcast(*shapes: tuple) -> tuple | None:
    """NumPy broadcasting of declared shapes (right-aligned); None when they do not fit."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dim = sympy.Integer(1)
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if dims_equal(d, 1):
                continue
            if dims_equal(dim, 1):
                dim = d
            elif not dims_equal(dim, d):
                return None
        out.append(dim)
    return tuple(out)


def as_dim(value) -> sympy.Expr:
    return sympy.Integer(value) if isinstance(value, int) else value
