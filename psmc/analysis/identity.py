"""The identity of combine: verify a declared one on both sides, or infer one.

Candidates per field, in order: floats 0, 1, -inf, inf (arrays: zeros, ones, eye for square
matrices, -inf, inf); ints 0, 1; bools false, true. Every combination is first screened at
two random points in float64 (cheap), and the survivors are judged like any law (random
search, then a SymPy proof). The first combination that is an identity on both sides is
the inferred identity; otherwise the first that works on one side only is reported as a
left-only or right-only identity (the scan then uses a formal identity).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from fractions import Fraction

import sympy

from ..ir.interp import concrete_shape
from ..ir.types import is_int
from . import symbolic
from .budget import Budget
from .dsl import identity_text
from .grid import Grid
from .judge import Judgement, judge
from .laws import LEFT_IDENTITY, RIGHT_IDENTITY, uses_params_or_layers
from .refute import dims_options, float_differs, random_point
from .split import field_groups, restrict
from .values import FLOAT_STYLES

MAX_COMBINATIONS = 1024


@dataclass
class IdentityResult:
    text: str | None  # the two-sided identity in DSL text, or None
    kind: str  # 'declared' | 'declared, unverified' | 'inferred' | 'left-only' | 'right-only' | 'none'
    note: str = ""
    left: Judgement | None = None  # the declared identity's judgements (for the report)
    right: Judgement | None = None
    fields: tuple | None = None  # an inferred (or one-sided) identity's DSL text per field


# ---------------------------------------------------------------------------- candidates
def _field_candidates(f) -> list[tuple[str, object]]:
    """(DSL text, entry value or 'eye') for one field."""
    if f.dtype == "bool":
        return [("false", False), ("true", True)]
    if is_int(f.dtype):
        return [("0", 0), ("1", 1)]
    if not f.shape:
        return [("0.0", Fraction(0)), ("1.0", Fraction(1)), ("-inf", -math.inf), ("inf", math.inf)]
    out = [("zeros", Fraction(0)), ("ones", Fraction(1))]
    if len(f.shape) == 2 and f.shape[0] == f.shape[1]:
        out.append((f"eye({f.shape[0]})", "eye"))
    return out + [("-inf", -math.inf), ("inf", math.inf)]


def _grid(f, value, dims) -> Grid:
    shape = concrete_shape(f.shape, dims)
    if value == "eye":
        return Grid.build(shape, lambda i: Fraction(int(i[0] == i[1])))
    return Grid.full(shape, value)


def _combination_fn(op, values):
    return lambda dims: {"e": tuple(_grid(f, v, dims) for f, v in zip(op.state, values))}


def _text(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "(" + ", ".join(items) + ")"


# ---------------------------------------------------------------------------- declared
def declared_element(op, dims) -> tuple[Grid, ...]:
    """The declared identity as exact entries (evaluated exactly, dims concrete)."""
    grids = symbolic.evaluate(op.identity, {}, dims)
    return tuple(g.map(lambda v, f=f: _exact(v, f.dtype)) for g, f in zip(grids, op.state))


class NotRational(Exception):
    """A declared identity holds a value exact arithmetic on fractions cannot represent."""


def _exact(value, dtype):
    if isinstance(value, bool):
        return value if dtype == "bool" else int(value)
    if value.is_infinite:
        return math.inf if value.is_extended_positive else -math.inf
    v = sympy.nsimplify(value)
    if not v.is_Rational:  # e.g. tanh(3): no Fraction; a rational stand-in could refute a true identity
        raise NotRational(str(value))
    fraction = Fraction(int(v.p), int(v.q))
    return int(fraction) if is_int(dtype) else fraction


# ---------------------------------------------------------------------------- the analysis
def analyse_identity(op, budget: Budget, seed: int) -> IdentityResult:
    if op.identity is not None:
        declared = _check_declared(op, budget.part(0.5), seed)
        if declared.kind in ("declared", "declared, unverified") or uses_params_or_layers(op):
            return declared
        inferred = infer(op, budget, seed)
        inferred.note = (declared.note + "; " + inferred.note).strip("; ")
        return inferred
    if uses_params_or_layers(op):
        return IdentityResult(None, "none", "not inferred: the combine uses params or layers")
    return infer(op, budget, seed)


def _check_declared(op, budget: Budget, seed: int) -> IdentityResult:
    text = identity_text(op)
    fixed = lambda dims: {"e": declared_element(op, dims)}  # noqa: E731
    try:
        left = judge(op, LEFT_IDENTITY, budget.part(0.5), seed, fixed=fixed, trials=60)
        right = judge(op, RIGHT_IDENTITY, budget, seed + 1, fixed=fixed, trials=60)
    except NotRational as value:
        return IdentityResult(text, "declared, unverified", f"declared; not verified: it holds {value}, not a "
                              "rational number, which the exact check cannot represent")
    statuses = {left.status, right.status}
    if statuses == {"proven"}:
        return IdentityResult(text, "declared", "declared, verified on both sides", left, right)
    if "refuted" in statuses:
        side = "left" if left.status == "refuted" else "right"
        note = f"the declared identity {text} is not a {side} identity"
        from .pipeline import _counterexample  # the shared counterexample text (lazy: pipeline imports us)
        ce = _counterexample(op, LEFT_IDENTITY if side == "left" else RIGHT_IDENTITY,
                             left if side == "left" else right)
        if ce is not None:
            note += f" ({ce.text})"
        if op.exclusive:
            note += " of combine; it only serves as the empty prefix of the exclusive readout"
        kind = {("proven", "refuted"): "left-only", ("refuted", "proven"): "right-only"}.get(
            (left.status, right.status), "none")
        return IdentityResult(None, kind, note, left, right)
    reason = left.reason if left.status == "unknown" else right.reason
    return IdentityResult(text, "declared, unverified", f"declared; not verified: {reason}", left, right)


def infer(op, budget: Budget, seed: int) -> IdentityResult:
    """The identity, inferred one independent group of fields at a time (`split.py`): e is an
    identity of the op iff its restriction to every group is one of the group's combine, so
    the candidates of different groups are never multiplied together."""
    groups = field_groups(op)
    if len(groups) == 1:
        return _infer(op, budget, seed)
    texts: list = [None] * len(op.state)
    kinds, notes = [], []
    for k, group in enumerate(groups):
        part = _infer(restrict(op, group, False), budget.part(1 / (len(groups) - k)), seed)
        if part.kind == "none" or part.fields is None:
            names = ", ".join(op.state[i].name for i in group)
            return IdentityResult(None, "none", f"no identity for the fields ({names}) among the candidates; "
                                                "a formal identity is used")
        kinds.append(part.kind)
        for i, t in zip(group, part.fields):
            texts[i] = t
    text = _text(texts)
    if all(k == "inferred" for k in kinds):
        return IdentityResult(text, "inferred", "inferred and verified on both sides, one group of fields at a time")
    for side in ("left", "right"):
        if all(k in ("inferred", f"{side}-only") for k in kinds):
            return IdentityResult(None, f"{side}-only", f"{text} is only a {side} identity; a formal identity is used")
    return IdentityResult(None, "none", "some groups of fields have only a left identity, others only a right "
                                        "one; a formal identity is used")


def _infer(op, budget: Budget, seed: int) -> IdentityResult:
    options = dims_options(op)
    if not options:
        return IdentityResult(None, "none", "no valid small dims to test at")
    per_field = [_field_candidates(f) for f in op.state]
    combos = list(itertools.islice(itertools.product(*per_field), MAX_COMBINATIONS))
    screened = _screen(op, combos, options[0], seed)
    one_sided = None
    for combo, left_ok, right_ok in screened:
        if budget.left() <= 0:
            break
        fixed = _combination_fn(op, [v for _, v in combo])
        text = _text([t for t, _ in combo])
        left = judge(op, LEFT_IDENTITY, budget.part(0.5), seed, fixed=fixed, trials=40) if left_ok else None
        right = judge(op, RIGHT_IDENTITY, budget.part(0.5), seed, fixed=fixed, trials=40) if right_ok else None
        lp = left is not None and left.status == "proven"
        rp = right is not None and right.status == "proven"
        if lp and rp:
            return IdentityResult(text, "inferred", "inferred and verified on both sides",
                                  fields=tuple(t for t, _ in combo))
        if one_sided is None and (lp or rp):
            one_sided = (text, "left-only" if lp else "right-only", tuple(t for t, _ in combo))
    if one_sided is not None:
        text, kind, fields = one_sided
        side = kind.split("-")[0]
        return IdentityResult(None, kind, f"{text} is only a {side} identity; a formal identity is used",
                              fields=fields)
    return IdentityResult(None, "none", "no identity among the candidates; a formal identity is used")


def _screen(op, combos, dims, seed) -> list:
    """Keep combinations that pass the left or right law at a few random float64 points
    (no point differs, at least one is defined)."""
    rng = random.Random(seed)
    points = [random_point(op, LEFT_IDENTITY, dims, rng, style) for style in FLOAT_STYLES[1:]]
    out = []
    for combo in combos:
        e = _combination_fn(op, [v for _, v in combo])(dims)
        ok = []
        for law in (LEFT_IDENTITY, RIGHT_IDENTITY):
            verdicts = [float_differs(op, law, _with(p, e)) for p in points]
            ok.append("differs" not in verdicts and "equal" in verdicts)
        if any(ok):
            out.append((combo, ok[0], ok[1]))
    return out


def _with(point, fixed):
    p = point.copy()
    p.elements.update(fixed)
    return p
