"""Exact linear arithmetic for the case splitter: linear forms and Fourier-Motzkin.

A SymPy expression is read as a linear form over "atoms": symbols, and any non-linear
subterm (exp(a), a*b, ...) treated as one opaque unknown. Treating a subterm as a free
unknown only enlarges the solution set, so "infeasible" answers stay true for the real
expressions: the splitter prunes a branch only when it is impossible.

Feasibility of a conjunction of `form > 0` / `form >= 0` constraints is decided by
Fourier-Motzkin elimination over exact rationals. The systems here are tiny (a few unknowns
per element, three elements); past a size cap the answer is "feasible" (no pruning), which
is always safe.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import sympy

MAX_CONSTRAINTS = 400


@dataclass(frozen=True)
class Linear:
    """const + sum(coef * atom); atoms are SymPy expressions (symbols or opaque subterms)."""

    coefs: tuple[tuple[sympy.Expr, Fraction], ...]
    const: Fraction

    @property
    def atoms(self):
        return tuple(a for a, _ in self.coefs)

    def scaled(self, k: Fraction) -> "Linear":
        return Linear(tuple((a, c * k) for a, c in self.coefs), self.const * k)


def _clean(table: dict) -> tuple:
    return tuple(sorted(((a, c) for a, c in table.items() if c != 0), key=lambda ac: sympy.default_sort_key(ac[0])))


def _fraction(x) -> Fraction | None:
    if isinstance(x, sympy.Rational):
        return Fraction(int(x.p), int(x.q))
    return None


def linearize(expr) -> Linear | None:
    """`expr` as a Linear, or None when it has non-rational coefficients or infinities."""
    expr = sympy.expand(sympy.sympify(expr))
    if expr.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return None
    table: dict = {}
    const = Fraction(0)
    for term in sympy.Add.make_args(expr):
        coef, rest = term.as_coeff_Mul()
        k = _fraction(coef)
        if k is None:
            return None
        if rest == 1:
            const += k
        else:
            table[rest] = table.get(rest, Fraction(0)) + k
    return Linear(_clean(table), const)


@dataclass(frozen=True)
class Constraint:
    form: Linear
    strict: bool  # form > 0 when strict, else form >= 0


def feasible(constraints: list[Constraint]) -> bool:
    """Is there a real point satisfying every constraint? (True when unsure: too large.)"""
    rows = [(dict(c.form.coefs), c.form.const, c.strict) for c in constraints]
    atoms = {a for coefs, _, _ in rows for a in coefs}
    for atom in sorted(atoms, key=sympy.default_sort_key):
        pos, neg, rest = [], [], []
        for row in rows:
            c = row[0].get(atom, Fraction(0))
            (pos if c > 0 else neg if c < 0 else rest).append(row)
        for p in pos:
            for n in neg:
                rest.append(_eliminate(p, n, atom))
        rows = _dedupe(rest)
        if len(rows) > MAX_CONSTRAINTS:
            return True
    return all(const > 0 if strict else const >= 0 for _, const, strict in rows)


def _eliminate(p, n, atom):
    """p / cp + n / |cn|: a nonnegative combination without `atom`."""
    cp, cn = p[0][atom], -n[0][atom]
    coefs = {}
    for a in set(p[0]) | set(n[0]):
        if a == atom:
            continue
        v = p[0].get(a, Fraction(0)) / cp + n[0].get(a, Fraction(0)) / cn
        if v != 0:
            coefs[a] = v
    return coefs, p[1] / cp + n[1] / cn, p[2] or n[2]


def _dedupe(rows):
    seen = {}
    for coefs, const, strict in rows:
        if not coefs:
            # a constant row that holds adds nothing; one that fails decides infeasibility
            if (const > 0) if strict else (const >= 0):
                continue
            return [(coefs, const, strict)]
        scale = max(abs(v) for v in coefs.values())
        key = tuple(sorted(((a, v / scale) for a, v in coefs.items()), key=lambda av: sympy.default_sort_key(av[0])))
        const = const / scale
        old = seen.get(key)
        # keep the tightest bound per direction: smaller const (then strict) is stronger
        if old is None or const < old[0] or (const == old[0] and strict and not old[1]):
            seen[key] = (const, strict)
    return [(dict(key), const, strict) for key, (const, strict) in seen.items()]
