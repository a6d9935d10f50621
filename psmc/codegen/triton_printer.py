"""IR → Triton source: fused forward, backward and decode-step kernels for elementwise exact scans.

The lanes tile model (every declared value a scalar): one program owns one batch row and a
tile of BLOCK_C lanes and walks the time axis in blocks of BLOCK_T tokens (vector and matrix
states run the token loops of psmc.codegen.triton_matrix instead). Inside a block: load → lift →
tl.associative_scan over time → combine with the carry of the earlier blocks → readout →
store. Per-token states live only in registers; the carry (the last prefix of a block) is
the only state that survives a block, and the final one is written out for streaming (and,
when a gradient will be needed, the carry entering each block, for the backward kernel of
psmc.codegen.triton_backward).

Every IR op has a row in TRITON_OPS (psmc.codegen.triton_layout): a rendering (a format
string over the operand names, or a method of the printer for ops that need care) or an
`Unsupported` reason. An op whose bodies use an unsupported op, or whose shapes do not fit the
tile model, gets no kernels and the torch backend serves it; `unsupported_reason` says why.
The module-level entry points (`generate`, `generate_section`, `describe`) live in
psmc.codegen.triton_kernels, which imports every Triton printer; this one imports none of the
printers built on it.

Python-semantics leaks are ruled out by construction: min/max print as tl.minimum/maximum,
`if` as tl.where, `/` is Triton's true division (ints promote to fp32), literals print as
float/int/bool literals (inf as float('inf')), and `pow` never reaches Python's `**`.
"""
from __future__ import annotations

import math

from ..ir.nodes import Node, OpIR, walk
from ..ir.registry import REDUCTION, REDUCTIONS, STRUCTURE_OPS
from ..runtime import triton_abi
from .torch_printer import dim_code
# what fits the tile models (re-exported: the op table and the layouts are read from here too)
from .triton_layout import (FLOAT_MATH, FLOATS, KERNEL_DTYPES, MATRIX_ONLY, TL_DTYPES, TRITON_OPS,  # noqa: F401
                            Layout, Unsupported, kernel_layout, unsupported_reason, value_roles)

PREFIX = "_psm_"


# the value that leaves a reduction unchanged: fills the padded columns of a tile
REDUCE_PAD = {row.name: row.pad for row in REDUCTIONS}  # psmc.ir.registry


def literal(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('inf')" if value > 0 else "float('-inf')"
        return repr(value)
    return repr(int(value))


def constant(node: Node) -> str:
    """A const or fill node's literal, a float one written as a float: `ones(D)` folded into
    `sigmoid` must not give tl.sigmoid(1), an int tile (the interpreter rejects it)."""
    value = node.attrs[0]
    return literal(float(value) if node.dtype in FLOATS and not isinstance(value, bool) else value)


def compute_dtype(dtype: str) -> str:
    """The dtype a value is held in inside a kernel: floats accumulate in fp32."""
    return "tl.float32" if dtype in FLOATS else TL_DTYPES[dtype]


def tile_expr(expr: str, dtype: str, shape: str) -> str:
    """`expr` as a full tile of `shape` in the kernel dtype of `dtype`."""
    if dtype == "bool":  # `expr` may be a Python bool (a literal): tl.broadcast_to needs a tensor
        return f"((tl.zeros({shape}, tl.int32) + ({expr})) != 0)"
    return f"(tl.zeros({shape}, {compute_dtype(dtype)}) + ({expr})).to({compute_dtype(dtype)})"


# ---------------------------------------------------------------------- bodies
class TritonBodyPrinter:
    """Statements computing `outputs`; leaves are names bound by the kernel around them."""

    def __init__(self, outputs: tuple[Node, ...], prefix: str, token: str = ""):
        self.outputs = outputs
        self.prefix = prefix  # temporaries are named prefix + counter (bodies share a kernel)
        # inputs and the index are `x<token>_<name>`, `index<token>`: the backward's per-token
        # values need names of their own (a Triton loop variable keeps one shape)
        self.token = token
        self.names: dict[Node, str] = {}
        self.lines: list[str] = []

    def run(self) -> list[str]:
        for node in walk(self.outputs):
            if node in self.names:
                continue
            if not node.args and node.op != "fill":
                self.names[node] = self.leaf(node)
                continue
            if node.op == "const" or (node.op == "fill"):
                self.names[node] = constant(node)
                continue
            name = f"{self.prefix}{len(self.lines)}"
            self.lines.append(f"{name} = {self.node(node)}")
            self.names[node] = name
        return self.lines

    def leaf(self, node: Node) -> str:
        op = node.op
        if op == "arg":
            return f"x{self.token}_" + node.attrs[0]
        if op == "field":
            return {"left": "l_", "right": "r_", "state": "s_"}[node.attrs[0]] + node.attrs[1]
        if op == "param":
            return "p_" + node.attrs[0]
        if op == "dim":
            return "dim_" + node.attrs[0]
        if op == "const":
            return constant(node)
        if op == "index":
            return "index" + self.token
        raise ValueError(f"no Triton leaf for {op!r}")

    def node(self, node: Node) -> str:
        args = [self.names[a] for a in node.args]
        if node.op in FLOAT_MATH:  # (an int constant as a float literal: tl.sigmoid(2) fails on an int)
            args = [n if a.dtype in FLOATS else literal(float(a.attrs[0])) if a.op == "const" else
                    f"({n}).to(tl.float32)" for n, a in zip(args, node.args)]
        rendering = TRITON_OPS[node.op]
        if isinstance(rendering, Unsupported):
            raise ValueError(f"IR op {node.op!r} has no Triton rendering: {rendering.reason}")
        if rendering != "special":
            return rendering.format(*args)
        if node.op == "pow":
            return self.power(node, args)
        if node.op in RULES:  # cast, broadcast: the rule the registry row names
            return RULES[node.op](self, node, args)
        if node.op in MATRIX_ONLY:
            raise ValueError(f"IR op {node.op!r} is rendered by the matrix tile model only")
        return self.reduce(node, args[0])

    # the rules the rows of psmc.ir.registry.STRUCTURE_OPS name (`triton`): triton_<rule>(node, args)
    def triton_cast(self, node: Node, args) -> str:
        return f"({args[0]}).to({compute_dtype(node.attrs[0])})" if node.args[0].op != "const" else \
            literal(_cast_value(node.args[0].attrs[0], node.attrs[0]))

    def triton_broadcast(self, node: Node, args) -> str:
        return args[0]  # a rank-0 value broadcasts against the tile by itself

    def power(self, node: Node, args) -> str:
        base, exponent = node.args
        if exponent.op == "const" and float(exponent.attrs[0]).is_integer() and 0 <= exponent.attrs[0] <= 4:
            n = int(exponent.attrs[0])
            return "(" + " * ".join([args[0]] * n) + ")" if n else f"({args[0]} * 0.0 + 1.0)"
        if exponent.op == "const" and exponent.attrs[0] == 0.5:
            return f"tl.sqrt({args[0]})"
        # a non-integer power of a negative base is NaN here and in torch; a runtime integer
        # exponent of a negative base is NaN here (docs/triton.md lists it)
        return f"tl.exp({args[1]} * tl.log({args[0]}))"

    def reduce(self, node: Node, x: str, axis: int = 1, mask: str = "col_ok", size: str = "S") -> str:
        """A masked reduction over tile axis `axis` (the columns by default), whose real
        entries are `mask` and number `size`."""
        pad = REDUCE_PAD[node.op]
        masked = f"tl.where({mask}, {x}, {pad})"
        return REDUCTION[node.op].triton.format(x=masked, axis=axis, size=size)


# the one-axis tile rules of the registry rows (psmc.ir.registry); the matrix-only rows
# (`tile="matrix"`) are psmc.codegen.triton_matrix.MATRIX_RULES
RULES = {row.name: getattr(TritonBodyPrinter, "triton_" + row.triton) for row in STRUCTURE_OPS
         if row.tile == "any" and isinstance(row.triton, str)}


def _cast_value(value, dtype: str):
    if dtype in FLOATS:
        return float(value)
    if dtype == "bool":
        return bool(value)
    return int(value)


# ---------------------------------------------------------------------- kernels
def kernel_signature(op: OpIR, kind: str, tile: str) -> list[str]:
    """The parameter lines of a kernel of tile model `tile`, from the launch contract
    (psmc.runtime.triton_abi): the runtime passes every argument by these names."""
    groups = triton_abi.arguments(kind, tile, len(op.inputs), len(op.params), len(op.state), len(op.outputs),
                                  tuple(op.dims))
    lines = [", ".join(g) for g in groups]
    lines.append(", ".join(f"{c}: tl.constexpr" for c in triton_abi.constexprs(kind, tile)))
    return ["    " + line + "," for line in lines]


# Passes over a sequence: which tokens program b runs. Packed sequences (VARLEN) are one batch
# row of tokens; program b runs sequence b, tokens seq0 .. seq0 + T_b - 1 of row 0 (its states,
# initial and final, are row b of theirs): each per-token tensor's pointer moves to its first
# token once, so the addresses inside the loops are the ones of a batch row. Otherwise program
# b runs batch row b, all T tokens.
def sequence(op: OpIR, kind: str) -> list[str]:
    """The lines that set T_b (this program's tokens) and row (its batch row of tokens)."""
    tensors = [f"in{i}" for i in range(len(op.inputs))]
    if kind == "backward":
        tensors += [f"dout{i}" for i in range(len(op.outputs))] + [f"din{i}" for i in range(len(op.inputs))]
    else:
        tensors += [f"out{i}" for i in range(len(op.outputs))]
    return ["if VARLEN:  # packed sequences: this program runs sequence b of batch row 0",
            "    seq0 = tl.load(cu + b)",
            "    T_b = tl.load(cu + b + 1) - seq0",
            "    row = b * 0"] + [f"    {t} += seq0 * {t}_st" for t in tensors] + [
            "else:",
            "    T_b = T",
            "    row = b"]


def token_pointer(kind: str, i: int, t: str, rest: str) -> str:
    """The address of token `t` (of this program's sequence) of a per-token tensor."""
    return f"{kind}{i} + row * {kind}{i}_sb + {t} * {kind}{i}_st + {rest}"


def kernel_names(op: OpIR) -> dict:
    base = PREFIX + "Op_" + op.name
    return {"combine": base + "_combine", "forward": base + "_forward", "step": base + "_step",
            "backward": base + "_backward"}


class KernelPrinter:
    """The combine function and the forward / step kernels of one op."""

    def __init__(self, op: OpIR):
        self.op = op
        self.layout = kernel_layout(op)
        self.names = kernel_names(op)
        self.fields = op.state

    # -- pieces shared by both kernels
    def signature(self, time: bool) -> list[str]:
        return kernel_signature(self.op, "forward" if time else "step", "lanes")

    def prologue(self) -> list[str]:
        op = self.op
        # lanes on grid axis 0 (up to 2**31 - 1 programs; axes 1 and 2 hold 65,535), the batch
        # last: no division to split a flat program id (it cost registers in the AOT table).
        # Offsets are 32-bit; triton_support.unusable_reason sends larger calls elsewhere
        lines = ["lane = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
                 "b = tl.program_id(1)",
                 "sidx = lane * 0",  # the (one-element) state axis: scalars only here
                 "col_ok = lane < L"]
        for d in op.dims:  # dims as tensors: an int argument equal to 1 arrives as a constexpr
            lines.append(f"dim_{d} = d_{d} + tl.zeros((1, 1), tl.int32)")
        for i, p in enumerate(op.params):
            # (par<i>_sl: 0, or the slice of a per-lane param)
            ptr = f"par{i} + lane * par{i}_sl + " + (f"sidx * par{i}_ss" if p.shape else "sidx * 0")
            lines.append(f"p_{p.name} = tl.load({ptr}, mask=col_ok, other=0).to({compute_dtype(p.dtype)})")
        return lines

    def state_offset(self, field) -> str:
        return "(b * L + lane) * S + sidx" if field.shape else "b * L + lane + sidx * 0"

    def boundary_offset(self, field) -> str:
        """Where block `blk`'s entering carry lives in a [B, L, NB, S'] boundary tensor."""
        return "((b * L + lane) * NB + blk) * S + sidx" if field.shape else "(b * L + lane) * NB + blk + sidx * 0"

    def state_mask(self, field) -> str:
        return "col_ok"

    def load_inputs(self, time: bool, mask: str) -> list[str]:
        lines = []
        for i, v in enumerate(self.op.inputs):
            rest = f"lane * in{i}_sl + sidx * in{i}_ss"
            ptr = token_pointer("in", i, "rows", rest) if time else f"in{i} + b * in{i}_sb + {rest}"
            cast = f".to({compute_dtype(v.dtype)})"
            lines.append(f"x_{v.name} = tl.load({ptr}, mask={mask}, other=0){cast}")
        return lines

    def tile(self, expr: str, dtype: str, shape: str) -> str:
        return tile_expr(expr, dtype, shape)

    def lift(self, shape: str) -> list[str]:
        printer = TritonBodyPrinter(tuple(self.op.lift), "u")
        lines = printer.run()
        for i, (f, node) in enumerate(zip(self.fields, self.op.lift)):
            lines.append(f"f{i} = {self.tile(printer.names[node], f.dtype, shape)}")
        return lines

    def readout(self, time: bool, mask: str) -> list[str]:
        op = self.op
        lines = [f"s_{f.name} = f{i}" for i, f in enumerate(self.fields)]
        printer = TritonBodyPrinter(tuple(op.readout), "v")
        lines += printer.run()
        for i, (out, node) in enumerate(zip(op.outputs, op.readout)):
            rest = f"lane * out{i}_sl + sidx * out{i}_ss"
            ptr = token_pointer("out", i, "rows", rest) if time else f"out{i} + b * out{i}_sb + {rest}"
            shape = "(BLOCK_T, BLOCK_C)" if time else "(1, BLOCK_C)"
            value = self.tile(printer.names[node], out.dtype, shape)
            lines.append(f"tl.store({ptr}, ({value}).to(out{i}.dtype.element_ty), mask={mask})")
        return lines

    def load_init(self) -> list[str]:
        lines = []
        for i, f in enumerate(self.fields):
            dt = compute_dtype(f.dtype)
            lines.append(f"c{i} = tl.load(ini{i} + {self.state_offset(f)}, mask=col_ok, other=0).to({dt})")
        return lines

    def store_final(self, names: str) -> list[str]:
        return [f"tl.store(fin{i} + {self.state_offset(f)}, {names}{i}.to(fin{i}.dtype.element_ty), "
                f"mask={self.state_mask(f)})" for i, f in enumerate(self.fields)]

    def carry_combine(self, shape: str) -> list[str]:
        n = len(self.fields)
        cs = ", ".join(f"c{i}" for i in range(n))
        fs = ", ".join(f"f{i}" for i in range(n))
        lines = [f"{fs} = {self.names['combine']}({cs}, {fs})"]
        lines += [f"f{i} = tl.broadcast_to(f{i}, {shape})" for i in range(n)]
        return lines

    # -- the three functions
    def combine_function(self) -> list[str]:
        op = self.op
        params = [f"l_{f.name}" for f in self.fields] + [f"r_{f.name}" for f in self.fields]
        printer = TritonBodyPrinter(tuple(op.combine), "k")
        body = printer.run()
        results = []
        for f, node in zip(self.fields, op.combine):
            ref = printer.names[node]
            results.append(f"({ref}) != 0" if f.dtype == "bool" else f"({ref}).to({compute_dtype(f.dtype)})")
        lines = ["@_psm_jit", f"def {self.names['combine']}({', '.join(params)}):"]
        lines += ["    " + line for line in body]
        lines.append("    return " + ", ".join(results))
        return lines

    def block_prefixes(self) -> list[str]:
        """The inclusive prefixes f0.. of block `blk` (rows `rows`, mask `ok`) from the carry
        c0.. entering it: load → lift → in-block scan → combine with the carry."""
        n = len(self.fields)
        shape = "(BLOCK_T, BLOCK_C)"
        lines = self.load_inputs(time=True, mask="ok")
        lines.append("index = (start + rows).to(tl.int64)")
        lines += self.lift(shape)
        fs = ", ".join(f"f{i}" for i in range(n))
        if n == 1:
            lines.append(f"f0 = tl.associative_scan(f0, 0, {self.names['combine']})")
        else:
            lines.append(f"{fs} = tl.associative_scan(({fs}), 0, {self.names['combine']})")
        # the carry joins every block but the first of a fresh stream
        lines.append("if HAS_INIT:")
        lines += ["    " + line for line in self.carry_combine(shape)]
        lines.append("else:")
        lines.append("    if blk > 0:")
        lines += ["        " + line for line in self.carry_combine(shape)]
        return lines

    def forward_kernel(self) -> list[str]:
        lines = ["@_psm_jit", f"def {self.names['forward']}("] + self.signature(time=True) + ["):"]
        body = self.prologue() + sequence(self.op, "forward")
        body += ["rows0 = tl.arange(0, BLOCK_T)[:, None]", "if HAS_INIT:"]
        body += ["    " + line for line in self.load_init()]
        body.append("else:")
        body += [f"    c{i} = tl.zeros((1, BLOCK_C), {compute_dtype(f.dtype)})" for i, f in enumerate(self.fields)]
        body.append("for blk in range(0, tl.cdiv(T_b, BLOCK_T)):")
        loop = ["rows = blk * BLOCK_T + rows0", "ok = (rows < T_b) & col_ok", "if SAVE:"]
        loop += [f"    tl.store(bnd{i} + {self.boundary_offset(f)}, c{i}.to(bnd{i}.dtype.element_ty), "
                 f"mask={self.state_mask(f)})" for i, f in enumerate(self.fields)]
        loop += self.block_prefixes()
        loop += self.readout(time=True, mask="ok")
        loop.append("last = rows == tl.minimum(T_b, blk * BLOCK_T + BLOCK_T) - 1")
        for i, f in enumerate(self.fields):
            loop.append(f"c{i} = {_row_pick(f'f{i}', f.dtype)}")
        body += ["    " + line for line in loop]
        body += self.store_final("c")
        return lines + ["    " + line for line in body]

    def step_kernel(self) -> list[str]:
        shape = "(1, BLOCK_C)"
        lines = ["@_psm_jit", f"def {self.names['step']}("] + self.signature(time=False) + ["):"]
        body = self.prologue()
        body += self.load_inputs(time=False, mask="col_ok")
        body.append("index = (start + tl.zeros((1, 1), tl.int64))")
        body += self.lift(shape)
        body.append("if HAS_INIT:")
        body += ["    " + line for line in self.load_init() + self.carry_combine(shape)]
        body += self.readout(time=False, mask="col_ok")
        body += self.store_final("f")
        return lines + ["    " + line for line in body]


def _row_pick(name: str, dtype: str) -> str:
    """The row where `last` holds, as a [1, BLOCK_C] tile (every other row contributes 0)."""
    if dtype == "bool":
        return f"tl.sum(tl.where(last, {name}.to(tl.int32), 0), axis=0, keep_dims=True) != 0"
    zero = "0.0" if dtype in FLOATS else "0"
    return f"tl.sum(tl.where(last, {name}, {zero}), axis=0, keep_dims=True).to({compute_dtype(dtype)})"


# ---------------------------------------------------------------------- module section
PRELUDE = [
    "# ---- Triton kernels (psmc.codegen.triton_printer); absent without Triton",
    "try:",
    "    import triton as _triton",
    "    import triton.language as tl",
    "except ImportError:  # no Triton on this platform: the torch backend serves every pass",
    "    _triton = None",
    "",
    "    class tl:  # kernel annotations only: no kernel is built without Triton",
    "        constexpr = None",
    "",
    "",
    "def _psm_jit(fn):",
    "    return _triton.jit(fn) if _triton is not None else None",
    "",
    "",
    "from psmc.runtime import triton_support as _tsup  # noqa: E402",
]


def _ranks(values) -> str:
    return "(" + "".join(f"{len(v.shape)}, " for v in values) + ")"


def _dim_lambda(expr) -> str:
    return "None" if expr is None else f"lambda cx_d: {dim_code(expr, 'cx_d')}"


def registration(op: OpIR) -> list[str]:
    layout = kernel_layout(op)
    names = kernel_names(op)
    axis = _dim_lambda(layout.axis)
    cls = f"__psmc_layers__[{op.name!r}]"  # the registry: class names are module.py's business
    return [
        "if _triton is not None:",
        f"    {cls}._triton_kernels = _tsup.TritonKernels(",
        f"        forward={names['forward']},",
        f"        step={names['step']},",
        f"        backward={names['backward']},",
        f"        mode={layout.mode!r},",
        f"        axis={axis},",
        f"        full_tile={layout.full_tile!r},",
        f"        inputs={tuple(v.name for v in op.inputs)!r},",
        f"        input_ranks={_ranks(op.inputs)},",
        f"        input_dtypes={tuple(v.dtype for v in op.inputs)!r},",
        f"        params={tuple(p.name for p in op.params)!r},",
        f"        field_ranks={_ranks(op.state)},",
        f"        field_dtypes={tuple(f.dtype for f in op.state)!r},",
        f"        output_ranks={_ranks(op.outputs)},",
        f"        output_dtypes={tuple(v.dtype for v in op.outputs)!r},",
        f"        dims={tuple(op.dims)!r},",
        f"        cols={_dim_lambda(layout.cols)},",
        f"        input_roles={value_roles(op, op.inputs)!r},",
        f"        param_roles={value_roles(op, op.params)!r},",
        f"        field_roles={value_roles(op, op.state)!r},",
        f"        output_roles={value_roles(op, op.outputs)!r},",
        "    )",
    ]
