"""Reverse-mode derivatives of IR bodies, printed as Triton statements.

`VjpPrinter` takes a body (output nodes), the names of the adjoints of its outputs and a test
for the leaves we want gradients of, and prints the primal statements followed by the adjoint
statements, in reverse topological order. Each IR op's vector-Jacobian product is a row of
VJP_RULES: format strings over the operands ({a}, {b}, {c}), the result {z} and its adjoint
{g}. The rules follow torch's derivative conventions wherever the choice matters (max/min ties
split the gradient, clamp-like max with a constant is inclusive, relu'(0) = 0, abs'(0) = 0,
softplus with threshold 20), so gradients agree with the torch backend's autograd.

Broadcasting: in the Triton tile a rank-0 value is the same in every column, and a rank-1
value varies over the columns (the state axis). Where a rank-0 operand meets a rank-1 result
the operand's adjoint is the masked sum of the contribution over the columns; a reduction's
adjoint spreads back without a sum. Adjoints of rank-0 values are therefore themselves the
same in every column, like the values.
"""
from __future__ import annotations

from ..ir.nodes import Node, walk
from ..ir.registry import BINARY_OPS, LEAF, REDUCTIONS, SELECT, SPECIAL, STRUCTURE_OPS, UNARY_MATH, UNARY_OPERATORS
from .triton_layout import FLOATS, TRITON_OPS, Unsupported
from .triton_printer import TritonBodyPrinter

# op -> one rendering per operand (None: no gradient flows to that operand).
# torch's amax/amin backward: the gradient is shared evenly by the tied maxima
_TIES = ("tl.where(({a} == {z}) & col_ok, {g} / tl.sum(tl.where(({a} == {z}) & col_ok, 1.0, 0.0), "
         "axis=1, keep_dims=True), 0.0)",)
VJP_RULES: dict[str, tuple] = {
    **{row.name: (row.vjp,) for row in UNARY_OPERATORS if row.vjp is not None},  # `-x`: psmc.ir.registry
    **{row.name: (row.vjp,) for row in UNARY_MATH if row.vjp is not None},  # psmc.ir.registry
    **{row.name: row.vjp for row in BINARY_OPS if row.vjp not in (None, SPECIAL)},  # psmc.ir.registry
    SELECT.name: SELECT.vjp,
    # cast, broadcast, and in matrix tiles (psmc.codegen.triton_matrix) matmul, outer (products
    # whose contraction or broadcast the printer's `unbroadcast` undoes by summing over the axes
    # the operand lacks) and getitem (full slices and new axes only): psmc.ir.registry
    **{row.name: row.vjp for row in STRUCTURE_OPS if row.vjp is not None},
    # reductions over the columns: the adjoint spreads back (rank 0 -> every column); psmc.ir.registry
    **{row.name: _TIES if row.vjp == "ties" else (row.vjp,) for row in REDUCTIONS},
}
# torch's clamp (a max/min with a constant): the bound is inclusive
CLAMP_RULES = {"maximum": "tl.where({a} >= {b}, {g}, 0.0)", "minimum": "tl.where({a} <= {b}, {g}, 0.0)"}
# ops whose result carries no gradient (bool / int results, piecewise-constant)
NO_GRADIENT = frozenset({row.name for row in UNARY_OPERATORS if row.vjp is None}
                       | {row.name for row in BINARY_OPS if row.vjp is None}
                       | {row.name for row in UNARY_MATH if row.vjp is None})
LEAVES = frozenset(LEAF)  # psmc.ir.registry


def differentiable(node: Node) -> bool:
    return node.dtype in FLOATS


def vjp_rule_missing() -> list[str]:
    """IR ops with a Triton rendering but neither a VJP rule nor a reason to have none."""
    return sorted(op for op, r in TRITON_OPS.items() if not isinstance(r, Unsupported)
                  and op not in VJP_RULES and op not in NO_GRADIENT and op not in LEAVES and op != "pow")


class VjpPrinter:
    """Primal and adjoint statements of one body.

    adjoints: for each output index, the name of its adjoint (None: no gradient arrives).
    wanted: which leaves need their adjoint (fields, args, params).
    After `run()`, `leaf_adjoints[node]` names the adjoint of each wanted leaf that received one.
    """

    def __init__(self, outputs: tuple[Node, ...], adjoints: tuple, wanted, prefix: str, token: str = ""):
        self.outputs = outputs
        self.token = token  # as TritonBodyPrinter's
        self.adjoints = adjoints
        self.wanted = wanted
        self.prefix = prefix
        self.leaf_adjoints: dict[Node, str] = {}

    def primal_printer(self) -> TritonBodyPrinter:
        return TritonBodyPrinter(self.outputs, self.prefix + "p", self.token)

    def unbroadcast(self, node: Node, arg: Node, contribution: str) -> str:
        """The adjoint contribution reduced to `arg`'s tile: a rank-0 operand broadcast over
        the columns gets the masked sum over them."""
        if arg.rank < node.rank:
            return f"tl.sum(tl.where(col_ok, {contribution}, 0.0), axis=1, keep_dims=True)"
        return contribution

    def run(self) -> list[str]:
        primal = self.primal_printer()
        lines = primal.run()
        names = primal.names
        order = list(walk(self.outputs))
        needs = self._needs(order)
        parts: dict[Node, list[str]] = {}
        for out, adj in zip(self.outputs, self.adjoints):
            if adj is not None and out in needs:
                parts.setdefault(out, []).append(adj)
        counter = 0
        for node in reversed(order):
            if node not in parts:
                continue
            name = f"{self.prefix}g{counter}"
            counter += 1
            lines.append(f"{name} = " + " + ".join(parts[node]))
            if node.op in LEAVES:
                if self.wanted(node):
                    self.leaf_adjoints[node] = name
                continue
            for i, arg in enumerate(node.args):
                if arg not in needs:
                    continue
                contribution = self.unbroadcast(node, arg, self._contribution(node, i, names, name))
                parts.setdefault(arg, []).append(contribution)
        return lines

    def _needs(self, order) -> set:
        """Float nodes on a path from a wanted leaf to an output."""
        needs: set = set()
        for node in order:
            if not differentiable(node) or node.op in NO_GRADIENT:
                continue
            if node.op in LEAVES:
                if self.wanted(node):
                    needs.add(node)
            elif any(a in needs for a in node.args):
                needs.add(node)
        return needs

    def _contribution(self, node: Node, i: int, names: dict, g: str) -> str:
        ops = {k: names[a] for k, a in zip("abc", node.args)}
        ops.update(z=names[node], g=g)
        if node.op == "pow":
            return self._pow(node, i, ops)
        if node.op in CLAMP_RULES and node.args[1 - i].op in ("const", "fill"):
            const_first = i == 1
            rule = CLAMP_RULES[node.op]
            return rule.format(a=ops["b"], b=ops["a"], g=g) if const_first else rule.format(**ops)
        rule = VJP_RULES[node.op][i]
        if rule is None:
            raise ValueError(f"no gradient flows to operand {i} of {node.op!r}")
        return rule.format(**ops)

    def _pow(self, node: Node, i: int, ops: dict) -> str:
        base, exponent = node.args
        g, a, b, z = ops["g"], ops["a"], ops["b"], ops["z"]
        if i == 1:  # torch: no gradient where the base is 0 and the exponent >= 0
            return f"tl.where(({a} == 0.0) & ({b} >= 0.0), 0.0, {g} * {z} * tl.log({a}))"
        if exponent.op == "const" and float(exponent.attrs[0]).is_integer() and 0 <= exponent.attrs[0] <= 5:
            n = int(exponent.attrs[0])
            if n == 0:
                return f"({g} * 0.0)"
            return f"({g} * {float(n)!r}" + "".join(f" * {a}" for _ in range(n - 1)) + ")"
        return f"tl.where({b} == 0.0, 0.0, {g} * {b} * tl.exp(({b} - 1.0) * tl.log({a})))"
