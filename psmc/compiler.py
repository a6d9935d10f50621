"""The whole pipeline for one `.psm` text: parse → IR → analysis → plan → generated module."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from .codegen.module import generate_module
from .ir import OpIR, ops_from_source


@dataclass(frozen=True)
class Compiled:
    ops: tuple[OpIR, ...]
    analyses: dict  # op name -> analysis object (or None when the analysis stage is absent)
    plans: dict  # op name -> plan dict (at least 'plan': 'exact-scan' | 'tree-scan')
    source: str  # the generated Python module


def source_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def analyse_op(op: OpIR):
    """The analysis, with `backends` narrowed to the kernels codegen really generates (the
    analysis stage says which passes are eligible; only codegen knows what it can print)."""
    from .analysis import analyse
    from .codegen.triton_printer import unsupported_reason

    analysis = analyse(op)
    triton = unsupported_reason(op, {"plan": analysis.plan, "structure": analysis.structure}) is None
    served = ("torch", "triton") if triton else ("torch",)
    return dataclasses.replace(analysis, backends=tuple((p, served) for p in ("forward", "backward", "step")))


def plan_of(analysis) -> dict:
    data = analysis.as_dict()
    return {"plan": data["plan"], "backends": data.get("backends"), "structure": data.get("structure")}


def codegen_notes(op: OpIR, analysis) -> dict:
    """What `psmc check` reports about code generation: fast path and Triton kernels."""
    from .codegen.fastpaths import choose_fast_path
    from .codegen.triton_printer import describe

    plan = plan_of(analysis)
    fast = choose_fast_path(op, plan)
    return {"fast_path": fast.name if fast else None, "triton": describe(op, plan)}


def compile_source(text: str, filename: str = "<string>") -> Compiled:
    ops = tuple(ops_from_source(text, filename))
    analyses = {op.name: analyse_op(op) for op in ops}
    plans = {op.name: plan_of(a) for op, a in zip(ops, analyses.values())}
    from .codegen.fastpaths import choose_fast_path
    fast = {op.name: choose_fast_path(op, plans[op.name]) for op in ops}
    module = generate_module(list(ops), plans, filename, source_hash(text), fast)
    return Compiled(ops, analyses, plans, module)
