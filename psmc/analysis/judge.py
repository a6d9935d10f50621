"""A verdict with evidence for one law: refute cheaply, then prove, then refute exactly.

1. float64 random search (params random too), confirmed in exact arithmetic -> refuted;
2. bodies with params, attention or layernorm stop here: unknown (random testing only);
3. SymPy proof with symbolic entries for each small size of the dims (1, 2, 3 where the
   time allows; at least the first two must be proven) -> proven;
4. a failed proof turns into a search with exact rationals on the failing branch
   -> refuted, else unknown with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from .budget import Budget
from .laws import Law, uses_params_or_layers
from .prove import prove, search_exact
from .refute import Found, dims_options, search


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
