"""The IR evaluated over SymPy: symbolic entries for proofs, exact numbers for counterexamples.

The semantics are those of `psmc.ir.interp` (the float64 reference), read in exact real
arithmetic: a float literal is the decimal it spells (0.1 is 1/10), `inf` is SymPy's oo,
`gelu` is x/2 (1 + erf(x/sqrt 2)), softmax and logsumexp are the unshifted formulas (equal
in exact arithmetic to the stable ones), layernorm's eps is 1/100000.

Every comparison (max, min, <, ==, abs, sign, relu, amax, amin) goes through a `decide(x, y)`
callback returning the sign of x - y: for numbers that is arithmetic; for symbolic entries
the case splitter (`cases.py`) answers from the branch it is exploring. Bools are always
concrete Python bools (the prover enumerates bool entries), so `where` picks a side.
"""
from __future__ import annotations

import math

import sympy

from ..ir.interp import concrete, concrete_shape, env_key
from ..ir.nodes import Node, walk
from ..ir.registry import BINARY_OPS, REDUCTION, SELECT, STRUCTURE_OPS, UNARY_MATH, UNARY_OPERATOR
from ..ir.types import is_float
from .grid import Grid, concat, matmul, reduce_axis, zip_map

LAYERNORM_EPS = sympy.Rational(1, 100000)


class Undecidable(Exception):
    """A comparison whose outcome this evaluation cannot know (symbolic, or undefined)."""


def numeric_sign(x, y) -> int:
    """Sign of x - y for concrete SymPy numbers (exact when both are rational)."""
    d = sympy.sympify(x - y)
    if d is sympy.nan or d.has(sympy.zoo) or d.has(sympy.nan):
        raise Undecidable(f"undefined comparison of {x} and {y}")
    if d.is_Rational or d.is_infinite:
        return int(sympy.sign(d))
    if not d.is_number:
        raise Undecidable(f"symbolic comparison of {x} and {y}")
    value = d.evalf(60)
    if value.is_real is False or value.has(sympy.I):
        raise Undecidable(f"complex value in a comparison: {d}")
    if abs(value) > sympy.Float("1e-45"):
        return 1 if value > 0 else -1
    zero = d.equals(0)
    if zero is None:
        raise Undecidable(f"cannot decide the sign of {d}")
    return 0 if zero else (1 if value > 0 else -1)


def number(value):
    """A Python literal as an exact SymPy value (floats by their decimal spelling)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return sympy.Integer(value)
    if math.isinf(value):
        return sympy.oo if value > 0 else -sympy.oo
    return sympy.Rational(repr(value))


def evaluate(outputs, env: dict, dims: dict, decide=numeric_sign, digits: int | None = None) -> tuple[Grid, ...]:
    """Evaluate `outputs` (Nodes) with `env` mapping leaf keys (as in `psmc.ir.interp`) to
    Grids of SymPy values / bools. With `digits`, every float value is rounded to that many
    significant digits as it is computed (numbers stay numbers: no closed forms grow)."""
    values: dict[Node, Grid] = {}
    ev = _Evaluator(env, dims, decide)
    for node in walk(outputs):
        out = ev.node(node, [values[a] for a in node.args])
        if digits is not None and is_float(node.dtype):
            out = out.map(lambda v: v if v.is_Float or v.is_infinite else v.evalf(digits))
        values[node] = out
    return tuple(values[o] for o in outputs)


class _Evaluator:
    def __init__(self, env, dims, decide):
        self.env, self.dims, self.decide = env, dims, decide

    @staticmethod
    def undecidable(why: str):
        """Registry rows say that they cannot decide (psmc.ir.registry imports no stage)."""
        raise Undecidable(why)

    def node(self, node: Node, args: list[Grid]) -> Grid:
        if not args:
            return self.leaf(node)
        if node.op in _UNARY:
            fn = _UNARY[node.op]
            return args[0].map(lambda x: fn(self, x))
        if node.op in _BINARY:
            fn = _BINARY[node.op]
            return zip_map(lambda x, y: fn(self, x, y), *args)
        if node.op in REDUCTION:  # psmc.ir.registry: a fold of the entries along the axis
            fold = REDUCTION[node.op].sympy
            return reduce_axis(args[0], node.attrs[0], lambda xs: fold(self, xs))
        if node.op == SELECT.name:
            return self.op_where(node, args)
        return _STRUCTURE[node.op](self, node, args)  # psmc.ir.registry: the row names its op_<rule>

    # ------------------------------------------------------------------ leaves
    def leaf(self, node: Node) -> Grid:
        op = node.op
        if op == "const":
            return Grid.scalar(number(node.attrs[0]))
        if op == "dim":
            return Grid.scalar(sympy.Integer(self.dims[node.attrs[0]]))
        if op == "fill":
            value = number(node.attrs[0])
            return Grid.full(concrete_shape(node.shape, self.dims), _as_dtype(value, node.dtype))
        if op in _STRUCTURE:  # eye: psmc.ir.registry
            return _STRUCTURE[op](self, node, [])
        key = env_key(node)
        value = self.env[key]
        if value.shape != concrete_shape(node.shape, self.dims):
            raise ValueError(f"{key} has shape {value.shape}, declared {node.shape}")
        return value

    # ------------------------------------------------------------------ comparisons
    def sign(self, x, y) -> int:
        return self.decide(x, y)

    def max(self, x, y):
        return x if self.sign(x, y) >= 0 else y

    def min(self, x, y):
        return x if self.sign(x, y) <= 0 else y

    # ------------------------------------------------------------------ the rest
    def op_where(self, node, args):
        pick = SELECT.sympy  # psmc.ir.registry
        return zip_map(lambda c, a, b: pick(self, c, a, b), *args).map(lambda v: _as_dtype(v, node.dtype))

    def op_eye(self, node, args):
        n = concrete(node.shape[0], self.dims)
        return Grid.build((n, n), lambda i: sympy.Integer(int(i[0] == i[1])))

    def op_cast(self, node, args):
        return args[0].map(lambda v: _as_dtype(v, node.dtype))

    def op_broadcast(self, node, args):
        return args[0].broadcast_to(concrete_shape(node.shape, self.dims))

    def op_softmax(self, node, args):
        return _softmax(args[0], node.attrs[0])

    def op_matmul(self, node, args):
        return matmul(args[0], args[1], lambda a, b: a + b, lambda a, b: a * b)

    def op_outer(self, node, args):
        a, b = args
        return Grid.build((a.shape[0], b.shape[0]), lambda i: a[(i[0],)] * b[(i[1],)])

    def op_transpose(self, node, args):
        return args[0].transpose()

    def op_getitem(self, node, args):
        grid = args[0]
        axis = 0
        for item in node.attrs:
            if item[0] == "newaxis":
                grid = Grid(grid.shape[:axis] + (1,) + grid.shape[axis:], grid.items)
                axis += 1
            elif item[0] == "slice":
                lo, hi = concrete(item[1], self.dims), concrete(item[2], self.dims)
                grid = grid.take(axis, range(lo, hi))
                axis += 1
            else:
                k = concrete(item[1], self.dims)
                sub = grid.take(axis, [k])
                grid = Grid(sub.shape[:axis] + sub.shape[axis + 1:], sub.items)
        return grid

    def op_concat(self, node, args):
        return concat(args, node.attrs[0])

    def op_diag(self, node, args):
        v = args[0]
        return Grid.build((v.shape[0],) * 2, lambda i: v[(i[0],)] if i[0] == i[1] else sympy.Integer(0))

    def op_reshape(self, node, args):
        return args[0].reshape(concrete_shape(node.shape, self.dims))

    def op_layernorm(self, node, args):
        x = args[0]
        axis = x.rank - 1

        def norm(lane):
            n = len(lane)
            mean = sympy.Add(*lane) / n
            var = sympy.Add(*[(v - mean) ** 2 for v in lane]) / n
            return [(v - mean) / sympy.sqrt(var + LAYERNORM_EPS) for v in lane]

        lanes = [norm(lane) for lane in x.lanes(axis)]
        rows = x.shape[:-1]
        flat = [v for lane in lanes for v in lane]
        return Grid(rows + (x.shape[-1],), tuple(flat))

    def op_attention(self, node, args):
        q, k, v = args
        heads, causal = concrete(node.attrs[0], self.dims), bool(node.attrs[1])
        dq, dv = q.shape[1] // heads, v.shape[1] // heads
        if dq * heads != q.shape[1] or dv * heads != v.shape[1]:
            raise ValueError("attention width not divisible by heads")
        scale = sympy.sqrt(dq)

        def entry(i):
            row, col = i
            h = col // dv
            keys = range(k.shape[0]) if not causal else range(min(row + 1, k.shape[0]))
            scores = [sympy.Add(*[q[(row, h * dq + c)] * k[(j, h * dq + c)] for c in range(dq)]) / scale
                      for j in keys]
            weights = [sympy.exp(s) for s in scores]
            total = sympy.Add(*weights)
            return sympy.Add(*[w * v[(j, col)] for w, j in zip(weights, keys)]) / total

        return Grid.build((q.shape[0], v.shape[1]), entry)


def _softmax(grid: Grid, axis: int) -> Grid:
    sums = reduce_axis(grid.map(sympy.exp), axis, lambda xs: sympy.Add(*xs))
    return Grid.build(grid.shape, lambda i: sympy.exp(grid[i]) / sums[i[:axis] + i[axis + 1:]])


def _as_dtype(value, dtype: str):
    if dtype == "bool":
        return value
    return sympy.Integer(int(value)) if isinstance(value, bool) else value


_UNARY = {
    "neg": UNARY_OPERATOR["neg"].sympy,
    **{row.name: row.sympy for row in UNARY_MATH},  # psmc.ir.registry
    "not": UNARY_OPERATOR["not"].sympy,
}

_BINARY = {row.name: row.sympy for row in BINARY_OPS}  # psmc.ir.registry
# the rules the rows of psmc.ir.registry.STRUCTURE_OPS name (`sympy`): _Evaluator.op_<rule>
_STRUCTURE = {row.name: getattr(_Evaluator, "op_" + row.sympy) for row in STRUCTURE_OPS}
