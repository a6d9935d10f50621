"""The plan stage: one typed, frozen `Plan` per op, computed once, read by codegen and `psmc check`.

Inputs: the CANONICAL op (psmc.ir.rewrite), its `Analysis` (the algebra: associativity, ...)
and what the Triton printer says it can render (a reason or None; the compiler asks codegen
and passes the answer in, so this stage imports no later one). Output: the scan, the
structure class, the implementation chosen for each pass (forward, backward, step) on each
backend, a reason for every path not taken, and the fields the stream state keeps.

    plan = make_plan(canonical_op, analysis, triton_reason=None)
    plan.fast_path         # 'chunkwise:key' | 'first_order' | 'delta_rule' | 'dplr' | None
    plan.as_dict()         # the plan keys of `psmc check --json`
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..analysis.classes import StructureClass, classify, coarse_structure
from ..analysis.liveness import stream_dead_fields
from ..analysis.plan import PASSES, _count, _size_text, _category
from ..ir.nodes import OpIR

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Choice:
    """The implementation serving one pass on one backend."""

    pass_name: str  # 'forward' | 'backward' | 'step'
    backend: str  # 'torch' | 'triton'
    impl: str  # what runs, in words a reader can find in the code


@dataclass(frozen=True)
class Plan:
    op: str
    scan: str  # 'exact-scan' | 'tree-scan'
    structure: str  # 'elementwise' | 'affine' | 'general', of the canonical combine
    structure_class: StructureClass
    fast_path: str | None  # the torch forward's fast path, None: the generic scan
    choices: tuple[Choice, ...]
    not_taken: tuple[tuple[str, str], ...]  # (path, why not)
    stream_fields: tuple[str, ...]  # the fields a stream state keeps (dead ones dropped)
    state_size: str

    @property
    def backends(self) -> dict[str, tuple[str, ...]]:
        return {p: tuple(b for b in BACKENDS if any(c.pass_name == p and c.backend == b for c in self.choices))
                for p in PASSES}

    def as_dict(self) -> dict:
        """The plan's keys in `psmc check --json`."""
        return {
            "plan": self.scan,
            "structure": self.structure,
            "class": self.structure_class.as_dict(),
            "fast_path": self.fast_path,
            "backends": {p: list(b) for p, b in self.backends.items()},
            "implementations": {p: {c.backend: c.impl for c in self.choices if c.pass_name == p} for p in PASSES},
            "not_taken": [{"path": p, "reason": r} for p, r in self.not_taken],
            "stream_fields": list(self.stream_fields),
            "state_size": self.state_size,
        }

    def rows(self) -> list[tuple[str, str]]:
        """(label, text) rows for `psmc check`."""
        cls = self.structure_class
        rows = [("class", f"{cls.name}{f' ({cls.detail})' if cls.detail else ''}: {cls.reason}")]
        for p in PASSES:
            rows.append((p, "; ".join(f"{c.backend}: {c.impl}" for c in self.choices if c.pass_name == p)))
        for path, why in self.not_taken:
            rows.append(("not taken", f"{path}: {why}"))
        return rows


FAST_PATH_WORDS = {
    "chunkwise:none": "chunkwise matmul form (linear attention, no decay)",
    "chunkwise:scalar": "chunkwise matmul form (scalar decay per lane)",
    "chunkwise:key": "chunkwise matmul form (per-key diagonal decay)",
    "first_order": "blocked first-order linear recurrence",
    "delta_rule": "delta rule, E never built (psmc.runtime.delta.chunk_delta_rule)",
    "dplr": "diagonal plus rank one in the chunked WY form, E never built (psmc.runtime.dplr.chunk_dplr)",
}

# The fast paths whose stream states hold S alone (E is never built, not even as a dead slot)
COMPACT_FAST_PATHS = ("delta_rule", "dplr")

# What backend='auto' runs for CUDA tensors when the fast path serves the forward
# (psmc.runtime.dispatch's cost rule), and how it takes packed sequences (cu_seqlens)
# a first-order op whose state has an axis per lane and which has generated kernels
# (psmc.runtime.dispatch: the state loop costs less than the first-order scan there)
STATE_LOOP_GPU = ("the generated state loop (triton-state-loop: lift, recurrence and readout in one kernel over "
                  "[lanes, state axis] tiles; the first-order scan would run the lift and readout in torch over "
                  "[B, T, lanes, state axis] tensors); packed sequences in one launch")
_CHUNK_GPU = ("chunked tensor-core Triton kernels (psmc.runtime.{module}): bf16/fp16 q, k, v that are inputs read as given, "
              "fp32 accumulation; packed sequences (cu_seqlens) in the same launches")
FAST_PATH_GPU = {
    "chunkwise:none": _CHUNK_GPU.format(module="triton_chunk"),
    "chunkwise:scalar": _CHUNK_GPU.format(module="triton_chunk"),
    "chunkwise:key": _CHUNK_GPU.format(module="triton_chunk"),
    "delta_rule": _CHUNK_GPU.format(module="triton_delta") + " (the chunked WY form)",
    "dplr": ("inference: the chunked WY form on two Triton kernels (psmc.runtime.triton_dplr: 16-token chunks with "
             "exact per-key decays, the state in registers across chunks; bf16/fp16 inputs read as given); training: "
             "the chunk-local terms in torch (batched cuBLAS matmuls and triangular solves, autograd) and the "
             "chunks chained on two Triton kernels, one forward, one backward (psmc.runtime.triton_dplr.chain); "
             "packed sequences in one call, each padded to whole chunks"),
    "first_order": ("the first-order scan kernel (psmc.runtime.triton_scan: channels across threads, time in "
                    "tiles scanned by each program; the lift and readout in torch); packed sequences in one scan"),
}


def _fast_path(op: OpIR, cls: StructureClass) -> tuple[str | None, list[tuple[str, str]]]:
    """The torch forward's fast path and why the others are not taken."""
    skipped = []
    if op.exclusive and cls.name != "decayed-linear-attention":  # (the chunkwise form reads S_{t-1} as well)
        skipped.append(("fast path", "exclusive readout: the prefix shift is fused into the chunkwise form only"))
        return None, skipped
    if op.chunk is not None:
        skipped.append(("fast path", "chunk op: the chunk readout runs on the generic scan"))
        return None, skipped
    if cls.name == "decayed-linear-attention":
        return f"chunkwise:{cls.detail}", skipped
    if cls.name == "first-order":
        skipped.append(("chunkwise matmul form", "the update is not outer(k, v) read out as q @ S"))
        return "first_order", skipped
    if cls.name == "identity-plus-low-rank":
        return "delta_rule", skipped
    if cls.name == "diagonal-plus-low-rank":
        return "dplr", skipped
    skipped.append(("fast path", f"class {cls.name} has no fast form; the generic scan serves it"))
    return None, skipped


def _stream_fields(op: OpIR, scan: str) -> tuple[str, ...]:
    """The fields a stream state keeps: those live in a left-operand prefix
    (psmc.analysis.liveness: S6's and GLA's decay product `a` and the delta rule's `E` feed only
    their own next value, never the readout); a tree scan keeps them all."""
    dead = stream_dead_fields(op, scan)
    return tuple(f.name for i, f in enumerate(op.state) if i not in dead)


def _state_size(op: OpIR, scan: str, kept: tuple[str, ...]) -> str:
    if scan != "exact-scan" or len(kept) == len(op.state):
        from ..analysis.plan import state_size
        return state_size(op, scan)
    sizes: dict = {}
    for f in op.state:
        if f.name in kept:
            n = sympy.Mul(*f.shape) if f.shape else sympy.Integer(1)
            sizes[_category(f.dtype)] = sizes.get(_category(f.dtype), sympy.Integer(0)) + n
    return " + ".join(_count(_size_text(sizes[c]), c) for c in ("float", "int", "bool") if c in sizes)


def make_plan(op: OpIR, analysis, triton_reason: str | None) -> Plan:
    """`op` is canonical; `analysis` its Analysis; `triton_reason` why the Triton printer cannot
    serve the op (None: it can)."""
    scan = analysis.plan
    cls = classify(op, scan == "exact-scan")
    fast, not_taken = _fast_path(op, cls)
    generic = "generic exact scan (log-depth, associative)" if scan == "exact-scan" else \
        "fixed tree scan (PAPER.md §3 bracketing)"
    forward = f"fast path: {FAST_PATH_WORDS[fast]}" if fast else generic
    if fast:
        not_taken.insert(0, (generic, "the fast path computes the same prefixes without the per-token states "
                                      "(layer.use_fast_path = False selects the generic scan)"))
    step = {"exact-scan": "combine the token into the inclusive prefix",
            "tree-scan": "push the token onto the binary counter"}[scan]
    steps = len(cls.piece("steps") or ())
    if fast == "delta_rule" and steps:  # a product of delta steps (DeltaProduct)
        step = (f"psmc.runtime.delta.delta_product_step, O({steps}*K*V) per token: its {steps} delta steps in one "
                "Triton kernel on CUDA tensors (psmc/runtime/triton_delta_step.py); backend='auto' on CPU tensors: one "
                "fused C++ call for the steps (psmc/runtime/cpu_lane.cpp); else one delta_rule_step each")
    elif fast == "delta_rule":
        step = ("psmc.runtime.delta.delta_rule_step, O(K*V) per token (backend='auto' on CPU tensors: one fused C++ "
                "token, psmc/runtime/cpu_lane.cpp, when a compiler is present; CUDA tensors: one Triton kernel, "
                "psmc/runtime/triton_delta_step.py)")
    elif fast == "dplr":
        step = ("psmc.runtime.dplr.dplr_step, O(K*V) per token: S <- d * S + b (a^T S) + k v^T (CUDA tensors: one "
                "Triton kernel, psmc/runtime/triton_dplr_step.py)")
    choices = [Choice("forward", "torch", forward), Choice("backward", "torch", "autograd through the forward"),
               Choice("step", "torch", step)]
    if triton_reason is None and scan == "tree-scan":
        choices += [Choice("forward", "triton", "tree kernel: each thread walks the fixed tree's leaves for its "
                                                "lanes (lift and readout in torch)"),
                    Choice("backward", "triton", "tree kernel: the adjoint walk, leaves in reverse"),
                    Choice("step", "triton", "a TreeCache token (the serving state): one step kernel, each row "
                                             "walks its own merges (a TreeState's step is the torch push)")]
    elif triton_reason is None:
        choices += [Choice("forward", "triton", "fused forward kernel"),
                    Choice("backward", "triton", "fused backward kernel"),
                    Choice("step", "triton", "fused step kernel")]
    else:
        not_taken.append(("triton", triton_reason))
    kept = _stream_fields(op, scan)
    dropped = [f.name for f in op.state if f.name not in kept]
    if dropped:
        not_taken.append(("stream field " + ", ".join(dropped),
                          "dead in a stream: it only feeds its own next value, the prefix is always the left operand"))
    return Plan(op=op.name, scan=scan, structure=coarse_structure(op), structure_class=cls, fast_path=fast,
                choices=tuple(choices), not_taken=tuple(not_taken), stream_fields=kept,
                state_size=_state_size(op, scan, kept))
