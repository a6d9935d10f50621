"""The matrix tile model: fused forward, backward and decode-step kernels for elementwise
exact scans whose state holds a matrix (gla, simple_gla, retention, linear_attention, mlstm,
rwkv6).

A program owns one batch row, one lane and a [BLOCK_R, BLOCK_C] tile of the [R, C] state: all
of its rows and a slice of its columns (all of them when a gradient will be needed, since the
adjoints of vectors over R sum over C, or when a body reduces over C). Every value spans some
of the tile's axes, its *role*: '' a scalar ([1, 1]), 'r' a vector over R ([BLOCK_R, 1]), 'c'
a vector over C ([1, BLOCK_C]), 'rc' the matrix. Tile broadcasting then is the IR's own
broadcasting: outer(k, v) is k * v, r.a[:, None] is r.a, q @ S is a masked sum over the rows.

Time is a token loop (the shape of fla's fused_recurrent kernels): an [R, C] prefix per token
does not fit in registers the way the block scan of the one-axis model does. Per token: load
→ lift → (an exclusive readout reads the carried state here, the identity for the first token
of a fresh stream) → combine with the carry → (an inclusive readout reads the new prefix) →
store. The carry entering each block of BLOCK_T tokens is saved for the backward, which walks
the blocks from last to first: it recomputes the block's prefixes from the saved carry into a
per-program scratch, then steps the adjoint back token by token (the recurrence of
psmc.codegen.triton_backward; every VJP printed from the IR by psmc.codegen.triton_vjp).
"""
from __future__ import annotations

from ..ir.nodes import Node, OpIR
from ..ir.ops import OPS
import sympy

from ..ir.registry import STRUCTURE_OPS
from .triton_layout import (FLOATS, Layout, kernel_layout, layout_of, matmul_axis, matrix_layout, matrix_reason,  # noqa: F401
                            reduce_axis, role_of)
from .triton_printer import (TritonBodyPrinter, compute_dtype, kernel_names, kernel_signature, sequence,
                             tile_expr, token_pointer)
from .triton_vjp import VjpPrinter

ROLE_SHAPE = {"": "(1, 1)", "r": "(BLOCK_R, 1)", "c": "(1, BLOCK_C)", "rc": "(BLOCK_R, BLOCK_C)"}
ROLE_MASK = {"": "one", "r": "row_ok", "c": "col_ok", "rc": "(row_ok & col_ok)"}
ROLE_INDEX = {"": "zero", "r": "kidx", "c": "vidx"}  # a vector's position along its tile axis
AXIS_MASK = {0: "row_ok", 1: "col_ok"}
AXIS_SIZE = {0: "SR", 1: "SC"}
_IN = ("arg", "param")


# ---------------------------------------------------------------------- bodies and their VJPs
class MatrixBodyPrinter(TritonBodyPrinter):
    """Bodies over role-shaped tiles: products, contractions and reductions along tile axes."""

    def __init__(self, outputs, prefix: str, rows, cols, token: str = ""):
        super().__init__(outputs, prefix, token)
        self.rows, self.cols = rows, cols

    def node(self, node: Node) -> str:
        args = [self.names[a] for a in node.args]
        if node.op in MATRIX_RULES:  # outer, getitem, matmul: the rule the registry row names
            return MATRIX_RULES[node.op](self, node, args)
        if OPS[node.op].kind == "reduce":
            axis = reduce_axis(node, self.rows, self.cols)
            if axis is None:
                return args[0]  # over a size-1 axis
            return self.reduce(node, args[0], axis, AXIS_MASK[axis], AXIS_SIZE[axis])
        return super().node(node)

    # the matrix-tile rules of the rows of psmc.ir.registry.STRUCTURE_OPS (`triton`, tile="matrix")
    def matrix_outer(self, node: Node, args) -> str:
        return f"({args[0]} * {args[1]})"

    def matrix_view(self, node: Node, args) -> str:
        return args[0]  # view only (matrix_reason): the tile is already laid out so

    def matrix_matmul(self, node: Node, args) -> str:
        axis = matmul_axis(node, self.rows, self.cols)
        return f"tl.sum(tl.where({AXIS_MASK[axis]}, {args[0]} * {args[1]}, 0.0), axis={axis}, keep_dims=True)"


MATRIX_RULES = {row.name: getattr(MatrixBodyPrinter, "matrix_" + row.triton) for row in STRUCTURE_OPS
                if row.tile == "matrix" and isinstance(row.triton, str)}


class MatrixVjpPrinter(VjpPrinter):
    """VJPs over role-shaped tiles: an operand's adjoint sums over the tile axes it lacks."""

    def __init__(self, outputs, adjoints, wanted, prefix: str, rows, cols, token: str = ""):
        super().__init__(outputs, adjoints, wanted, prefix, token)
        self.rows, self.cols = rows, cols

    def role(self, node: Node) -> str:
        return role_of(node.shape, self.rows, self.cols)

    def primal_printer(self) -> TritonBodyPrinter:
        return MatrixBodyPrinter(self.outputs, self.prefix + "p", self.rows, self.cols, self.token)

    def unbroadcast(self, node: Node, arg: Node, contribution: str) -> str:
        # a product's contribution spans every axis of its operands (a matmul's too, before
        # the contraction); sum it over the ones `arg` lacks
        span = "".join(sorted(set("".join(self.role(a) for a in node.args)))) if node.op == "matmul" \
            else self.role(node)
        for axis, char in ((0, "r"), (1, "c")):
            if char in span and char not in self.role(arg):
                contribution = f"tl.sum(tl.where({AXIS_MASK[axis]}, {contribution}, 0.0), axis={axis}, keep_dims=True)"
        return contribution

    def _contribution(self, node: Node, i: int, names: dict, g: str) -> str:
        if node.op in ("mean", "amax", "amin"):
            axis = reduce_axis(node, self.rows, self.cols)
            if axis is None:
                return g
            if node.op == "mean":
                return f"({g} / {AXIS_SIZE[axis]})"
            a, z = names[node.args[0]], names[node]
            tie = f"(({a} == {z}) & {AXIS_MASK[axis]})"
            return f"tl.where({tie}, {g} / tl.sum(tl.where({tie}, 1.0, 0.0), axis={axis}, keep_dims=True), 0.0)"
        return super()._contribution(node, i, names, g)


# ---------------------------------------------------------------------- kernels
def _offset(role: str, base: str) -> str:
    """Where a role-shaped value lives in a contiguous [..., *declared] tensor whose leading
    index is `base`."""
    if role == "":
        return f"({base}) + zero"
    if role == "r":
        return f"({base}) * SR + kidx"
    if role == "c":
        return f"({base}) * SC + vidx"
    return f"(({base}) * SR + kidx) * SC + vidx"


def _mask(*parts) -> str:
    return " & ".join(p for p in parts if p)


def _is_float(value) -> bool:
    return value.dtype in FLOATS


class MatrixPrinter:
    """The forward, step and backward kernels of one matrix-state op."""

    tile = "matrix"  # the launch contract's tile model (psmc.runtime.triton_abi)
    role_shape, role_mask = ROLE_SHAPE, ROLE_MASK

    def __init__(self, op: OpIR):
        self.op = op
        layout = matrix_layout(op)
        self.rows, self.cols = layout.axis, layout.cols
        self.names = kernel_names(op)
        self.fields = op.state

    def role(self, value) -> str:
        return role_of(value.shape, self.rows, self.cols)

    def shape(self, value) -> str:
        return self.role_shape[self.role(value)]

    def store_mask(self, value, *extra) -> str:
        """Every column tile computes values without a column axis: the first one stores them."""
        role = self.role(value)
        return _mask(self.role_mask[role], *extra, None if "c" in role else "lead_tile")

    def body(self, outputs, prefix: str) -> MatrixBodyPrinter:
        return MatrixBodyPrinter(tuple(outputs), prefix, self.rows, self.cols)

    def vjp(self, outputs, adjoints, wanted, prefix: str) -> MatrixVjpPrinter:
        return MatrixVjpPrinter(tuple(outputs), adjoints, wanted, prefix, self.rows, self.cols)

    # -- signatures: the launch contract (psmc.runtime.triton_abi) names every argument
    def signature(self, kind: str) -> list[str]:
        return kernel_signature(self.op, kind, self.tile)

    def grid(self) -> list[str]:
        """The program's place: its lane, its rows (kidx, row_ok) and column tile (vidx, col_ok)."""
        # lanes on grid axis 0, column tiles on 1, the batch on 2 (see triton_printer's prologue)
        return ["lane = tl.program_id(0)", "tile = tl.program_id(1)", "b = tl.program_id(2)",
                "zero = tl.zeros((1, 1), tl.int32)", "one = zero == 0",
                "kidx = tl.arange(0, BLOCK_R)[:, None]",
                "vidx = tile * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
                "row_ok = kidx < SR", "col_ok = vidx < SC"]

    def prologue(self) -> list[str]:
        op = self.op
        lines = self.grid() + ["lead_tile = (tile + zero) == 0"]
        for d in op.dims:  # dims as tensors: an int argument equal to 1 arrives as a constexpr
            lines.append(f"dim_{d} = d_{d} + zero")
        for i, p in enumerate(op.params):
            role = self.role(p)
            lines.append(f"p_{p.name} = tl.load(par{i} + lane * par{i}_sl + {ROLE_INDEX[role]} * par{i}_ss, "
                         f"mask={self.role_mask[role]}, "
                         f"other=0).to({compute_dtype(p.dtype)})")
        if op.exclusive:  # the state an exclusive readout reads before the first token
            printer = self.body(op.identity, "id")
            lines += printer.run()
            lines += [f"ident{i} = {tile_expr(printer.names[node], f.dtype, self.shape(f))}"
                      for i, (f, node) in enumerate(zip(self.fields, op.identity))]
        return lines

    # -- one token
    def token_head(self, kind: str) -> list[str]:
        """t, okt (a real token), has_left (a prefix before it), the inputs and the index."""
        if kind == "step":
            lines = ["t = zero", "okt = one", "if HAS_INIT:", "    has_left = one", "else:", "    has_left = zero > 0"]
        else:
            lines = ["t = blk * BLOCK_T + r + zero", "okt = t < T_b",
                     "if HAS_INIT:", "    has_left = t >= 0", "else:", "    has_left = t > 0"]
        for i, v in enumerate(self.op.inputs):
            role = self.role(v)
            rest = f"lane * in{i}_sl + {ROLE_INDEX[role]} * in{i}_ss"
            ptr = f"in{i} + b * in{i}_sb + {rest}" if kind == "step" else token_pointer("in", i, "t", rest)
            lines.append(f"x_{v.name} = tl.load({ptr}, mask={_mask(self.role_mask[role], 'okt')}, other=0)"
                         f".to({compute_dtype(v.dtype)})")
        lines.append("index = (start + t).to(tl.int64)")
        return lines

    def lift(self) -> list[str]:
        printer = self.body(self.op.lift, "u")
        lines = printer.run()
        lines += [f"f{i} = {tile_expr(printer.names[node], f.dtype, self.shape(f))}"
                  for i, (f, node) in enumerate(zip(self.fields, self.op.lift))]
        return lines

    def bind(self, side: str, names) -> list[str]:
        return [f"{side}_{f.name} = {name}" for f, name in zip(self.fields, names)]

    def combine(self) -> list[str]:
        """n0.. = combine(c0.., f0..), or f0.. for the first token of a fresh stream."""
        n = len(self.fields)
        lines = self.bind("l", [f"c{i}" for i in range(n)]) + self.bind("r", [f"f{i}" for i in range(n)])
        printer = self.body(self.op.combine, "k")
        lines += printer.run()
        lines += [f"n{i} = tl.where(has_left, {tile_expr(printer.names[node], f.dtype, self.shape(f))}, f{i})"
                  for i, (f, node) in enumerate(zip(self.fields, self.op.combine))]
        return lines

    def exclusive_state(self, prev: str) -> list[str]:
        """s_ = the prefix before the token (`prev`<i>), the identity for a fresh stream's first."""
        return [f"s_{f.name} = tl.where(has_left, {prev}{i}, ident{i})" for i, f in enumerate(self.fields)]

    def readout(self, kind: str) -> list[str]:
        printer = self.body(self.op.readout, "v")
        lines = printer.run()
        for i, (out, node) in enumerate(zip(self.op.outputs, self.op.readout)):
            role = self.role(out)
            rest = f"lane * out{i}_sl + {ROLE_INDEX[role]} * out{i}_ss"
            ptr = f"out{i} + b * out{i}_sb + {rest}" if kind == "step" else token_pointer("out", i, "t", rest)
            value = tile_expr(printer.names[node], out.dtype, self.role_shape[role])
            lines.append(f"tl.store({ptr}, ({value}).to(out{i}.dtype.element_ty), "
                         f"mask={self.store_mask(out, 'okt')})")
        return lines

    def token(self, kind: str) -> list[str]:
        """One token of the forward or the step: outputs stored, the carry c0.. advanced."""
        n = len(self.fields)
        lines = self.token_head(kind) + self.lift()
        if self.op.exclusive:
            lines += self.exclusive_state("c") + self.readout(kind)
        lines += self.combine()
        if not self.op.exclusive:
            lines += self.bind("s", [f"n{i}" for i in range(n)]) + self.readout(kind)
        lines += [f"c{i} = tl.where(okt, n{i}, c{i})" for i in range(n)]
        return lines

    def load_state(self, source: str, base: str, name: str = "c") -> list[str]:
        return [f"{name}{i} = tl.load({source}{i} + {_offset(self.role(f), base)}, mask={self.role_mask[self.role(f)]}, "
                f"other=0).to({compute_dtype(f.dtype)})" for i, f in enumerate(self.fields)]

    def store_state(self, target: str, base: str, names: str) -> list[str]:
        return [f"tl.store({target}{i} + {_offset(self.role(f), base)}, {names}{i}.to({target}{i}.dtype.element_ty), "
                f"mask={self.store_mask(f)})" for i, f in enumerate(self.fields)]

    def initial_carry(self) -> list[str]:
        lines = ["if HAS_INIT:"] + ["    " + x for x in self.load_state("ini", "b * L + lane")] + ["else:"]
        lines += [f"    c{i} = tl.zeros({self.shape(f)}, {compute_dtype(f.dtype)})" for i, f in enumerate(self.fields)]
        return lines

    # -- the kernels
    def forward_kernel(self) -> list[str]:
        lines = ["@_psm_jit", f"def {self.names['forward']}("] + self.signature("forward") + ["):"]
        body = self.prologue() + sequence(self.op, "forward") + self.initial_carry()
        body.append("for blk in range(0, tl.cdiv(T_b, BLOCK_T)):")
        body += ["    if SAVE:"] + ["        " + x for x in self.store_state("bnd", "(b * L + lane) * NB + blk", "c")]
        body.append("    for r in range(0, BLOCK_T):")
        body += ["        " + x for x in self.token("forward")]
        body += self.store_state("fin", "b * L + lane", "c")
        return lines + ["    " + x for x in body]

    def step_kernel(self) -> list[str]:
        lines = ["@_psm_jit", f"def {self.names['step']}("] + self.signature("step") + ["):"]
        body = self.prologue() + self.initial_carry() + self.token("step")
        body += self.store_state("fin", "b * L + lane", "c")
        return lines + ["    " + x for x in body]

    # -- the backward
    def scratch(self, i: int, row: str) -> str:
        return f"ws{i} + {_offset(self.role(self.fields[i]), f'(b * L + lane) * BLOCK_T + {row}')}"

    def recompute_block(self) -> list[str]:
        """The prefixes of block `blk` from the carry saved at its start, into the scratch."""
        lines = self.load_state("bnd", "(b * L + lane) * NB + blk")
        token = self.token_head("forward") + self.lift() + self.combine()
        token += [f"c{i} = tl.where(okt, n{i}, c{i})" for i in range(len(self.fields))]
        token += [f"tl.store({self.scratch(i, 'r')}, c{i}, mask={self.role_mask[self.role(f)]})"
                  for i, f in enumerate(self.fields)]
        return lines + ["for r in range(0, BLOCK_T):"] + ["    " + x for x in token]

    def token_adjoint(self) -> list[str]:
        """One token backwards: gc0.. = dL/dP_t on entry, dL/dP_{t-1} on exit."""
        op = self.op
        lines = self.token_head("forward")
        for i, f in enumerate(self.fields):
            dt, mask = compute_dtype(f.dtype), self.role_mask[self.role(f)]
            lines.append(f"p{i} = tl.load({self.scratch(i, 'r')}, mask={mask}, other=0).to({dt})")
            before = f"tl.load({self.scratch(i, 'tl.maximum(r - 1, 0)')}, mask={mask}, other=0).to({dt})"
            lines.append(f"c{i} = tl.where(r > 0, {before}, cb{i})")  # P_{t-1}
        for i, out in enumerate(op.outputs):
            if _is_float(out):
                role = self.role(out)
                ptr = token_pointer("dout", i, "t", f"lane * dout{i}_sl + {ROLE_INDEX[role]} * dout{i}_ss")
                lines.append(f"dy{i} = tl.load({ptr}, mask={_mask(self.role_mask[role], 'okt')}, other=0).to(tl.float32)")
        found: dict = {}
        if not op.exclusive:  # y_t reads P_t: its adjoint joins G_t
            lines += self.bind("s", [f"p{i}" for i in range(len(self.fields))])
            lines += self.readout_vjp(found)
        for i, f in enumerate(self.fields):
            if _is_float(f):
                extra = found.pop(("field", f.name), None)
                lines.append(f"gt{i} = gc{i}" + (f" + {extra}" if extra else ""))
        lines += self.lift()
        n = len(self.fields)
        lines += self.bind("l", [f"c{i}" for i in range(n)]) + self.bind("r", [f"f{i}" for i in range(n)])
        adj = tuple(f"gt{i}" if _is_float(f) else None for i, f in enumerate(self.fields))
        combine = self.vjp(op.combine, adj, lambda x: x.op == "field", "co")
        lines += combine.run()
        sides = {(x.attrs[0], x.attrs[1]): name for x, name in combine.leaf_adjoints.items()}
        if op.exclusive:  # y_t reads P_{t-1}: its adjoint joins G_{t-1}
            lines += self.exclusive_state("c") + self.readout_vjp(found)
        for i, f in enumerate(self.fields):
            if not _is_float(f):
                continue
            zeros = f"tl.zeros({self.shape(f)}, tl.float32)"
            left = " + ".join(x for x in (sides.get(("left", f.name)), found.pop(("field", f.name), None)) if x)
            right = sides.get(("right", f.name), zeros)
            lines.append(f"ge{i} = tl.where(has_left, {right}, gt{i}) + {zeros}")
            lines.append(f"gc{i} = tl.where(okt, tl.where(has_left, {left or zeros}, 0.0) + {zeros}, gc{i})")
        adj = tuple(f"ge{i}" if _is_float(f) else None for i, f in enumerate(self.fields))
        lifted = self.vjp(op.lift, adj, lambda x: x.op in _IN, "li")
        lines += lifted.run()
        for x, name in lifted.leaf_adjoints.items():
            key = (x.op, x.attrs[0])
            found[key] = f"{found[key]} + {name}" if key in found else name
        return lines + self.gradient_stores(found)

    def readout_vjp(self, found: dict) -> list[str]:
        adjoints = tuple(f"dy{i}" if _is_float(o) else None for i, o in enumerate(self.op.outputs))
        readout = self.vjp(self.op.readout, adjoints, lambda x: x.op in ("field",) + _IN, "ro")
        lines = readout.run()
        for x, name in readout.leaf_adjoints.items():
            found[(x.op, x.attrs[-1] if x.op == "field" else x.attrs[0])] = name
        return lines

    def input_grad_store(self, i: int, role: str, value: str) -> list[str]:
        ptr = token_pointer("din", i, "t", f"lane * din{i}_sl + {ROLE_INDEX[role]} * din{i}_ss")
        return [f"tl.store({ptr}, {value}, mask={_mask(self.role_mask[role], 'okt')})"]

    def input_grad_sums(self, where: str) -> list[str]:
        """Adjoints summed over the walk (the state tile's TIME_SUM): their accumulators
        (`where` = 'start') and their stores ('end'). The matrix tile stores every token's."""
        return []

    def gradient_stores(self, found: dict) -> list[str]:
        lines = []
        for i, v in enumerate(self.op.inputs):
            if not _is_float(v):
                continue
            role = self.role(v)
            grad = found.get(("arg", v.name))
            zeros = f"tl.zeros({self.role_shape[role]}, tl.float32)"
            value = f"({grad}) + {zeros}" if grad else zeros
            lines += self.input_grad_store(i, role, value)
        for i, p in enumerate(self.op.params):
            grad = found.get(("param", p.name))
            if grad is not None and _is_float(p):
                lines.append(f"dp{i} = dp{i} + tl.where(okt, {grad}, 0.0)")
        return lines

    def backward_kernel(self) -> list[str]:
        op = self.op
        lines = ["@_psm_jit", f"def {self.names['backward']}("] + self.signature("backward") + ["):"]
        body = self.prologue() + sequence(self.op, "backward")
        for i, f in enumerate(self.fields):
            if _is_float(f):
                zeros = f"tl.zeros({self.shape(f)}, tl.float32)"
                body += ["if HAS_DFIN:",
                         f"    gc{i} = tl.load(dfin{i} + {_offset(self.role(f), 'b * L + lane')}, "
                         f"mask={self.role_mask[self.role(f)]}, other=0.0) + {zeros}",
                         "else:", f"    gc{i} = {zeros}"]
        body += [f"dp{i} = tl.zeros({self.shape(p)}, tl.float32)" for i, p in enumerate(op.params)]
        body += self.input_grad_sums("start")
        body.append("n_blocks = tl.cdiv(T_b, BLOCK_T)")
        body.append("for bi in range(0, n_blocks):")
        loop = ["blk = n_blocks - 1 - bi"] + self.recompute_block()
        loop.append("tl.debug_barrier()  # the scratch is written before any thread reads it")
        loop += self.load_state("bnd", "(b * L + lane) * NB + blk", "cb")  # P before the block
        loop.append("for ri in range(0, BLOCK_T):")
        # r stays a scalar int32, as in the recompute loop above (the loop-carried types must agree)
        loop += ["    r = BLOCK_T - 1 - ri"] + ["    " + x for x in self.token_adjoint()]
        loop.append("tl.debug_barrier()  # this block's reads of the scratch are done")
        body += ["    " + x for x in loop]
        body += self.input_grad_sums("end")
        for i, f in enumerate(self.fields):
            if _is_float(f):
                body += ["if HAS_INIT:",
                         f"    tl.store(dini{i} + {_offset(self.role(f), 'b * L + lane')}, gc{i}, "
                         f"mask={self.role_mask[self.role(f)]})"]
        for i, p in enumerate(op.params):
            if _is_float(p):
                body.append(f"tl.store(dpar{i} + {_offset(self.role(p), 'b * L + lane')}, dp{i}, "
                            f"mask={self.role_mask[self.role(p)]})")
        return lines + ["    " + x for x in body]


# ---------------------------------------------------------------------- the state tile
# No declared value spans the rows of a state tile (they are lanes): a dim no shape can equal.
_LANE_ROWS = sympy.Symbol("_lanes_")


class StatePrinter(MatrixPrinter):
    """The kernels of an op whose values are scalars or vectors over one state axis S (the
    selective SSM's h[N], softmax_pool's [V]): the matrix token loop over a tile whose rows are
    BLOCK_R lanes and whose columns are S (mamba's selective-scan layout: a program owns a
    batch row, a block of channels and the state axis; each thread walks time in order on its
    elements, so lift, recurrence and readout fuse and nothing of size [B, T, L, S] reaches
    memory). A value's role is '' (a scalar per lane, [BLOCK_R, 1]) or 'c' (a vector over S per
    lane, [BLOCK_R, BLOCK_C]): the lanes never mix, so no adjoint is summed over the rows,
    except the adjoint of an input the lanes share (LANE_SUM, below)."""

    tile = "state"
    role_shape = {"": "(BLOCK_R, 1)", "c": "(BLOCK_R, BLOCK_C)"}
    role_mask = {"": "row_ok", "c": "(row_ok & col_ok)"}

    def __init__(self, op: OpIR):
        self.op = op
        self.rows, self.cols = _LANE_ROWS, kernel_layout(op).axis
        self.names = kernel_names(op)
        self.fields = op.state

    def grid(self) -> list[str]:
        # lane tiles on grid axis 0 (up to 2**31 - 1 programs), column tiles on 1, the batch on 2
        return ["tile = tl.program_id(1)", "b = tl.program_id(2)",
                "zero = tl.zeros((1, 1), tl.int32)", "one = zero == 0",
                "kidx = tl.arange(0, BLOCK_R)[:, None]",
                "lane = tl.program_id(0) * BLOCK_R + kidx  # this program's lanes: the tile's rows",
                "SC = S  # the state axis: the tile's columns",
                "vidx = tile * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
                "row_ok = lane < L", "col_ok = vidx < SC"]

    def input_grad_store(self, i: int, role: str, value: str) -> list[str]:
        """The adjoint of input i at this token. An input the same at every token (a stride-0
        time axis: the selective SSM's A, broadcast over batch and time) adds it to an
        accumulator, stored once after the walk (TIME_SUM); one the lanes share (a stride-0 lane
        axis: its B and C) stores its sum over this program's lanes, once per lane tile
        (LANE_SUM): the runtime sums what remains, and no [B, T, L, S'] adjoint of a broadcast
        input is ever written."""
        token = f"row * din{i}_sb + t * din{i}_st"
        return [f"if (TIME_SUM >> {i}) & 1:",
                f"    dx{i} = dx{i} + tl.where(okt, {value}, 0.0)",
                f"elif (LANE_SUM >> {i}) & 1:",
                "    " + self.din_store(i, role, token, value, shared=True, when="okt"),
                "else:"] + ["    " + x for x in super().input_grad_store(i, role, value)]

    def din_store(self, i: int, role: str, base: str, value: str, shared: bool, when: str = "") -> str:
        """Store an adjoint of input i at `base` (its batch and token offsets): per lane, or
        (`shared`) summed over this program's lanes at its lane tile."""
        if shared:
            lane, value, mask = "tl.program_id(0)", _lane_total(value), _mask("col_ok" if "c" in role else "", when)
        else:
            lane, mask = "lane", _mask(self.role_mask[role], when)
        return (f"tl.store(din{i} + {base} + {lane} * din{i}_sl + {ROLE_INDEX[role]} * din{i}_ss, {value}, "
                f"mask={mask or 'one'})")

    def input_grad_sums(self, where: str) -> list[str]:
        lines = []
        for i, v in enumerate(self.op.inputs):
            if not _is_float(v):
                continue
            role = self.role(v)
            lines.append(f"if (TIME_SUM >> {i}) & 1:")
            if where == "start":
                lines.append(f"    dx{i} = tl.zeros({self.role_shape[role]}, tl.float32)")
                continue
            lines += [f"    if (LANE_SUM >> {i}) & 1:",
                      "        " + self.din_store(i, role, f"b * din{i}_sb", f"dx{i}", shared=True),
                      "    else:",
                      "        " + self.din_store(i, role, f"b * din{i}_sb", f"dx{i}", shared=False)]
        return lines


def _lane_total(value: str) -> str:
    """A state tile's value summed over its lanes (the rows; padding rows hold 0)."""
    return f"tl.sum(tl.where(row_ok, {value}, 0.0), axis=0, keep_dims=True)"
