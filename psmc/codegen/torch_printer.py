"""IR → torch source for one body (lift, combine, readout, identity).

Each non-leaf node becomes one statement `tN = ...` in topological order; structurally equal
nodes are one value (the IR is hash-consed), so common subexpressions are computed once.
Values are batched over any number of leading axes (`[*lead, *declared]`); the printer
indexes with `...` and aligns declared ranks explicitly, so the same code serves a whole
sequence, a tree level or a single streaming step.

Nothing from the `.psm` text reaches the output except through `repr()` of a string or a
number, or as a suffix of a fixed prefix (`x_`, `l_`, `r_`, `s_`, `self.p_`): a program cannot
inject code (see docs/language.md, "Names in generated code").
"""
from __future__ import annotations

import math

import sympy

from ..dtypes import DType
from ..ir.nodes import Node, walk
from ..ir.registry import BINARY_OPS, LEAF_OPS, REDUCTIONS, STRUCTURE_OPS, UNARY_MATH, UNARY_OPERATORS

UNARY = {row.name: row.torch for row in UNARY_MATH}  # psmc.ir.registry
BINARY = {row.name: row.torch for row in BINARY_OPS}  # format strings over the operands {0}, {1}
REDUCE = {row.name: row.torch for row in REDUCTIONS}  # psmc.ir.registry
OPERATORS = {row.name: row.torch for row in UNARY_OPERATORS}  # `-x`, `not c`: format strings over {0}
FIELD_PREFIX = {"left": "l_", "right": "r_", "state": "s_"}
LET_PREFIX = "v_"  # `let` values: v_NAME (no other generated name starts with v_ and is longer)


def dim_code(expr, dims: str = "cx.d") -> str:
    """A SymPy dim expression as Python over the dims dict named `dims` (`cx.d` in bodies,
    `cx_d` in the lambdas of a Spec)."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Symbol:
        return f"{dims}[{str(expr.name)!r}]"
    if expr.is_Add:
        return "(" + " + ".join(dim_code(a, dims) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"
    if expr.is_Mul:
        num, den = sympy.fraction(expr)
        if den != 1:
            return f"({dim_code(num, dims)} // {dim_code(den, dims)})"
        return "(" + " * ".join(dim_code(a, dims) for a in sorted(expr.args, key=sympy.default_sort_key)) + ")"
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        return "(" + " * ".join([dim_code(expr.base, dims)] * int(expr.exp)) + ")"
    raise ValueError(f"cannot print dim expression {expr}")


def shape_code(shape, dims: str = "cx.d") -> str:
    items = [dim_code(d, dims) for d in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def const_code(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if math.isinf(value):
            return "math.inf" if value > 0 else "-math.inf"
        return repr(value)
    return repr(int(value))


# const, dim, index, fill and eye (a leaf structure op): psmc.ir.registry
WEAK_LEAVES = frozenset({row.name for row in LEAF_OPS if row.weak} | {row.name for row in STRUCTURE_OPS
                                                                     if row.kind == "leaf"})
_FLOAT_WIDTH = {DType.F16: 1, DType.BF16: 1, DType.F32: 2, DType.F64: 3}


def widen_weak(outputs: tuple[Node, ...]) -> tuple[Node, ...]:
    """`outputs` with their weak constants widened (see widen_weak_map)."""
    widened = widen_weak_map(outputs)
    return tuple(widened.get(o, o) for o in outputs)


def widen_weak_map(outputs: tuple[Node, ...]) -> dict:
    """Float values made only of literals, dims, `index`, `zeros`/`ones`/`eye` (or from such
    values by `where`s whatever their condition) have no dtype of their own (the IR types them
    f32); each is retyped to the widest float dtype its users
    compute in, so `0.9 * eye(K)` or `0.01 * index` inside an f64 expression is computed in
    f64, as the reference interpreter does, never rounded to float32 first. Returns the
    rebuilt node of every node that changed."""
    order = list(walk(outputs))
    constant, weak = {}, {}  # constant: made only of literals, dims, index, zeros/ones/eye
    for n in order:
        constant[n] = n.op in WEAK_LEAVES if not n.args else all(constant[a] for a in n.args)
        # weak: a constant float, or a float computed from weak floats only, where a `where`'s
        # condition may be anything (`tanh(where(l.x > 0, 1.0, -1.0))` has no dtype of its own)
        free = n.args[1:] if n.op == "where" else n.args
        from_weak = any(a.dtype.is_float for a in free) and all(
            weak[a] if a.dtype.is_float else constant[a] for a in free)
        weak[n] = n.dtype.is_float and (constant[n] or from_weak)
    if not any(weak.values()):
        return {}
    users: dict = {}
    for n in order:
        for a in n.args:
            users.setdefault(a, []).append(n)
    demand = {}
    for n in reversed(order):
        dtype = n.dtype
        if weak[n]:
            for u in users.get(n, ()):
                want = demand[u]
                if want.is_float and _FLOAT_WIDTH[want] > _FLOAT_WIDTH[dtype]:
                    dtype = want
        demand[n] = dtype
    rebuilt: dict = {}
    for n in order:
        args = tuple(rebuilt[a] for a in n.args)
        if args == n.args and demand[n] == n.dtype:
            rebuilt[n] = n
        else:
            rebuilt[n] = Node(n.op, args, n.attrs, demand[n], n.shape, n.span)
    return {n: m for n, m in rebuilt.items() if m is not n}  # every node that changed


class BodyPrinter:
    """Prints the statements computing `outputs`; `name_of` maps leaves to expressions."""

    def __init__(self, outputs: tuple[Node, ...], let_names=()):
        self.given = tuple(outputs)
        widened = widen_weak_map(self.given)
        self.outputs = tuple(widened.get(o, o) for o in self.given)
        # node -> the `let` name it had in the source (widened nodes keep their names)
        self.let_names = {widened.get(n, n): name for n, name in dict(let_names).items()}
        self.names: dict[Node, str] = {}
        self.lines: list[str] = []

    def run(self) -> list[str]:
        counter = 0
        used: set[str] = set()
        for node in walk(self.outputs):
            if node in self.names:
                continue
            code = self.leaf(node) if not node.args else None
            if code is not None:
                self.names[node] = code
                continue
            expr = self.node(node)
            if node in self.let_names:  # `let kv = ...` prints as `v_kv = ...` (behind a prefix)
                name = LET_PREFIX + self.let_names[node]
                while name in used:
                    name += "_"
            else:
                name = f"t{counter}"
                counter += 1
            used.add(name)
            comment = f"  # line {node.span.line}" if node.span is not None else ""
            self.lines.append(f"{name} = {expr}{comment}")
            self.names[node] = name
        for given, printed in zip(self.given, self.outputs):  # callers look outputs up as given
            self.names.setdefault(given, self.names[printed])
        return self.lines

    def ref(self, node: Node) -> str:
        return self.names[node]

    # ------------------------------------------------------------------ leaves
    def leaf(self, node: Node) -> str | None:
        op = node.op
        if op == "arg":
            return "x_" + node.attrs[0]
        if op == "field":
            return FIELD_PREFIX[node.attrs[0]] + node.attrs[1]
        if op == "dim":
            return f"cx.d[{node.attrs[0]!r}]"
        if op == "const":
            return const_code(node.attrs[0])
        if op == "index":
            return "index"
        return None  # param / fill / eye become statements

    # ------------------------------------------------------------------ operations
    def aligned(self, arg: Node, target_rank: int) -> str:
        """`arg` with singleton axes inserted after the leading axes: batched values, and values
        computed from a param (a layer built with per-lane params holds them as
        `[*lanes, *declared]`: its lane axes lead like a batched value's; for a shared param
        the inserted axes change nothing)."""
        code = self.ref(arg)
        if not (arg.batched or self.from_param(arg)) or arg.rank >= target_rank:
            return code
        return code + "[..., " + ", ".join(["None"] * (target_rank - arg.rank) + [":"] * arg.rank) + "]"

    def operand(self, arg: Node, node: Node, target_rank: int | None = None) -> str:
        """`arg` as an operand of `node`: aligned to `target_rank`, and converted to the dtype
        `node` computes in when that is a float dtype `arg` does not have (an int, bool or
        `index` operand, f32 beside f64): the result is then computed in the call's compute
        dtype, never in torch's default float32, and `@` never meets mixed dtypes."""
        code = self.ref(arg) if target_rank is None else self.aligned(arg, target_rank)
        if node.dtype.is_float and arg.dtype != node.dtype and not self.static_scalar(arg):
            return f"_ops.to({code}, cx.dt[{node.dtype!r}])"
        return code

    def from_param(self, node: Node) -> bool:
        return any(leaf.op == "param" for leaf in walk((node,)))

    def static_scalar(self, node: Node) -> bool:
        """True when the value is a Python number at run time (literals and dims only)."""
        return not node.batched and node.rank == 0 and all(
            leaf.op in ("const", "dim") for leaf in walk((node,)) if not leaf.args)

    def node(self, node: Node) -> str:
        op, args = node.op, node.args
        R = node.rank
        if op == "param":  # a statement: the param in the call's compute dtype for its DType
            return f"_ops.to(self.p_{node.attrs[0]}, cx.dt[{node.dtype!r}])"
        if op == "fill":
            return f"_ops.full({shape_code(node.shape)}, {const_code(node.attrs[0])}, cx.dt[{node.dtype!r}], cx.dev)"
        if op in STRUCTURE:  # cast, broadcast, eye, matmul, ...: psmc.ir.registry names the rule
            return STRUCTURE[op](self, node)
        if op in OPERATORS:
            return OPERATORS[op].format(self.ref(args[0]))
        if op in UNARY:
            if self.static_scalar(args[0]):
                return f"_ops.unary({UNARY[op]}, {self.ref(args[0])})"
            return f"{UNARY[op]}({self.operand(args[0], node)})"
        if op == "mul" and args[0].op == "const" and not isinstance(args[0].attrs[0], bool) \
                and args[0].attrs[0] == -1 and args[1].dtype == node.dtype and args[1].rank == R:
            return f"-{self.ref(args[1])}"  # -1 * x: the canonical form of -x (psmc.ir.rewrite); exact
        if op in BINARY:
            return BINARY[op].format(*(self.operand(x, node, R) for x in args))
        if op == "where":
            c = self.aligned(args[0], R)
            a, b = (self.operand(x, node, R) for x in args[1:])
            if self.static_scalar(node):
                return f"_ops.where({c}, {a}, {b})"
            return f"_ops.where({c}, {a}, {b}, cx.dt[{node.dtype!r}], cx.dev)"
        if op in REDUCE:
            axis = node.attrs[0] - args[0].rank
            return f"{REDUCE[op]}({self.operand(args[0], node)}, dim={axis})"
        raise NotImplementedError(f"no torch rendering for IR op {op!r}")

    # ------------------------------------------------------------------ structure rules
    # the rules the rows of psmc.ir.registry.STRUCTURE_OPS name (`torch`): torch_<rule>(node)
    def torch_eye(self, node: Node) -> str:
        return f"_ops.eye({dim_code(node.shape[0])}, cx.dt[{node.dtype!r}], cx.dev)"

    def torch_cast(self, node: Node) -> str:
        return f"_ops.cast({self.ref(node.args[0])}, cx.dt[{node.attrs[0]!r}])"

    def torch_broadcast(self, node: Node) -> str:
        arg = node.args[0]
        if self.static_scalar(arg):  # a number stays a number otherwise: materialise it
            return f"_ops.full({shape_code(node.shape)}, {self.ref(arg)}, cx.dt[{node.dtype!r}], cx.dev)"
        return f"_ops.broadcast_to({self.ref(arg)}, {arg.rank}, {shape_code(node.shape)})"

    def torch_softmax(self, node: Node) -> str:
        return f"torch.softmax({self.operand(node.args[0], node)}, dim={node.attrs[0] - node.args[0].rank})"

    def torch_matmul(self, node: Node) -> str:
        a, b = node.args
        return f"_ops.matmul({self.operand(a, node)}, {self.operand(b, node)}, {a.rank}, {b.rank})"

    def torch_outer(self, node: Node) -> str:
        return f"_ops.outer({self.operand(node.args[0], node)}, {self.operand(node.args[1], node)})"

    def torch_getitem(self, node: Node) -> str:
        return f"{self.ref(node.args[0])}[{self.index_code(node.attrs, node.args[0].shape)}]"

    def torch_concat(self, node: Node) -> str:
        items = ", ".join(self.operand(a, node) for a in node.args)
        return f"_ops.concat([{items}], {node.attrs[0]}, {node.args[0].rank})"

    def torch_reshape(self, node: Node) -> str:
        return f"_ops.reshape({self.ref(node.args[0])}, {node.args[0].rank}, {shape_code(node.shape)})"

    def torch_attention(self, node: Node) -> str:
        q, k, v = (self.operand(a, node) for a in node.args)
        heads, causal = node.attrs
        return f"_ops.attention({q}, {k}, {v}, {dim_code(heads)}, {const_code(bool(causal))})"

    def index_code(self, spec, shape) -> str:
        parts, axis = ["..."], 0
        for entry in spec:
            if entry[0] == "newaxis":
                parts.append("None")
                continue
            if entry[0] == "index":
                parts.append(dim_code(entry[1]))
            else:
                lo, hi = sympy.sympify(entry[1]), sympy.sympify(entry[2])
                lo_code = "" if lo == 0 else dim_code(lo)
                hi_code = "" if sympy.expand(hi - shape[axis]) == 0 else dim_code(hi)
                parts.append(f"{lo_code}:{hi_code}")
            axis += 1
        return ", ".join(parts)


def _structure_rule(row):
    """The renderer of a STRUCTURE_OPS row's `torch` entry: BodyPrinter.torch_<rule>, or its
    template filled with the operands' names."""
    if "{" not in row.torch:
        return getattr(BodyPrinter, "torch_" + row.torch)
    template = row.torch
    return lambda self, node: template.format(*(self.ref(arg) for arg in node.args))


# the rule each row of psmc.ir.registry.STRUCTURE_OPS names (`torch`)
STRUCTURE = {row.name: _structure_rule(row) for row in STRUCTURE_OPS}
