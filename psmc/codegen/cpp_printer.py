"""IR → C++ source: the fused CPU forward, backward and step of an elementwise exact scan.

The third renderer of the same bodies (after psmc.codegen.torch_printer and
psmc.codegen.triton_printer). It serves exactly the ops the Triton printer serves (exact-scan
plans whose combine is elementwise, with the 'lanes', 'state' or 'matrix' tile model of
`layout_of`), and runs each pass as one sequential loop over time:

* a work item is one batch row and one lane ('state' and 'matrix' modes: the whole state of
  that lane) or one batch row and a block of LANE_BLOCK lanes ('lanes' mode: every value a
  scalar, so the block is what the compiler vectorises). Work items run in parallel (OpenMP);
* inside a work item, values live on a small grid: a value's role says which grid axes it
  spans ('' one number, 'r' the rows R, 'c' the columns C, 'rc' the matrix), exactly the roles
  of the Triton matrix tile model. Each IR node is one statement: a loop over its role's axes
  (and, for reductions and matmul, an inner loop over the contracted axis);
* the forward writes every token's outputs, and, when a gradient will be needed, every
  token's prefix (the backward reads them instead of recomputing a scan);
* the backward walks time in reverse: the adjoint of the prefix flows back through the
  combine's VJP, the lift's and readout's VJPs give the input and parameter gradients. Every
  VJP is printed here from the IR with the rules of psmc.codegen.triton_vjp (same
  conventions as torch's autograd: ties of max/min split, relu'(0) = 0, softplus threshold 20).

The C++ has no torch headers: it exports
`extern "C" void <name>_<pass>_<f32|f64>(void **ptrs, const int64_t *ints, int threads)`, called
through ctypes by psmc.runtime.cpu_support, which builds it with
torch.utils.cpp_extension.load_inline, one library per pass and float type (`export_macro`:
at -O3 with the vectoriser each instantiation costs seconds, and most callers need one). Pointer and integer layouts are documented on
`forward_layout` / `backward_layout` and used by both sides.
"""
from __future__ import annotations

import re

import hashlib
import math

import sympy

from ..ir.nodes import Node, OpIR, walk
from ..ir.registry import BINARY_OPS, FLOAT_RESULT, LEAF, REDUCTION, REDUCTIONS as _REDUCTION_ROWS, SELECT, SPECIAL, \
    STRUCTURE, STRUCTURE_OPS, UNARY_MATH, UNARY_OPERATOR, UNARY_OPERATORS, Unsupported
from .torch_printer import dim_code
from .triton_layout import FLOATS, layout_of, matrix_reason, role_of, scan_reason

LANE_BLOCK = 16  # lanes per work item in 'lanes' mode (the vectorised inner loop)
INTS = ("i32", "i64")

# op -> C++ over the operands {a}, {b}, {c} (already cast where needed); None: special
CPP_OPS = {
    "neg": UNARY_OPERATOR["neg"].cpp,
    **{row.name: row.cpp for row in UNARY_MATH},  # the math builtins: psmc.ir.registry
    **{row.name: row.cpp for row in BINARY_OPS},  # operators, comparisons, max/min: the registry
    "not": UNARY_OPERATOR["not"].cpp, SELECT.name: SELECT.cpp,
}
# ops whose operands are converted to floats first (a dim such as sqrt(K) arrives as an int)
FLOAT_MATH = frozenset({row.name for row in UNARY_MATH if row.dtype == "float"} | {"pow"} | FLOAT_RESULT)
# ops computed in the result's kind, whose operands are converted to it (psmc.ir.registry): neg, abs,
# sign, relu, add, sub, mul, maximum, minimum, where
ARITH = frozenset({row.name for row in UNARY_MATH if row.dtype == "same"}
                  | {row.name for row in UNARY_OPERATORS if row.kind == "unary"}
                  | ({row.name for row in BINARY_OPS if row.kind == "binary"} - FLOAT_MATH) | {SELECT.name})
REDUCTIONS = frozenset(REDUCTION)  # psmc.ir.registry: each row's `cpp` is its accumulator loop
# rendered on the matrix grid only (the registry rows say so: tile="matrix")
MATRIX_ONLY = frozenset(row.name for row in STRUCTURE_OPS if row.tile == "matrix" and isinstance(row.cpp, str))

# reverse mode: one rendering per operand over {a} {b} {c} (operands), {z} (result), {g}
# (the result's adjoint), {n} (the reduced extent); None: no gradient to that operand
VJP_RULES = {
    **{row.name: (row.cpp_vjp,) for row in UNARY_OPERATORS if row.cpp_vjp is not None},  # `-x`: the registry
    **{row.name: (row.cpp_vjp,) for row in UNARY_MATH if row.cpp_vjp is not None},  # psmc.ir.registry
    **{row.name: row.cpp_vjp for row in BINARY_OPS if row.cpp_vjp not in (None, SPECIAL)},  # the registry
    SELECT.name: SELECT.cpp_vjp,
    # cast, broadcast, getitem, matmul, outer: psmc.ir.registry
    **{row.name: row.cpp_vjp for row in STRUCTURE_OPS if row.cpp_vjp is not None},
    # reductions (psmc.ir.registry); "ties": amax/amin share the gradient by a rule of their own
    **{row.name: row.cpp_vjp if row.cpp_vjp == "ties" else (row.cpp_vjp,) for row in _REDUCTION_ROWS},
}
CLAMP_RULES = {"maximum": "({a} >= {b} ? {g} : scalar_t(0))", "minimum": "({a} <= {b} ? {g} : scalar_t(0))"}
NO_GRADIENT = frozenset({row.name for row in UNARY_OPERATORS if row.cpp_vjp is None}
                       | {row.name for row in BINARY_OPS if row.cpp_vjp is None}
                       | {row.name for row in UNARY_MATH if row.cpp_vjp is None})
LEAVES = frozenset(LEAF)  # psmc.ir.registry


def unsupported_reason(op: OpIR, plan: dict | None) -> str | None:
    """Why `op` gets no C++ kernels, or None when it does. The reach of the Triton tile models
    (psmc.codegen.triton_printer), plus f64 values and exclusive readouts of scalar and vector
    states, which a sequential loop serves as easily."""
    nodes = list(walk(_bodies(op)))
    reason = scan_reason(op, _plan_dict(plan), nodes, _cpp_cannot)  # the checks Triton makes too
    if reason is not None:
        return reason
    if op.exclusive and op.identity is None:
        return "exclusive readout without an identity: the first token of a stream reads it"
    if any(len(f.shape) == 2 for f in op.state):
        return matrix_reason(op)
    for node in nodes:
        if node.op in MATRIX_ONLY:
            return f"uses {node.op!r} without a matrix-valued state: not generated; the torch backend serves it"
    values = op.state + op.inputs + op.outputs + op.params
    shapes = [tuple(v.shape) for v in values] + [tuple(n.shape) for n in nodes]
    if any(len(s) > 1 for s in shapes):
        return "a value has rank > 1 but no state field does"
    axes = {sympy.sympify(s[0]) for s in shapes if len(s) == 1}
    if len(axes) > 1:
        return f"values of different lengths {sorted(map(str, axes))}: the grid has one state axis"
    return None


def _cpp_cannot(name: str) -> str | None:
    row = STRUCTURE.get(name)
    if row is not None:
        return row.cpp.reason if isinstance(row.cpp, Unsupported) else None  # psmc.ir.registry says why
    if name in CPP_OPS or name in LEAVES or name in REDUCTIONS:
        return None
    return "no C++ rendering; the torch backend serves it"


def _plan_dict(plan):
    """A psmc.plan.Plan or the dict the printers take ({'plan': ..., 'structure': ...})."""
    if plan is None or isinstance(plan, dict):
        return plan
    return {"plan": plan.scan, "structure": plan.structure}


def _bodies(op: OpIR) -> tuple:
    extra = tuple(op.identity or ()) if op.exclusive else ()
    return tuple(op.lift) + tuple(op.combine) + tuple(op.readout) + extra


def ctype(dtype: str) -> str:
    return "scalar_t" if dtype in FLOATS else "int64_t" if dtype in INTS else "bool"


def store_type(dtype: str) -> str:
    return "scalar_t" if dtype in FLOATS else "int64_t" if dtype in INTS else "uint8_t"


def _kind(dtype: str) -> str:
    return "f" if dtype in FLOATS else "i" if dtype in INTS else "b"


def literal(value, dtype: str) -> str:
    if dtype == "bool":
        return "true" if value else "false"
    if dtype in INTS:
        return f"INT64_C({int(value)})"
    value = float(value)
    if math.isnan(value):
        return "std::numeric_limits<scalar_t>::quiet_NaN()"
    if math.isinf(value):
        return ("" if value > 0 else "-") + "std::numeric_limits<scalar_t>::infinity()"
    return f"scalar_t({value!r})"


class Grid:
    """Roles and extents of the values of one op (see the module docstring)."""

    def __init__(self, op: OpIR):
        self.op = op
        self.layout = layout_of(op)
        self.mode = self.layout.mode
        if self.mode == "matrix":
            rows, cols = self.layout.axis, self.layout.cols
            self._role = lambda shape: role_of(shape, rows, cols)
        self.fields = {f.name: self.value_role(f) for f in op.state}

    def value_role(self, v) -> str:
        """The role of a declared value (field, input, output, param)."""
        if self.mode == "lanes":
            return "" if v in self.op.params else "c"
        if self.mode == "state":
            return "r" if v.shape else ""
        return self._role(v.shape)

    def role(self, node: Node) -> str:
        if node.op == "field":
            return self.fields[node.attrs[1]]
        if self.mode == "lanes":
            return "c" if node.batched else ""
        if self.mode == "state":
            return "r" if node.rank else ""
        return self._role(node.shape)

    def extent(self, role: str) -> str:
        """The number of elements a value of `role` has per work item (lanes mode: per lane)."""
        if self.mode == "lanes":
            return "1"
        return {"": "1", "r": "R", "c": "C", "rc": "(R * C)"}[role]

    def size(self, role: str) -> str:
        """Elements of a work-item buffer of `role`."""
        return {"": "1", "r": "R", "c": "C", "rc": "(R * C)"}[role]


def access(name: str, role: str) -> str:
    return {"": name, "r": f"{name}[i]", "c": f"{name}[k]", "rc": f"{name}[i * C + k]"}[role]


def union(*roles: str) -> str:
    letters = set("".join(roles))
    return "".join(ch for ch in "rc" if ch in letters)


def loops(role: str) -> str:
    out = ""
    if "r" in role:
        out += "for (int64_t i = 0; i < R; ++i) "
    if "c" in role:
        out += "for (int64_t k = 0; k < C; ++k) "
    return out


_LOOP = re.compile(r"^((?:for \(int64_t i = 0; i < R; \+\+i\) )?(?:for \(int64_t k = 0; k < C; \+\+k\) )?)([^{};|]+;)$")


_NAME = re.compile(r"[A-Za-z_]\w*")
# a sum (or mean) over one axis into a scalar (CppBody.contraction with the registry's rows)
_SUM = re.compile(r'^scalar_t (\w+); \{ scalar_t acc = 0; _Pragma\("omp simd reduction\(\+:acc\)"\) '
                  r'((?:for \(int64_t i = 0; i < R; \+\+i\) )|(?:for \(int64_t k = 0; k < C; \+\+k\) ))'
                  r'acc \+= ([^;]+); \1 = acc((?: / scalar_t\(\w+\))?); \}$')


def fuse(lines: list) -> list:
    """Elementwise loops over the same axes as one loop (`for i: a[i] = ..; for i: b[i] =
    f(a[i])` -> `for i: { a[i] = ..; b[i] = f(a[i]); }`): a statement of one of them reads the
    group's values at its own index only, so the order within an index is all that matters,
    and a fused loop pays its bounds, its alias checks and its vector prologue once instead of
    per statement (a work item of 16 values ran 14 such loops per token). A loop joins an
    earlier group over the same axes across other loops when it neither reads what they write
    nor writes what they read or write. PSM_IVDEP tells the compiler the iterations are
    independent, which they are: every buffer is read and written at the loop's own index."""
    items = []  # [key, statements, names written, names read, sums] per loop group; a str per other line
    for line in lines:
        r = _SUM.match(line)
        if r is not None and items and not isinstance(items[-1], str) and items[-1][0] == r.group(2):
            # a sum over the axis of the loop just before it: accumulated in that loop (an
            # OpenMP simd reduction, as the sum's own loop was), which then takes no more
            # statements (the sum is known after it)
            items[-1][4].append((r.group(1), r.group(3), r.group(4)))
            continue
        m = _LOOP.match(line)
        if m is None or not m.group(1):
            items.append(line)
            continue
        key, stmt = m.group(1), m.group(2)
        target = stmt.split("=", 1)[0]
        writes = set(_NAME.findall(target.split("[", 1)[0]))
        reads = set(_NAME.findall(stmt)) - writes
        joined = False
        for item in reversed(items):
            if isinstance(item, str) or item[4]:
                break
            if item[0] == key:
                item[1].append(stmt)
                item[2].update(writes)
                item[3].update(reads)
                joined = True
                break
            if writes & (item[2] | item[3]) or reads & item[2]:
                break
        if not joined:
            items.append([key, [stmt], set(writes), set(reads), []])
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif item[4]:
            accs = [f"{var}_acc" for var, _, _ in item[4]]
            adds = " ".join(f"{var}_acc += {a};" for var, a, _ in item[4])
            out.append(" ".join(f"scalar_t {acc} = 0;" for acc in accs) +
                       f' _Pragma("omp simd reduction(+:{", ".join(accs)})") {item[0]}'
                       f"{{ {' '.join(item[1])} {adds} }} " +
                       " ".join(f"scalar_t {var} = {var}_acc{tail};" for var, _, tail in item[4]))
        elif len(item[1]) == 1:
            out.append(item[0] + item[1][0])
        elif item[0].count("for (") == 2:  # [R, C]: the inner (contiguous) loop is the vector loop
            out.append(f"for (int64_t i = 0; i < R; ++i) {{ PSM_IVDEP for (int64_t k = 0; k < C; ++k) "
                       f"{{ {' '.join(item[1])} }} }}")
        else:
            out.append(f"PSM_IVDEP {item[0]}{{ {' '.join(item[1])} }}")
    return out


_BUFFER = re.compile(r"^PsmBuf<(\w+)> (\w+)_v\([^;]*\); \w+ \*(?:__restrict__ )?(\w+) = \w+_v\.data\(\);$")


def scalarize(lines: list) -> list:
    """A work-item buffer written and read only inside one fused loop as a local of the loop
    body (`k5[i * C + k] = ..; n1[..] = k5[i * C + k] + ..` -> `const scalar_t k5_ = ..;
    n1[..] = k5_ + ..`): no store and reload of a temporary, and its buffer goes."""
    text_count = {}
    for line in lines:
        for name in _NAME.findall(line):
            text_count[name] = text_count.get(name, 0) + 1
    decls = {}
    for j, line in enumerate(lines):
        m = _BUFFER.match(line.strip())
        if m:
            decls[m.group(3)] = (j, m.group(1))
    out = list(lines)
    drop = set()
    for j, line in enumerate(lines):
        if "PSM_IVDEP" not in line and "omp simd reduction(+:" not in line:  # (the fused loops)
            continue
        body = line
        for name in dict.fromkeys(re.findall(r"\{ (\w+)\[[^\]]+\] = |; (\w+)\[[^\]]+\] = ", line)):
            name = name[0] or name[1]
            if name not in decls:
                continue
            here = len(_NAME.findall(" ".join(x for x in _NAME.findall(line) if x == name)))
            if text_count.get(name, 0) != here + 1:  # read or written anywhere else (the +1: its declaration)
                continue
            first = re.search(rf"\b{name}\[[^\]]+\] ?(\+?=)", body)
            if first is None or first.group(1) != "=":  # read or accumulated before its first assignment
                continue
            kind = decls[name][1]
            body = re.sub(rf"(?<=[{{;] ){name}\[[^\]]+\] = ", f"{kind} {name}_ = ", body, count=1)
            body = re.sub(rf"\b{name}\[[^\]]+\]", f"{name}_", body)
            drop.add(decls[name][0])
        out[j] = body
    return [line for j, line in enumerate(out) if j not in drop]


class CppBody:
    """Statements computing `outputs`. `decls` are the work-item buffers the statements use
    (declared once per work item, outside the time loop)."""

    def __init__(self, grid: Grid, outputs: tuple, prefix: str, sides=None, bound=None):
        self.grid = grid
        self.outputs = outputs
        self.prefix = prefix
        self.sides = sides or {"left": "l_", "right": "r_", "state": "s_"}
        # (side, field) -> the name a field reads as, where it is not `<side prefix><field>`
        # (the step's combine reads the lift's values and the readout the new state directly)
        self.bound = bound or {}
        self.names: dict[Node, str] = {}
        self.lines: list[str] = []
        self.decls: list[str] = []

    def new(self, node: Node, tag: str = "") -> str:
        name = f"{self.prefix}{tag}{len(self.names)}_{len(self.lines)}"
        return name

    def run(self) -> list[str]:
        for node in walk(self.outputs):
            if node in self.names:
                continue
            leaf = self.leaf(node)
            if leaf is not None:
                self.names[node] = leaf
                continue
            self.statement(node)
        return self.lines

    def leaf(self, node: Node) -> str | None:
        op = node.op
        if op == "arg":
            return "x_" + node.attrs[0]
        if op == "field":
            return self.bound.get(tuple(node.attrs)) or self.sides[node.attrs[0]] + node.attrs[1]
        if op == "param":
            return "p_" + node.attrs[0]
        if op == "dim":
            return "dim_" + node.attrs[0]
        if op == "const":
            return literal(node.attrs[0], node.dtype)
        if op == "fill":
            return literal(node.attrs[0], node.dtype)
        if op == "index":
            return "index"
        return None

    def ref(self, node: Node, grid_role: str) -> str:
        """`node`'s value read inside loops over `grid_role` (a leaf constant reads as is)."""
        name = self.names[node]
        role = self.grid.role(node) if node.op not in ("const", "fill", "dim", "index") else ""
        return access(name, role)

    def operand(self, node: Node, arg: Node, grid_role: str) -> str:
        code = self.ref(arg, grid_role)
        want = node.dtype
        if node.op in FLOAT_MATH and arg.dtype not in FLOATS:
            return f"scalar_t({code})"
        if node.op in ARITH and _kind(arg.dtype) != _kind(want) and not (node.op == "where" and arg is node.args[0]):
            return f"{ctype(want)}({code})"
        return code

    def declare(self, node: Node, name: str, role: str):
        if role:
            self.decls.append(f"PsmBuf<{store_type(node.dtype)}> {name}_v({self.grid.size(role)}); "
                              f"{store_type(node.dtype)} *__restrict__ {name} = {name}_v.data();")

    def statement(self, node: Node):
        role = self.grid.role(node)
        name = self.new(node)
        self.declare(node, name, role)
        target = access(name, role)
        contracted = self.contracted(node)
        ct = ctype(node.dtype)
        head = "" if role else f"{ct} {name}; "
        if node.op == "matmul" and role == "c" and contracted == "r" and ct == "scalar_t":
            # a row vector times the matrix (q S): rows outer, columns inner, so the inner loop
            # runs along contiguous rows and vectorises (each column still sums i = 0..R-1 in order)
            a, b = (self.ref(x, "rc") for x in node.args)
            self.lines.append(f"for (int64_t k = 0; k < C; ++k) {target} = 0; "
                              f"for (int64_t i = 0; i < R; ++i) for (int64_t k = 0; k < C; ++k) {target} += {a} * {b};")
        elif node.op in REDUCTIONS or node.op in CONTRACTIONS:
            body = self.contraction(node, contracted, target)
            self.lines.append(f"{head}{loops(role)}{{ {body} }}")
        else:
            self.lines.append(f"{head}{loops(role)}{target} = {self.expression(node, role)};")
        self.names[node] = name

    def contracted(self, node: Node) -> str:
        roles = [self.grid.role(a) for a in node.args]
        mine = self.grid.role(node)
        return "".join(ch for ch in union(*roles) if ch not in mine)

    def expression(self, node: Node, grid_role: str) -> str:
        op = node.op
        if op in EXPRESSIONS:  # cast, broadcast, getitem, outer: the rule the registry row names
            return EXPRESSIONS[op](self, node, grid_role)
        if op == "pow" and node.args[1].op == "const" and float(node.args[1].attrs[0]) in (1.0, 2.0, 3.0):
            a = self.operand(node, node.args[0], grid_role)
            return "(" + " * ".join([a] * int(node.args[1].attrs[0])) + ")"
        ops = {k: self.operand(node, a, grid_role) for k, a in zip("abc", node.args)}
        return CPP_OPS[op].format(**ops)

    def contraction(self, node: Node, contracted: str, target: str) -> str:
        """A reduction or a matmul: an accumulator over the contracted axes."""
        inner = loops(contracted)
        if len(contracted) == 1 and (node.op in ("matmul", "sum", "mean")):
            # a sum over one axis may add in any order (OpenMP simd reduction): it vectorises,
            # where the in-order scalar chain of adds was the selective SSM step's hottest loop
            inner = '_Pragma("omp simd reduction(+:acc)") ' + inner
        full = union(self.grid.role(node), contracted)
        if node.op in CONTRACTIONS:  # matmul: the rule the registry row names
            return CONTRACTIONS[node.op](self, node, inner, full, target)
        a = self.ref(node.args[0], full)
        n = " * ".join({"r": "R", "c": "C"}[ch] for ch in contracted) or "1"
        return REDUCTION[node.op].cpp.format(inner=inner, a=a, target=target, n=n)  # psmc.ir.registry


    # the rules the rows of psmc.ir.registry.STRUCTURE_OPS name (`cpp`): an expression on the
    # node's grid role, cpp_<rule>(node, role), or an accumulation over the contracted axes,
    # contract_<rule>(node, inner loops, full role, target)
    def cpp_cast(self, node: Node, grid_role: str) -> str:
        code = self.ref(node.args[0], grid_role)
        return f"({code} != 0)" if node.attrs[0] == "bool" else f"{ctype(node.attrs[0])}({code})"

    def cpp_view(self, node: Node, grid_role: str) -> str:
        return self.ref(node.args[0], grid_role)  # the same values on the same grid axes

    def cpp_outer(self, node: Node, grid_role: str) -> str:
        a, b = (self.ref(x, grid_role) for x in node.args)
        return f"({a} * {b})"

    def contract_matmul(self, node: Node, inner: str, full: str, target: str) -> str:
        a, b = (self.ref(x, full) for x in node.args)
        return f"scalar_t acc = 0; {inner}acc += {a} * {b}; {target} = acc;"


def _rules(prefix: str) -> dict:
    """The registry rows whose `cpp` names a CppBody method `<prefix><rule>`: op -> method."""
    return {row.name: getattr(CppBody, prefix + row.cpp) for row in STRUCTURE_OPS
            if isinstance(row.cpp, str) and hasattr(CppBody, prefix + row.cpp)}


EXPRESSIONS = _rules("cpp_")
CONTRACTIONS = _rules("contract_")


class CppVjp:
    """Primal and adjoint statements of one body (psmc.codegen.triton_vjp's plan on the grid).

    adjoints: per output, (name, role) of its adjoint or None. wanted: which leaves need their
    adjoint. After `run()`, `leaf_adjoints[(op, key)]` = (name, role) for each wanted leaf
    reached (key: the field's (side, name) or the arg / param name)."""

    def __init__(self, grid: Grid, outputs: tuple, adjoints: tuple, wanted, prefix: str, sides=None):
        self.grid = grid
        self.outputs = outputs
        self.adjoints = adjoints
        self.wanted = wanted
        self.prefix = prefix
        self.primal = CppBody(grid, outputs, prefix + "p", sides)
        self.decls: list[str] = []
        self.leaf_adjoints: dict = {}

    def run(self) -> list[str]:
        lines = self.primal.run()
        self.decls += self.primal.decls
        order = list(walk(self.outputs))
        needs = self._needs(order)
        gnames: dict[Node, str] = {}
        for j, node in enumerate(n for n in order if n in needs):
            name = f"{self.prefix}g{j}"
            gnames[node] = name
            role = self.grid.role(node)
            if role:
                self.decls.append(f"PsmBuf<scalar_t> {name}_v({self.grid.size(role)}); scalar_t *{name} = "
                                  f"{name}_v.data();")
                lines.append(f"{loops(role)}{access(name, role)} = 0;")
            else:
                lines.append(f"scalar_t {name} = 0;")
        for out, adj in zip(self.outputs, self.adjoints):
            if adj is None or out not in needs:
                continue
            adj_name, adj_role = adj
            role = self.grid.role(out)
            lines.append(f"{loops(union(role, adj_role))}{access(gnames[out], role)} += {access(adj_name, adj_role)};")
        for node in reversed(order):
            if node not in gnames:
                continue
            if node.op in LEAVES:
                key = node.attrs if node.op == "field" else node.attrs[0]
                self.leaf_adjoints[(node.op, key)] = (gnames[node], self.grid.role(node))
                continue
            for i, arg in enumerate(node.args):
                if arg in needs:
                    lines.append(self._contribution(node, i, gnames))
        return lines

    def _needs(self, order) -> set:
        needs: set = set()
        for node in order:
            if node.dtype not in FLOATS or node.op in NO_GRADIENT:
                continue
            if node.op in LEAVES:
                if node.op not in ("const", "fill", "dim", "index") and self.wanted(node):
                    needs.add(node)
            elif any(a in needs for a in node.args):
                needs.add(node)
        return needs

    def _contribution(self, node: Node, i: int, gnames: dict) -> str:
        g = self.grid
        p = self.primal
        arg = node.args[i]
        role = g.role(node)
        contracted = p.contracted(node)
        full = union(role, *(g.role(a) for a in node.args if a.op not in ("const", "fill", "dim", "index")),
                     contracted)
        target = access(gnames[arg], g.role(arg))
        ops = {k: p.ref(a, full) for k, a in zip("abc", node.args)}
        ops.update(z=p.ref(node, full), g=access(gnames[node], role),
                   n=" * ".join({"r": "R", "c": "C"}[ch] for ch in contracted) or "1")
        if node.op in ("amax", "amin"):
            a, z, gg = ops["a"], ops["z"], ops["g"]
            inner = loops(contracted)
            return (f"{loops(role)}{{ scalar_t cnt = 0; {inner}cnt += ({a} == {z}) ? 1 : 0; "
                    f"{inner}{target} += ({a} == {z}) ? {gg} / cnt : scalar_t(0); }}")
        if node.op == "pow":
            expr = self._pow(node, i, ops)
        elif node.op in CLAMP_RULES and node.args[1 - i].op in ("const", "fill"):
            rule = CLAMP_RULES[node.op]
            expr = rule.format(a=ops["b"], b=ops["a"], g=ops["g"]) if i == 1 else rule.format(**ops)
        else:
            rule = VJP_RULES[node.op][i]
            if rule is None:
                raise ValueError(f"no gradient flows to operand {i} of {node.op!r}")
            expr = rule.format(**ops)
        return f"{loops(full)}{target} += {expr};"

    def _pow(self, node: Node, i: int, ops: dict) -> str:
        g, a, b, z = ops["g"], ops["a"], ops["b"], ops["z"]
        if i == 1:  # torch: no gradient where the base is 0 and the exponent >= 0
            return f"(({a} == scalar_t(0) && {b} >= scalar_t(0)) ? scalar_t(0) : {g} * {z} * std::log({a}))"
        return f"({b} == scalar_t(0) ? scalar_t(0) : {g} * {b} * std::pow({a}, {b} - scalar_t(1)))"


# ---------------------------------------------------------------------- kernels
PRELUDE = r"""// Generated by psmc (psmc.codegen.cpp_printer). Do not edit: recompile the .psm source.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <utility>
#include <vector>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define PSM_HAVE_MXCSR 1
#endif

// float32 kernels flush subnormals to zero (FTZ/DAZ) while they run: a decay product that
// underflows would otherwise take the slow subnormal path (~100x) for every lane on its way to
// 0. Values below 1.2e-38 become 0; float64 is left alone.
#if defined(__clang__)
#define PSM_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define PSM_IVDEP _Pragma("GCC ivdep")
#else
#define PSM_IVDEP
#endif

// a work-item buffer: memory left uninitialised (every value is written before it is read),
// taken from this thread's pool of blocks the previous calls returned: a step allocates its
// buffers on every token, and fresh heap blocks of a few KB would take page faults each time
struct PsmPool {
  std::vector<std::pair<size_t, void *>> blocks;
  ~PsmPool() { for (auto &b : blocks) std::free(b.second); }
};
static inline PsmPool &psm_pool() { static thread_local PsmPool pool; return pool; }
template <typename T> struct PsmBuf {
  T *p;
  size_t bytes;
  explicit PsmBuf(int64_t n) : p(nullptr), bytes(((sizeof(T) * (size_t)(n > 0 ? n : 1)) + 63) / 64 * 64) {
    auto &blocks = psm_pool().blocks;
    for (size_t j = 0; j < blocks.size(); ++j)
      if (blocks[j].first == bytes) { p = (T *)blocks[j].second; blocks[j] = blocks.back(); blocks.pop_back(); return; }
    p = (T *)std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
  }
  ~PsmBuf() {
    auto &blocks = psm_pool().blocks;
    if (blocks.size() < 256) blocks.emplace_back(bytes, (void *)p); else std::free(p);
  }
  PsmBuf(const PsmBuf &) = delete;
  PsmBuf &operator=(const PsmBuf &) = delete;
  T *data() { return p; }
};

template <typename T> struct PsmFlushSubnormals {};
#ifdef PSM_HAVE_MXCSR
template <> struct PsmFlushSubnormals<float> {
  unsigned int saved;
  PsmFlushSubnormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~PsmFlushSubnormals() { _mm_setcsr(saved); }
};
#endif

// exp(x) = 2^n p(r), |r| <= ln(2)/2 (Cephes' expf polynomial, about 1 ulp): branch-free, so the
// loops over lanes vectorise (std::exp does not without -ffast-math). float64 uses std::exp.
// Results below 1.6e-38 (torch's subnormals) are 0; above 88.5 it overflows to inf one bit early.
static inline double psm_exp(double x) { return std::exp(x); }
static inline float psm_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.5f ? 88.5f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 126) << 23;  // 2^(n - 1), times 2 below: n may be 128
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float y = p * scale * 2.0f;
  y = x < -87.0f ? 0.0f : y;  // below exp(-87) ~ 1.6e-38 (subnormal results): 0
  y = x > 88.5f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
template <typename T> static inline T psm_max(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T> static inline T psm_min(T a, T b) { return (a != a || a < b) ? a : b; }
template <typename T> static inline T psm_logaddexp(T a, T b) {  // equal operands (infinities too): a + log 2
  return a == b ? a + T(0.6931471805599453) : psm_max(a, b) + std::log1p(psm_exp(-std::abs(a - b)));
}
template <typename T> static inline T psm_sign(T a) { return a > T(0) ? T(1) : (a < T(0) ? T(-1) : a * T(0)); }
template <typename T> static inline T psm_relu(T a) { return a > T(0) ? a : (a != a ? a : T(0)); }
template <typename T> static inline T psm_sigmoid(T a) { return T(1) / (T(1) + psm_exp(-a)); }
template <typename T> static inline T psm_softplus(T a) { return a > T(20) ? a : std::log1p(psm_exp(a)); }
template <typename T> static inline T psm_logsigmoid(T a) {
  return std::min(a, T(0)) - std::log1p(std::exp(-std::abs(a)));
}
"""


def symbol(op: OpIR) -> str:
    """The C symbol prefix of an op's kernels (an op name is any identifier: hashed in)."""
    digest = hashlib.sha256(op.name.encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() else "_" for ch in op.name)[:32]
    return f"psm_{safe}_{digest}"


def forward_layout(op: OpIR) -> dict:
    """Pointers: inputs, params, inits, outputs, finals, saves (one per field each), and one
    byte per work item set when an output it wrote is NaN.
    Ints: B, T, L, R, C, start, has_init, save, lanes per work item, then the dims in op.dims order,
    then four strides (batch, time, lane, declared axis) per input, then each param's slice size
    per lane (0: shared by the lanes), then the packed sequences: 0, or 1 and the B + 1 token
    offsets (cu_seqlens) of B sequences packed in one batch row of T tokens."""
    return {"ptrs": ("inputs", "params", "inits", "outputs", "finals", "saves"),
            "ints": ("B", "T", "L", "R", "C", "start", "has_init", "save", "spare", "dims", "input_strides",
                     "param_strides", "packed", "offsets")}


def backward_layout(op: OpIR) -> dict:
    """Pointers: inputs, params, inits, saves, douts, dfins, dins, dpars, dinits.
    Ints: B, T, L, R, C, start, has_init, has_dfin, lanes per work item, then as forward: dims, input
    strides, param slice sizes, packed sequences."""
    return {"ptrs": ("inputs", "params", "inits", "saves", "douts", "dfins", "dins", "dpars", "dinits"),
            "ints": ("B", "T", "L", "R", "C", "start", "has_init", "has_dfin", "spare", "dims", "input_strides",
                     "param_strides", "packed", "offsets")}


class KernelPrinter:
    def __init__(self, op: OpIR):
        self.op = op
        self.grid = Grid(op)
        self.lanes = self.grid.mode == "lanes"
        self.name = symbol(op)

    # -- shared pieces
    def header(self, pointer_groups: list) -> list[str]:
        op, g = self.op, self.grid
        lines = ["const int64_t B = N[0], T = N[1], L = N[2], R0 = N[3], C0 = N[4], start = N[5];",
                 "const bool has_init = N[6] != 0, flag = N[7] != 0;", "(void)start; (void)has_init; (void)flag;"]
        for j, d in enumerate(op.dims):
            lines.append(f"const int64_t dim_{d} = N[{9 + j}]; (void)dim_{d};")
        base = 9 + len(op.dims)
        for j, v in enumerate(op.inputs):
            s = base + 4 * j
            lines.append(f"const int64_t in{j}_sb = N[{s}], in{j}_st = N[{s + 1}], in{j}_sl = N[{s + 2}], "
                         f"in{j}_ss = N[{s + 3}];")
        base += 4 * len(op.inputs)
        for j, _ in enumerate(op.params):  # 0 for a param shared by the lanes, its slice size per lane
            lines.append(f"const int64_t par{j}_sl = N[{base + j}]; (void)par{j}_sl;")
        base += len(op.params)
        lines.append("// packed sequences (cu_seqlens): B sequences in the one batch row, sequence b its tokens "
                     "bos[b] .. bos[b + 1] - 1")
        lines.append(f"const int64_t *bos = N[{base}] != 0 ? N + {base + 1} : nullptr;")
        p = 0
        for group, items in pointer_groups:
            for j, (dtype, const) in enumerate(items):
                q = "const " if const else ""
                lines.append(f"{q}{store_type(dtype)} *__restrict__ {group}{j} = ({q}{store_type(dtype)} *)P[{p}];")
                p += 1
        lines.append("const int64_t W = N[8]; (void)W;  // lanes per work item ('lanes' mode)")
        lines.append(f"const int64_t NL = {'(L + W - 1) / W' if self.lanes else 'L'};")
        return lines

    def item_start(self) -> list[str]:
        """The work item: its batch row (packed: its sequence) b, its lanes from l, and its tokens:
        `steps` of them, in batch row `row` from token `first` on; token t's slot in the
        per-token tensors ([B * T] tokens, packed [T]) is `tok + t`."""
        if self.lanes:
            lines = ["const int64_t b = item / NL, l = (item % NL) * W;",
                     "const int64_t C = std::min<int64_t>(W, L - l);  // this block's lanes"]
        else:
            lines = ["const int64_t b = item / NL, l = item % NL;"]
        return lines + ["// its tokens: `steps` of batch row `row` from token `first` on; token t's slot in the [B * T] "
                        "(packed: [T]) tokens is tok + t",
                        "const int64_t row = bos ? 0 : b, first = bos ? bos[b] : 0, steps = bos ? bos[b + 1] - first : T;",
                        "const int64_t tok = row * T + first; (void)tok;"]

    def slot(self, role: str, row: str) -> str:
        """Offset of this work item's value of `role` in a [rows, L, *extent] tensor."""
        return f"(({row}) * L + l) * {self.grid.extent(role)}"

    def params(self) -> list[str]:
        """This work item's params: lane l's slice of a per-lane param (par<j>_sl elements per
        lane; 0 when shared). In 'lanes' mode a call with per-lane params runs one lane per work
        item (the runtime sets W = 1), so one slice serves the whole item."""
        lines = []
        for j, p in enumerate(self.op.params):
            role = self.grid.value_role(p)
            if role:
                lines.append(f"const {store_type(p.dtype)} *p_{p.name} = par{j} + l * par{j}_sl;")
            else:
                lines.append(f"const {ctype(p.dtype)} p_{p.name} = par{j}[l * par{j}_sl];")
        return lines

    def load_inputs(self) -> tuple[list[str], list[str]]:
        """(work-item buffers, per-token loads) of the inputs at token t."""
        decls, lines = [], []
        for j, v in enumerate(self.op.inputs):
            role = self.grid.value_role(v)
            st = store_type(v.dtype)
            base = f"in{j}[row * in{j}_sb + (first + t) * in{j}_st"
            if self.lanes:
                # contiguous lanes are read where they lie; strided ones are gathered into a buffer
                decls.append(f"PsmBuf<{st}> x_{v.name}_v(C); {st} *__restrict__ x_{v.name}_b = x_{v.name}_v.data();")
                lines.append(f"const {st} *__restrict__ x_{v.name} = &{base} + l * in{j}_sl];")
                lines.append(f"if (in{j}_sl != 1) {{ for (int64_t k = 0; k < C; ++k) x_{v.name}_b[k] = x_{v.name}[k * in{j}_sl]; "
                             f"x_{v.name} = x_{v.name}_b; }}")
            elif role:
                # a contiguous vector is read where it lies; a strided one is gathered
                decls.append(f"PsmBuf<{st}> x_{v.name}_v({self.grid.size(role)}); {st} *__restrict__ x_{v.name}_b = "
                             f"x_{v.name}_v.data();")
                idx = "i" if role == "r" else "k"
                lines.append(f"const {st} *__restrict__ x_{v.name} = &{base} + l * in{j}_sl];")
                lines.append(f"if (in{j}_ss != 1) {{ {loops(role)}x_{v.name}_b[{idx}] = x_{v.name}[{idx} * in{j}_ss]; "
                             f"x_{v.name} = x_{v.name}_b; }}")
            else:
                lines.append(f"const {ctype(v.dtype)} x_{v.name} = {base} + l * in{j}_sl];")
        return decls, lines

    def bind(self, prefix: str, field, source: str) -> str:
        """`prefix<field>` names the value `source` (a pointer to a work item's slot, or a number)."""
        role = self.grid.fields[field.name]
        if role:
            return f"const {store_type(field.dtype)} *{prefix}{field.name} = {source};"
        return f"const {ctype(field.dtype)} {prefix}{field.name} = {source};"

    def field_ptr(self, group: str, i: int, row: str) -> str:
        f = self.op.state[i]
        role = self.grid.fields[f.name]
        off = self.slot(role, row)
        return f"({group}{i} + {off})" if role else f"{group}{i}[{off}]"

    def assign(self, target: str, role: str, body: CppBody, node: Node) -> str:
        """`target` (a pointer or a scalar lvalue) = the value of `node`, broadcast to `role`."""
        src_role = self.grid.role(node) if node.op not in ("const", "fill", "dim", "index") else ""
        return f"{loops(role)}{access(target, role)} = {access(body.names[node], src_role)};"

    def identity_lines(self, decls: list) -> list[str]:
        """The identity element as work-item buffers id_<field> (exclusive readouts read it)."""
        op = self.op
        body = CppBody(self.grid, tuple(op.identity), "ident")
        lines = body.run()
        decls += body.decls
        for f, node in zip(op.state, op.identity):
            role = self.grid.fields[f.name]
            st = store_type(f.dtype)
            if role:
                decls.append(f"std::vector<{st}> id_{f.name}_v({self.grid.size(role)}); {st} *id_{f.name} = "
                             f"id_{f.name}_v.data();")
            else:
                lines.append(f"{ctype(f.dtype)} id_{f.name};")
            lines.append(self.assign(f"id_{f.name}", role, body, node))
        return lines

    def prologue(self, groups: list) -> tuple[list[str], list[str], list[str], list[str]]:
        """What both passes start with: (the header over these pointer groups, the work-item
        buffer declarations, the work item's first lines: params and the identity when the
        readout is exclusive, the per-token input loads)."""
        decls, in_lines = self.load_inputs()
        item = self.params()
        if self.op.exclusive:
            item += self.identity_lines(decls)
        return self.header(groups), decls, item, in_lines

    # -- forward (and step: a forward over one token)
    def forward(self) -> list[str]:
        op, g = self.op, self.grid
        n = len(op.state)
        groups = [("in", [(v.dtype, True) for v in op.inputs]), ("par", [(p.dtype, True) for p in op.params]),
                  ("ini", [(f.dtype, True) for f in op.state]), ("out", [(o.dtype, False) for o in op.outputs]),
                  ("fin", [(f.dtype, False) for f in op.state]), ("sav", [(f.dtype, False) for f in op.state]),
                  ("nan", [("bool", False)])]
        lines, decls, item, in_lines = self.prologue(groups)
        for i, f in enumerate(op.state):  # the carry: two buffers, or the save slots
            role = g.fields[f.name]
            st = store_type(f.dtype)
            if role:
                size = g.size(role)
                decls.append(f"PsmBuf<{st}> cbuf{i}_a({size}), cbuf{i}_b({size});")
                decls.append(f"if (T == 0) std::fill(cbuf{i}_a.data(), cbuf{i}_a.data() + {size}, {st}(0));  "
                             f"// what an empty call without a state returns")
                # the carry: read in place from the initial state, then from the buffer last written
                item.append(f"const {st} *c{i} = has_init ? {self.field_ptr('ini', i, 'b')} : cbuf{i}_a.data();")
            else:
                item.append(f"{ctype(f.dtype)} c{i} = has_init ? {ctype(f.dtype)}(ini{i}[{self.slot('', 'b')}]) : "
                            f"{ctype(f.dtype)}(0);")
        step = ["const int64_t index = start + t; (void)index;"] + in_lines
        readout = CppBody(g, tuple(op.readout), "v")
        ro_lines = readout.run()
        decls += readout.decls

        def do_readout(source_for):
            out = [self.bind("s_", f, source_for(i, f)) for i, f in enumerate(op.state)]
            out += self.output_slots() + ro_lines
            return ["{"] + ["  " + x for x in fuse(out + self.store_outputs(readout))] + ["}"]

        if op.exclusive:
            step.append("if (has_init || t > 0) {")
            step += ["  " + x for x in do_readout(lambda i, f: f"c{i}")]
            step.append("} else {")
            step += ["  " + x for x in do_readout(lambda i, f: f"id_{f.name}")]
            step.append("}")
        # the update: n<i> = combine(c<i>, lift) (or the lift alone on a fresh stream's first token)
        for i, f in enumerate(op.state):
            role = g.fields[f.name]
            st = store_type(f.dtype)
            if role:
                # the last token writes the final state in place (a one-token step copies nothing)
                step.append(f"{st} *n{i} = flag ? {self.field_ptr('sav', i, 'tok + t')} : t == steps - 1 ? "
                            f"{self.field_ptr('fin', i, 'b')} : "
                            f"(c{i} == cbuf{i}_a.data() ? cbuf{i}_b.data() : cbuf{i}_a.data());")
            else:
                step.append(f"{ctype(f.dtype)} n{i};")
        # Each branch computes the lift, then the combine (or the lift's copy), then (inclusive
        # readout) the readout of the new state, with the combine reading the lift's values and
        # the readout the new state by name: no binding line between them, so `fuse` runs the
        # elementwise statements of all three as one loop per axis and `scalarize` keeps their
        # temporaries in registers (the lift's [K, V] outer product of GLA is never stored).
        # The lift is printed once per branch (its names differ: each is local to its branch).
        for branch, tag in (("if (has_init || t > 0) {", "u"), ("} else {", "w")):
            lift = CppBody(g, tuple(op.lift), tag)
            lift_lines = lift.run()
            decls += lift.decls
            inner = []
            if tag == "u":
                right = {}
                inner += [self.bind("l_", f, f"c{i}") for i, f in enumerate(op.state)]
                for i, (f, node) in enumerate(zip(op.state, op.lift)):
                    src = g.role(node) if node.op not in ("const", "fill", "dim", "index") else ""
                    if src == g.fields[f.name]:
                        right[("right", f.name)] = lift.names[node]
                unbound = [f for f in op.state if ("right", f.name) not in right]
                combine = CppBody(g, tuple(op.combine), "k", bound=right)
                comb_lines = combine.run()
                decls += combine.decls
                body = lift_lines + self.bind_right(lift, decls, unbound) + comb_lines
                body += [self.assign(f"n{i}", g.fields[f.name], combine, node)
                         for i, (f, node) in enumerate(zip(op.state, op.combine))]
            else:
                body = lift_lines + [self.assign(f"n{i}", g.fields[f.name], lift, node)
                                     for i, (f, node) in enumerate(zip(op.state, op.lift))]
            if not op.exclusive:
                ro = CppBody(g, tuple(op.readout), "v" + tag, bound={("state", f.name): f"n{i}"
                                                                     for i, f in enumerate(op.state)})
                body += ro.run() + self.store_outputs(ro)
                decls += ro.decls
            step.append(branch)
            step += ["  " + x for x in inner + (self.output_slots() if not op.exclusive else []) + fuse(body)]
        step.append("}")
        for i, f in enumerate(op.state):
            role = g.fields[f.name]
            step.append(f"c{i} = n{i};")
            if not role:
                step.append(f"if (flag) sav{i}[{self.slot('', 'tok + t')}] = c{i};")
        item.append("int bad = 0;  // an int: an or-reduction of bools does not vectorise")
        item.append("for (int64_t t = 0; t < steps; ++t) {")
        item += ["  " + x for x in step]
        item.append("}")
        item.append("nan0[item] = bad != 0;")
        for i, f in enumerate(op.state):
            role = g.fields[f.name]
            if role:
                item.append(f"if (c{i} != {self.field_ptr('fin', i, 'b')}) "
                            f"{loops(role)}{access(self.field_ptr('fin', i, 'b'), role)} = {access(f'c{i}', role)};")
            else:
                item.append(f"fin{i}[{self.slot('', 'b')}] = c{i};")
        return self._function("forward", lines, decls, item)

    def output_slots(self) -> list[str]:
        """out<j>_p: token t's slot of each output (declared before the readout's statements,
        so that the stores below can join their loops)."""
        out = []
        for j, o in enumerate(self.op.outputs):
            role = self.grid.value_role(o)
            off = self.slot(role, "tok + t")
            if role:
                out.append(f"{store_type(o.dtype)} *__restrict__ out{j}_p = out{j} + {off};")
            else:
                out.append(f"{store_type(o.dtype)} &out{j}_p = out{j}[{off}];")
        return out

    def store_outputs(self, readout: CppBody) -> list[str]:
        """Write token t's outputs (slots: `output_slots`) from the readout's values, and flag
        NaN ones."""
        op, g = self.op, self.grid
        out = []
        for j, (o, node) in enumerate(zip(op.outputs, op.readout)):
            role = g.value_role(o)
            out.append(self.assign(f"out{j}_p", role, readout, node))
            if o.dtype in FLOATS:  # NaN outputs are reported; the layer then looks closer
                v = access(f"out{j}_p", role)
                out.append(f"{loops(role)}bad |= int({v} != {v});")
        return out

    def bind_right(self, lift: CppBody, decls: list, fields=None) -> list[str]:
        """r_<field> = the lift's values (of `fields`, default all); a lift value narrower than
        its field (a constant lift in lanes mode) is first broadcast into a work-item buffer."""
        out = []
        g = self.grid
        for i, (f, node) in enumerate(zip(self.op.state, self.op.lift)):
            if fields is not None and f not in fields:
                continue
            role = g.fields[f.name]
            src = g.role(node) if node.op not in ("const", "fill", "dim", "index") else ""
            if role == src:
                out.append(self.bind("r_", f, lift.names[node]))
                continue
            st = store_type(f.dtype)
            decls.append(f"PsmBuf<{st}> rb{i}_v({g.size(role)}); {st} *rb{i} = rb{i}_v.data();")
            out.append(self.assign(f"rb{i}", role, lift, node))
            out.append(f"const {st} *r_{f.name} = rb{i};")
        return out

    def _function(self, kind: str, header: list, decls: list, item: list) -> list[str]:
        lines = [f"template <typename scalar_t>",
                 f"static void {self.name}_{kind}(void **P, const int64_t *N, int threads) {{"]
        lines += ["  " + x for x in header]
        lines.append("  #pragma omp parallel num_threads(threads)")
        lines.append("  {")
        lines.append("    PsmFlushSubnormals<scalar_t> flush;  // this thread, for this call")
        lines.append("    // work-item buffers, allocated once per thread (lanes mode: for the widest block)")
        lines.append(f"    const int64_t R = {'1' if self.lanes else 'R0'}, C = {'W' if self.lanes else 'C0'}; (void)R; (void)C;")
        lines += ["    " + x for x in decls]
        lines.append("    #pragma omp for schedule(static)")
        lines.append("    for (int64_t item = 0; item < B * NL; ++item) {")
        lines += ["      " + x for x in self.item_start()]
        lines += ["      " + x for x in item]
        lines += ["    }", "  }", "}"]
        return scalarize(lines)

    # -- backward
    def backward(self) -> list[str]:
        op, g = self.op, self.grid
        fl = [f for f in op.state if f.dtype in FLOATS]
        groups = [("in", [(v.dtype, True) for v in op.inputs]), ("par", [(p.dtype, True) for p in op.params]),
                  ("ini", [(f.dtype, True) for f in op.state]), ("sav", [(f.dtype, True) for f in op.state]),
                  ("dout", [("f32", True) for _ in op.outputs]), ("dfin", [("f32", True) for _ in op.state]),
                  ("din", [("f32", False) for _ in op.inputs]), ("dpar", [("f32", False) for _ in op.params]),
                  ("dini", [("f32", False) for _ in op.state])]
        lines, decls, item, in_lines = self.prologue(groups)
        for i, f in enumerate(op.state):  # gc: the adjoint reaching P_t from the later tokens
            if f.dtype not in FLOATS:
                continue
            role = g.fields[f.name]
            if role:
                decls.append(f"std::vector<scalar_t> gc{i}_v({g.size(role)}); scalar_t *gc{i} = gc{i}_v.data();")
                item.append(f"{loops(role)}{access(f'gc{i}', role)} = flag ? {access(self.field_ptr('dfin', i, 'b'), role)} "
                            ": scalar_t(0);")
                decls.append(f"std::vector<scalar_t> gt{i}_v({g.size(role)}); scalar_t *gt{i} = gt{i}_v.data();")
            else:
                item.append(f"scalar_t gc{i} = flag ? dfin{i}[{self.slot('', 'b')}] : scalar_t(0);")
        for j, p in enumerate(op.params):
            role = g.value_role(p)
            if role:
                decls.append(f"std::vector<scalar_t> dp{j}_v({g.size(role)}); scalar_t *dp{j} = dp{j}_v.data();")
                item.append(f"{loops(role)}{access(f'dp{j}', role)} = 0;")
            else:
                item.append(f"scalar_t dp{j} = 0;")
        step = ["const int64_t t = steps - 1 - tr;", "const bool has_left = has_init || t > 0;"]
        step += in_lines
        step.append("const int64_t index = start + t; (void)index;")
        zero_field = {}
        for i, f in enumerate(op.state):
            role = g.fields[f.name]
            step.append(self.bind("s_", f, self.field_ptr("sav", i, "tok + t")))
            prev = self.field_ptr("sav", i, "tok + t - 1")
            init = self.field_ptr("ini", i, "b")
            fallback = f"s_{f.name}"
            step.append(self.bind("l_", f, f"t > 0 ? {prev} : (has_init ? {init} : {fallback})"))
        for j, o in enumerate(op.outputs):
            if o.dtype in FLOATS:
                role = g.value_role(o)
                off = self.slot(role, "tok + t")
                step.append(f"const scalar_t *dy{j} = dout{j} + {off};" if role else
                            f"const scalar_t dy{j} = dout{j}[{off}];")
        # readout VJP (exclusive: it read P_{t-1}, or the identity)
        adjoints = tuple((f"dy{j}", g.value_role(o)) if o.dtype in FLOATS else None
                         for j, o in enumerate(op.outputs))
        sides = {"left": "l_", "right": "r_", "state": "e_" if op.exclusive else "s_"}
        ro = CppVjp(g, tuple(op.readout), adjoints, lambda n: n.op in ("field", "arg", "param"), "ro", sides)
        if op.exclusive:
            step += [self.bind("e_", f, f"has_left ? l_{f.name} : id_{f.name}") for f in op.state]
        step += ro.run()
        decls += ro.decls
        for i, f in enumerate(op.state):
            if f.dtype not in FLOATS:
                continue
            role = g.fields[f.name]
            extra = None if op.exclusive else ro.leaf_adjoints.get(("field", ("state", f.name)))
            add = f" + {access(extra[0], role)}" if extra else ""
            if role:
                step.append(f"{loops(role)}{access(f'gt{i}', role)} = {access(f'gc{i}', role)}{add};")
            else:
                step.append(f"const scalar_t gt{i} = gc{i}{add};")
        lift = CppBody(g, tuple(op.lift), "ut")
        step += lift.run()
        decls += lift.decls
        step += self.bind_right(lift, decls)
        co = CppVjp(g, tuple(op.combine),
                    tuple((f"gt{i}", g.fields[f.name]) if f.dtype in FLOATS else None for i, f in enumerate(op.state)),
                    lambda n: n.op == "field", "co")
        step += co.run()
        decls += co.decls
        # ge: the adjoint of this token's lift values; gc: what flows on to P_{t-1}
        for i, f in enumerate(op.state):
            if f.dtype not in FLOATS:
                continue
            role = g.fields[f.name]
            right = co.leaf_adjoints.get(("field", ("right", f.name)))
            left = co.leaf_adjoints.get(("field", ("left", f.name)))
            excl = ro.leaf_adjoints.get(("field", ("state", f.name))) if op.exclusive else None
            r = access(right[0], right[1]) if right else "scalar_t(0)"
            lft = access(left[0], left[1]) if left else "scalar_t(0)"
            ex = f" + {access(excl[0], excl[1])}" if excl else ""
            if role:
                decls.append(f"PsmBuf<scalar_t> ge{i}_v({g.size(role)}); scalar_t *ge{i} = ge{i}_v.data();")
                step.append(f"{loops(role)}{access(f'ge{i}', role)} = has_left ? {r} : {access(f'gt{i}', role)};")
                step.append(f"{loops(role)}{access(f'gc{i}', role)} = has_left ? {lft}{ex} : scalar_t(0);")
            else:
                step.append(f"const scalar_t ge{i} = has_left ? {r} : gt{i};")
                step.append(f"gc{i} = has_left ? {lft}{ex} : scalar_t(0);")
        li = CppVjp(g, tuple(op.lift),
                    tuple((f"ge{i}", g.fields[f.name]) if f.dtype in FLOATS else None for i, f in enumerate(op.state)),
                    lambda n: n.op in ("arg", "param"), "li")
        step += li.run()
        decls += li.decls
        for j, v in enumerate(op.inputs):
            if v.dtype not in FLOATS:
                continue
            role = g.value_role(v)
            parts = [x for x in (ro.leaf_adjoints.get(("arg", v.name)), li.leaf_adjoints.get(("arg", v.name))) if x]
            value = " + ".join(access(n, r) for n, r in parts) or "scalar_t(0)"
            off = self.slot(role, "tok + t")
            if role:
                step.append(f"{{ scalar_t *dx = din{j} + {off}; {loops(role)}{access('dx', role)} = {value}; }}")
            else:
                step.append(f"din{j}[{off}] = {value};")
        for j, p in enumerate(op.params):
            if p.dtype not in FLOATS:
                continue
            role = g.value_role(p)
            for x in (ro.leaf_adjoints.get(("param", p.name)), li.leaf_adjoints.get(("param", p.name))):
                if x:
                    step.append(f"{loops(role)}{access(f'dp{j}', role)} += {access(x[0], x[1])};")
        item.append("for (int64_t tr = 0; tr < steps; ++tr) {")
        # (not fused: gcc 12 vectorised none of the fused adjoint loops, "no vectype for stmt",
        # and the unfused backward measured as fast or faster)
        item += ["  " + x for x in step]
        item.append("}")
        for i, f in enumerate(op.state):
            if f.dtype not in FLOATS:
                continue
            role = g.fields[f.name]
            if role:
                item.append(f"if (has_init) {loops(role)}{access(self.field_ptr('dini', i, 'b'), role)} = "
                            f"{access(f'gc{i}', role)};")
            else:
                item.append(f"if (has_init) dini{i}[{self.slot('', 'b')}] = gc{i};")
        for j, p in enumerate(op.params):
            if p.dtype not in FLOATS:
                continue
            role = g.value_role(p)
            size = g.size(role)
            item.append(f"{loops(role)}dpar{j}[item * {size} + {('i' if role == 'r' else 'k' if role == 'c' else 'i * C + k') if role else '0'}] = "
                        f"{access(f'dp{j}', role)};")
        return self._function("backward", lines, decls, item)

    def exports(self) -> list[str]:
        return exports(self.name)


def export_macro(kind: str, suffix: str) -> str:
    """The macro that compiles in one pass's entry point for one float type. psmc.runtime.
    cpu_support builds a library per pass and type (-D<macro>), so the compiler instantiates
    only the templates that library calls: inference in float32 builds a quarter of the code
    (the float64 and backward instantiations take most of an -O3 build). The runtime spells
    the same name (it imports no compiler stage; tests/codegen/test_cpu.py checks they agree)."""
    return f"PSM_EXPORT_{kind.upper()}_{suffix.upper()}"


def exports(name: str, kinds: tuple = ("forward", "backward")) -> list[str]:
    """`extern "C" void <name>_<pass>_<f32|f64>(void **P, const int64_t *N, int threads)`, each
    compiled only into the library built for its pass and type (`export_macro`)."""
    lines = []
    for kind in kinds:
        for suffix, t in (("f32", "float"), ("f64", "double")):
            lines += [f"#ifdef {export_macro(kind, suffix)}",
                      f'extern "C" void {name}_{kind}_{suffix}(void **P, const int64_t *N, int threads) '
                      f"{{ {name}_{kind}<{t}>(P, N, threads); }}",
                      "#endif"]
    return lines


def generate(op: OpIR, plan: dict | None) -> str | None:
    """The C++ source of one op's kernels, or None when the op gets none."""
    if unsupported_reason(op, plan) is not None:
        return None
    printer = KernelPrinter(op)
    lines = PRELUDE.split("\n") + printer.forward() + [""] + printer.backward() + [""] + printer.exports()
    return "\n".join(lines) + "\n"


def registration(op: OpIR, source_name: str) -> list[str]:
    g = Grid(op)
    layout = g.layout
    cls = f"__psmc_layers__[{op.name!r}]"

    def lam(expr):
        return "None" if expr is None else f"lambda cx_d: {dim_code(expr).replace('cx.d', 'cx_d')}"
    return [
        f"{cls}._cpu_kernels = _csup.CpuKernels(",
        f"    source={source_name},",
        f"    symbol={symbol(op)!r},",
        f"    mode={g.mode!r},",
        f"    rows={lam(layout.axis)},",
        f"    cols={lam(layout.cols)},",
        f"    inputs={tuple(v.name for v in op.inputs)!r},",
        f"    input_dtypes={tuple(v.dtype for v in op.inputs)!r},",
        f"    input_roles={tuple(g.value_role(v) for v in op.inputs)!r},",
        f"    params={tuple(p.name for p in op.params)!r},",
        f"    param_roles={tuple(g.value_role(p) for p in op.params)!r},",
        f"    field_dtypes={tuple(f.dtype for f in op.state)!r},",
        f"    field_roles={tuple(g.fields[f.name] for f in op.state)!r},",
        f"    output_dtypes={tuple(v.dtype for v in op.outputs)!r},",
        f"    output_roles={tuple(g.value_role(v) for v in op.outputs)!r},",
        f"    dims={tuple(op.dims)!r},",
        f"    lane_block={LANE_BLOCK},",
        f"    param_dtypes={tuple(p.dtype for p in op.params)!r},",
        ")",
    ]


def generate_section(ops, plans: dict) -> list[str]:
    """The C++ part of a generated module: each op's source as a string constant and its
    registration; empty when no op gets kernels."""
    return source_section(ops, plans, generate, registration, "_PSM_CPP_", [
        "# ---- C++ CPU kernels (psmc.codegen.cpp_printer), built on first use by psmc.runtime.cpu_support",
        "from psmc.runtime import cpu_support as _csup  # noqa: E402"])


def source_section(ops, plans: dict, make, register, const: str, header: list) -> list[str]:
    """For each op that `make(op, plan)` gives C++ source: the source as a raw string constant
    `<const><i>` and `register(op, that name)`'s lines; after `header`. Empty when none."""
    lines, count = [], 0
    for op in ops:
        source = make(op, plans.get(op.name))
        if source is None:
            continue
        if "'''" in source or "\\" in source:
            raise ValueError("generated C++ must not contain triple quotes or backslashes")
        name = f"{const}{count}"
        count += 1
        lines += [f"{name} = r'''", *source.rstrip("\n").split("\n"), "'''", ""]
        lines += register(op, name) + ["", ""]
    return header + ["", ""] + lines if lines else []


def describe(op: OpIR, plan: dict | None) -> str:
    reason = unsupported_reason(op, plan)
    if reason is not None:
        return f"cpu: none ({reason})"
    g = Grid(op)
    what = {"lanes": "a block of lanes", "state": f"state axis {g.layout.axis}",
            "matrix": f"a [{g.layout.axis}, {g.layout.cols}] state"}[g.mode]
    return (f"cpu: fused C++ forward + backward + step, one loop over time per batch row x {what}; packed "
            "sequences in one call")
