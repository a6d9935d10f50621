"""`analyse(op)`: the algebra of one op, with evidence, cached by the op's IR.

Order of work (cheapest first): the known-monoid table; the float64 random search; SymPy
proofs with case splits; exact rationals. Then identity, commutativity, structure, the
causality of a chunk readout, and the plan. Contradictions between the program and the
algebra (an `assume associative` or `assume commutative` refuted, a chunk readout that looks
at later tokens) are compile errors, raised after the result is cached so that a second run
reports them without re-analysing.
"""
from __future__ import annotations

import contextlib
import re

import torch

from ..errors import PsmcAnalysisError, Span
from ..ir.nodes import walk
from . import cache, monoids
from .budget import Budget
from .dsl import exact_text, side_texts
from .identity import analyse_identity
from .judge import Judgement, judge
from .laws import ASSOCIATIVITY, COMMUTATIVITY, Law
from .plan import backends, scan_plan, state_description, state_size
from .result import Analysis, Counterexample
from .structure import causality_violation, elementwise_fields, structure

SECONDS = 4.0  # per op, all laws together; running out only ever weakens a verdict


def analyse(op, use_cache: bool = True) -> Analysis:
    """The analysis of `op` (an OpIR). Raises PsmcAnalysisError when the program contradicts
    the algebra (see the module docstring)."""
    k = cache.key(op)
    result = cache.load(k) if use_cache else None
    if result is None:
        result = compute(op, seed=int(k[:8], 16))
        if use_cache:
            cache.store(k, result)
    check_contradictions(op, result)
    return result


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: torch's thread pool only adds contention (40 ms per call on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute(op, seed: int = 0, seconds: float = SECONDS) -> Analysis:
    """The analysis itself (no cache, no contradiction check)."""
    with _one_thread():
        return _compute(op, seed, seconds)


def _compute(op, seed: int, seconds: float) -> Analysis:
    budget = Budget(seconds)
    assoc = _associativity(op, budget.part(0.55), seed)
    identity = analyse_identity(op, budget.part(0.6), seed + 1)
    commutative, comm_note = _commutativity(op, budget, seed + 2)
    shape = structure(op)
    violation = causality_violation(op, seed) if op.chunk is not None else None
    plan = scan_plan(assoc.status)
    return Analysis(
        op=op.name, associativity=assoc.status, method=assoc.method, reason=assoc.reason,
        counterexample=_counterexample(op, ASSOCIATIVITY, assoc),
        identity=identity.text, identity_kind=identity.kind, identity_note=identity.note,
        commutative=commutative, commutative_note=comm_note,
        structure=shape, elementwise_fields=tuple(elementwise_fields(op).items()),
        causal=None if op.chunk is None else violation is None, causal_violation=violation,
        plan=plan, backends=tuple(backends(plan, shape).items()),
        state_size=state_size(op, plan), state=state_description(op, plan),
        assumes=tuple(sorted(op.assumes)))


# ---------------------------------------------------------------------------- associativity
def _associativity(op, budget: Budget, seed: int) -> Judgement:
    row = monoids.match(op)
    if "associative" in op.assumes:
        j = judge(op, ASSOCIATIVITY, budget, seed)
        if j.status == "refuted":
            return j
        also = "SymPy also proves it" if j.status == "proven" else j.reason
        return Judgement("assumed", f"`assume associative`; no counterexample found ({also})")
    if row is not None:
        return Judgement("proven", f"known monoid: {row.name} ({row.theorem})")
    return judge(op, ASSOCIATIVITY, budget, seed)


def _commutativity(op, budget: Budget, seed: int) -> tuple[bool | None, str]:
    row = monoids.match(op)
    if row is not None and row.commutative:
        return True, f"known monoid: {row.name}"
    j = judge(op, COMMUTATIVITY, budget, seed, trials=150)
    assumed = "commutative" in op.assumes
    if j.status == "proven":
        return True, j.method
    if j.status == "refuted":
        return False, _counterexample(op, COMMUTATIVITY, j).text
    return None, ("assumed (`assume commutative`), not proven: " if assumed else "") + j.reason


def _counterexample(op, law: Law, j: Judgement) -> Counterexample | None:
    if j.found is None:
        return None
    point = j.found.point
    left, right = side_texts(op, j.found.lhs, j.found.rhs)
    elements = tuple((name, tuple((f.name, _texts(g)) for f, g in zip(op.state, point.elements[name])))
                     for name in law.free + law.fixed)
    used = {n.attrs[0] for n in walk(op.combine) if n.op == "param"}
    params = tuple((p, _texts(g)) for p, g in sorted(point.params.items()) if p in used)
    dims = tuple(sorted(point.dims.items())) if op.dims else ()
    return Counterexample(law.name, law.lhs_text, law.rhs_text, elements, left, right, dims, params)


def _texts(grid):
    """A grid's entries as exact DSL text, nested like the grid (a bare string for scalars)."""
    return grid.map(exact_text).to_nested()


# ---------------------------------------------------------------------------- errors
def check_contradictions(op, result: Analysis) -> None:
    if "associative" in op.assumes and result.associativity == "refuted":
        ce = result.counterexample
        raise PsmcAnalysisError(
            f"op '{op.name}' assumes associativity, but combine is not associative: {ce.text}",
            _assume_span(op, "associative") or op.span,
            hint="remove `assume associative;` (the op then runs on the fixed tree scan) or fix combine")
    if "commutative" in op.assumes and result.commutative is False:
        raise PsmcAnalysisError(
            f"op '{op.name}' assumes commutativity, but combine is not commutative: {result.commutative_note}",
            _assume_span(op, "commutative") or op.span, hint="remove `assume commutative;` or fix combine")
    if op.identity is not None and result.identity_kind not in ("declared", "declared, unverified") \
            and "empty_prefix" not in op.assumes:
        raise PsmcAnalysisError(
            f"op '{op.name}' declares an identity that is not one: {result.identity_note.split('; ')[0]}",
            _member_span(op, r"\bidentity\s*=[^;]*;?") or op.span,
            hint="fix the identity, or delete it (psmc then infers one or uses a formal identity); if it is "
                 "only the value of the empty prefix (what an exclusive readout reads before the first token), "
                 "say so with `assume empty_prefix;`")
    if result.causal is False:
        name, row, later = result.causal_violation
        value = next((v for v in op.readout_inputs if v.name == name), None)
        raise PsmcAnalysisError(
            f"the readout of chunk op '{op.name}' is not causal within the chunk: output row {row} "
            f"depends on row {later} of input '{name}' (a later token)",
            (value.span if value is not None and value.span else op.span),
            hint="output row j may use rows 0..j of the chunk only (e.g. attention(..., causal=true))")


def _assume_span(op, prop: str) -> Span | None:
    """The span of the `assume` declaration naming `prop` (found in the op's source lines)."""
    return _member_span(op, rf"\bassume\b[^;]*\b{prop}\b[^;]*;?")


def _member_span(op, pattern: str) -> Span | None:
    """The span of the first match of `pattern` in the op's source lines (comments skipped)."""
    if op.span is None or not op.source_text:
        return None
    for offset, line in enumerate(op.source_text.splitlines()):
        code = line.split("#", 1)[0]
        m = re.search(pattern, code)
        if m:
            lineno = op.span.line + offset
            col = m.start() + 1  # source_text holds whole lines
            return Span(op.span.source, lineno, col, lineno, col + len(m.group(0)))
    return None
