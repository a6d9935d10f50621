"""The whole pipeline for one `.psm` text: parse → IR → analysis → plan → generated module."""
from __future__ import annotations

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
    from .analysis import analyse
    return analyse(op)


def plan_of(analysis) -> dict:
    data = analysis.as_dict()
    return {"plan": data["plan"], "backends": data.get("backends"), "structure": data.get("structure")}


def compile_source(text: str, filename: str = "<string>") -> Compiled:
    ops = tuple(ops_from_source(text, filename))
    analyses = {op.name: analyse_op(op) for op in ops}
    plans = {op.name: plan_of(a) for op, a in zip(ops, analyses.values())}
    from .codegen.fastpaths import choose_fast_path
    fast = {op.name: choose_fast_path(op, plans[op.name]) for op in ops}
    module = generate_module(list(ops), plans, filename, source_hash(text), fast)
    return Compiled(ops, analyses, plans, module)
