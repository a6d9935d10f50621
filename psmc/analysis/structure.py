"""Structure of combine (elementwise / affine / general) and causality of chunk readouts.

- elementwise: every output entry depends only on the matching entries of the fields after
  broadcasting. Decided on the IR: every node on the way from the fields to an output is
  elementwise in the ops table, or a pure view (full slices and new axes only, which change
  how a value broadcasts, not which entries meet). Scalar fields always qualify.
- affine: linear in the earlier element `l` (constant terms from `r` allowed), with products
  across entries (matmul). Decided by a degree count on the IR: fields of `l` have degree 1,
  everything else 0; + and - take the larger degree, * @ outer add degrees, / needs a
  degree-0 denominator, other nonlinear functions need a degree-0 argument. A degree above
  1 anywhere in an output means not affine (a syntactic test: `l.x * l.x - l.x * l.x` counts
  as quadratic).
- causal chunk readout: output row j may depend only on rows 0..j of each chunk input.
  Decided by perturbation in float64: rows after j are replaced by other random values and
  rows 0..j of every output must not move.
"""
from __future__ import annotations

import math

import torch

from ..ir import interp, registry
from ..ir.interp import concrete_shape
from ..ir.nodes import Node, walk
from .refute import dims_options

INFINITE = math.inf


def _nonpolynomial(a):
    return 0 if all(d == 0 for d in a) else INFINITE


# the degree rules the registry rows name (`degree`, psmc.ir.registry.DEGREES): operand degrees -> degree
DEGREE_RULES = {
    "linear": max,  # sums, negation, views, casts, linear reductions
    "product": lambda a: a[0] + a[1],
    "quotient": lambda a: a[0] if a[1] == 0 else INFINITE,
    "select": lambda a: max(a[-2:]) if a[0] == 0 else _nonpolynomial(a),  # a condition free of l
}
_DEGREE = {row.name: DEGREE_RULES[row.degree] for row in registry.rows() if getattr(row, "degree", None)}


def is_view(node: Node) -> bool:
    shape = node.args[0].shape
    axis = 0
    for item in node.attrs:
        if item[0] == "newaxis":
            continue
        if item[0] != "slice" or item[1] != 0 or item[2] != shape[axis]:
            return False
        axis += 1
    return True


def elementwise_output(node: Node) -> bool:
    """Is this combine output elementwise in the fields (after broadcasting)?"""
    for n in walk((node,)):
        if n.op == "getitem":
            if not is_view(n):
                return False
        elif not n.info.elementwise:
            return False
    return True


def elementwise_fields(op) -> dict[str, bool]:
    return {f.name: elementwise_output(n) for f, n in zip(op.state, op.combine)}


def degree_in_left(node: Node) -> float:
    """Polynomial degree of `node` in the fields of l (INFINITE when not polynomial)."""
    deg: dict[Node, float] = {}
    for n in walk((node,)):
        a = [deg[x] for x in n.args]
        if not n.args:
            deg[n] = 1 if n.op == "field" and n.attrs[0] == "left" else 0
        elif n.op in _DEGREE:  # psmc.ir.registry names the rule
            deg[n] = _DEGREE[n.op](a)
        else:
            deg[n] = _nonpolynomial(a)
    return deg[node]


def structure(op) -> str:
    if all(elementwise_fields(op).values()):
        return "elementwise"
    if all(degree_in_left(n) <= 1 for n in op.combine):
        return "affine"
    return "general"


# ---------------------------------------------------------------------------- causality
def causality_violation(op, seed: int = 0) -> tuple[str, int, int] | None:
    """For a chunk op: (input name, output row, input row) of a dependency of an output row
    on a LATER row of a chunk input; None when the readout is causal within the chunk."""
    if op.chunk is None:
        return None
    rng = torch.Generator().manual_seed(seed)
    for dims in _causal_dims(op):
        chunk = interp.concrete(op.chunk, dims)
        env = _random_env(op, dims, rng)
        base = interp.evaluate(op.readout, env, dims)
        for value in op.readout_inputs:
            shape = concrete_shape(value.shape, dims)
            if not value.shape or shape[0] != chunk:
                continue
            for j in range(chunk - 1):
                moved = dict(env)
                noise = _random_tensor(value.dtype, shape, rng)
                changed = env[("arg", value.name)].clone()
                changed[j + 1:] = noise[j + 1:]
                moved[("arg", value.name)] = changed
                out = interp.evaluate(op.readout, moved, dims)
                for a, b in zip(base, out):
                    if not _rows_equal(a[: j + 1], b[: j + 1]):
                        later = _first_row_that_matters(op, env, value, dims, j, a[: j + 1], rng)
                        return value.name, j, later
    return None


def _first_row_that_matters(op, env, value, dims, j, rows, rng) -> int:
    """The first later row whose change alone moves output rows 0..j (for the message)."""
    shape = concrete_shape(value.shape, dims)
    for k in range(j + 1, shape[0]):
        moved = dict(env)
        changed = env[("arg", value.name)].clone()
        changed[k] = _random_tensor(value.dtype, shape, rng)[k]
        moved[("arg", value.name)] = changed
        out = interp.evaluate(op.readout, moved, dims)
        base = interp.evaluate(op.readout, env, dims)
        if any(not _rows_equal(a[: j + 1], b[: j + 1]) for a, b in zip(base, out)):
            return k
    return j + 1


def _causal_dims(op) -> list[dict]:
    options = dims_options(op, sizes=(3, 2))
    return options[:1] if options else []


def _random_tensor(dtype: str, shape, rng) -> torch.Tensor:
    if dtype == "bool":
        return torch.rand(shape, generator=rng) < 0.5
    if dtype in ("i32", "i64"):
        return torch.randint(-3, 4, shape, generator=rng)
    return torch.randn(shape, generator=rng, dtype=torch.float64)


def _random_env(op, dims, rng) -> dict:
    env = {("index",): torch.tensor(1)}
    for p in op.params:
        env[("param", p.name)] = _random_tensor(p.dtype, concrete_shape(p.shape, dims), rng)
    for f in op.state:
        env[("field", "state", f.name)] = _random_tensor(f.dtype, concrete_shape(f.shape, dims), rng)
    for v in op.readout_inputs:
        env[("arg", v.name)] = _random_tensor(v.dtype, concrete_shape(v.shape, dims), rng)
    return env


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return bool((a == b).all())
    return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True))
