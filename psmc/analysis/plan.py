"""The plan: which scan, which backend serves each pass, what the streaming state holds.

- exact-scan when associativity is proven or assumed (any bracketing is right), tree-scan
  (the paper's fixed Blelloch tree and binary counter) otherwise;
- backends: torch serves every pass; Triton also serves forward, backward and step when the
  plan is an exact scan and combine is elementwise (one fused kernel per pass);
- streaming state: an exact scan keeps the inclusive prefix, one element; a tree scan keeps
  the counter's roots, at most ceil(log2(m + 1)) elements after m leaves (m = n tokens, or
  n/C chunks), plus one more for the cached fold.
"""
from __future__ import annotations

import sympy

from ..ir.types import is_float, is_int

PASSES = ("forward", "backward", "step")


def scan_plan(associativity: str) -> str:
    return "exact-scan" if associativity in ("proven", "assumed") else "tree-scan"


def backends(plan: str, structure: str) -> dict[str, tuple[str, ...]]:
    fused = plan == "exact-scan" and structure == "elementwise"
    return {p: ("torch", "triton") if fused else ("torch",) for p in PASSES}


def _category(dtype: str) -> str:
    return "float" if is_float(dtype) else "int" if is_int(dtype) else "bool"


def _size_text(expr) -> str:
    """A sum of dim products, smallest terms first: K + K*V."""
    terms = sympy.Add.make_args(sympy.expand(expr))
    ordered = sorted(terms, key=lambda t: (sympy.Poly(t, *sorted(t.free_symbols, key=str)).total_degree()
                                           if t.free_symbols else 0, str(t)))
    return " + ".join(str(t) for t in ordered)


def element_size(op) -> list[tuple[str, str]]:
    """(size text, category) per dtype category, in the order float, int, bool."""
    sizes: dict[str, sympy.Expr] = {}
    for f in op.state:
        n = sympy.Mul(*f.shape) if f.shape else sympy.Integer(1)
        sizes[_category(f.dtype)] = sizes.get(_category(f.dtype), sympy.Integer(0)) + n
    return [(_size_text(sizes[c]), c) for c in ("float", "int", "bool") if c in sizes]


def _count(text: str, category: str) -> str:
    """`1 float`, `D floats`, `(K + K*V) floats`."""
    plural = category + ("" if text == "1" else "s")
    shown = text if text.isidentifier() or text.isdigit() else f"({text})"
    return f"{shown} {plural}"


def state_size(op, plan: str) -> str:
    parts = element_size(op)
    if plan == "exact-scan":
        return " + ".join(_count(t, c) for t, c in parts)
    leaves = "n" if op.chunk is None else f"n/{op.chunk}"
    roots = f"(ceil(log2({leaves} + 1)) + 1)"
    return " + ".join(f"{roots} * {_count(t, c)}" for t, c in parts)


def state_description(op, plan: str) -> str:
    fields = ", ".join(f.name for f in op.state)
    if plan == "exact-scan":
        text = f"the inclusive prefix ({fields})"
    else:
        leaves = "tokens" if op.chunk is None else "chunks"
        text = (f"the binary counter: at most ceil(log2(m + 1)) roots ({fields}) after m {leaves}, "
                "plus the cached fold")
    if op.chunk is not None:
        text += f", and the tokens of the chunk being filled (up to {op.chunk})"
    return text
