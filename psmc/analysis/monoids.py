"""The table of known monoids: the cheapest proof of associativity.

Each row is a combine written in the DSL itself, with the theorem that makes it associative.
An op matches a row when its combine has the same canonical form (`canonical`): fields are
numbered (l0, r0, l1, ...), operands of commutative elementwise ops are sorted, and pure
views (`x[:, None]`, full slices) are dropped. Dropping views is sound for these rows: a view
only decides how a factor broadcasts, and every row stays associative under any fixed
broadcast of its factors (e.g. the gate of a diagonal affine map may be a scalar, a vector
per row, or a full matrix). A row's shape and dtype requirements are checked separately.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..ir import ops_from_source
from ..ir.nodes import Node
from ..ir.registry import COMMUTATIVE
from .structure import is_view

_COMMUTATIVE = COMMUTATIVE  # psmc.ir.registry


@dataclass(frozen=True)
class Monoid:
    name: str
    theorem: str
    state: str  # the DSL state declaration of the row
    combine: str  # the DSL body of combine(l, r)
    commutative: bool
    bool_fields: bool = False  # the row needs bool fields (xor is `!=` on bools only)


TABLE = (
    Monoid("sum", "addition is associative", "(x: f32)", "l.x + r.x", True),
    Monoid("product", "multiplication is associative", "(x: f32)", "l.x * r.x", True),
    Monoid("max", "max is associative", "(x: f32)", "max(l.x, r.x)", True),
    Monoid("min", "min is associative", "(x: f32)", "min(l.x, r.x)", True),
    Monoid("or", "disjunction is associative", "(x: bool)", "l.x or r.x", True, True),
    Monoid("and", "conjunction is associative", "(x: bool)", "l.x and r.x", True, True),
    Monoid("xor", "!= on bools is addition mod 2", "(x: bool)", "l.x != r.x", True, True),
    Monoid("first", "(a b) c = a = a (b c)", "(x: f32)", "l.x", False),
    Monoid("last", "(a b) c = c = a (b c)", "(x: f32)", "r.x", False),
    Monoid("matrix product", "matrix multiplication is associative", "(x: f32[2, 2])", "l.x @ r.x", False),
    Monoid("log-add-exp", "log(e^a + e^b) is + in the log domain",
           "(x: f32)", "let m = max(l.x, r.x); return m + log(exp(l.x - m) + exp(r.x - m))", True),
    # (also `log(exp(l.x) + exp(r.x))`, which the rewrite pass turns into this builtin)
    Monoid("log-add-exp", "log(e^a + e^b) is + in the log domain", "(x: f32)", "logaddexp(l.x, r.x)", True),
    Monoid("diagonal affine maps", "composition of h -> a * h + b",
           "(a: f32, h: f32)", "(l.a * r.a, r.a * l.h + r.h)", False),
    Monoid("diagonal affine maps with a shared gate", "composition of (h, n) -> (a * h + b, a * n + c)",
           "(a: f32, h: f32, n: f32)", "(l.a * r.a, r.a * l.h + r.h, r.a * l.n + r.n)", False),
    Monoid("affine maps, later on the left", "composition of S -> E S + F",
           "(E: f32[2, 2], S: f32[2, 2])", "(r.E @ l.E, r.E @ l.S + r.S)", False),
    Monoid("affine maps, later on the right", "composition of S -> S G + B",
           "(G: f32[2, 2], S: f32[2, 2])", "(l.G @ r.G, l.S @ r.G + r.S)", False),
    Monoid("online softmax normaliser", "(m, s) stands for s e^m; combine adds those",
           "(m: f32, s: f32)", "let m = max(l.m, r.m); return (m, l.s * exp(l.m - m) + r.s * exp(r.m - m))", True),
    Monoid("online softmax pooling", "(m, s, acc) stands for (s, acc) e^m; combine adds those",
           "(m: f32, s: f32, acc: f32)",
           "let m = max(l.m, r.m); let wl = exp(l.m - m); let wr = exp(r.m - m); "
           "return (m, l.s * wl + r.s * wr, l.acc * wl + r.acc * wr)", True),
)


def canonical(node: Node, fields: dict[str, int]):
    """A hashable form of an expression that ignores spelling the algebra does not see."""
    if node.op == "field":
        role, name = node.attrs
        return ("l" if role == "left" else "r", fields[name])
    if node.op == "const":
        value = node.attrs[0]
        return ("const", float(value) if not isinstance(value, bool) else value)
    if node.op == "getitem" and is_view(node):
        return canonical(node.args[0], fields)
    args = tuple(canonical(a, fields) for a in node.args)
    if node.op in _COMMUTATIVE:
        args = tuple(sorted(args, key=repr))
    attrs = node.attrs if node.op != "getitem" else tuple(map(str, node.attrs))
    return (node.op, attrs) + args


def combine_form(op) -> tuple:
    fields = {f.name: i for i, f in enumerate(op.state)}
    return tuple(canonical(n, fields) for n in op.combine)


@functools.lru_cache(maxsize=None)
def _forms() -> tuple:
    out = []
    for row in TABLE:
        body = row.combine if "return" in row.combine else f"return {row.combine};"
        if not body.rstrip().endswith(";"):
            body += ";"
        text = f"op row {{ state {row.state}; combine (l, r) {{ {body} }} }}"
        (op,) = ops_from_source(text, f"<monoid {row.name}>")
        out.append((combine_form(op), row))
    return tuple(out)


def match(op) -> Monoid | None:
    """The known monoid the op's combine is, if any (no params; dtypes as the row needs)."""
    if op.params:
        return None
    form = combine_form(op)
    for row_form, row in _forms():
        if form != row_form:
            continue
        if row.bool_fields and not all(f.dtype == "bool" for f in op.state):
            continue
        return row
    return None
