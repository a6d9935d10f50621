"""An independent reference for a generated layer: the op's IR bodies evaluated one position of
one lane at a time by the reference interpreter (psmc.ir.interp), combined by a plain left fold
(associative ops) or by the closed form of the paper's tree written here (the others).

Nothing here uses psmc.runtime or the generated code; only the IR and its interpreter.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from psmc.ir import ops_from_file
from psmc.ir.interp import concrete, evaluate

# Padding of a final partial chunk: deliberately not zero, so a layer whose visible outputs
# depend on the padding disagrees with the reference.
PAD_VALUE = 7.0


@lru_cache(maxsize=None)
def op_ir(path: str, name: str):
    return next(op for op in ops_from_file(path) if op.name == name)


class Bodies:
    """lift / combine / readout / identity of one op as functions of plain tensors."""

    def __init__(self, op, dims: dict, params: dict):
        self.op, self.dims = op, dims
        self.params = {("param", name): value for name, value in params.items()}

    def lift(self, args: dict, index: int) -> tuple:
        env = {("arg", n): v for n, v in args.items()}
        return evaluate(self.op.lift, {**env, **self.params, ("index",): torch.tensor(index)}, self.dims)

    def combine(self, left: tuple, right: tuple) -> tuple:
        env = dict(self.params)
        for f, l, r in zip(self.op.state, left, right):
            env[("field", "left", f.name)] = l
            env[("field", "right", f.name)] = r
        return evaluate(self.op.combine, env, self.dims)

    def identity(self) -> tuple:
        return evaluate(self.op.identity, dict(self.params), self.dims)

    def readout(self, prefix: tuple, args: dict, index: int) -> tuple:
        env = {("field", "state", f.name): v for f, v in zip(self.op.state, prefix)}
        env.update({("arg", n): v for n, v in args.items()})
        return evaluate(self.op.readout, {**env, **self.params, ("index",): torch.tensor(index)}, self.dims)


def left_fold_prefixes(elements: list, combine) -> list:
    """Inclusive prefixes s_t = (...(x_0 . x_1) . ...) . x_t, one combine per step."""
    prefixes = [elements[0]]
    for x in elements[1:]:
        prefixes.append(combine(prefixes[-1], x))
    return prefixes


def tree_prefixes(elements: list, agg) -> list:
    """P(1), ..., P(n) of PAPER.md §3 by its closed form: with n = 2^k1 + 2^k2 + ... (k1 > k2 >
    ...), P(n) = Agg(...Agg(B1, B2)..., Bm), Bi the balanced tree over the i-th run of 2^ki
    leaves, balanced(lo, hi) = Agg(balanced(lo, mid), balanced(mid, hi)). The formal identity
    never meets Agg."""
    blocks = {}

    def balanced(lo: int, hi: int):
        if (lo, hi) not in blocks:
            if hi - lo == 1:
                blocks[lo, hi] = elements[lo]
            else:
                mid = (lo + hi) // 2
                blocks[lo, hi] = agg(balanced(lo, mid), balanced(mid, hi))
        return blocks[lo, hi]

    out = []
    for n in range(1, len(elements) + 1):
        prefix, start = None, 0
        for k in reversed(range(n.bit_length())):
            if (n >> k) & 1:
                block = balanced(start, start + (1 << k))
                prefix = block if prefix is None else agg(prefix, block)
                start += 1 << k
        out.append(prefix)
    return out


def reference_outputs(op, dims: dict, params: dict, lane_inputs: dict, tree: bool) -> tuple:
    """Outputs of one lane: `lane_inputs[name]` is `[T, *declared]` (chunk ops: `[T, *rest]`).
    Returns one tensor per output, `[T, *output]`."""
    bodies = Bodies(op, dims, params)
    T = next(iter(lane_inputs.values())).shape[0]
    chunk = None if op.chunk is None else concrete(op.chunk, dims)
    if chunk is None:
        steps = [{n: x[t] for n, x in lane_inputs.items()} for t in range(T)]
    else:
        steps = [{n: _chunk(x, i, chunk) for n, x in lane_inputs.items()} for i in range(-(-T // chunk))]
    lift_names = [v.name for v in op.lift_inputs]
    readout_names = [v.name for v in op.readout_inputs]
    elements = [bodies.lift({n: s[n] for n in lift_names}, i) for i, s in enumerate(steps)]
    scan = tree_prefixes if tree else left_fold_prefixes
    inclusive = scan(elements, bodies.combine)
    if op.exclusive:
        prefixes = [bodies.identity()] + inclusive[:-1]
    else:
        prefixes = inclusive
    rows = [bodies.readout(p, {n: s[n] for n in readout_names}, i)
            for i, (p, s) in enumerate(zip(prefixes, steps))]
    if chunk is None:
        return tuple(torch.stack(parts) for parts in zip(*rows))
    return tuple(torch.cat(parts)[:T] for parts in zip(*rows))


def _chunk(x: torch.Tensor, i: int, chunk: int) -> torch.Tensor:
    part = x[i * chunk:(i + 1) * chunk]
    missing = chunk - part.shape[0]
    if missing:
        pad = torch.full((missing, *part.shape[1:]), PAD_VALUE, dtype=part.dtype)
        part = torch.cat([part, pad])
    return part
