"""A verdict with evidence for one law: refute cheaply, then prove, then refute exactly.

1. float64 random search (params random too), confirmed in exact arithmetic -> refuted;
2. bodies with params, attention or layernorm stop here: unknown (random testing only);
3. SymPy proof with symbolic entries for each small size of the dims (1, 2, 3 where the
   time allows; at least the first two must be proven) -> proven; independent groups of
   fields are proved apart, entrywise groups on one entry per field (`split.py`), and the
   law holds iff it holds for every part;
4. a failed proof turns into a search with exact rationals on the failing branch
   -> refuted, else unknown with the reason.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from ..ir.interp import concrete_shape
from ..ir.types import is_int
from . import split
from .budget import Budget
from .grid import Grid
from .laws import Law, uses_params_or_layers
from .prove import prove, search_exact
from .refute import Found, confirm, dims_options, search, shrink
from .values import FLOAT_STYLES, Point, random_element, random_params


@dataclass
class Judgement:
    status: str  # 'proven' | 'refuted' | 'unknown'
    method: str = ""
    reason: str = ""
    found: Found | None = None


def judge(op, law: Law, budget: Budget, seed: int, fixed=None, trials: int = 300,
          prove_it: bool = True) -> Judgement:
    """`fixed(dims)` gives the law's fixed elements (the identity e) as exact entries."""
    found = search(op, law, budget.part(0.4), seed, fixed=fixed, trials=trials)
    if found is not None:
        return Judgement("refuted", "counterexample from a float64 random search, confirmed in exact "
                                    "arithmetic", found=found)
    if uses_params_or_layers(op):
        return Judgement("unknown", reason=f"the combine uses params, attention or layernorm, which only "
                                           f"random testing covers: no counterexample in {trials} float64 trials")
    if not prove_it:
        return Judgement("unknown", reason=f"no counterexample in {trials} float64 trials")
    return _prove(op, law, budget, seed, fixed)


def _prove(op, law: Law, budget: Budget, seed: int, fixed) -> Judgement:
    pieces = split.parts(op)
    options = dims_options(op)
    if (len(pieces) == 1 and not pieces[0].scalar) or not options:
        return _prove_whole(op, law, budget, seed, fixed)
    methods = []
    for part in pieces:
        part_fixed = part.restrict_fixed(fixed, options)
        if part_fixed is split.NOT_UNIFORM:  # e varies over positions: judge the group whole
            part = split.Part(part.fields, split.restrict(op, part.fields, False), False)
            part_fixed = part.restrict_fixed(fixed, options)
        j = _prove_whole(part.op, law, budget, seed, part_fixed)
        names = "(" + ", ".join(op.state[i].name for i in part.fields) + ")"
        if j.status == "proven":
            how = j.method.removeprefix("SymPy: ")
            methods.append(f"{names}{' one entry per field' if part.scalar else ''}: {how}")
            continue
        if j.status == "refuted":
            found = _lift(op, law, part, j.found, fixed, options, budget, seed)
            if found is not None:
                return Judgement("refuted", j.method, found=found)
            return Judgement("unknown", reason=f"a counterexample for the fields {names} alone was not confirmed "
                                               "on the whole op")
        return Judgement("unknown", reason=f"{j.reason} (fields {names}, judged apart from the others)")
    return Judgement("proven", "SymPy, each independent group of fields apart: " + "; ".join(methods))


def _lift(op, law: Law, part, found: Found, fixed, options, budget: Budget, seed: int) -> Found | None:
    """A point of the whole op from a counterexample on one part: the part's entries (spread
    over every position for an entrywise part), the law's fixed elements, and values for the
    other fields (zeros, then random ones), confirmed in exact arithmetic on the whole op."""
    point = found.point
    dims = options[0] if part.scalar else point.dims
    rng = random.Random(seed)
    fillers = [None] + [FLOAT_STYLES[k % len(FLOAT_STYLES)] for k in range(8)]
    whole_fixed = fixed(dims) if fixed else {}
    for style in fillers:
        if budget.left() <= 0:
            return None
        elements = {}
        for name in law.free:
            if style is None:
                base = [Grid.full(concrete_shape(f.shape, dims), _zero(f.dtype)) for f in op.state]
            else:
                base = list(random_element(op, dims, rng, style))
            for k, i in enumerate(part.fields):
                grid = point.elements[name][k]
                base[i] = Grid.full(concrete_shape(op.state[i].shape, dims), grid.item()) if part.scalar else grid
            elements[name] = tuple(base)
        elements.update(whole_fixed)
        candidate = Point(dict(dims), elements, random_params(op, dims, rng))
        confirmed = confirm(op, law, shrink(op, law, candidate, budget)) or confirm(op, law, candidate)
        if confirmed is not None:
            return confirmed
    return None


def _zero(dtype):
    if dtype == "bool":
        return False
    return 0 if is_int(dtype) else Fraction(0)


def _prove_whole(op, law: Law, budget: Budget, seed: int, fixed) -> Judgement:
    proven_dims, cases = [], 0
    options = dims_options(op)
    if not options:
        return Judgement("unknown", reason="no small sizes of the dims give valid shapes to prove at")
    for dims in options:
        attempt = prove(op, law, dims, budget, fixed=fixed(dims) if fixed else None)
        if attempt.status == "proven":
            proven_dims.append(dims)
            cases = max(cases, attempt.cases)
            continue
        if attempt.status == "failed":
            found = search_exact(op, law, attempt, dims, budget, seed, fixed=fixed(dims) if fixed else None)
            if found is not None:
                return Judgement("refuted", "counterexample from exact rationals on a failed SymPy proof",
                                 found=found)
            where = _dims_text(dims)
            return Judgement("unknown", reason="SymPy could not reduce the difference of the two sides to 0"
                                               f"{' for ' + where if where else ''}, and no counterexample was "
                                               "found with exact random rationals")
        if len(proven_dims) >= 2:
            break  # the larger sizes ran out of time; the two smaller ones stand
        return Judgement("unknown", reason=attempt.reason)
    return Judgement("proven", _method(op, proven_dims, cases))


def _method(op, proven_dims, cases) -> str:
    text = "SymPy: both sides reduce to the same expression, entries symbolic"
    if op.dims:
        sizes = ", ".join(str(next(iter(d.values()))) for d in proven_dims)
        text += f", {' = '.join(op.dims)} = {sizes}"
    if cases > 1:
        text += f"; case split over {cases} cases (orderings of compared values, bool entries)"
    return text


def _dims_text(dims: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in dims.items())
