"""The elementwise ops, each declared ONCE with everything every stage needs: the math
builtins (`UNARY_MATH`) and the binary operators, comparisons, `and`/`or` and `max`/`min`
(`BINARY_OPS`, further down).

A row gives: the name (the builtin and the IR op are the same word), its doc line, its dtype
rule, its reference semantics (the torch function the interpreter applies, in float64), its
symbolic semantics (a SymPy expression; `ev.sign(x, y)` decides comparisons), its torch
rendering (the function the generated module calls), its Triton rendering (a format string
over the operand `{0}`) and its Triton VJP (over the upstream gradient `{g}`, the operand `{a}`
and the result `{z}`; None: piecewise constant, no gradient), and the same two in C++.

The tables of the other stages are derived from these rows: `OPS` (psmc.ir.ops), `BUILTINS`
(psmc.ir.builtins), the interpreter (psmc.ir.interp), the SymPy semantics
(psmc.analysis.symbolic), the torch printer (psmc.codegen.torch_printer), the Triton printer
and its VJP rules (psmc.codegen.triton_printer, triton_vjp), the C++ printer and its VJP rules
(psmc.codegen.cpp_printer). Adding an elementwise builtin is
one edit: a row here (plus its tests; tests/test_op_coverage.py checks every table has it);
so is a binary operator, save its spelling in the grammar when it is a new operator.

The unary operators `-x`, `not c` (`UNARY_OPERATORS`) and the reductions (`REDUCTIONS`) are
rows too, read the same way by every stage (tests/test_op_coverage.py checks each row reaches
every renderer). So are `cast`, `broadcast`, `eye` and the structure and layer ops
(`STRUCTURE_OPS`), whose renderings depend on each printer's tile model: their rows name a rule
of each stage's own module (or give an `Unsupported` reason), see `Structure`; and so are the
leaves (`LEAF_OPS`). Every op of `OPS` is a row of this module.

This module holds data only (strings, SymPy lambdas and rule names) and imports no other stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy


@dataclass(frozen=True)
class UnaryMath:
    name: str
    doc: str
    dtype: str  # 'float': ints and bools become f32 | 'same'
    interp: str  # the reference function: 'torch.<fn>' or 'F.<fn>' (torch.nn.functional), float64
    sympy: Callable  # (ev, x) -> SymPy value
    torch: str  # the function the generated module calls (`torch.` / `_F.` = torch.nn.functional)
    triton: str  # format string over {0}
    vjp: str | None  # format string over {g}, {a}, {z}; None: no gradient flows
    cpp: str  # the C++ rendering (psmc.codegen.cpp_printer) over {a}, in the kernel's `scalar_t`
    cpp_vjp: str | None  # its adjoint over {g}, {a}, {z}, in C++; None exactly when `vjp` is None
    heavy: bool = False  # exact (SymPy) evaluation builds huge closed forms (psmc.analysis.laws)


def _sigmoid(x):
    return 1 / (1 + sympy.exp(-x))


# tanh in Triton: 2 sigmoid(2x) - 1 loses the relative precision of small x (tanh(1e-5) came out
# 1% off, and a comparison like tanh(e) <= e flipped); below |x| = 1/8 the Taylor series to x^7
# is exact to float32 (the next term is 4e-9 of x)
TRITON_TANH = ("tl.where({0} * {0} < 0.015625, {0} * (1.0 + {0} * {0} * (-0.3333333333333333 + {0} * {0} * "
               "(0.13333333333333333 - 0.05396825396825397 * {0} * {0}))), 2.0 * tl.sigmoid(2.0 * {0}) - 1.0)")

UNARY_MATH: tuple[UnaryMath, ...] = (
    UnaryMath("exp", "e ** x", "float", "torch.exp", lambda ev, x: sympy.exp(x), "torch.exp", "tl.exp({0})",
              "({g} * {z})",
              "psm_exp({a})",
              "({g} * {z})"),
    UnaryMath("log", "natural logarithm", "float", "torch.log", lambda ev, x: sympy.log(x), "torch.log",
              "tl.log({0})", "({g} / {a})",
              "std::log({a})",
              "({g} / {a})"),
    UnaryMath("sqrt", "square root", "float", "torch.sqrt", lambda ev, x: sympy.sqrt(x), "torch.sqrt",
              "tl.sqrt({0})", "({g} / (2.0 * {z}))",
              "std::sqrt({a})",
              "({g} / (scalar_t(2) * {z}))"),
    UnaryMath("rsqrt", "1 / sqrt(x)", "float", "torch.rsqrt", lambda ev, x: 1 / sympy.sqrt(x), "torch.rsqrt",
              "tl.rsqrt({0})", "({g} * -0.5 * {z} / {a})",
              "(scalar_t(1) / std::sqrt({a}))",
              "({g} * scalar_t(-0.5) * {z} / {a})"),
    UnaryMath("abs", "absolute value", "same", "torch.abs", lambda ev, x: x if ev.sign(x, 0) >= 0 else -x,
              "torch.abs", "tl.abs({0})", "({g} * tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, 0.0)))",
              "std::abs({a})",
              "({g} * psm_sign({a}))"),
    UnaryMath("sign", "-1, 0 or 1", "same", "torch.sign", lambda ev, x: sympy.Integer(ev.sign(x, 0)), "torch.sign",
              "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, {0} * 0.0))", None,
              "psm_sign({a})",
              None),
    UnaryMath("sigmoid", "1 / (1 + exp(-x))", "float", "torch.sigmoid", lambda ev, x: _sigmoid(x), "torch.sigmoid",
              "tl.sigmoid({0})", "({g} * {z} * (1.0 - {z}))",
              "psm_sigmoid({a})",
              "({g} * {z} * (scalar_t(1) - {z}))"),
    UnaryMath("tanh", "hyperbolic tangent", "float", "torch.tanh", lambda ev, x: sympy.tanh(x), "torch.tanh",
              TRITON_TANH, "({g} * (1.0 - {z} * {z}))",
              "std::tanh({a})",
              "({g} * (scalar_t(1) - {z} * {z}))"),
    # torch's softplus (beta 1, threshold 20)
    UnaryMath("softplus", "log(1 + exp(x))", "float", "F.softplus", lambda ev, x: sympy.log(1 + sympy.exp(x)),
              "_F.softplus", "tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp(tl.minimum({0}, 20.0))))",
              "tl.where({a} > 20.0, {g}, {g} * tl.sigmoid({a}))",
              "psm_softplus({a})",
              "({a} > scalar_t(20) ? {g} : {g} * psm_sigmoid({a}))"),
    UnaryMath("relu", "max(x, 0)", "same", "torch.relu", lambda ev, x: x if ev.sign(x, 0) > 0 else sympy.Integer(0),
              "torch.relu", "tl.maximum({0}, 0.0)", "tl.where({a} > 0.0, {g}, 0.0)",
              "psm_relu({a})",
              "({a} > scalar_t(0) ? {g} : scalar_t(0))"),
    # torch's exact (erf) gelu
    UnaryMath("gelu", "Gaussian error linear unit (erf form)", "float", "F.gelu",
              lambda ev, x: x / 2 * (1 + sympy.erf(x / sympy.sqrt(2))), "_F.gelu",
              "(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))",
              "({g} * (0.5 * (1.0 + tl.erf({a} * 0.7071067811865476)) + "
              "{a} * tl.exp(-0.5 * {a} * {a}) * 0.3989422804014327))",
              "(scalar_t(0.5) * {a} * (scalar_t(1) + std::erf({a} * scalar_t(0.7071067811865476))))",
              "({g} * (scalar_t(0.5) * (scalar_t(1) + std::erf({a} * scalar_t(0.7071067811865476))) + "
              "{a} * std::exp(scalar_t(-0.5) * {a} * {a}) * scalar_t(0.3989422804014327)))", heavy=True),
    UnaryMath("silu", "x * sigmoid(x)", "float", "F.silu", lambda ev, x: x * _sigmoid(x), "_F.silu",
              "({0} * tl.sigmoid({0}))", "({g} * tl.sigmoid({a}) * (1.0 + {a} * (1.0 - tl.sigmoid({a}))))",
              "({a} * psm_sigmoid({a}))",
              "({g} * psm_sigmoid({a}) * (scalar_t(1) + {a} * (scalar_t(1) - psm_sigmoid({a}))))"),
    UnaryMath("logsigmoid", "log(sigmoid(x))", "float", "F.logsigmoid",
              lambda ev, x: -sympy.log(1 + sympy.exp(-x)), "_F.logsigmoid",
              "(tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0}))))", "({g} * tl.sigmoid(-{a}))",
              "psm_logsigmoid({a})",
              "({g} * psm_sigmoid(-{a}))"),
)

UNARY: dict[str, UnaryMath] = {row.name: row for row in UNARY_MATH}


# ------------------------------------------------------------------ binary operators
SPECIAL = "special"  # a rendering a printer writes by a rule of its own (named in the printer)


def _both_bools(fn):
    """A logical op in SymPy: decided only when both operands are concrete bools."""
    def op(ev, x, y):
        if not (isinstance(x, bool) and isinstance(y, bool)):
            ev.undecidable("symbolic bool")
        return fn(x, y)
    return op


def _equal(ev, x, y):
    if isinstance(x, bool) or isinstance(y, bool):
        return x == y
    return ev.sign(x, y) == 0


@dataclass(frozen=True)
class BinaryOp:
    """An elementwise op of two operands (broadcast like NumPy), declared once.

    `kind` is the OPS kind (binary: the promoted dtype; compare: a bool result; logical: bools
    in and out); `spelling` is how the language writes it (an operator of the expression
    grammar, or a builtin's name); renderings are format strings over the operands `{0}`, `{1}`
    (torch, Triton) or `{a}`, `{b}` (C++); VJPs give one rendering per operand over `{g}` (the
    result's adjoint), `{a}`, `{b}` and `{z}` (the result), None when no gradient flows."""
    name: str
    kind: str
    spelling: str
    commutative: bool
    interp: str  # the reference function ('torch.add'), on operands in the node's dtype
    sympy: Callable  # (ev, x, y) -> SymPy value or bool
    torch: str
    triton: str
    vjp: tuple | None
    cpp: str
    cpp_vjp: tuple | None
    doc: str = ""  # for the rows spelled as builtins (psmc.ir.builtins)
    degree: str | None = None  # how its degree in the left operand follows its operands' (DEGREES)
    float_result: bool = False  # ints promote to a float (true division, logaddexp)

    @property
    def operator(self) -> bool:
        """True when the language spells it as an infix operator, False for a builtin call."""
        return not self.spelling.isidentifier() or self.spelling in ("and", "or")


_MAX_VJP = ("tl.where({a} == {b}, 0.5 * {g}, tl.where({a} > {b}, {g}, 0.0))",
            "tl.where({a} == {b}, 0.5 * {g}, tl.where({b} > {a}, {g}, 0.0))")
_MIN_VJP = ("tl.where({a} == {b}, 0.5 * {g}, tl.where({a} < {b}, {g}, 0.0))",
            "tl.where({a} == {b}, 0.5 * {g}, tl.where({b} < {a}, {g}, 0.0))")
_CPP_MAX_VJP = ("({a} == {b} ? scalar_t(0.5) * {g} : ({a} > {b} ? {g} : scalar_t(0)))",
                "({a} == {b} ? scalar_t(0.5) * {g} : ({b} > {a} ? {g} : scalar_t(0)))")
_CPP_MIN_VJP = ("({a} == {b} ? scalar_t(0.5) * {g} : ({a} < {b} ? {g} : scalar_t(0)))",
                "({a} == {b} ? scalar_t(0.5) * {g} : ({b} < {a} ? {g} : scalar_t(0)))")


_LOGADDEXP = ("tl.where({0} == {1}, {0} + 0.6931471805599453, "
              "tl.maximum({0}, {1}) + tl.log(1.0 + tl.exp(-tl.abs({0} - {1}))))")
_LOGADDEXP_VJP = ("tl.where({a} == {b}, 0.5 * {g}, {g} * tl.exp({a} - {z}))",
                  "tl.where({a} == {b}, 0.5 * {g}, {g} * tl.exp({b} - {z}))")
_CPP_LOGADDEXP_VJP = ("({a} == {b} ? scalar_t(0.5) * {g} : {g} * psm_exp({a} - {z}))",
                      "({a} == {b} ? scalar_t(0.5) * {g} : {g} * psm_exp({b} - {z}))")


def _compare(name, spelling, commutative, test):
    return BinaryOp(name, "compare", spelling, commutative, f"torch.{name}", test, f"{{0}} {spelling} {{1}}",
                    f"({{0}} {spelling} {{1}})", None, f"({{a}} {spelling} {{b}})", None)


BINARY_OPS: tuple[BinaryOp, ...] = (
    BinaryOp("add", "binary", "+", True, "torch.add", lambda ev, x, y: x + y, "{0} + {1}", "({0} + {1})",
             ("{g}", "{g}"), "({a} + {b})", ("{g}", "{g}"), degree="linear"),
    BinaryOp("sub", "binary", "-", False, "torch.sub", lambda ev, x, y: x - y, "{0} - {1}", "({0} - {1})",
             ("{g}", "(-{g})"), "({a} - {b})", ("{g}", "(-{g})"), degree="linear"),
    BinaryOp("mul", "binary", "*", True, "torch.mul", lambda ev, x, y: x * y, "{0} * {1}", "({0} * {1})",
             ("({g} * {b})", "({g} * {a})"), "({a} * {b})", ("({g} * {b})", "({g} * {a})"), degree="product"),
    # true division, ints promote to a float (as torch and Triton's `/`)
    BinaryOp("div", "binary", "/", False, "torch.true_divide", lambda ev, x, y: x / y, "{0} / {1}",
             "({0} / {1})", ("({g} / {b})", "(-{g} * {z} / {b})"), "({a} / {b})",
             ("({g} / {b})", "(-{g} * {z} / {b})"), degree="quotient", float_result=True),
    # Triton and C++ write pow and its VJP by rules of their own (small integer exponents unrolled)
    BinaryOp("pow", "binary", "**", False, "torch.pow", lambda ev, x, y: sympy.Pow(x, y), "{0} ** {1}", SPECIAL,
             SPECIAL, "std::pow({a}, {b})", SPECIAL),
    BinaryOp("maximum", "binary", "max", True, "torch.maximum", lambda ev, x, y: ev.max(x, y),
             "_ops.maximum({0}, {1})", "tl.maximum({0}, {1})", _MAX_VJP, "psm_max({a}, {b})", _CPP_MAX_VJP,
             "elementwise maximum"),
    BinaryOp("minimum", "binary", "min", True, "torch.minimum", lambda ev, x, y: ev.min(x, y),
             "_ops.minimum({0}, {1})", "tl.minimum({0}, {1})", _MIN_VJP, "psm_min({a}, {b})", _CPP_MIN_VJP,
             "elementwise minimum"),
    # log(e^a + e^b) without overflow: the larger operand plus log1p(e^-|a - b|); equal operands
    # (both -inf or both +inf too, where a - b is NaN) give a + log 2. The naive spelling
    # `log(exp(a) + exp(b))` is rewritten to it (psmc.ir.rewrite), since it overflows from
    # about 88 in fp32. Each operand's gradient is its softmax weight e^(x - z), one half each at a tie.
    BinaryOp("logaddexp", "binary", "logaddexp", True, "torch.logaddexp",
             lambda ev, x, y: sympy.log(sympy.exp(x) + sympy.exp(y)), "_ops.logaddexp({0}, {1})",
             _LOGADDEXP, _LOGADDEXP_VJP, "psm_logaddexp({a}, {b})", _CPP_LOGADDEXP_VJP,
             "log(exp(a) + exp(b)), computed without overflow", float_result=True),
    _compare("lt", "<", False, lambda ev, x, y: ev.sign(x, y) < 0),
    _compare("le", "<=", False, lambda ev, x, y: ev.sign(x, y) <= 0),
    _compare("gt", ">", False, lambda ev, x, y: ev.sign(x, y) > 0),
    _compare("ge", ">=", False, lambda ev, x, y: ev.sign(x, y) >= 0),
    _compare("eq", "==", True, _equal),
    _compare("ne", "!=", True, lambda ev, x, y: not _equal(ev, x, y)),
    BinaryOp("and", "logical", "and", True, "torch.logical_and", _both_bools(lambda x, y: x and y), "{0} & {1}",
             "({0} & {1})", None, "({a} && {b})", None),
    BinaryOp("or", "logical", "or", True, "torch.logical_or", _both_bools(lambda x, y: x or y), "{0} | {1}",
             "({0} | {1})", None, "({a} || {b})", None),
)

BINARY: dict[str, BinaryOp] = {row.name: row for row in BINARY_OPS}
COMMUTATIVE = frozenset(row.name for row in BINARY_OPS if row.commutative)
FLOAT_RESULT = frozenset(row.name for row in BINARY_OPS if row.float_result)  # div, logaddexp


# ------------------------------------------------------------------ unary operators
@dataclass(frozen=True)
class UnaryOperator:
    """An elementwise op of one operand written as an operator (`-x`, `not c`), declared once.

    `kind` is the OPS kind (unary: arithmetic in the node's dtype; logical: bools in and out,
    the operand is not cast); renderings are format strings over the operand: `{0}` (torch,
    whose operand is the plain reference, and Triton) or `{a}` (C++); the VJPs are over `{g}`
    (the result's adjoint), None: no gradient flows (a bool result)."""
    name: str
    kind: str
    spelling: str
    interp: str  # the reference function ('torch.neg')
    sympy: Callable  # (ev, x) -> SymPy value or bool
    torch: str
    triton: str
    vjp: str | None
    cpp: str
    cpp_vjp: str | None
    degree: str | None = None  # how its degree in the left operand follows its operands' (DEGREES)


def _not(ev, x):
    if not isinstance(x, bool):
        ev.undecidable("symbolic bool")
    return not x


UNARY_OPERATORS: tuple[UnaryOperator, ...] = (
    UnaryOperator("neg", "unary", "-", "torch.neg", lambda ev, x: -x, "-{0}", "(-{0})", "(-{g})",
                  "(-{a})", "(-{g})", degree="linear"),
    UnaryOperator("not", "logical", "not", "torch.logical_not", _not, "_ops.logical_not({0})", "({0} == 0)", None,
                  "(!{a})", None),
)

UNARY_OPERATOR: dict[str, UnaryOperator] = {row.name: row for row in UNARY_OPERATORS}


# ------------------------------------------------------------------ reductions
@dataclass(frozen=True)
class Reduction:
    """A reduction over one declared axis (`sum(x, axis=-1)`), declared once.

    `dtype` is the builtin's dtype rule ('same', or 'float': ints become f32 and the reference
    computes in the node's dtype); `interp` names the torch function of the reference
    (`torch.<fn>(x, axis)`); `sympy` folds the list of entries along the axis. Triton (over a
    tile whose padded entries are masked to `pad`): `triton` over `{x}` (the masked operand),
    `{axis}` and `{size}` (the real extent), `vjp` over `{g}`, `{a}` (the operand), `{z}` (the
    result), and the column mask `col_ok`. C++ (a loop nest accumulating into `acc`):
    `cpp` over `{inner}` (the loops of the reduced axes), `{a}` (the operand inside them),
    `{target}` and `{n}` (the reduced extent); `cpp_vjp` over `{g}`, `{a}`, `{z}`, `{n}`.
    "ties" (amax, amin): the gradient is shared evenly by the tied extremes, a rule each
    printer writes itself (it needs a count over the reduced axes first)."""
    name: str
    doc: str
    dtype: str
    interp: str
    sympy: Callable  # (ev, list of entries) -> SymPy value
    torch: str
    pad: str  # the Triton value that leaves the reduction unchanged (fills padded entries)
    triton: str
    vjp: str
    cpp: str
    cpp_vjp: str
    degree: str | None = None  # how its degree in the left operand follows its operands' (DEGREES)
    heavy: bool = False  # exact (SymPy) evaluation builds huge closed forms (psmc.analysis.laws)


def _fold(fn):
    def fold(ev, xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(ev, out, x)
        return out
    return fold


_TL_MAX = "tl.max({x}, axis={axis}, keep_dims=True)"
_TL_SAFE = f"tl.where({_TL_MAX} == float('-inf'), 0.0, {_TL_MAX})"
_TIES = "ties"

REDUCTIONS: tuple[Reduction, ...] = (
    Reduction("sum", "sum over an axis", "same", "torch.sum", lambda ev, xs: sympy.Add(*xs), "torch.sum", "0.0",
              "tl.sum({x}, axis={axis}, keep_dims=True)", "{g}",
              "scalar_t acc = 0; {inner}acc += {a}; {target} = acc;", "{g}", degree="linear"),
    Reduction("mean", "mean over an axis", "float", "torch.mean", lambda ev, xs: sympy.Add(*xs) / len(xs),
              "torch.mean", "0.0", "(tl.sum({x}, axis={axis}, keep_dims=True) / {size})", "({g} / S)",
              "scalar_t acc = 0; {inner}acc += {a}; {target} = acc / scalar_t({n});", "({g} / scalar_t({n}))",
              degree="linear"),
    Reduction("amax", "maximum over an axis", "same", "torch.amax", _fold(lambda ev, x, y: ev.max(x, y)),
              "torch.amax", "float('-inf')", _TL_MAX, _TIES,
              "scalar_t acc = -std::numeric_limits<scalar_t>::infinity(); {inner}acc = psm_max(acc, {a}); "
              "{target} = acc;", _TIES),
    Reduction("amin", "minimum over an axis", "same", "torch.amin", _fold(lambda ev, x, y: ev.min(x, y)),
              "torch.amin", "float('inf')", "tl.min({x}, axis={axis}, keep_dims=True)", _TIES,
              "scalar_t acc = std::numeric_limits<scalar_t>::infinity(); {inner}acc = psm_min(acc, {a}); "
              "{target} = acc;", _TIES),
    # stable: shifted by the maximum; an all -inf row gives -inf as torch does
    Reduction("logsumexp", "log(sum(exp(x))) over an axis, stable", "float", "torch.logsumexp",
              lambda ev, xs: sympy.log(sympy.Add(*map(sympy.exp, xs))), "torch.logsumexp", "float('-inf')",
              f"({_TL_SAFE} + tl.log(tl.sum(tl.exp({{x}} - {_TL_SAFE}), axis={{axis}}, keep_dims=True)))",
              "({g} * tl.exp({a} - {z}))",
              "scalar_t m = -std::numeric_limits<scalar_t>::infinity(); {inner}m = psm_max(m, {a}); "
              "scalar_t safe = std::isinf(m) ? scalar_t(0) : m; scalar_t acc = 0; {inner}acc += std::exp({a} - safe); "
              "{target} = safe + std::log(acc);", "({g} * std::exp({a} - {z}))", heavy=True),
)

REDUCTION: dict[str, Reduction] = {row.name: row for row in REDUCTIONS}


# ------------------------------------------------------------------ selection
@dataclass(frozen=True)
class Select:
    """`where(c, a, b)`, declared once: renderings over the operands `{0}` `{1}` `{2}` (Triton) or
    `{a}` `{b}` `{c}` (C++), VJPs one per operand (None: the bool condition gets no gradient).
    The reference (`interp`, after holding a and b in the node's dtype) and the SymPy semantics
    (a concrete bool condition picks a side) are here too; the torch rendering is SPECIAL: the
    printer materialises a Python-number result in the call's compute dtype and device
    (`_ops.where`), a rule of its own."""
    name: str
    doc: str
    interp: str
    sympy: Callable  # (ev, c, a, b) -> SymPy value
    torch: str
    triton: str
    vjp: tuple
    cpp: str
    cpp_vjp: tuple
    degree: str | None = None  # how its degree in the left operand follows its operands' (DEGREES)


def _pick(ev, c, a, b):
    if not isinstance(c, bool):
        ev.undecidable(f"symbolic condition {c}")
    return a if c else b


SELECT = Select("where", "c ? a : b, elementwise", "torch.where", _pick, SPECIAL, "tl.where({0}, {1}, {2})",
                (None, "tl.where({a}, {g}, 0.0)", "tl.where({a}, 0.0, {g})"), "({a} ? {b} : {c})",
                (None, "({a} ? {g} : scalar_t(0))", "({a} ? scalar_t(0) : {g})"), degree="select")


# ------------------------------------------------------------------ leaves
@dataclass(frozen=True)
class Leaf:
    """An op with no operands, declared once. The printers bind leaves by rules of their own
    (a name in the kernel, an environment lookup, a literal), one case per leaf in each
    (tests/test_op_coverage.py runs every leaf row through every printer). `batched`: the
    value differs per position (psmc.ir.nodes.BATCHED_LEAVES); `weak`: made of literals, dims
    and the position only, so it has no dtype of its own (the torch printer widens it to its
    users' dtype) and is the same in every tile cell (the C++ grid)."""
    name: str
    doc: str
    batched: bool
    weak: bool
    positional: bool  # a combine using it is not split into per-entry scalar ops (psmc.analysis.split)


LEAF_OPS: tuple[Leaf, ...] = (
    Leaf("arg", "a lift or readout input", True, False, True),
    Leaf("field", "a state field of the left or right operand, or of the prefix", True, False, False),
    Leaf("param", "a learnable parameter", False, False, True),
    Leaf("dim", "the size of a dim", False, True, True),
    Leaf("const", "a literal", False, True, False),
    Leaf("index", "the position of the token", True, True, True),
    Leaf("fill", "zeros(...) / ones(...) of a static shape", False, True, False),
)

LEAF: dict[str, Leaf] = {row.name: row for row in LEAF_OPS}


# ------------------------------------------------------------------ structure ops
@dataclass(frozen=True)
class Unsupported:
    """A renderer's entry for an op it cannot render: the reason, which `unsupported_reason`
    reports (the torch backend then serves the op)."""
    reason: str


@dataclass(frozen=True)
class Call:
    """How the language calls a structure op as a builtin (psmc.ir.builtins derives its row):
    arity, keywords (keyword -> (kind, default)), shape rule (a `_call_<shape>` / ShapeRules
    method of the lowering), dtype rule, doc line and the arguments as a user writes them."""
    min_args: int
    max_args: int | None
    shape: str
    dtype: str
    doc: str
    args: str = "x"
    kwargs: tuple = ()  # ((keyword, (kind, default)), ...)
    lowers_to_op: bool = True  # False: the lowering builds the node by a rule of its own (`eye`)


_MATRIX = "moves data between the axes of a matrix tile; the torch backend serves it"
_LAYER = "a whole-layer op inside a body; the torch backend serves it"
_NO_CPP = "no C++ rendering; the torch backend serves it"


@dataclass(frozen=True)
class Structure:
    """An op whose rendering depends on each printer's tile model (casts, broadcasts, products,
    views, shape changes, whole-layer ops), declared once.

    Every renderer entry is the NAME of a rule that the renderer's module implements (a small
    function or method there; tests/test_op_coverage.py checks each name resolves) or an
    `Unsupported(reason)`:
      interp  a rule of psmc.ir.interp (`_RULES`: (node, args, dims) -> tensor)
      sympy   a method `op_<rule>` of psmc.analysis.symbolic's evaluator
      torch   a method `torch_<rule>` of psmc.codegen.torch_printer.BodyPrinter, or, for a
              rendering that is one torch expression of the operands as they are, a template
              over their names: "{0}.transpose(-1, -2)" (no printer rule to write)
      triton  a rule of the Triton tile printers (psmc.codegen.triton_printer `RULES`, or, with
              `tile="matrix"`, psmc.codegen.triton_matrix `MATRIX_RULES`: the [R, C] tile only)
      cpp     a rule of psmc.codegen.cpp_printer (`CPP_RULES`; with `tile="matrix"`, matrix
              states only)
    `vjp` / `cpp_vjp`: the Triton / C++ adjoint per operand over {g}, {a}, {b} (the matrix
    printers sum a contribution over the tile axes an operand lacks); None exactly where that
    renderer is Unsupported. `call`: the builtin, None when only syntax produces the op
    (`syntax` says which)."""
    name: str
    kind: str  # the OPS kind: cast | broadcast | structure | layer | leaf
    arity: int  # -1: variadic
    call: Call | None
    syntax: str
    interp: str
    sympy: str
    torch: str
    triton: object  # rule name | Unsupported
    vjp: tuple | None
    cpp: object  # rule name | Unsupported
    cpp_vjp: tuple | None
    degree: str | None = None  # how its degree in the left operand follows its operands' (DEGREES)
    heavy: bool = False  # exact (SymPy) evaluation builds huge closed forms (psmc.analysis.laws)
    tile: str = "any"  # 'matrix': Triton and C++ render it in the matrix tile model only
    elementwise: bool = False
    operator: str | None = None  # its infix spelling in the expression grammar (`@`), if any


_PRODUCT_VJP = ("({g} * {b})", "({g} * {a})")
_CPP_PRODUCT_VJP = _PRODUCT_VJP

STRUCTURE_OPS: tuple[Structure, ...] = (
    Structure("cast", "cast", 1, None, "a value stored into a field or output of another dtype",
              "cast", "cast", "cast", "cast", ("{g}",), "cast", ("{g}",), elementwise=True, degree="linear"),
    Structure("broadcast", "broadcast", 1, None, "a value stored into a larger field or output",
              "broadcast", "broadcast", "broadcast", "broadcast", ("{g}",), "view", ("{g}",), elementwise=True, degree="linear"),
    Structure("getitem", "structure", -1, None, "x[...]", "getitem", "getitem", "getitem",
              "view", ("{g}",), "view", ("{g}",), tile="matrix", degree="linear"),
    Structure("matmul", "structure", -1, None, "a @ b", "matmul", "matmul", "matmul",
              "matmul", _PRODUCT_VJP, "matmul", _CPP_PRODUCT_VJP, tile="matrix", operator="@", degree="product"),
    Structure("softmax", "structure", -1, Call(1, 1, "same", "float", "softmax over an axis",
                                              kwargs=(("axis", ("axis", -1)),)), "",
              "softmax", "softmax", "softmax",
              Unsupported("normalises over the state axis inside a body; not generated yet, the torch "
                          "backend serves it"), None, Unsupported(_NO_CPP), None, heavy=True),
    Structure("outer", "structure", -1, Call(2, 2, "outer", "promote", "a[:, None] * b[None, :]", "a, b"), "",
              "outer", "outer", "outer", "outer", _PRODUCT_VJP, "outer", _CPP_PRODUCT_VJP, tile="matrix", degree="product"),
    Structure("eye", "leaf", 0, Call(1, 1, "eye", "fill", "identity matrix of a static size", "n",
                                     lowers_to_op=False), "",
              "eye", "eye", "eye", Unsupported(_MATRIX), None, Unsupported(_NO_CPP), None),
    Structure("concat", "structure", -1, Call(1, None, "concat", "promote", "join along an axis", "a, b, ...",
                                              (("axis", ("axis", 0)),)), "",
              "concat", "concat", "concat", Unsupported(_MATRIX), None, Unsupported(_NO_CPP), None, degree="linear"),
    Structure("transpose", "structure", -1, Call(1, 1, "transpose", "same", "swap the last two axes"), "x.T",
              "transpose", "transpose", "{0}.transpose(-1, -2)", Unsupported(_MATRIX), None, Unsupported(_NO_CPP), None, degree="linear"),
    Structure("diag", "structure", -1, Call(1, 1, "diag", "same", "vector -> diagonal matrix"), "",
              "diag", "diag", "_ops.diag({0})", Unsupported(_MATRIX), None, Unsupported(_NO_CPP), None, degree="linear"),
    Structure("reshape", "structure", -1, Call(2, 2, "reshape", "same",
                                               "reshape to a static shape, e.g. reshape(x, (C, D))", "x, shape"), "",
              "reshape", "reshape", "reshape", Unsupported(_MATRIX), None, Unsupported(_NO_CPP), None, degree="linear"),
    Structure("layernorm", "layer", 1, Call(1, 1, "same", "float",
                                            "layer norm over the last axis, no affine, eps 1e-5"), "",
              "layernorm", "layernorm", "_ops.layernorm({0})", Unsupported(_LAYER), None, Unsupported(_NO_CPP), None, heavy=True),
    Structure("attention", "layer", 3, Call(3, 3, "attention", "float",
                                            "scaled dot-product softmax attention over the first axis", "q, k, v",
                                            (("heads", ("int", 1)), ("causal", ("bool", False)))), "",
              "attention", "attention", "attention", Unsupported(_LAYER), None, Unsupported(_NO_CPP), None, heavy=True),
)

STRUCTURE: dict[str, Structure] = {row.name: row for row in STRUCTURE_OPS}

# ------------------------------------------------------------------ every row
# the degree rules (`degree` of a row: how an op's polynomial degree in the left operand's
# fields follows its operands'; None: constant or not polynomial). psmc.analysis.structure
# implements each: linear (the largest operand degree: sums, negation, views, casts, linear
# reductions), product (the sum of the two: products), quotient (the numerator's, when the
# denominator is constant in the left operand), select (the branches', when the condition is)
DEGREES = ("linear", "product", "quotient", "select")


def rows() -> tuple:
    """Every row of this module: one per IR op."""
    return (*LEAF_OPS, *UNARY_OPERATORS, *UNARY_MATH, *BINARY_OPS, SELECT, *REDUCTIONS, *STRUCTURE_OPS)
