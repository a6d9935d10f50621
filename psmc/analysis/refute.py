"""Looking for counterexamples: float64 random search, shrinking, exact confirmation.

The search draws random points (short decimals, small integers, random bools; params too)
and evaluates the law in float64 with the reference interpreter. A point whose two sides
differ beyond rounding is shrunk entry by entry towards 0, 1, -1, 2, ... while it still
differs (so counterexamples read like (1, 0, 0), not like 0.7316...), then confirmed in
exact arithmetic (SymPy rationals, or 60-digit floats for layers): only a confirmed point
refutes a law. A float64 difference that exact arithmetic does not confirm is discarded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..ir.interp import concrete_shape
from .budget import Budget
from .grid import Grid
from .symbolic import Undecidable
from .laws import Law, exact_sides, exact_verdict, float_sides, float_verdict
from .values import FLOAT_STYLES, Point, random_element, random_params, shrink_candidates, simpler


@dataclass
class Found:
    point: Point
    lhs: tuple  # exact values per field (Grids of SymPy values)
    rhs: tuple


def dims_options(op, sizes=(1, 2, 3)) -> list[dict]:
    """Concrete dims to test at: every dim equal to k, for the k that give valid shapes; when
    none does (a shape like V - K), distinct sizes k, k + 1, ... in declaration order."""
    candidates = [{d: k for d in op.dims} for k in sizes]
    candidates += [{d: k + i for i, d in enumerate(op.dims)} for k in sizes]
    out = []
    for dims in candidates:
        if len(out) == len(sizes):
            break
        try:
            for v in op.state + op.params + op.lift_inputs + op.readout_inputs:
                concrete_shape(v.shape, dims)
        except ValueError:
            continue
        if dims not in out:
            out.append(dims)
    return out


def float_differs(op, law: Law, point: Point) -> str:
    try:
        return float_verdict(*float_sides(op, law, point))
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError):
        return "undefined"


def confirm(op, law: Law, point: Point) -> Found | None:
    try:
        lhs, rhs = exact_sides(op, law, point)
    except (Undecidable, ValueError, ZeroDivisionError, TypeError, ArithmeticError):
        return None  # undefined at this point (0/0, a complex power, ...): no evidence
    return Found(point, lhs, rhs) if exact_verdict(lhs, rhs) == "differs" else None


def search(op, law: Law, budget: Budget, seed: int, fixed=None, trials: int = 400,
           dims_list: list[dict] | None = None) -> Found | None:
    """Random float64 search for a confirmed counterexample to `law`."""
    rng = random.Random(seed)
    dims_list = list(dims_list if dims_list is not None else dims_options(op))
    if not dims_list:
        return None
    for trial in range(trials):
        if budget.left() <= 0 or not dims_list:
            return None
        dims = dims_list[trial % len(dims_list)]
        style = FLOAT_STYLES[(trial // len(dims_list)) % len(FLOAT_STYLES)]
        point = random_point(op, law, dims, rng, style, fixed)
        verdict = float_differs(op, law, point)
        if verdict != "differs":
            continue
        found = confirm(op, law, shrink(op, law, point, budget))
        if found is None:
            found = confirm(op, law, point)
        if found is not None:
            return found
    return None


def random_point(op, law: Law, dims, rng, style, fixed=None) -> Point:
    elements = {name: random_element(op, dims, rng, style) for name in law.free}
    if fixed is not None:
        elements.update(fixed(dims))
    return Point(dims, elements, random_params(op, dims, rng))


def shrink(op, law: Law, point: Point, budget: Budget, passes: int = 3) -> Point:
    """Simplify entries one at a time while the float64 sides still differ."""
    point = _shrink_ties(op, law, point, budget)
    dtypes = {f.name: f.dtype for f in op.state}
    pdtypes = {p.name: p.dtype for p in op.params}
    for _ in range(passes):
        changed = False
        for where in _entries(op, law, point):
            if budget.left() <= 0:
                return point
            current = _get(point, where)
            dtype = dtypes[op.state[where[2]].name] if where[0] == "element" else pdtypes[where[1]]
            for candidate in shrink_candidates(dtype):
                if simpler(candidate) >= simpler(current):
                    continue
                trial = _set(point, where, candidate)
                if float_differs(op, law, trial) == "differs":
                    point, changed = trial, True
                    break
        if not changed:
            break
    return point


def _shrink_ties(op, law: Law, point: Point, budget: Budget) -> Point:
    """Replace every occurrence of one value at once (keeps ties such as a.v = b.v that a
    counterexample may need), largest values first."""
    positions: dict = {}
    for where in _entries(op, law, point):
        if where[0] == "element":
            value = _get(point, where)
            kind = op.state[where[2]].dtype
            if kind != "bool":
                positions.setdefault((kind, value), []).append(where)
    for (dtype, value), places in sorted(positions.items(), key=lambda kv: simpler(kv[0][1]), reverse=True):
        for candidate in shrink_candidates(dtype):
            if budget.left() <= 0 or simpler(candidate) >= simpler(value):
                continue
            trial = point
            for where in places:
                trial = _set(trial, where, candidate)
            if float_differs(op, law, trial) == "differs":
                point = trial
                break
    return point


def _entries(op, law, point):
    for name in law.free:
        for i, grid in enumerate(point.elements[name]):
            for k in range(len(grid.items)):
                yield ("element", name, i, k)
    for name, grid in point.params.items():
        for k in range(len(grid.items)):
            yield ("param", name, None, k)


def _get(point: Point, where):
    kind, name, i, k = where
    grid = point.elements[name][i] if kind == "element" else point.params[name]
    return grid.items[k]


def _set(point: Point, where, value) -> Point:
    kind, name, i, k = where
    out = point.copy()
    if kind == "element":
        grid = out.elements[name][i]
        items = list(grid.items)
        items[k] = value
        fields = list(out.elements[name])
        fields[i] = Grid(grid.shape, tuple(items))
        out.elements[name] = tuple(fields)
    else:
        grid = out.params[name]
        items = list(grid.items)
        items[k] = value
        out.params[name] = Grid(grid.shape, tuple(items))
    return out
