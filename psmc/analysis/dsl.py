"""Values and counterexamples printed in DSL syntax, as a mathematician would write them.

Exact numbers print exactly: integers as `2`, terminating decimals as `0.09`, other
rationals as `1/3`, infinities as `inf`; bools as `true` / `false`; arrays as nested
brackets. Irrational results print as `≈ 0.7616` with just enough digits to tell the two
sides of a law apart.
"""
from __future__ import annotations

import math
from fractions import Fraction

import sympy

from ..ir.nodes import Node, render

_MAX_DECIMALS = 8


def exact_text(value) -> str:
    """An exact entry (Fraction, int, bool, ±inf float, SymPy rational) in DSL syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, sympy.Basic):
        if value.is_infinite:
            return "inf" if value.is_extended_positive else "-inf"
        value = Fraction(int(value.p), int(value.q))
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    decimal = _decimal(value)
    return decimal if decimal is not None else f"{value.numerator}/{value.denominator}"


def _decimal(value: Fraction) -> str | None:
    den = value.denominator
    for k in range(1, _MAX_DECIMALS + 1):
        if (10 ** k) % den == 0:
            scaled = abs(value.numerator) * (10 ** k // den)
            digits = str(scaled).rjust(k + 1, "0")
            text = digits[:-k] + "." + digits[-k:]
            return ("-" if value < 0 else "") + text
    return None


def parse_exact(text: str):
    """Inverse of exact_text for the entries of a printed counterexample."""
    if text in ("true", "false"):
        return text == "true"
    if text in ("inf", "-inf"):
        return float(text)
    return Fraction(text)


def nested_text(nested, fmt) -> str:
    if isinstance(nested, list):
        return "[" + ", ".join(nested_text(v, fmt) for v in nested) + "]"
    return fmt(nested)


def is_exact(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, sympy.Basic) and (value.is_Rational or value.is_infinite))


def approx_text(value, digits: int) -> str:
    if isinstance(value, bool) or is_exact(value):
        return exact_text(value)
    # evalf, not Float(): an exact transcendental value (tanh(1), 1/(exp(-1) + 1)) has no
    # Float constructor but does evaluate to any precision
    number = _numeric(value, digits + 5)
    text = f"{float(number):.{digits}g}" if digits <= 15 else str(_numeric(value, digits))
    return text


def _numeric(value, digits: int):
    if isinstance(value, sympy.Basic):
        return value.evalf(digits)
    return sympy.Float(value, digits)


def side_texts(op, lhs, rhs) -> tuple[str, str]:
    """The two sides of a law (tuples of Grids per field), printed so that they differ."""
    exact = all(is_exact(v) for grids in (lhs, rhs) for g in grids for v in g.items)
    if exact:
        return _element_value_text(op, lhs, exact_text), _element_value_text(op, rhs, exact_text)
    for digits in (4, 6, 8, 12, 15, 20):
        left = _element_value_text(op, lhs, lambda v: approx_text(v, digits))
        right = _element_value_text(op, rhs, lambda v: approx_text(v, digits))
        if left != right:
            return "≈ " + left, "≈ " + right
    return "≈ " + left, "≈ " + right


def _element_value_text(op, grids, fmt) -> str:
    texts = [nested_text(g.to_nested(), fmt) for g in grids]
    if len(texts) == 1:
        return texts[0]
    return "(" + ", ".join(f"{f.name} = {t}" for f, t in zip(op.state, texts)) + ")"


# ---------------------------------------------------------------------------- identities
def identity_text(op) -> str | None:
    """The declared identity as DSL text, one item per field (a tuple for several)."""
    if op.identity is None:
        return None
    items = [_constant_text(n) for n in op.identity]
    return items[0] if len(items) == 1 else "(" + ", ".join(items) + ")"


def _constant_text(node: Node) -> str:
    while node.op in ("cast", "broadcast"):
        node = node.args[0]
    if node.op == "const":
        value = node.attrs[0]
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)
    if node.op == "fill":
        return "zeros" if node.attrs[0] == 0 else "ones"
    if node.op == "eye":
        return f"eye({node.shape[0]})"
    return render(node)
