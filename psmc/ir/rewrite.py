"""Canonicalisation of the lowered IR by rewriting: rules are data, the engine is small.

The model is tinygrad's PatternMatcher: a rule is a `Pat` (a pattern over IR nodes, with named
captures) and a function from the captures to a replacement node, or None to decline. The
engine rewrites every body bottom-up to a fixpoint: a node's operands are canonical before
the node is matched, and a replacement is itself canonicalised.

    canonical = canonicalize(op)       # an OpIR, same meaning, one spelling

Every rule keeps the meaning, the dtype and the shape of the node it replaces (the engine
checks dtype and shape and refuses a replacement that changes either). `let` and `fn` need no
rule: the lowering already inlines them (the IR is a DAG of values, names are gone), so
`let kv = outer(k, v); kv` and `outer(k, v)` are one node.

The canonical form, rule by rule (RULES below; tests/ir/test_rewrite.py tests each one):

  fold         operations on constants are folded (1.0 / 2.0 -> 0.5, 2 * 3 -> 6)
  sub          a - b  -> a + (-1 * b)      (IEEE: exact)
  neg          -x     -> -1 * x            (IEEE: exact)
  flatten      + and * chains are flattened, constants folded into one leading term, the
               other terms sorted by a structural key, and rebuilt left-nested; inside a *
               chain the outer and outer_row rules apply to any two factors
  unit         (part of flatten) x * 1 -> x, x + 0 -> x   (when the shape and dtype stay)
  commute      max, min, ==, !=, and, or: operands sorted by the same key
  outer        x[:, None] * y[None, :], x[:, None] * y, x[:, None] @ y[None, :] -> outer(x, y)
  outer_scale  outer(c * x, y), outer(x, c * y) -> c * outer(x, y)   (c a scalar)
  outer_row    x[:, None] * outer(a, b) -> outer(x * a, b)
  diag         diag(a) @ X -> a[:, None] * X;  X @ diag(a) -> X * a;  diag(a) @ x -> a * x
  eye          (c * eye(K)) @ X -> c * X;  eye(K) @ X -> X;  X @ eye(K) -> X
  dot          x @ y (two vectors) -> sum(x * y)
  vecmat       sum(x[:, None] * M, axis=0) -> x @ M;  transpose(M) @ x -> x @ M
  matmul_scale (c * x) @ M -> c * (x @ M);  x @ (c * M) -> c * (x @ M);  same for / c
  transpose    transpose(outer(v, k)) -> outer(k, v);  transpose(transpose(X)) -> X;
               transpose(c * X) -> c * transpose(X);  transpose(X * a) -> a[:, None] * transpose(X)
  logaddexp    log(exp(a) + exp(b)) -> logaddexp(a, b)   (the same real number; no overflow to inf)

Canonicalisation can change float rounding (reassociated sums and products, folded
constants), never the value in exact arithmetic.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import sympy

from .nodes import Node, OpIR, render
from .registry import COMMUTATIVE as REGISTRY_COMMUTATIVE, FLOAT_RESULT
from .types import broadcast, dims_equal, is_float, is_int, promote, shapes_equal

MAX_REWRITES = 100_000  # a backstop against a rule set that does not terminate
COMMUTATIVE = REGISTRY_COMMUTATIVE  # psmc.ir.registry: the rows marked commutative


# ---------------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class Pat:
    """A pattern over IR nodes.

    op: an op name, a tuple of names, or None (any node); args: patterns for the operands (None:
    any operands); name: capture the matched node under this name (a name captured twice must
    be the same value); where: an extra test on the node. Commutative binary ops match their
    operands in either order."""

    op: object = None
    args: tuple | None = None
    name: str | None = None
    where: Callable[[Node], bool] | None = None

    def match(self, node: Node, caps: dict) -> dict | None:
        if self.op is not None:
            ops = (self.op,) if isinstance(self.op, str) else self.op
            if node.op not in ops:
                return None
        if self.where is not None and not self.where(node):
            return None
        if self.name is not None:
            if self.name in caps and caps[self.name] != node:
                return None
            caps = {**caps, self.name: node}
        if self.args is None:
            return caps
        if len(self.args) != len(node.args):
            return None
        orders = [node.args]
        if node.op in COMMUTATIVE and len(node.args) == 2:
            orders.append(node.args[::-1])
        for order in orders:
            got = caps
            for p, a in zip(self.args, order):
                got = p.match(a, got)
                if got is None:
                    break
            if got is not None:
                return got
        return None


@dataclass(frozen=True)
class Rule:
    name: str  # listed in the module docstring; tests/ir/test_rewrite.py tests each
    pattern: Pat
    build: Callable[..., Node | None]  # captures (and `node`) -> replacement, or None to decline


def _any(name=None, where=None) -> Pat:
    return Pat(None, None, name, where)


# ---------------------------------------------------------------------------- node builders
def _is_const(n: Node) -> bool:
    return n.op == "const"


def const(value, dtype: str) -> Node:
    return Node("const", (), (value,), dtype, ())


def binary(op: str, a: Node, b: Node) -> Node:
    shape = broadcast(a.shape, b.shape)
    assert shape is not None, (op, a, b)
    dtype = promote(a.dtype, b.dtype, _is_const(a), _is_const(b))
    if op in FLOAT_RESULT and not is_float(dtype):  # div, logaddexp
        dtype = "f32"
    return Node(op, (a, b), (), dtype, shape, None)


def column(x: Node) -> Node:
    """x[:, None] for a vector x."""
    return Node("getitem", (x,), (("slice", sympy.Integer(0), x.shape[0]), ("newaxis",)), x.dtype,
                (x.shape[0], sympy.Integer(1)), None)


def outer(a: Node, b: Node) -> Node:
    return Node("outer", (a, b), (), promote(a.dtype, b.dtype), (a.shape[0], b.shape[0]), None)


def matmul(a: Node, b: Node) -> Node:
    return Node("matmul", (a, b), (), promote(a.dtype, b.dtype), a.shape[:-1] + b.shape[1:], None)


def _full_slice(entry, size) -> bool:
    return entry[0] == "slice" and dims_equal(entry[1], 0) and dims_equal(entry[2], size)


def is_column(n: Node) -> bool:
    """x[:, None] of a vector x."""
    return n.op == "getitem" and n.args[0].rank == 1 and len(n.attrs) == 2 and \
        _full_slice(n.attrs[0], n.args[0].shape[0]) and n.attrs[1] == ("newaxis",)


def is_row(n: Node) -> bool:
    """x[None, :] (or x[None]) of a vector x."""
    return n.op == "getitem" and n.args[0].rank == 1 and n.attrs[0] == ("newaxis",) and \
        (len(n.attrs) == 1 or (len(n.attrs) == 2 and _full_slice(n.attrs[1], n.args[0].shape[0])))


def _scalar(n: Node) -> bool:
    return n.rank == 0


def _vector(n: Node) -> bool:
    return n.rank == 1


def _matrix(n: Node) -> bool:
    return n.rank == 2


def sort_key(n: Node):
    """The order of operands in canonical + and * chains: constants first, then by a
    structural rendering (deterministic; independent of spans and of how the term was built)."""
    return (0 if _is_const(n) else 1, render(n), n.dtype, tuple(map(str, n.shape)))


# ---------------------------------------------------------------------------- rule bodies
_FOLD = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "neg": lambda a: -a,
}


def _fold(node: Node) -> Node | None:
    if node.op not in _FOLD or not node.args or not all(_is_const(a) for a in node.args):
        return None
    values = [a.attrs[0] for a in node.args]
    if any(isinstance(v, bool) for v in values):
        return None
    if node.op == "div" and values[1] == 0:
        return None
    try:
        value = _FOLD[node.op](*values)
    except (ArithmeticError, ValueError):
        return None
    if is_float(node.dtype):
        value = float(value)
        if not math.isfinite(value):
            return None
    elif is_int(node.dtype):
        if node.op == "div" or not (-(2 ** 63) <= value < 2 ** 63):
            return None
        value = int(value)
    else:
        return None
    return const(value, node.dtype)


def _minus_one(dtype: str) -> Node:
    return const(-1.0 if is_float(dtype) else -1, dtype)


def _sub(node, a, b):
    if not (is_float(node.dtype) or is_int(node.dtype)):
        return None
    return binary("add", a, binary("mul", _minus_one(b.dtype), b))


def _neg(node, x):
    if not (is_float(node.dtype) or is_int(node.dtype)):
        return None
    return binary("mul", _minus_one(node.dtype), x)


def _terms(node: Node) -> list[Node]:
    """The operands of a flattened + or * chain of one dtype."""
    out = []
    for a in node.args:
        if a.op == node.op and a.dtype == node.dtype:
            out += _terms(a)
        else:
            out.append(a)
    return out


def _flatten(node: Node):
    if not (is_float(node.dtype) or is_int(node.dtype)):
        return None
    terms = _pair_up(_terms(node)) if node.op == "mul" else _terms(node)
    numeric = [_is_const(t) and not isinstance(t.attrs[0], bool) for t in terms]
    consts = [t for t, c in zip(terms, numeric) if c]
    rest = sorted((t for t, c in zip(terms, numeric) if not c), key=sort_key)
    unit = 0 if node.op == "add" else 1
    folded = None
    if consts:
        value = consts[0].attrs[0]
        for c in consts[1:]:
            value = value + c.attrs[0] if node.op == "add" else value * c.attrs[0]
        value = float(value) if is_float(node.dtype) else value
        if is_float(node.dtype) and not math.isfinite(value):
            return None
        if value != unit or not rest:
            folded = const(value if is_float(node.dtype) else int(value), node.dtype)
    items = ([folded] if folded is not None else []) + rest
    out = items[0]
    for t in items[1:]:
        out = binary(node.op, out, t)
    return out


def _pair_up(terms: list[Node]) -> list[Node]:
    """Apply the product rules (outer, outer_row) to any two factors of a chain, so that
    `beta * k[:, None] * v[None, :]` meets the `outer` rule although the two views are not
    operands of one node."""
    changed = True
    while changed:
        changed = False
        for i in range(len(terms)):
            for j in range(len(terms)):
                if i == j or broadcast(terms[i].shape, terms[j].shape) is None:
                    continue
                pair = binary("mul", terms[i], terms[j])
                for rule in RULES:
                    if rule.name not in PAIR_RULES:
                        continue
                    caps = rule.pattern.match(pair, {})
                    new = rule.build(node=pair, **caps) if caps is not None else None
                    if new is not None and new.dtype == pair.dtype and shapes_equal(new.shape, pair.shape):
                        terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [new]
                        changed = True
                        break
                if changed:
                    break
            if changed:
                break
    return terms


def _commute(node):
    a, b = node.args
    if sort_key(b) < sort_key(a):
        return Node(node.op, (b, a), node.attrs, node.dtype, node.shape, node.span)
    return None


def _outer_of_columns(node, x, y):
    return outer(x, y)


def _outer_scale(node, c, x, y):
    return binary("mul", c, outer(x, y))


def _outer_scale_right(node, c, x, y):
    return binary("mul", c, outer(x, y))


def _outer_row(node, x, a, b):
    return outer(binary("mul", x, a), b)


def _diag_left(node, a, X):
    if X.rank == 1:
        return binary("mul", a, X)
    return binary("mul", column(a), X)


def _diag_right(node, X, a):
    return binary("mul", X, a)


def _eye_scaled(node, c, X):
    return binary("mul", c, X)


def _keep(node, X):
    return X


def _logaddexp(node, a, b):
    # exp(a) + exp(b) overflows from about 88 in fp32 (and its log with it) where logaddexp does not
    out = binary("logaddexp", a, b)
    return out if out.dtype == node.dtype else None


def _dot(node, x, y):
    prod = binary("mul", x, y)
    return Node("sum", (prod,), (0,), prod.dtype, (), None)


def _vecmat(node, x, M):
    return matmul(x, M)


def _scale_out(node, c, x, M):
    return binary("mul", c, matmul(x, M))


def _div_out(node, x, c, M):
    return binary("div", matmul(x, M), c)


def _div_out_right(node, x, M, c):
    return binary("div", matmul(x, M), c)


def _outer_swap(node, v, k):
    return outer(k, v)


def _transpose_scaled(node, c, X):
    return binary("mul", c, Node("transpose", (X,), (), X.dtype, X.shape[:-2] + (X.shape[-1], X.shape[-2]), None))


def _transpose_row_scaled(node, X, a):
    # X * a scales X's columns; transposed, that scales rows: a[:, None] * X^T
    if len(X.shape) != 2 or not dims_equal(a.shape[0], X.shape[1]):
        return None
    return binary("mul", column(a), Node("transpose", (X,), (), X.dtype, (X.shape[1], X.shape[0]), None))


def _sum_vecmat(node, x, M):
    if node.attrs != (0,):
        return None
    return matmul(x, M)


_ARITH = ("add", "mul")
PAIR_RULES = ("outer", "outer_row")  # product rules that _flatten also applies inside a chain
RULES: tuple[Rule, ...] = (
    Rule("fold", _any(where=lambda n: n.op in _FOLD and bool(n.args)), lambda node: _fold(node)),
    Rule("sub", Pat("sub", (_any("a"), _any("b"))), _sub),
    Rule("neg", Pat("neg", (_any("x"),)), _neg),
    Rule("commute", Pat(tuple(sorted(COMMUTATIVE - {"add", "mul"}))), lambda node: _commute(node)),
    Rule("outer", Pat("mul", (Pat("getitem", (_any("x"),), where=is_column),
                              Pat("getitem", (_any("y"),), where=is_row))), _outer_of_columns),
    Rule("outer", Pat("mul", (Pat("getitem", (_any("x"),), where=is_column), _any("y", _vector))),
         _outer_of_columns),
    Rule("outer", Pat("matmul", (Pat("getitem", (_any("x"),), where=is_column),
                                 Pat("getitem", (_any("y"),), where=is_row))), _outer_of_columns),
    Rule("outer_scale", Pat("outer", (Pat("mul", (_any("c", _scalar), _any("x", _vector))), _any("y"))),
         _outer_scale),
    Rule("outer_scale", Pat("outer", (_any("x"), Pat("mul", (_any("c", _scalar), _any("y", _vector))))),
         _outer_scale_right),
    Rule("outer_row", Pat("mul", (Pat("getitem", (_any("x"),), where=is_column),
                                  Pat("outer", (_any("a"), _any("b"))))), _outer_row),
    Rule("diag", Pat("matmul", (Pat("diag", (_any("a"),)), _any("X"))), _diag_left),
    Rule("diag", Pat("matmul", (_any("X", _matrix), Pat("diag", (_any("a"),)))), _diag_right),
    Rule("eye", Pat("matmul", (Pat("mul", (_any("c", _scalar), Pat("eye"))), _any("X"))), _eye_scaled),
    Rule("eye", Pat("matmul", (Pat("eye"), _any("X"))), _keep),
    Rule("eye", Pat("matmul", (_any("X", _matrix), Pat("eye"))), _keep),
    Rule("dot", Pat("matmul", (_any("x", _vector), _any("y", _vector))), _dot),
    Rule("vecmat", Pat("sum", (Pat("mul", (Pat("getitem", (_any("x"),), where=is_column),
                                          _any("M", _matrix))),)), _sum_vecmat),
    Rule("vecmat", Pat("matmul", (Pat("transpose", (_any("M", _matrix),)), _any("x", _vector))), _vecmat),
    Rule("matmul_scale", Pat("matmul", (Pat("mul", (_any("c", _scalar), _any("x", _vector))),
                                        _any("M", _matrix))), _scale_out),
    Rule("matmul_scale", Pat("matmul", (_any("x", _vector),
                                        Pat("mul", (_any("c", _scalar), _any("M", _matrix))))), _scale_out),
    Rule("matmul_scale", Pat("matmul", (Pat("div", (_any("x", _vector), _any("c", _scalar))),
                                        _any("M", _matrix))), _div_out),
    Rule("matmul_scale", Pat("matmul", (_any("x", _vector),
                                        Pat("div", (_any("M", _matrix), _any("c", _scalar))))), _div_out_right),
    Rule("transpose", Pat("transpose", (Pat("outer", (_any("v"), _any("k"))),)), _outer_swap),
    Rule("transpose", Pat("transpose", (Pat("transpose", (_any("X"),)),)), _keep),
    Rule("transpose", Pat("transpose", (Pat("mul", (_any("c", _scalar), _any("X", _matrix))),)), _transpose_scaled),
    Rule("transpose", Pat("transpose", (Pat("mul", (_any("X", _matrix), _any("a", _vector))),)),
         _transpose_row_scaled),
    Rule("logaddexp", Pat("log", (Pat("add", (Pat("exp", (_any("a"),)), Pat("exp", (_any("b"),)))),)), _logaddexp),
    Rule("flatten", Pat(_ARITH, where=lambda n: len(n.args) == 2), lambda node: _flatten(node)),
)


# ---------------------------------------------------------------------------- the engine
class Rewriter:
    """Rewrites nodes bottom-up to a fixpoint of `rules`; remembers every node it has seen."""

    def __init__(self, rules=RULES):
        self.rules = tuple(rules)
        self.memo: dict[Node, Node] = {}
        self.budget = MAX_REWRITES
        self.fired: dict[str, int] = {}

    def __call__(self, node: Node) -> Node:
        done = self.memo.get(node)
        if done is not None:
            return done
        args = tuple(self(a) for a in node.args)
        current = node if args == node.args else Node(node.op, args, node.attrs, node.dtype, node.shape, node.span)
        while True:  # iterate here (not recurse) so a runaway rule set hits the budget
            replacement = self._first(current)
            if replacement is None:
                break
            args = tuple(self(a) for a in replacement.args)
            current = replacement if args == replacement.args else \
                Node(replacement.op, args, replacement.attrs, replacement.dtype, replacement.shape, replacement.span)
        self.memo[node] = current
        self.memo[current] = current
        return current

    def _first(self, node: Node) -> Node | None:
        for rule in self.rules:
            caps = rule.pattern.match(node, {})
            if caps is None:
                continue
            new = rule.build(node=node, **caps)
            if new is None or new == node:
                continue
            if new.dtype != node.dtype or not shapes_equal(new.shape, node.shape):
                continue  # a rule never changes a value's type
            self.budget -= 1
            if self.budget < 0:
                raise RuntimeError("canonicalisation did not terminate (a rule undoes another)")
            self.fired[rule.name] = self.fired.get(rule.name, 0) + 1
            if node.span is not None and new.span is None:
                new = Node(new.op, new.args, new.attrs, new.dtype, new.shape, node.span)
            return new
        return None


def canonical_nodes(nodes, rules=RULES) -> tuple[Node, ...]:
    rw = Rewriter(rules)
    return tuple(rw(n) for n in nodes)


def canonicalize(op: OpIR, rules=RULES) -> OpIR:
    """The op with every body in canonical form (same meaning, dtypes and shapes)."""
    rw = Rewriter(rules)

    def body(nodes):
        return None if nodes is None else tuple(rw(n) for n in nodes)
    lift, combine, identity, readout = body(op.lift), body(op.combine), body(op.identity), body(op.readout)
    names: dict[Node, str] = {}
    for node, name in op.let_names:  # a let names the canonical form of its value
        if node in rw.memo:
            names.setdefault(rw.memo[node], name)
    return dataclasses.replace(op, lift=lift, combine=combine, identity=identity, readout=readout,
                               let_names=tuple(names.items()))
