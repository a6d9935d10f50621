"""The algebraic laws the analysis checks, and their evaluation at a point.

A law is two expressions in `combine` over named elements: associativity
(combine(combine(a, b), c) = combine(a, combine(b, c))), commutativity, and the left / right
identity laws for a fixed element e. The same law is evaluated three ways: in float64 with
the reference interpreter (search), exactly with SymPy numbers (confirmation), and over
SymPy symbols (proof, in prove.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ..ir import interp, registry
from ..ir.nodes import walk
from . import symbolic
from .values import Point, sympy_grid, to_tensor


@dataclass(frozen=True)
class Law:
    name: str
    free: tuple[str, ...]  # the elements a point must give
    lhs_text: str
    rhs_text: str
    fixed: tuple[str, ...] = ()  # elements given by the law itself (the identity e)

    def sides(self, combine, el: dict):
        """(lhs, rhs) for `combine(l, r)` over elements `el` (name -> element)."""
        return _SIDES[self.name](combine, el)


_SIDES = {
    "associativity": lambda C, el: (C(C(el["a"], el["b"]), el["c"]), C(el["a"], C(el["b"], el["c"]))),
    "commutativity": lambda C, el: (C(el["a"], el["b"]), C(el["b"], el["a"])),
    "left identity": lambda C, el: (C(el["e"], el["x"]), el["x"]),
    "right identity": lambda C, el: (C(el["x"], el["e"]), el["x"]),
}

ASSOCIATIVITY = Law("associativity", ("a", "b", "c"), "combine(combine(a, b), c)", "combine(a, combine(b, c))")
COMMUTATIVITY = Law("commutativity", ("a", "b"), "combine(a, b)", "combine(b, a)")
LEFT_IDENTITY = Law("left identity", ("x",), "combine(e, x)", "x", fixed=("e",))
RIGHT_IDENTITY = Law("right identity", ("x",), "combine(x, e)", "x", fixed=("e",))

# ops whose exact evaluation would build huge closed forms: confirm them with 60-digit floats
_HEAVY = frozenset(row.name for row in registry.rows() if getattr(row, "heavy", False))  # psmc.ir.registry


def uses_params_or_layers(op) -> bool:
    return any(n.op == "param" or n.info.kind == "layer" for n in walk(op.combine))


def needs_precise_floats(op) -> bool:
    return any(n.op in _HEAVY or n.op == "param" for n in walk(op.combine))


def _env(op, left, right, params: dict) -> dict:
    env = dict(params)
    for f, lv, rv in zip(op.state, left, right):
        env[("field", "left", f.name)] = lv
        env[("field", "right", f.name)] = rv
    return env


# ---------------------------------------------------------------------------- float64
def float_sides(op, law: Law, point: Point):
    """Both sides of the law at the point, in float64 (tuples of tensors per field)."""
    dims = point.dims
    params = {("param", k): to_tensor(v, _param_dtype(op, k)) for k, v in point.params.items()}

    def combine(l, r):
        return interp.evaluate(op.combine, _env(op, l, r, params), dims)

    elements = {k: tuple(to_tensor(g, f.dtype) for g, f in zip(v, op.state)) for k, v in point.elements.items()}
    return law.sides(combine, elements)


def float_verdict(lhs, rhs, rtol: float = 1e-7) -> str:
    """'differs' | 'equal' | 'undefined' (a NaN anywhere: the point says nothing)."""
    differs = False
    for a, b in zip(lhs, rhs):
        if a.dtype == torch.bool or not a.is_floating_point():
            differs |= bool((a != b).any())
            continue
        if torch.isnan(a).any() or torch.isnan(b).any():
            return "undefined"
        both_inf = torch.isinf(a) & torch.isinf(b)
        same_inf = both_inf & (a == b)
        finite = torch.isfinite(a) & torch.isfinite(b)
        scale = 1 + torch.maximum(a.abs(), b.abs())
        gap = torch.where(finite, (a - b).abs() / torch.where(finite, scale, torch.ones_like(scale)),
                          torch.zeros_like(a))
        one_inf = torch.isinf(a) ^ torch.isinf(b)  # values here are small: not an overflow
        differs |= bool((gap > rtol).any()) or bool((both_inf & ~same_inf).any()) or bool(one_inf.any())
    return "differs" if differs else "equal"


def _param_dtype(op, name):
    return next(p.dtype for p in op.params if p.name == name)


# ---------------------------------------------------------------------------- exact
def exact_sides(op, law: Law, point: Point, precise: bool | None = None):
    """Both sides evaluated with SymPy numbers (tuples of Grids per field)."""
    if precise is None:
        precise = needs_precise_floats(op)
    dims = point.dims
    params = {("param", k): sympy_grid(v, precise) for k, v in point.params.items()}

    def combine(l, r):
        return symbolic.evaluate(op.combine, _env(op, l, r, params), dims, digits=60 if precise else None)

    elements = {k: tuple(sympy_grid(g, precise) for g in v) for k, v in point.elements.items()}
    return law.sides(combine, elements)


def exact_verdict(lhs, rhs) -> str:
    """'differs' | 'equal' | 'undefined', deciding each entry exactly (or to 60 digits)."""
    differs = False
    for a, b in zip(lhs, rhs):
        for x, y in zip(a.items, b.items):
            if isinstance(x, bool) or isinstance(y, bool):
                differs |= x != y
                continue
            if _undefined(x) or _undefined(y):
                return "undefined"
            if x.is_infinite or y.is_infinite:
                differs |= x != y
                continue
            try:
                differs |= symbolic.numeric_sign(x, y) != 0
            except symbolic.Undecidable:
                return "undefined"
    return "differs" if differs else "equal"


def _undefined(v) -> bool:
    return v.has(sympy.nan, sympy.zoo) or v.is_real is False
