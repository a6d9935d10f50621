"""The whole pipeline for one `.psm` text: parse → IR → canonical IR → analysis → plan → module.

Each stage reads the results of the earlier ones and never rewrites them: the analysis judges
the op as written (its verdicts and counterexamples speak about the user's code), the plan is
computed once from the analysis and the canonical IR, and codegen prints the canonical IR the
plan describes. The Triton printer's answer to "can you render this op" is asked here and
handed to the plan stage as an input (the plan stage imports no later stage).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .codegen.module import generate_module
from .ir import OpIR, ops_from_source
from .ir.rewrite import canonicalize


@dataclass(frozen=True)
class Compiled:
    ops: tuple[OpIR, ...]  # canonical
    analyses: dict  # op name -> Analysis
    plans: dict  # op name -> Plan (psmc.plan)
    source: str  # the generated Python module


def source_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def analyse_op(op: OpIR):
    """The analysis of the op as written (verdicts, counterexamples, identity)."""
    from .analysis import analyse
    return analyse(op)


def plan_op(op: OpIR, analysis):
    """(canonical op, Plan)."""
    from .analysis.classes import coarse_structure
    from .codegen.triton_layout import unsupported_reason
    from .plan import make_plan

    canonical = canonicalize(op)
    plan = {"plan": analysis.plan, "structure": coarse_structure(canonical)}
    if analysis.plan == "tree-scan":  # the tree kernels (psmc.codegen.triton_tree), not the block scan's
        from .codegen import triton_tree
        reason = triton_tree.unsupported_reason(canonical, plan)
    else:
        reason = unsupported_reason(canonical, plan)
    return canonical, make_plan(canonical, analysis, reason)


def codegen_notes(op: OpIR, plan) -> dict:
    """What `psmc check` reports about code generation besides the plan: the Triton and C++
    kernels."""
    from .codegen import cpp_tree
    from .codegen.cpp_printer import describe as describe_cpu
    from .codegen.triton_kernels import describe
    plan_dict = {"plan": plan.scan, "structure": plan.structure}
    return {"triton": describe(op, plan_dict), "cpu": cpp_tree.describe(op, plan_dict) or describe_cpu(op, plan_dict)}


def compile_source(text: str, filename: str = "<string>") -> Compiled:
    ops = tuple(ops_from_source(text, filename))
    analyses = {op.name: analyse_op(op) for op in ops}
    planned = [plan_op(op, analyses[op.name]) for op in ops]
    canonical = tuple(c for c, _ in planned)
    plans = {c.name: p for c, p in planned}
    module = generate_module(list(canonical), plans, filename, source_hash(text))
    return Compiled(canonical, analyses, plans, module)
