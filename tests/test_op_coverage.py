"""Every IR op (psmc.ir.ops.OPS) has an entry in every table that gives ops a meaning or a
rendering, or a declared reason not to: builtins, the reference interpreter, the SymPy
semantics, the torch printer, the Triton printer and its VJP rules, and the commutative ops
of the rewrite pass and the monoid table. A new op missing from any of them fails here."""
import inspect
import os
import re

import pytest

from psmc.analysis import monoids, symbolic
from psmc.codegen import cpp_printer, torch_printer, triton_matrix, triton_printer, triton_vjp
import torch

from psmc.ir import interp, registry, rewrite
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
        or op == "where"


@pytest.mark.parametrize("op", NON_LEAF)
def test_the_symbolic_semantics_has_every_op(op):
    assert op in symbolic._UNARY or op in symbolic._BINARY or op in symbolic.REDUCTION \
        or op in symbolic._STRUCTURE or op == "where"


def _torch_printed() -> set:
    src = inspect.getsource(torch_printer.BodyPrinter.node)
    named = set(re.findall(r'op == "(\w+)"', src))
    for group in re.findall(r"op in \(([^)]*)\)", src):
        named |= set(re.findall(r'"(\w+)"', group))
    return named | set(torch_printer.UNARY) | set(torch_printer.BINARY) | set(torch_printer.REDUCE) \
        | set(torch_printer.OPERATORS) | set(torch_printer.STRUCTURE)


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


ELEMENTWISE_KINDS = ("unary", "binary", "compare", "logical", "select")


@pytest.mark.parametrize("op", sorted(o for o, info in OPS.items() if info.kind in ELEMENTWISE_KINDS))
def test_the_cpp_printer_renders_every_elementwise_op_with_a_gradient(op):
    """The C++ kernels are sequential loops over elements: every elementwise op has a C++
    rendering, and a VJP rule or a declaration that no gradient flows."""
    assert op in cpp_printer.CPP_OPS
    assert (op in cpp_printer.VJP_RULES) != (op in cpp_printer.NO_GRADIENT) or op == "pow", op  # pow: its own rule


def test_the_cpp_printer_says_why_for_the_rest():
    """Reductions, views, casts and the matrix products have their own code in the C++ printer;
    every other op is a registry row whose `cpp` entry is an `Unsupported` reason, which
    `unsupported_reason` reports (the torch backend serves the op)."""
    handled = set(cpp_printer.CPP_OPS) | cpp_printer.REDUCTIONS | cpp_printer.LEAVES \
        | set(cpp_printer.EXPRESSIONS) | set(cpp_printer.CONTRACTIONS)
    rest = sorted(set(OPS) - handled)
    assert rest == sorted(r.name for r in registry.STRUCTURE_OPS if isinstance(r.cpp, registry.Unsupported)), rest
    assert {"attention", "concat", "diag", "eye", "layernorm", "reshape", "softmax", "transpose"} <= set(rest)
    from psmc.compiler import compile_source
    src = ("op t[D] {{ state (h: f32[D]); lift (x: f32[D]) {{ return {}; }} "
           "combine (l, r) {{ return l.h + r.h; }} }}")
    compiled = compile_source(src.format("softmax(x)"), "t.psm")
    reason = cpp_printer.unsupported_reason(compiled.ops[0], compiled.plans["t"])
    assert reason == "uses 'softmax': no C++ rendering; the torch backend serves it", reason


REGISTERED = [("operator", row.name) for row in registry.UNARY_OPERATORS] \
    + [("reduction", row.name) for row in registry.REDUCTIONS]


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_every_registered_operator_and_reduction_reaches_every_renderer(kind, name):
    """The rows of psmc.ir.registry for `-x`, `not c` and the reductions: each renderer's
    table is the row's entry, or the printer names the rule it writes instead."""
    row = (registry.UNARY_OPERATOR if kind == "operator" else registry.REDUCTION)[name]
    assert OPS[name].kind == (row.kind if kind == "operator" else "reduce")
    assert row.torch and row.triton and row.cpp  # every renderer has a rendering
    if kind == "operator":
        assert interp._UNARY[name] is getattr(torch, row.interp.removeprefix("torch."))
        assert symbolic._UNARY[name] is row.sympy
        assert torch_printer.OPERATORS[name] == row.torch
        assert triton_printer.TRITON_OPS[name] == row.triton and cpp_printer.CPP_OPS[name] == row.cpp
        if row.vjp is None:  # a bool result: declared gradient-free in both printers
            assert row.cpp_vjp is None and name in triton_vjp.NO_GRADIENT and name in cpp_printer.NO_GRADIENT
        else:
            assert triton_vjp.VJP_RULES[name] == (row.vjp,) and cpp_printer.VJP_RULES[name] == (row.cpp_vjp,)
        return
    assert BUILTINS[name].ir_op == name and BUILTINS[name].dtype == row.dtype and BUILTINS[name].doc == row.doc
    assert interp._REDUCE[name] is getattr(torch, row.interp.removeprefix("torch."))
    assert torch_printer.REDUCE[name] == row.torch and triton_printer.REDUCE_PAD[name] == row.pad
    assert triton_printer.TRITON_OPS[name] == "special"  # TritonBodyPrinter.reduce formats row.triton
    assert name in cpp_printer.REDUCTIONS  # the C++ contraction formats row.cpp
    if row.vjp == "ties":  # amax/amin: each printer's own tie-sharing rule
        assert row.cpp_vjp == "ties" and cpp_printer.VJP_RULES[name] == "ties"
        assert "tl.sum(tl.where(({a} == {z})" in triton_vjp.VJP_RULES[name][0]
    else:
        assert triton_vjp.VJP_RULES[name] == (row.vjp,) and cpp_printer.VJP_RULES[name] == (row.cpp_vjp,)


def test_the_where_row_reaches_every_renderer():
    row = registry.SELECT
    assert OPS[row.name].kind == "select" and BUILTINS[row.name].doc == row.doc and BUILTINS[row.name].ir_op == row.name
    assert interp._WHERE is torch.where and symbolic.SELECT is row
    assert row.torch == registry.SPECIAL and 'op == "where"' in inspect.getsource(torch_printer.BodyPrinter.node)
    assert triton_printer.TRITON_OPS[row.name] == row.triton and triton_vjp.VJP_RULES[row.name] == row.vjp
    assert cpp_printer.CPP_OPS[row.name] == row.cpp and cpp_printer.VJP_RULES[row.name] == row.cpp_vjp
    assert row.vjp[0] is None and row.cpp_vjp[0] is None  # no gradient to the bool condition


@pytest.mark.parametrize("name", sorted(registry.STRUCTURE))
def test_every_structure_row_reaches_every_renderer(name):
    """The rows of psmc.ir.registry for cast, broadcast, eye and the structure and layer ops:
    each table holds the rule the row names (a function of that stage's own module), or the
    row's `Unsupported` reason, and a renderer that renders the op has its VJP."""
    row = registry.STRUCTURE[name]
    info = OPS[name]
    assert (info.kind, info.arity, info.elementwise) == (row.kind, row.arity, row.elementwise)
    if row.call is not None:  # a builtin: its BUILTINS row comes from the registry's
        b = BUILTINS[name]
        assert (b.min_args, b.max_args, b.shape, b.dtype, b.doc, b.args) == \
            (row.call.min_args, row.call.max_args, row.call.shape, row.call.dtype, row.call.doc, row.call.args)
        assert b.kwargs == dict(row.call.kwargs) and b.ir_op == (name if row.call.lowers_to_op else None)
    else:  # only syntax produces it (`x[...]`, `a @ b`, a store that casts or broadcasts)
        assert row.syntax and name in FROM_SYNTAX and name not in BUILTINS
    assert (name in BINARY_OPERATORS.values()) == (row.operator is not None)
    assert interp._STRUCTURE[name] is interp.RULES[row.interp]
    assert symbolic._STRUCTURE[name] is getattr(symbolic._Evaluator, "op_" + row.sympy)
    if "{" in row.torch:  # a template over the operands' names
        assert torch_printer.STRUCTURE[name].__qualname__.startswith("_structure_rule")
        row.torch.format(*("x" for _ in range(max(row.arity, 1))))  # (fills without an IndexError)
    else:
        assert torch_printer.STRUCTURE[name] is getattr(torch_printer.BodyPrinter, "torch_" + row.torch)
    if isinstance(row.triton, registry.Unsupported):
        assert triton_printer.TRITON_OPS[name] is row.triton and row.triton.reason and row.vjp is None
        assert name not in triton_vjp.VJP_RULES and name not in triton_printer.RULES
    else:
        assert triton_printer.TRITON_OPS[name] == "special" and triton_vjp.VJP_RULES[name] == row.vjp
        if row.tile == "matrix":
            assert triton_matrix.MATRIX_RULES[name] is getattr(triton_matrix.MatrixBodyPrinter, "matrix_" + row.triton)
            assert name in triton_printer.MATRIX_ONLY and name not in triton_printer.RULES
        else:
            assert triton_printer.RULES[name] is getattr(triton_printer.TritonBodyPrinter, "triton_" + row.triton)
            assert name not in triton_printer.MATRIX_ONLY
    if isinstance(row.cpp, registry.Unsupported):
        assert row.cpp.reason and row.cpp_vjp is None and name not in cpp_printer.VJP_RULES
        assert name not in cpp_printer.EXPRESSIONS and name not in cpp_printer.CONTRACTIONS
    else:  # an expression or an accumulation, never both
        assert (name in cpp_printer.EXPRESSIONS) != (name in cpp_printer.CONTRACTIONS)
        assert cpp_printer.VJP_RULES[name] == row.cpp_vjp
        assert (name in cpp_printer.MATRIX_ONLY) == (row.tile == "matrix")
    for vjp in (row.vjp, row.cpp_vjp):
        assert vjp is None or len(vjp) == (2 if row.arity == -1 and name in ("matmul", "outer") else
                                           max(row.arity, 1)), (name, vjp)


def _rule_names(cls, prefix):
    return {n.removeprefix(prefix) for n in vars(cls) if n.startswith(prefix)}


def test_every_rule_is_named_by_a_row():
    """No stage keeps a structure rule that no registry row names (a dead or misspelt rule)."""
    rows = registry.STRUCTURE_OPS
    assert set(interp.RULES) == {r.interp for r in rows}
    assert _rule_names(symbolic._Evaluator, "op_") == {r.sympy for r in rows} | {"where"}  # where: SELECT
    assert _rule_names(torch_printer.BodyPrinter, "torch_") == {r.torch for r in rows if "{" not in r.torch}
    triton_rules = {r.triton for r in rows if isinstance(r.triton, str)}
    assert _rule_names(triton_printer.TritonBodyPrinter, "triton_") \
        | _rule_names(triton_matrix.MatrixBodyPrinter, "matrix_") == triton_rules
    assert _rule_names(cpp_printer.CppBody, "cpp_") | _rule_names(cpp_printer.CppBody, "contract_") \
        == {r.cpp for r in rows if isinstance(r.cpp, str)}


def test_unsupported_reasons_come_from_the_rows():
    """`unsupported_reason` of both kernel printers quotes the row's reason for the op."""
    from psmc.compiler import compile_source
    src = ("op t[D] {{ state (h: f32[D, D]); lift (x: f32[D], y: f32[D, D]) {{ return {}; }} "
           "combine (l, r) {{ return l.h + r.h; }} }}")
    for call, op in (("diag(x)", "diag"), ("transpose(y)", "transpose"), ("eye(D) * x", "eye")):
        compiled = compile_source(src.format(call), "t.psm")
        row = registry.STRUCTURE[op]
        reason = cpp_printer.unsupported_reason(compiled.ops[0], compiled.plans["t"])
        assert reason == f"uses {op!r}: {row.cpp.reason}", reason
        reason = triton_printer.unsupported_reason(compiled.ops[0], {"plan": "exact-scan"})
        assert reason == f"uses {op!r}: {row.triton.reason}", reason


def test_both_kernel_printers_make_the_same_first_checks():
    """Triton and C++ share `scan_reason` (psmc.codegen.triton_layout): the same words for a
    tree-scan plan, a non-elementwise combine, and an op neither renders."""
    from psmc.ir import ops_from_source
    op = ops_from_source("op t[D] { state (h: f32[D]); lift (x: f32[D]) { return softmax(x); } "
                         "combine (l, r) { return l.h + r.h; } }")[0]
    for plan, words in (({"plan": "tree-scan"}, "tree-scan plan: a scan kernel needs an associative combine"),
                        ({"plan": "exact-scan", "structure": "affine"}, "combine structure is 'affine'"),
                        ({"plan": "exact-scan"}, "uses 'softmax': ")):
        reasons = {triton_printer.unsupported_reason(op, plan), cpp_printer.unsupported_reason(op, plan)}
        assert all(r.startswith(words) for r in reasons), reasons


LEAF_NODES = {  # one node per leaf row, with the environment entry of the bound ones
    "arg": (("x",), ("arg", "x")), "field": (("left", "h"), ("field", "left", "h")), "param": (("p",), ("param", "p")),
    "dim": (("D",), None), "const": ((2.0,), None), "index": ((), ("index",)), "fill": ((1.0,), None),
}


@pytest.mark.parametrize("name", sorted(registry.LEAF))
def test_every_leaf_row_is_bound_by_every_stage(name):
    """The leaf rows of psmc.ir.registry: OPS and the leaf sets derive from them, and every
    stage binds each one (a value in the interpreter and in SymPy, a name or a statement in
    the torch, Triton and C++ printers)."""
    from psmc.analysis.grid import Grid
    from psmc.ir.nodes import BATCHED_LEAVES, Node, dim_symbol
    row = registry.LEAF[name]
    assert OPS[name].kind == "leaf" and OPS[name].arity == 0
    assert (name in BATCHED_LEAVES) == row.batched and (name in torch_printer.WEAK_LEAVES) == row.weak
    assert name in cpp_printer.LEAVES and name in triton_vjp.LEAVES and triton_printer.TRITON_OPS[name] == "special"
    attrs, key = LEAF_NODES[name]
    shape = ("D",) if name == "fill" else ()
    node = Node(name, (), attrs, "f32", tuple(dim_symbol(d) for d in shape))
    dims = {"D": 3}
    value = interp._leaf(node, {key: torch.tensor(0.5)} if key else {}, dims)
    assert tuple(value.shape) == ((3,) if shape else ())
    grid = symbolic._Evaluator({key: Grid((), (symbolic.number(0.5),))} if key else {}, dims, None).leaf(node)
    assert grid.shape == tuple(value.shape) and all(float(v) == float(w) for v, w in zip(grid.items, value.flatten()))
    printer = torch_printer.BodyPrinter((node,))
    printer.run()
    assert printer.names[node]
    triton = triton_printer.TritonBodyPrinter((node,), "t")
    triton.run()
    assert triton.names[node]
    cpp = cpp_printer.CppBody(None, (node,), "c")
    cpp.run()
    assert cpp.names[node]


def test_the_analysis_tables_derive_from_the_rows():
    """The structure analysis's degree table, the laws' heavy ops and the split's positional
    leaves are row attributes; each degree rule a row names is implemented, and each behaves as
    its name says on a small combine."""
    from psmc.analysis import laws, split, structure
    from psmc.ir import ops_from_source
    every = registry.rows()
    assert sorted(r.name for r in every) == sorted(OPS)  # one row per op
    named = {r.degree for r in every if getattr(r, "degree", None)}
    assert named == set(registry.DEGREES) == set(structure.DEGREE_RULES)
    assert laws._HEAVY == {r.name for r in every if getattr(r, "heavy", False)}
    assert split._POSITIONAL == {r.name for r in registry.LEAF_OPS if r.positional}
    src = "op t[D] {{ state (h: f32[D]); lift (x: f32[D]) {{ return x; }} combine (l, r) {{ return {}; }} }}"
    for body, want in (("-l.h + r.h", 1), ("l.h * l.h", 2), ("l.h / (r.h + 1.0)", 1), ("r.h / l.h", structure.INFINITE),
                       ("where(r.h > 0.0, l.h, r.h)", 1), ("where(l.h > 0.0, l.h, r.h)", structure.INFINITE),
                       ("exp(l.h)", structure.INFINITE), ("exp(r.h)", 0)):
        op = ops_from_source(src.format(body))[0]
        assert structure.degree_in_left(op.combine[0]) == want, body


def test_every_runtime_function_the_torch_rendering_calls_exists():
    """The torch renderings (the rows' strings and the printer's rules) call `_ops.<fn>`
    (psmc.runtime.ops), `torch.<fn>` and `_F.<fn>` (torch.nn.functional): each one exists."""
    import torch.nn.functional as F
    from psmc.runtime import ops as runtime_ops
    rows = "\n".join(str(getattr(r, "torch", "")) for r in registry.rows())  # 'torch.exp', '_ops.maximum({0}, {1})'
    found = set(re.findall(r"\b(_ops|torch|_F)\.(\w+)\(", inspect.getsource(torch_printer))) \
        | set(re.findall(r"\b(_ops|torch|_F)\.(\w+)", rows))
    assert ("torch", "exp") in found and ("_F", "softplus") in found
    assert {fn for m, fn in found if m == "_ops"} >= {"matmul", "outer", "concat", "eye", "where", "cast"}
    where = {"_ops": runtime_ops, "torch": torch, "_F": F}
    missing = sorted(f"{m}.{fn}" for m, fn in found if not hasattr(where[m], fn))
    assert not missing, missing


def test_reduction_rows_evaluate_like_torch():
    """The row's SymPy fold and its reference function agree on a concrete vector."""
    import sympy
    values = [1, -2, 3, 0.5]
    x = torch.tensor(values, dtype=torch.float64)
    for row in registry.REDUCTIONS:
        class Ev:  # numbers only: comparisons by arithmetic
            max = staticmethod(lambda a, b: a if a >= b else b)
            min = staticmethod(lambda a, b: a if a <= b else b)
        exact = row.sympy(Ev, [sympy.Rational(str(v)) for v in values])
        assert abs(float(exact) - float(interp._REDUCE[row.name](x, 0))) < 1e-12, row.name


def test_the_commutative_ops_agree():
    assert rewrite.COMMUTATIVE == monoids._COMMUTATIVE
    assert all(OPS[o].arity == 2 for o in rewrite.COMMUTATIVE)


NEW_ROW = '''
UNARY_MATH = UNARY_MATH + (
    UnaryMath("cos", "cosine", "float", "torch.cos", lambda ev, x: sympy.cos(x), "torch.cos", "tl.cos({0})",
              "(-{g} * tl.sin({a}))", "std::cos({a})", "(-{g} * std::sin({a}))"),
)
UNARY = {row.name: row for row in UNARY_MATH}
'''

CHECK = '''
import torch
from psmc.analysis import symbolic
from psmc.codegen import cpp_printer, torch_printer, triton_printer, triton_vjp
from psmc.compiler import compile_source
from psmc.ir import interp
from psmc.ir.builtins import BUILTINS
from psmc.ir.ops import OPS
assert OPS["cos"].kind == "unary" and BUILTINS["cos"].doc == "cosine"
assert "cos" in interp._UNARY and "cos" in symbolic._UNARY and torch_printer.UNARY["cos"] == "torch.cos"
assert triton_printer.TRITON_OPS["cos"] == "tl.cos({0})" and triton_vjp.VJP_RULES["cos"] == ("(-{g} * tl.sin({a}))",)
src = "op c[D] { state (h: f32[D]); lift (x: f32[D]) { return cos(x); } combine (l, r) { return l.h + r.h; } }"
assert cpp_printer.CPP_OPS["cos"] == "std::cos({a})" and cpp_printer.VJP_RULES["cos"] == ("(-{g} * std::sin({a}))",)
generated = compile_source(src, "c.psm").source
assert "tl.cos(" in generated and "std::cos(" in generated  # the Triton and C++ kernels use the row
open("c.psm", "w").write(src)
import psmc
x = torch.randn(2, 5, 3, dtype=torch.float64)
out = psmc.load("c.psm").c(backend="torch")(x=x)
assert torch.allclose(out, torch.cos(x).cumsum(1))
print("cos works")
'''


# a structure op: its row, plus the rules it names in the stages that render it (inserted just
# before each stage derives its table from the rows)
FLIP_ROW = '''
STRUCTURE_OPS = STRUCTURE_OPS + (
    Structure("flip", "structure", 1, Call(1, 1, "same", "same", "reverse the last axis"), "",
              "flip", "flip", "{0}.flip(-1)", Unsupported("not generated for Triton yet; the torch backend serves it"),
              None, Unsupported("no C++ rendering; the torch backend serves it"), None),
)
STRUCTURE = {row.name: row for row in STRUCTURE_OPS}
'''
FLIP_RULES = {
    "ir/interp.py": ("_STRUCTURE = {row.name: RULES[row.interp]",
                     'RULES["flip"] = lambda n, a, d: a[0].flip(-1)\n'),
    "analysis/symbolic.py": ("_STRUCTURE = {row.name: getattr(_Evaluator",
                             "_Evaluator.op_flip = lambda self, node, args: Grid.build(\n"
                             "    args[0].shape, lambda i: args[0][i[:-1] + (args[0].shape[-1] - 1 - i[-1],)])\n"),
}

FLIP_CHECK = '''
import torch
import psmc
from psmc.compiler import compile_source
from psmc.analysis import symbolic
from psmc.ir import interp
from psmc.ir.builtins import BUILTINS
from psmc.ir.ops import OPS
assert OPS["flip"].kind == "structure" and BUILTINS["flip"].ir_op == "flip" and "flip" in symbolic._STRUCTURE
src = ("op f[D] { state (h: f32[D]); lift (x: f32[D]) { return flip(x * 2.0); } "
       "combine (l, r) { return l.h + r.h; } }")
compiled = compile_source(src, "f.psm")
assert ".flip(-1)" in compiled.source
open("f.psm", "w").write(src)
x = torch.randn(2, 5, 3, dtype=torch.float64)
layer = psmc.load("f.psm").f(backend="torch")
assert torch.allclose(layer(x=x), (2 * x).flip(-1).cumsum(1))
import sympy
from psmc.analysis.grid import Grid
lift, dims = compiled.ops[0].lift, {"D": 3}  # the reference and the SymPy rules agree
ref = interp.evaluate(lift, {("arg", "x"): torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}, dims)[0]
exact = symbolic.evaluate(lift, {("arg", "x"): Grid((3,), tuple(map(sympy.Integer, (1, 2, 3))))}, dims)[0]
assert [float(v) for v in exact.items] == ref.tolist() == [6.0, 4.0, 2.0], (exact, ref)
from psmc.compiler import codegen_notes
notes = codegen_notes(compiled.ops[0], compiled.plans["f"])
assert "not generated for Triton yet" in str(notes["triton"]) and "uses 'flip': no C++" in str(notes["cpu"]), notes
print("flip works")
'''


def test_adding_a_math_builtin_is_one_edit_and_a_structure_op_its_row_and_rules(tmp_path):
    """Copy the package (once, both checks share it: a copy and a fresh interpreter cost seconds)
    and
    - add ONE row to psmc/ir/registry.py: `cos` works everywhere: builtin, IR op, interpreter,
      SymPy, torch, Triton and C++ printers, their VJPs, a running layer;
    - add a `flip` Structure row (its torch rendering a template in the row; Triton and C++
      declare why they cannot) and the two rules it names (interpreter, SymPy): three edits;
      `flip` is a builtin and an IR op, a
      layer that calls it runs on the torch backend, and `psmc check` gives the rows' reasons."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "psmc", tmp_path / "psmc", ignore=shutil.ignore_patterns("__pycache__"))
    registry_py = tmp_path / "psmc" / "ir" / "registry.py"
    registry_py.write_text(registry_py.read_text() + NEW_ROW + FLIP_ROW)
    for path, (marker, rule) in FLIP_RULES.items():
        module = tmp_path / "psmc" / path
        text = module.read_text()
        assert text.count(marker) == 1, (path, marker)
        module.write_text(text.replace(marker, rule + marker))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PSMC_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", CHECK + FLIP_CHECK], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "cos works" in run.stdout and "flip works" in run.stdout, run.stderr[-3000:]
