"""The elementwise math builtins, each declared ONCE with everything every stage needs.

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
one edit: a row here (plus its tests; tests/test_op_coverage.py checks every table has it).

This module holds data only (strings and SymPy lambdas) and imports no other stage.
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


def _sigmoid(x):
    return 1 / (1 + sympy.exp(-x))


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
              "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", "({g} * (1.0 - {z} * {z}))",
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
              "{a} * std::exp(scalar_t(-0.5) * {a} * {a}) * scalar_t(0.3989422804014327)))"),
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
