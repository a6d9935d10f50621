"""Case splits over the outcomes of comparisons: the prover's answer to max, min, <, == ...

A `Branch` answers `decide(x, y)` (the sign of x - y) for symbolic x, y. When the facts of
the branch so far force the answer, it gives it; otherwise the comparison is a choice point
with the feasible outcomes among <, =, >. `explore` enumerates every branch by re-running
the evaluation with a recorded path of choices (depth-first), so together the branches cover
every real point: the weak orders of the compared atoms, generated as they are met.

An `=` outcome is made exact by substitution: x - y = 0 is solved for one symbol and that
symbol is replaced everywhere (`Branch.eqs`). A `<` or `>` outcome is remembered as a strict
linear fact; facts prune later choices by Fourier-Motzkin (`linear.py`). Comparisons of
non-linear terms treat their non-linear parts as opaque unknowns (sound for pruning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from .budget import OutOfTime, limited
from .linear import Constraint, Linear, feasible, linearize
from .symbolic import Undecidable, numeric_sign


class Infeasible(Exception):
    """The branch contradicts itself (no real point follows it): skip it."""


class TooManyCases(Exception):
    """The case split exceeded its budget."""


@dataclass
class Branch:
    path: list[int]
    pos: int = 0
    facts: list[sympy.Expr] = field(default_factory=list)  # each known > 0
    eqs: dict = field(default_factory=dict)  # symbol -> expression it equals on this branch
    arity: list[int] = field(default_factory=list)  # options at each choice point taken

    def reduce(self, expr):
        """expr with this branch's ties substituted."""
        expr = sympy.sympify(expr)
        return expr.xreplace(self.eqs) if self.eqs else expr

    def decide(self, x, y) -> int:
        d = sympy.expand(self.reduce(x - y))
        if d.is_number:
            return numeric_sign(d, 0)
        form = linearize(d)
        options = [s for s in self._feasible_signs(d, form) if s in _signs_allowed_by_sympy(d)]
        solution = None
        if 0 in options:
            solution = _solve_zero(d)
            if solution is None:
                options.remove(0)
        if not options:
            raise Infeasible()
        if len(options) == 1:
            choice = options[0]
        else:
            if self.pos < len(self.path):
                choice = options[self.path[self.pos]]
            else:
                self.path.append(0)
                choice = options[0]
            self.arity.append(len(options))
            self.pos += 1
        if choice == 0:
            self._substitute(*solution)
        else:
            self.facts.append(d if choice == 1 else -d)
        return choice

    def _feasible_signs(self, d, form: Linear | None) -> list[int]:
        if form is None:
            return [-1, 0, 1]
        facts = [Constraint(f, True) for f in (linearize(self.reduce(e)) for e in self.facts) if f is not None]
        facts += _positive_atoms(form)
        minus = form.scaled(Fraction(-1))
        out = []
        if feasible(facts + [Constraint(minus, True)]):
            out.append(-1)
        if feasible(facts + [Constraint(form, False), Constraint(minus, False)]):
            out.append(0)
        if feasible(facts + [Constraint(form, True)]):
            out.append(1)
        return out

    def _substitute(self, symbol, value):
        """Make a tie exact: replace `symbol` by `value` everywhere on this branch."""
        self.eqs = {k: v.xreplace({symbol: value}) for k, v in self.eqs.items()}
        self.eqs[symbol] = value


def _solve_zero(d):
    """(symbol, value) with d = 0 iff symbol = value; None when d = 0 has no real solution.
    Linear occurrences are solved directly; otherwise SymPy's solveset over the reals (which
    answers EmptySet only when there is provably no solution)."""
    for term in sympy.Add.make_args(d):
        coef, rest = term.as_coeff_Mul()
        if isinstance(rest, sympy.Symbol) and coef.is_Rational and not (d - term).has(rest):
            return rest, sympy.expand(-(d - term) / coef)
    for symbol in sorted(d.free_symbols, key=sympy.default_sort_key):
        try:
            with limited(0.5):
                solutions = sympy.solveset(d, symbol, sympy.S.Reals)
        except OutOfTime:
            continue
        if solutions is sympy.S.EmptySet:
            return None
        if isinstance(solutions, sympy.FiniteSet) and len(solutions) == 1:
            return symbol, next(iter(solutions))
    raise Undecidable(f"cannot split on {d} = 0")


def _signs_allowed_by_sympy(d) -> tuple[int, ...]:
    """SymPy's assumptions (real symbols) sometimes know a sign outright: log(1 + exp(x)) > 0."""
    if d.is_positive:
        return (1,)
    if d.is_negative:
        return (-1,)
    if d.is_nonnegative:
        return (0, 1)
    if d.is_nonpositive:
        return (-1, 0)
    return (-1, 0, 1)


def _positive_atoms(form: Linear) -> list[Constraint]:
    """exp(...) is positive: a fact about the opaque atoms that prunes impossible orders."""
    one = Fraction(1)
    return [Constraint(Linear(((a, one),), Fraction(0)), True) for a in form.atoms if isinstance(a, sympy.exp)]


def explore(run, max_branches: int = 400):
    """Call run(branch) on every branch of the case split; yields (branch, result).

    `run` evaluates with branch.decide; its result is whatever the caller needs checked on
    that branch. Infeasible branches are skipped."""
    stack: list[list[int]] = [[]]
    count = 0
    while stack:
        path = stack.pop()
        count += 1
        if count > max_branches:
            raise TooManyCases(f"more than {max_branches} cases")
        branch = Branch(list(path))
        fixed = len(path)
        try:
            result = run(branch)
        except Infeasible:
            result = None
        # alternatives at the choice points this run added (deepest first, depth-first order)
        for depth in range(len(branch.path) - 1, fixed - 1, -1):
            for alt in range(branch.arity[depth] - 1, 0, -1):
                stack.append(branch.path[:depth] + [alt])
        if result is not None:
            yield branch, result
