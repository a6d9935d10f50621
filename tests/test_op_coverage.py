"""Every IR op (psmc.ir.ops.OPS) has an entry in every table that gives ops a meaning or a
rendering, or a declared reason not to: builtins, the reference interpreter, the SymPy
semantics, the torch printer, the Triton printer and its VJP rules, and the commutative ops
of the rewrite pass and the monoid table. A new op missing from any of them fails here."""
import inspect
import re

import pytest

from psmc.analysis import monoids, symbolic
from psmc.codegen import torch_printer, triton_printer, triton_vjp
from psmc.ir import interp, rewrite
from psmc.ir.builtins import BUILTINS
from psmc.ir.ops import BINARY_OPERATORS, OPS

NON_LEAF = sorted(o for o, info in OPS.items() if info.kind != "leaf")
# lowered from syntax rather than from a builtin call: operators, unary minus, `not`,
# subscripts, `.T`/@, and the casts/broadcasts the lowering inserts to store a value
FROM_SYNTAX = set(BINARY_OPERATORS.values()) | {"neg", "not", "getitem", "cast", "broadcast"}


def test_every_op_is_reachable_from_the_language():
    reachable = {b.ir_op for b in BUILTINS.values() if b.ir_op} | FROM_SYNTAX
    assert set(NON_LEAF) <= reachable, sorted(set(NON_LEAF) - reachable)
    assert {b.ir_op for b in BUILTINS.values() if b.ir_op} <= set(OPS)


@pytest.mark.parametrize("op", NON_LEAF)
def test_the_interpreter_has_every_op(op):
    assert op in interp._UNARY or op in interp._BINARY or op in interp._REDUCE or op in interp._STRUCTURE \
        or op in ("where", "cast", "broadcast")


@pytest.mark.parametrize("op", NON_LEAF)
def test_the_symbolic_semantics_has_every_op(op):
    assert op in symbolic._UNARY or op in symbolic._BINARY or hasattr(symbolic._Evaluator, "op_" + op)


def _torch_printed() -> set:
    src = inspect.getsource(torch_printer.BodyPrinter.node)
    named = set(re.findall(r'op == "(\w+)"', src))
    for group in re.findall(r"op in \(([^)]*)\)", src):
        named |= set(re.findall(r'"(\w+)"', group))
    return named | set(torch_printer.UNARY) | set(torch_printer.INFIX) | set(torch_printer.REDUCE)


@pytest.mark.parametrize("op", NON_LEAF)
def test_the_torch_printer_has_every_op(op):
    assert op in _torch_printed()


def test_the_triton_printer_renders_or_says_why_and_has_a_gradient():
    assert set(triton_printer.TRITON_OPS) == set(OPS)
    for op, rendering in triton_printer.TRITON_OPS.items():
        if isinstance(rendering, triton_printer.Unsupported):
            assert rendering.reason
            continue
        if OPS[op].kind == "leaf":
            continue
        has_vjp = op in triton_vjp.VJP_RULES or op in triton_vjp.NO_GRADIENT or op == "pow"  # pow: _pow
        assert has_vjp, f"{op} renders in Triton but has no VJP rule and is not declared gradient-free"


def test_the_commutative_ops_agree():
    assert rewrite.COMMUTATIVE == monoids._COMMUTATIVE
    assert all(OPS[o].arity == 2 for o in rewrite.COMMUTATIVE)
