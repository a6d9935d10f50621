"""Symbolic proofs of a law: SymPy entries, case splits, zero tests.

For each small concrete size of the dims, every entry of every element is a SymPy symbol
(real for floats, integer for ints); bool entries are enumerated. The two sides of the law
are evaluated on every branch of the case split over comparisons (`cases.py`), and each
output component's difference must simplify to exactly 0. Cheap tactics first: expand,
cancel (rational functions), for logarithms comparing exp of both sides, then `simplify`
under a time limit. Any branch that does not reduce to 0 makes the attempt fail (never a
proof); the failing branch is kept so that `search_exact` can look for a counterexample on
it with exact rationals (ties included, which random floats almost never hit).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from fractions import Fraction

import sympy

from ..ir.interp import concrete_shape
from ..ir.types import is_int
from . import symbolic
from .budget import Budget, OutOfTime, limited
from .cases import Branch, TooManyCases, explore
from .grid import Grid
from .laws import Law
from .refute import Found, confirm, float_differs, shrink
from .values import Point, sympy_grid

MAX_BOOL_CASES = 64


@dataclass
class Attempt:
    status: str  # 'proven' | 'failed' | 'unknown'
    reason: str = ""
    branch: Branch | None = None  # the failing branch
    bools: dict | None = None  # its bool entries
    symbols: dict | None = None  # element name -> tuple of Grids of symbols
    cases: int = 0  # branches checked (case split x bool enumeration)


def symbolic_elements(op, law: Law, dims: dict) -> tuple[dict, list]:
    """name -> element of symbols; plus the list of (name, field index, flat index) of bool
    entries, which the caller fills by enumeration."""
    elements, bools = {}, []
    for name in law.free:
        fields = []
        for i, f in enumerate(op.state):
            shape = concrete_shape(f.shape, dims)
            if f.dtype == "bool":
                grid = Grid.full(shape, None)
                bools += [(name, i, k) for k in range(len(grid.items))]
            else:
                grid = Grid.build(shape, lambda ix, f=f, name=name: _symbol(name, f, ix))
            fields.append(grid)
        elements[name] = tuple(fields)
    return elements, bools


def _symbol(elem: str, f, index) -> sympy.Symbol:
    label = f"{elem}.{f.name}" + (f"[{','.join(map(str, index))}]" if index else "")
    if is_int(f.dtype):
        return sympy.Symbol(label, integer=True)
    return sympy.Symbol(label, real=True)


def _with_bools(elements: dict, bools: list, values) -> dict:
    out = {k: list(v) for k, v in elements.items()}
    for (name, i, k), value in zip(bools, values):
        grid = out[name][i]
        items = list(grid.items)
        items[k] = value
        out[name][i] = Grid(grid.shape, tuple(items))
    return {k: tuple(v) for k, v in out.items()}


def prove(op, law: Law, dims: dict, budget: Budget, fixed: dict | None = None) -> Attempt:
    """Try to prove `law` for combine at these concrete dims (symbolic entries). `fixed`
    gives the law's fixed elements (the identity e) as exact entries."""
    elements, bools = symbolic_elements(op, law, dims)
    if 2 ** len(bools) > MAX_BOOL_CASES:
        return Attempt("unknown", f"too many bool entries to enumerate ({len(bools)})")
    fixed = {k: tuple(sympy_grid(g) for g in v) for k, v in (fixed or {}).items()}
    cases = [0]
    try:
        for values in itertools.product((False, True), repeat=len(bools)):
            budget.check()
            el = _with_bools(elements, bools, values)
            el.update(fixed)
            failing = _first_failing_branch(op, law, dims, el, budget, cases)
            if failing is not None:
                return Attempt("failed", "", failing, dict(zip(bools, values)), elements)
    except OutOfTime as err:
        return Attempt("unknown", str(err))
    except TooManyCases as err:
        return Attempt("unknown", f"the case split is too large ({err})")
    except symbolic.Undecidable as err:
        return Attempt("unknown", f"a comparison SymPy cannot split on ({err})")
    except (ValueError, TypeError, ArithmeticError, NotImplementedError, RecursionError,
            sympy.polys.polyerrors.PolynomialError) as err:
        return Attempt("unknown", f"SymPy could not handle the expressions ({type(err).__name__}: {err})")
    return Attempt("proven", cases=cases[0])


def _first_failing_branch(op, law, dims, el, budget, cases) -> Branch | None:
    def run(branch: Branch):
        budget.check()

        def combine(l, r):
            env = {}
            for f, lv, rv in zip(op.state, l, r):
                env[("field", "left", f.name)] = lv
                env[("field", "right", f.name)] = rv
            return symbolic.evaluate(op.combine, env, dims, branch.decide)

        lhs, rhs = law.sides(combine, el)
        return all(_same(branch, a, b, budget) for a, b in zip(lhs, rhs))

    for branch, ok in explore(run):
        cases[0] += 1
        if not ok:
            return branch
    return None


def _same(branch: Branch, a: Grid, b: Grid, budget: Budget) -> bool:
    for x, y in zip(a.items, b.items):
        if isinstance(x, bool) or isinstance(y, bool):
            if x != y:
                return False
            continue
        if not is_zero(branch.reduce(x), branch.reduce(y), budget):
            return False
    return True


def is_zero(x, y, budget: Budget) -> bool:
    """Is x - y identically 0? True only when a tactic reduces it to exactly 0."""
    d = x - y
    if d == 0:
        return True
    if d.has(sympy.nan, sympy.zoo):
        return False
    budget.check()
    with limited(min(budget.left(), 2.0)):
        # over a common denominator, d is 0 iff its numerator expands to 0 (expand also
        # splits exp(a - b) into exp(a) exp(-b), so exponential factors cancel)
        if sympy.expand(sympy.numer(sympy.together(d))) == 0:
            return True
        if sympy.cancel(sympy.together(sympy.expand(d))) == 0:
            return True
        if d.has(sympy.log):
            # exp is injective on the reals: x = y iff exp(x) = exp(y), and exp(u + log v)
            # evaluates to v exp(u), which turns sums of logs into rational functions
            e = sympy.expand(sympy.exp(x) - sympy.exp(y))
            if e == 0 or sympy.cancel(sympy.together(e)) == 0:
                return True
    budget.check()
    with limited(min(budget.left(), 2.0)):
        return sympy.simplify(d) == 0


def search_exact(op, law: Law, attempt: Attempt, dims: dict, budget: Budget, seed: int,
                 fixed: dict | None = None, trials: int = 200) -> Found | None:
    """Random rationals on the failing branch (its ties substituted, its strict facts
    checked) until both exact arithmetic and float64 see the two sides differ."""
    rng = random.Random(seed)
    branch = attempt.branch
    symbols = [s for grids in attempt.symbols.values() for g in grids for s in g.items if s is not None]
    free = [s for s in symbols if s not in branch.eqs]
    for _ in range(trials):
        if budget.left() <= 0:
            return None
        values = {s: _random_value(s, rng) for s in free}
        for s, expr in branch.eqs.items():
            values[s] = expr.xreplace({k: sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction)
                                       else sympy.Integer(v) for k, v in values.items()})
        if not all(_positive(f, values) for f in branch.facts):
            continue
        point = _point(op, attempt, dims, values, fixed)
        if point is None or float_differs(op, law, point) != "differs":
            continue
        found = confirm(op, law, shrink(op, law, point, budget)) or confirm(op, law, point)
        if found is not None:
            return found
    return None


def _random_value(symbol, rng):
    if symbol.is_integer:
        return rng.randint(-3, 3)
    return Fraction(rng.randint(-6, 6), 2)


def _as_fraction(v):
    if isinstance(v, (int, Fraction)):
        return v
    v = sympy.nsimplify(v)
    return Fraction(int(v.p), int(v.q)) if v.is_Rational else None


def _positive(expr, values) -> bool:
    subs = {k: (sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else v)
            for k, v in values.items()}
    value = sympy.sympify(expr).xreplace(subs)
    try:
        return symbolic.numeric_sign(value, 0) > 0
    except symbolic.Undecidable:
        return False


def _point(op, attempt: Attempt, dims, values, fixed) -> Point | None:
    elements = {}
    for name, grids in attempt.symbols.items():
        fields = []
        for i, g in enumerate(grids):
            items = []
            for k, s in enumerate(g.items):
                if s is None:
                    items.append(attempt.bools[(name, i, k)])
                    continue
                v = _as_fraction(values[s])
                if v is None:
                    return None
                items.append(int(v) if is_int(op.state[i].dtype) else Fraction(v))
            fields.append(Grid(g.shape, tuple(items)))
        elements[name] = tuple(fields)
    if fixed:
        elements.update(fixed)
    return Point(dict(dims), elements, {})
