"""Dtype and shape facts: promotion, broadcasting, shape equality over symbolic dims."""
from __future__ import annotations

import sympy

FLOATS = ("f16", "bf16", "f32", "f64")
INTS = ("i32", "i64")
DTYPES = FLOATS + INTS + ("bool",)
# Wider wins; bf16 and f16 meet at f32 (as in torch).
_FLOAT_RANK = {"f16": 1, "bf16": 1, "f32": 2, "f64": 3}
_INT_RANK = {"i32": 1, "i64": 2}


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


def is_int(dtype: str) -> bool:
    return dtype in INTS


def promote(a: str, b: str, weak_a: bool = False, weak_b: bool = False) -> str:
    """Result dtype of arithmetic on `a` and `b`. A weak operand (a literal) never widens a
    strong one of its own category, as with Python scalars in torch."""
    if a == b:
        return a
    if weak_a and not weak_b and _category(a) <= _category(b):
        return b
    if weak_b and not weak_a and _category(b) <= _category(a):
        return a
    if is_float(a) or is_float(b):
        if is_float(a) and is_float(b):
            if {a, b} == {"f16", "bf16"}:
                return "f32"
            return a if _FLOAT_RANK[a] >= _FLOAT_RANK[b] else b
        return a if is_float(a) else b
    if is_int(a) or is_int(b):
        if is_int(a) and is_int(b):
            return a if _INT_RANK[a] >= _INT_RANK[b] else b
        return a if is_int(a) else b
    return "bool"


def _category(dtype: str) -> int:
    return 2 if is_float(dtype) else 1 if is_int(dtype) else 0


def float_of(dtype: str) -> str:
    """The dtype of a transcendental function of `dtype` (ints and bools become f32)."""
    return dtype if is_float(dtype) else "f32"


def can_store(value: str, slot: str) -> bool:
    """Can a value of dtype `value` be stored in a field/output of dtype `slot`?"""
    return _category(value) <= _category(slot)


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
