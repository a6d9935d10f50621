"""Float comparisons at a tie: where rounding alone may pick the other branch.

`x > y` (and `<`, `<=`, `>=`, `==`, `!=`) on floats is a discontinuity. When the two operands
are equal in exact arithmetic (`(l - r) + abs(r) > l` for r >= 0; `0.01 * index - 0.2` at
index 20), a difference of one rounding step decides the branch, and the outputs that follow
differ by O(1). Two roundings the runner meets legitimately do that:

- float32 vs float64 (the float32 check): the same program computed in two precisions;
- the canonical IR vs the IR as written (the reference check): canonicalisation reassociates
  `+` and `*` chains (psmc/ir/rewrite.py: same value in exact arithmetic, not the same
  rounding), the layer computes the canonical form and the reference the written one.

Neither is a bug, and a check must not call it one; but neither may hide a real one. So a
check that fails on an op with a float comparison asks `nearest_tie` how close the float64
operands of its comparisons came to each other on the failing lanes, and forgives the failure
only when some comparison came within the rounding in question of a tie (TIE_F32, TIE_F64).
"""
from __future__ import annotations

import contextlib
import math

import torch

import layer_reference
from psmc.ir.interp import evaluate
from psmc.ir.nodes import walk

COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
# sign(x) jumps at x = 0 as a comparison of x with 0 does (seed 300601: sign(0.01 * index - 0.2)
# is 0 at index 20 in one rounding and -1 in another); the only discontinuous builtin
JUMPS = COMPARISONS | {"sign"}
# how close (|a - b| / max(|a|, |b|, 1): the values of generated programs are O(1)) two float64
# operands must be for a rounding of that size to flip the comparison
TIE_F32 = 1e-5  # float32: ~100 roundings of 6e-8 on the way to the comparison
TIE_F64 = 1e-12  # float64 reassociation: a few roundings of 1.1e-16


def float_comparisons(op) -> tuple:
    """The comparison nodes of the op's bodies with a float operand that is not a constant."""
    bodies = [b for b in (op.lift, op.combine, op.readout, op.identity) if b]
    return tuple(n for body in bodies for n in walk(body) if _float_jump(n)
                 and not all(a.op in ("const", "dim") for a in n.args))


def _float_jump(node) -> bool:
    """A comparison with a float operand, or sign() of a float."""
    return node.op in JUMPS and any(a.dtype.startswith(("f", "bf")) for a in node.args)


@contextlib.contextmanager
def _recording(gaps: list):
    """layer_reference's `evaluate`, also recording the gap of every float comparison met."""
    def recording_evaluate(outputs, env, dims):
        outputs = tuple(outputs)
        compares = [n for n in walk(outputs) if _float_jump(n)]
        operands = tuple(a for n in compares for a in n.args)
        values = evaluate(outputs + operands, env, dims)
        rest = list(values[len(outputs):])
        for n in compares:  # a comparison's two operands; sign's one, against 0
            a = rest.pop(0)
            b = rest.pop(0) if len(n.args) == 2 else torch.zeros_like(torch.as_tensor(a))
            a, b = torch.broadcast_tensors(torch.as_tensor(a).double(), torch.as_tensor(b).double())
            gap = (a - b).abs() / torch.maximum(torch.maximum(a.abs(), b.abs()), torch.ones_like(a))
            if gap.numel():
                gaps.append(float(gap.min()))
        return values[:len(outputs)]

    saved = layer_reference.evaluate
    layer_reference.evaluate = recording_evaluate
    try:
        yield
    finally:
        layer_reference.evaluate = saved


def nearest_tie(op, dims: dict, params: dict, lane_inputs: dict, tree: bool) -> float:
    """The smallest relative gap between the float64 operands of a float comparison, over the
    reference run of one lane (`lane_inputs` as for layer_reference.reference_outputs); inf
    when no float comparison is evaluated."""
    gaps: list = []
    with _recording(gaps):
        layer_reference.reference_outputs(op, dims, params, lane_inputs, tree)
    return min(gaps, default=math.inf)


def reference_at_a_tie(op, dims: dict, params: dict, lane_inputs: dict, tree: bool, check) -> bool:
    """After the layer disagreed with the reference of the op as written on one lane: True when
    the disagreement is a comparison at a tie decided differently by the canonical IR's
    rounding, i.e. the written op's reference came within TIE_F64 of a tie and the layer
    agrees with the reference of the canonical op (`check(want)` raises the runner's Failure
    when it does not: then the layer is wrong, tie or not)."""
    from psmc.ir.rewrite import canonicalize
    if not float_comparisons(op) or nearest_tie(op, dims, params, lane_inputs, tree) > TIE_F64:
        return False
    check(layer_reference.reference_outputs(canonicalize(op), dims, params, lane_inputs, tree))
    return True


def float32_reference_at_a_tie(op, dims: dict, params: dict, lane_inputs: dict, tree: bool) -> bool:
    """After a layer that computes in float32 disagreed with the reference (the interpreter
    computes every float in float64) on one lane: True when that lane came within TIE_F32 of a
    tie in the canonical op (the one the layer computes), as the float32 check forgives."""
    from psmc.ir.rewrite import canonicalize
    return bool(float_comparisons(op)) and nearest_tie(canonicalize(op), dims, params, lane_inputs, tree) <= TIE_F32


def float32_at_ties(op, dims: dict, params: dict, inputs: dict, got: tuple, want: tuple, lead: tuple,
                    tree: bool, rms: float) -> bool:
    """After the float32 layer missed the float64 one: True when every (batch row, lane) where
    some output is off (relative RMS error above `rms`, or integer outputs differing) has a
    float comparison whose float64 operands came within TIE_F32 of a tie in the canonical op
    (the one both layers compute). `inputs` are the float64 inputs broadcast to `lead`;
    `params` a dict, or a function of the lane index tuple giving that lane's (per-lane params)."""
    from psmc.ir.rewrite import canonicalize
    if not float_comparisons(op):
        return False
    canonical = canonicalize(op)
    rows = [(b, *lane) for b in range(lead[0]) for lane in _lanes(lead[2:])]
    for row in rows:
        where = (row[0], slice(None), *row[1:])
        off = False
        for g, w in zip(got, want):
            g, w = g[where], w[where]
            if w.is_floating_point():
                off |= not float((g.double() - w).norm() / w.norm().clamp_min(1e-6)) <= rms
            else:
                off |= not torch.equal(g, w)
        lane_params = params(tuple(row[1:])) if callable(params) else params
        if off and nearest_tie(canonical, dims, lane_params, {n: x[where] for n, x in inputs.items()}, tree) > TIE_F32:
            return False
    return True


def _lanes(sizes) -> list:
    import itertools
    return list(itertools.product(*(range(n) for n in sizes)))
