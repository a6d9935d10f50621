"""What fits the Triton tile models, decided before any kernel is printed.

Every IR op has a row in TRITON_OPS: a rendering (a format string over the operand names, or
a method of the printer for ops that need care) or an `Unsupported` reason. `layout_of` picks
the tile model of an op (lanes, one state axis, or a [R, C] matrix tile: the roles of
psmc.codegen.triton_matrix), and `unsupported_reason` says why an op gets no kernels (the
torch backend then serves it). The printers (triton_printer, triton_vjp, triton_backward,
triton_matrix) build on this module and the C++ printer reads its layouts; it imports none of
them, so the Triton modules import each other in one direction only (triton_kernels, the
entry point, imports them all).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ..ir.nodes import Node, OpIR, render, walk
from ..ir.ops import OPS
from ..ir.registry import (BINARY_OPS, FLOAT_RESULT, LEAF_OPS, REDUCTIONS, SELECT, STRUCTURE_OPS, UNARY_MATH,
                           UNARY_OPERATOR, Unsupported)

# rendered by the matrix tile model only (psmc.codegen.triton_matrix): the registry rows say so
MATRIX_ONLY = frozenset(row.name for row in STRUCTURE_OPS if row.tile == "matrix" and isinstance(row.triton, str))
# math functions that need a float operand (a dim such as sqrt(K) arrives as an int)
# psmc.ir.registry: the float math, and the float-result binary ops but `/` (Triton's / of ints is a float division)
FLOAT_MATH = frozenset({row.name for row in UNARY_MATH if row.dtype == "float"} | {"pow"} | (FLOAT_RESULT - {"div"}))

# op -> format string over operand names ({0}, {1}, ...), "special" (a printer method), or
# Unsupported(reason). One row per IR op: tests/codegen/test_triton.py checks completeness.
TRITON_OPS: dict[str, object] = {
    # leaves: the printer binds them (psmc.ir.registry)
    **{row.name: "special" for row in LEAF_OPS},
    # unary
    "neg": UNARY_OPERATOR["neg"].triton,
    **{row.name: row.triton for row in UNARY_MATH},  # the math builtins: psmc.ir.registry
    # binary (Triton's `/` is true division, ints promote to fp32, as torch)
    **{row.name: row.triton for row in BINARY_OPS},  # operators, comparisons, max/min: the registry
    "not": UNARY_OPERATOR["not"].triton,
    SELECT.name: SELECT.triton,
    # reductions over the one declared axis (the columns), masked to the real S entries
    **{row.name: "special" for row in REDUCTIONS},  # `reduce` renders the registry row's `triton`
    # cast, broadcast, eye and the structure ops: a rule the row names (TritonBodyPrinter.RULES,
    # or, for the matrix tile model only, triton_matrix.MATRIX_RULES; unsupported_reason rejects
    # those in the one-axis tile models) or the row's Unsupported reason; psmc.ir.registry
    **{row.name: row.triton if isinstance(row.triton, Unsupported) else "special" for row in STRUCTURE_OPS},
}

TL_DTYPES = {"f16": "tl.float16", "bf16": "tl.bfloat16", "f32": "tl.float32", "f64": "tl.float64",
             "i32": "tl.int32", "i64": "tl.int64", "bool": "tl.int1"}
KERNEL_DTYPES = ("f16", "bf16", "f32", "i32", "i64", "bool")  # f64 runs on the torch backend
FLOATS = ("f16", "bf16", "f32", "f64")

# ---------------------------------------------------------------------- what fits the tile model
@dataclass(frozen=True)
class Layout:
    mode: str  # 'lanes' (block scan) | 'state' ([lanes, S] token loop) | 'matrix' ([R, C] token loop)
    axis: object  # the SymPy dim expression of the state axis S, the rows R in matrix mode (None in lanes mode)
    full_tile: bool  # a body reduces over S (over C in matrix mode): one tile must hold all of it
    cols: object = None  # matrix mode: the SymPy dim expression of the column axis C


def _bodies(op: OpIR):
    """What the kernels print: lift, combine, readout, and the identity an exclusive readout
    reads before a fresh stream's first token."""
    extra = tuple(op.identity or ()) if op.exclusive else ()
    return tuple(op.lift) + tuple(op.combine) + tuple(op.readout) + extra


def scan_reason(op: OpIR, plan: dict | None, nodes, cannot) -> str | None:
    """The first checks of both kernel printers (Triton here, C++ in psmc.codegen.cpp_printer):
    an exact scan with an elementwise combine, no chunk, every op of the bodies `nodes`
    rendered (`cannot(op name)`: the renderer's reason it cannot, or None), a combine that
    neither reduces nor ignores its operands. The reason, or None when they pass."""
    if plan is not None and plan.get("plan") != "exact-scan":
        return "tree-scan plan: a scan kernel needs an associative combine; the torch tree serves it"
    structure = (plan or {}).get("structure")
    if structure not in (None, "elementwise"):
        return f"combine structure is {structure!r}, not 'elementwise'"
    if op.chunk is not None:
        return "chunk op: the chunked layout is not generated"
    for node in nodes:
        reason = cannot(node.op)
        if reason is not None:
            return f"uses {node.op!r}: {reason}"
    if any(OPS[n.op].kind == "reduce" for n in walk(op.combine)):
        return "combine reduces over an axis: not elementwise"
    if any(not n.batched for n in op.combine):
        return "a combine output ignores both operands"
    return None


def tree_reason(op: OpIR, plan, cannot, floats=FLOATS) -> str | None:
    """The checks of both tree-kernel printers (Triton: psmc.codegen.triton_tree, C++:
    psmc.codegen.cpp_tree): a tree-scan plan, no chunk, an Agg elementwise over float fields
    (scalars, and vectors of one shape whose elements become lanes) that reads float params of
    those shapes, every op of it rendered (`cannot(op name)`: the renderer's reason it cannot, or
    None), fields and params of the float dtypes `floats` the kernels hold. The reason, or None
    when they pass."""
    scan = plan.get("plan") if isinstance(plan, dict) else getattr(plan, "scan", None)
    structure = plan.get("structure") if isinstance(plan, dict) else getattr(plan, "structure", None)
    if scan not in ("tree-scan", "tree"):
        return "not a tree-scan plan"
    if op.chunk is not None:
        return "chunk op: its Agg runs over whole chunks (cuBLAS matmuls in the torch tree)"
    if structure not in (None, "elementwise"):
        return f"combine structure is {structure!r}, not 'elementwise'"
    vectors = {tuple(f.shape) for f in op.state if f.shape}
    shape = next(iter(vectors), ())  # each element of a vector field is a lane (a scalar field's value is copied to each)
    for f in op.state:
        if len(f.shape) > 1:
            return f"state field {f.name!r} has rank {len(f.shape)}: the tree kernel holds scalar or vector fields"
        if len(vectors) > 1:
            return "vector fields of different shapes: the tree kernel sees each element of a field as a lane"
        if f.dtype not in floats:
            return (f"state field {f.name!r} is {f.dtype}: the tree kernel holds "
                    f"{'/'.join(sorted(floats))} fields")
    for node in walk(tuple(op.combine)):
        reason = cannot(node.op)
        if reason is not None:
            return f"combine uses {node.op!r}: {reason}"
        if OPS[node.op].kind == "reduce":
            return "combine reduces over an axis: not elementwise"
        if node.shape and tuple(node.shape) != shape:
            return f"combine computes a value of shape {list(node.shape)}: not elementwise in the fields"
        if node.op == "param" and node.dtype not in floats:
            return f"combine reads param {node.attrs[0]!r} of {node.dtype}: the tree kernel reads float params"
    if any(not n.batched for n in op.combine):
        return "a combine output ignores both operands"
    return None


def _triton_cannot(name: str) -> str | None:
    rendering = TRITON_OPS[name]
    return rendering.reason if isinstance(rendering, Unsupported) else None


def unsupported_reason(op: OpIR, plan: dict | None) -> str | None:
    """Why `op` gets no Triton kernels, or None when it does."""
    nodes = list(walk(_bodies(op)))
    reason = scan_reason(op, plan, nodes, _triton_cannot)
    if reason is not None:
        return reason
    values = op.state + op.inputs + op.outputs + op.params
    for v in values:
        if v.dtype not in KERNEL_DTYPES:
            return f"{v.name!r} is {v.dtype}: kernels hold f16/bf16/f32/int/bool values"
    if _is_matrix(op):
        return matrix_reason(op)
    for node in nodes:
        if node.op in MATRIX_ONLY:
            return f"uses {node.op!r} without a matrix-valued state: not generated; the torch backend serves it"
    shapes = [tuple(v.shape) for v in values] + [tuple(n.shape) for n in nodes]
    if any(len(s) > 1 for s in shapes):
        return "a value has rank > 1 but no state field does: only matrix-valued states get a second tile axis"
    axes = {sympy.sympify(s[0]) for s in shapes if len(s) == 1}
    if len(axes) > 1:
        return f"values of different lengths {sorted(map(str, axes))}: the tile has one state axis"
    if op.exclusive and op.identity is None:
        return "exclusive readout without an identity: the first token of a stream reads it"
    return None


def _is_matrix(op: OpIR) -> bool:
    """A rank-2 state field: the matrix tile model (psmc.codegen.triton_matrix)."""
    return any(len(f.shape) == 2 for f in op.state)


def layout_of(op: OpIR) -> Layout:
    if _is_matrix(op):
        return matrix_layout(op)
    nodes = list(walk(_bodies(op)))
    axes = {sympy.sympify(s[0]) for s in [tuple(v.shape) for v in op.state + op.inputs + op.outputs + op.params]
            + [tuple(n.shape) for n in nodes] if len(s) == 1}
    full = any(OPS[n.op].kind == "reduce" for n in nodes)
    if not axes:
        return Layout("lanes", None, False)
    return Layout("state", next(iter(axes)), full)


def kernel_layout(op: OpIR) -> Layout:
    """The Triton kernels' tile model: `layout_of`, except for an exclusive readout of scalar
    states, which the lanes' block scan cannot give (a token's exclusive prefix is the scan's
    previous row, across a block boundary the carry): it runs the state tile's token loop over
    [lanes, 1] tiles, a state axis of one column."""
    layout = layout_of(op)
    if layout.mode == "lanes" and op.exclusive:
        return Layout("state", sympy.Integer(1), False)
    return layout


def value_roles(op: OpIR, values) -> tuple:
    """Which tile axes each value spans: '' (scalar), 'r' (rows / the state axis), 'c'
    (columns, matrix mode) or 'rc'."""
    layout = layout_of(op)
    if layout.mode == "matrix":
        return tuple(role_of(v.shape, layout.axis, layout.cols) for v in values)
    return tuple("r" if v.shape else "" for v in values)


# ---------------------------------------------------------------------- the matrix tile: roles and what fits
# matmul (role and rank of each operand) -> the tile axis it contracts
MATMUL_AXIS = {("r", 1, "rc", 2): 0, ("r", 1, "r", 1): 0, ("c", 1, "c", 1): 1, ("rc", 2, "c", 1): 1}


@functools.lru_cache(maxsize=4096)
def _same(a, b) -> bool:
    # dims are polynomials in positive integers: expanding decides equality (simplify() took
    # seconds per op here, thousands of calls)
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def role_of(shape, rows, cols) -> str | None:
    """The tile axes a value of `shape` spans, or None when it fits neither."""
    dims = [sympy.sympify(d) for d in shape]
    if not dims:
        return ""
    if len(dims) == 1:
        hits = [role for role, axis in (("r", rows), ("c", cols)) if _same(dims[0], axis)]
        return hits[0] if len(hits) == 1 else None
    if len(dims) == 2:
        r = "r" if _same(dims[0], rows) else "" if dims[0] == 1 else None
        c = "c" if _same(dims[1], cols) else "" if dims[1] == 1 else None
        return None if r is None or c is None else r + c
    return None


def _matrix_shape(op: OpIR) -> tuple:
    return next(tuple(sympy.sympify(d) for d in f.shape) for f in op.state if len(f.shape) == 2)


def reduce_axis(node: Node, rows, cols) -> int | None:
    """The tile axis a reduction runs over; None for a size-1 declared axis (no reduction)."""
    arg = node.args[0]
    role = role_of(arg.shape, rows, cols)
    if arg.rank == 1:
        return {"r": 0, "c": 1}.get(role)
    char = "r" if node.attrs[0] == 0 else "c"
    return (0 if char == "r" else 1) if char in role else None


def matmul_axis(node: Node, rows, cols) -> int | None:
    a, b = node.args
    return MATMUL_AXIS.get((role_of(a.shape, rows, cols), a.rank, role_of(b.shape, rows, cols), b.rank))


def _view_only(node: Node, rows, cols) -> bool:
    """A getitem of full slices and new axes: the same values on the same tile axes."""
    if any(entry[0] == "index" for entry in node.attrs):
        return False
    arg = node.args[0]
    sliced = [e for e in node.attrs if e[0] == "slice"]
    first = arg.rank - len(sliced)
    for j, entry in enumerate(sliced):
        if not (sympy.sympify(entry[1]) == 0 and _same(entry[2], arg.shape[first + j])):
            return False
    return role_of(arg.shape, rows, cols) == role_of(node.shape, rows, cols)


def matrix_layout(op: OpIR) -> Layout:
    rows, cols = _matrix_shape(op)
    full = False
    for node in walk(_bodies(op)):
        if OPS[node.op].kind == "reduce" and reduce_axis(node, rows, cols) == 1:
            full = True
        if node.op == "matmul" and matmul_axis(node, rows, cols) == 1:
            full = True
    return Layout("matrix", rows, full, cols)


def matrix_reason(op: OpIR) -> str | None:
    """Why a matrix-state op gets no kernels, or None when the matrix tile model serves it."""
    shapes = {tuple(sympy.sympify(d) for d in f.shape) for f in op.state if len(f.shape) == 2}
    if len(shapes) > 1:
        return "matrix fields of different shapes: the tile has one [R, C] layout"
    rows, cols = _matrix_shape(op)
    if _same(rows, cols):
        return f"a square [{rows}, {cols}] state: which tile axis a vector spans would be ambiguous"
    if op.exclusive and op.identity is None:
        return "exclusive readout without an identity: the first token of a stream reads it"
    for v in op.inputs + op.outputs + op.params:
        if len(v.shape) > 1:
            return f"{v.name!r} has rank {len(v.shape)}: per-token inputs, outputs and params are at most vectors"
    for v in op.state + op.inputs + op.outputs + op.params:
        if role_of(v.shape, rows, cols) is None:
            return f"{v.name!r} spans no axis of the [{rows}, {cols}] tile"
    for node in walk(_bodies(op)):
        what = render(node)[:60]
        if role_of(node.shape, rows, cols) is None:
            return f"{what} has a shape that spans no axis of the [{rows}, {cols}] tile"
        if node.op == "matmul" and matmul_axis(node, rows, cols) is None:
            return f"{what}: only vector @ matrix, matrix @ vector and vector @ vector are generated"
        if node.op == "outer" and tuple(role_of(a.shape, rows, cols) for a in node.args) != ("r", "c"):
            return f"{what}: only outer([{rows}], [{cols}]) is generated"
        if node.op == "getitem" and not _view_only(node, rows, cols):
            return f"{what}: only full slices and new axes that keep the tile axes are generated"
    if any(n.op == "matmul" for n in walk(op.combine)):
        return "combine contracts an axis: not elementwise"
    return None
