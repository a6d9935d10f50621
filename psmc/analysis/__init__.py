"""The algebra of an op: associativity (with a proof or a counterexample), identity,
commutativity, structure, causality of chunk readouts, and the scan plan.

    from psmc.analysis import analyse
    result = analyse(op)          # an Analysis (frozen); result.report(), result.as_dict()
"""
from .pipeline import analyse, check_contradictions, compute
from .result import Analysis, Counterexample
from .structure import elementwise_fields

__all__ = ["Analysis", "Counterexample", "analyse", "check_contradictions", "compute", "elementwise_fields"]
