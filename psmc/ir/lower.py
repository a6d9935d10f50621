"""AST → typed IR, with every semantic check of the language.

`lower_module(module)` returns one `OpIR` per `op`. Helper `fn`s are inlined at each call
(their arguments are untyped and checked at the call site). Shapes and dtypes are inferred for
every expression; any problem is a `PsmcError` with the span of the offending construct.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import sympy

from ..errors import (PsmcDeclarationError, PsmcError, PsmcLimitError, PsmcNameError,
                      PsmcTypeError, Span)
from ..grammar import ast
from .builtins import BUILTINS, usage
from .nodes import Node, OpIR, Param, Value, dim_symbol, shape_str, type_str
from .ops import BINARY_OPERATORS
from .registry import FLOAT_RESULT
from .types import (broadcast, can_store, dims_equal, float_of, is_float, is_int, promote,
                    shapes_equal)

MAX_INLINE_DEPTH = 32
MAX_LOWERED_EXPRESSIONS = 200_000
# Lowering recurses a few Python frames per nesting level; this keeps far below Python's limit.
MAX_EXPRESSION_DEPTH = 128
_INIT_KINDS = {"zeros": 0, "ones": 0, "xavier": 0, "normal": 1, "uniform": 2}
# What to do instead of reading the position where it does not exist (per body).
_INDEX_HINTS = {
    "combine": "combine sees two elements, not a position; put the position into the state in lift",
    "identity": "the identity is the empty prefix and has no position; use a constant such as -1 or 0",
}

# The largest size a type may spell as a number: the analysis evaluates literal shapes entry by
# entry (dims it takes small), so a larger one belongs in a dim.
MAX_LITERAL_SIZE = 1 << 20


# ----------------------------------------------------------------------------- scope values
@dataclass(frozen=True)
class Element:
    """`l`, `r` (combine) or `s`/`p` (readout): a state element, accessed by field."""

    role: str  # 'left' | 'right' | 'state'
    fields: dict
    span: Span | None = None


@dataclass(frozen=True)
class TupleValue:
    items: tuple
    span: Span | None = None


def lower_module(module: ast.Module) -> list[OpIR]:
    fns: dict[str, ast.FnDef] = {}
    ops: dict[str, ast.OpDef] = {}
    for item in module.items:
        table = fns if isinstance(item, ast.FnDef) else ops
        kind = "fn" if isinstance(item, ast.FnDef) else "op"
        if item.name in table:
            raise PsmcNameError(f"duplicate {kind} '{item.name}'", item.name_span,
                                notes=((f"'{item.name}' was first defined here", table[item.name].name_span),),
                                hint=f"rename one of the two {kind}s")
        if isinstance(item, ast.FnDef) and item.name in BUILTINS:
            raise PsmcNameError(f"fn '{item.name}' has the name of a builtin", item.name_span,
                                hint="choose another name for the helper")
        table[item.name] = item
    for fn in fns.values():
        _check_unique(fn.params, [fn.name_span] * len(fn.params), "parameter")
    return [_lower_op(op, fns) for op in ops.values()]


def _lower_op(op: ast.OpDef, fns) -> OpIR:
    try:
        return _OpLowerer(op, fns).lower()
    except RecursionError:  # a backstop: MAX_EXPRESSION_DEPTH normally reports it first
        raise PsmcLimitError(f"op '{op.name}' is nested too deeply to check", op.name_span,
                             hint="flatten deeply nested expressions with `let`") from None


def _check_unique(names, spans, what):
    seen = {}
    for name, span in zip(names, spans):
        if name in seen:
            raise PsmcNameError(f"duplicate {what} '{name}'", span,
                                notes=((f"'{name}' was first declared here", seen[name]),),
                                hint="every name in an op must be unique")
        seen[name] = span


def _suggest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None


class _OpLowerer:
    """Lowers one `op`; holds its dims, params and the current body's scope."""

    def __init__(self, op: ast.OpDef, fns: dict[str, ast.FnDef]):
        self.op = op
        self.fns = fns
        self.dims: dict[str, sympy.Symbol] = {}
        self.params: dict[str, Param] = {}
        self.scope: dict[str, object] = {}
        self.body: str = ""
        self.fn_stack: list[str] = []
        self.budget = MAX_LOWERED_EXPRESSIONS
        self.depth = 0
        self.identity_field: Value | None = None
        self.let_names: dict[Node, str] = {}

    # ------------------------------------------------------------------ the op
    def lower(self) -> OpIR:
        op = self.op
        _check_unique([d.name for d in op.dims], [d.span for d in op.dims], "dim")
        self.dims = {d.name: dim_symbol(d.name) for d in op.dims}
        members = self._members()
        state_decl = members.get(ast.StateDecl)
        if state_decl is None:
            raise PsmcDeclarationError(f"op '{op.name}' has no state declaration", op.name_span,
                                       hint="declare the element's fields, e.g. `state (h: f32[D]);`")
        combine_def = members.get(ast.CombineDef)
        if combine_def is None:
            raise PsmcDeclarationError(f"op '{op.name}' has no combine", op.name_span,
                                       hint="add `combine (l, r) { return ...; }`: how two adjacent "
                                            "elements merge (l is the earlier one)")
        chunk = None
        if ast.ChunkDecl in members:
            chunk = self._dim_expr(members[ast.ChunkDecl].size)
        self.chunk = chunk
        for p in members.get(ast.ParamDecl, []):
            self._param(p)
        state = self._typed_values(state_decl.fields, "state field")
        lift_def = members.get(ast.LiftDef)
        if lift_def is not None:
            lift_inputs = self._typed_values(lift_def.inputs, "lift input")
        else:
            lift_inputs = state
        self._check_reserved(lift_inputs)
        if chunk is not None:
            self._check_chunk_axis(lift_inputs, "lift input" if lift_def else "state field (the op has no lift)")
        lift = self._lift(lift_def, lift_inputs, state)
        combine = self._combine(combine_def, state)
        identity_def = members.get(ast.IdentityDef)
        identity = self._identity(identity_def, state) if identity_def else None
        readout_def = members.get(ast.ReadoutDef)
        readout_inputs, readout, outputs, exclusive = self._readout(readout_def, state, identity_def, chunk)
        self._check_shared_inputs(lift_inputs if lift_def else (), readout_inputs)
        assumes = frozenset(p for a in members.get(ast.AssumeDecl, []) for p in a.properties)
        return OpIR(
            name=op.name, dims=tuple(self.dims), chunk=chunk, params=tuple(self.params.values()),
            state=state, lift_inputs=lift_inputs, lift=lift, combine=combine, identity=identity,
            readout_inputs=readout_inputs, readout=readout, outputs=outputs, exclusive=exclusive,
            assumes=assumes, has_lift=lift_def is not None, has_readout=readout_def is not None,
            span=op.span, source_text=_op_source(op), let_names=tuple(self.let_names.items()))

    def _members(self) -> dict:
        """Group members by kind; params and assumes may repeat, everything else once."""
        out: dict = {}
        words = {ast.ChunkDecl: "chunk", ast.StateDecl: "state", ast.LiftDef: "lift",
                 ast.CombineDef: "combine", ast.IdentityDef: "identity", ast.ReadoutDef: "readout"}
        for m in self.op.members:
            kind = type(m)
            if kind in (ast.ParamDecl, ast.AssumeDecl):
                out.setdefault(kind, []).append(m)
                continue
            if kind in out:
                raise PsmcDeclarationError(f"op '{self.op.name}' declares {words[kind]} twice", m.span,
                                           notes=(("the first one is here", out[kind].span),),
                                           hint=f"an op has at most one {words[kind]}")
            out[kind] = m
        return out

    # ------------------------------------------------------------------ declarations
    def _dim_expr(self, e) -> sympy.Expr:
        if isinstance(e, ast.DimInt):
            return sympy.Integer(e.value)
        if isinstance(e, ast.DimName):
            if e.name not in self.dims:
                raise PsmcNameError(f"unknown dim '{e.name}'", e.span,
                                    hint=_suggest(e.name, self.dims) or
                                    f"declare it in the op's dims: op {self.op.name}[..., {e.name}]")
            return self.dims[e.name]
        left, right = self._dim_expr(e.left), self._dim_expr(e.right)
        return {"+": left + right, "-": left - right, "*": left * right}[e.op]

    def _type(self, t: ast.TypeExpr) -> tuple[str, tuple]:
        shape = tuple(self._dim_expr(d) for d in t.shape)
        for d, src in zip(shape, t.shape):
            if d.is_nonpositive:  # decided for dims too: f32[1 - K] has no entries
                raise PsmcTypeError(f"a shape entry must be positive, got {d}", src.span,
                                    hint="a scalar has no shape: write `f32`, not `f32[0]`")
            if d.is_Integer and d > MAX_LITERAL_SIZE:  # the analysis builds literal shapes entry by entry
                raise PsmcTypeError(f"a shape entry of {d} is too large for a literal (at most {MAX_LITERAL_SIZE:,})",
                                    src.span, hint="declare the size as a dim (op name[..., N]) and set it when the "
                                                   "layer is built")
        return t.dtype, shape

    def _typed_values(self, typed, what) -> tuple[Value, ...]:
        _check_unique([t.name for t in typed], [t.span for t in typed], what)
        out = []
        for t in typed:
            dtype, shape = self._type(t.type)
            out.append(Value(t.name, dtype, shape, t.span))
        return tuple(out)

    def _param(self, p: ast.ParamDecl):
        if p.name in self.params:
            raise PsmcNameError(f"duplicate param '{p.name}'", p.span,
                                notes=(("first declared here", self.params[p.name].span),),
                                hint="every name in an op must be unique; rename one of the two params")
        if p.name in self.dims:
            raise PsmcNameError(f"param '{p.name}' has the name of a dim", p.span, hint="rename the param")
        dtype, shape = self._type(p.type)
        if not is_float(dtype):
            raise PsmcTypeError(f"param '{p.name}' must be a float type, not {dtype}", p.type.span,
                                hint="learnable parameters are f16, bf16, f32 or f64")
        init = self._param_init(p, shape)
        self.params[p.name] = Param(p.name, dtype, shape, p.span, init)

    def _param_init(self, p: ast.ParamDecl, shape) -> tuple:
        e = p.init
        if e is None:
            return ("xavier",) if len(shape) >= 2 else ("zeros",)
        name, args, span = None, (), e.span
        if isinstance(e, ast.Var):
            name = e.name
        elif isinstance(e, ast.Call) and not e.kwargs:
            name, args = e.name, e.args
        if name not in _INIT_KINDS or len(args) != _INIT_KINDS[name]:
            raise PsmcDeclarationError("unknown param initialiser", span,
                                       hint="use zeros, ones, normal(std), uniform(lo, hi) or xavier")
        if name == "xavier" and len(shape) < 2:
            raise PsmcDeclarationError(f"xavier needs a matrix; param '{p.name}' has shape {shape_str(shape)}",
                                       span, hint="use zeros, ones, normal(std) or uniform(lo, hi)")
        values = tuple(self._literal_number(a) for a in args)
        if name == "normal" and values[0] < 0:
            raise PsmcDeclarationError("normal(std) needs std >= 0", args[0].span,
                                       hint="std is a standard deviation, e.g. normal(0.02)")
        if name == "uniform" and values[0] > values[1]:
            raise PsmcDeclarationError("uniform(lo, hi) needs lo <= hi", span,
                                       hint="give the lower bound first, e.g. uniform(-0.1, 0.1)")
        return (name,) + values

    def _literal_number(self, e) -> float:
        sign = 1.0
        while isinstance(e, ast.Unary) and e.op == "-":
            sign, e = -sign, e.operand
        if isinstance(e, ast.Number):
            value = float(e.text)
            if math.isinf(value):
                raise PsmcDeclarationError("number literal is too large for a float", e.span,
                                           hint="initialiser arguments are finite numbers, e.g. normal(0.02)")
            return sign * value
        raise PsmcDeclarationError("expected a number literal", e.span,
                                   hint="initialiser arguments are plain numbers, e.g. normal(0.02)")

    def _check_reserved(self, values):
        for v in values:
            if v.name == "self":  # nn.Module.__call__(self, ...): no layer call could pass it by keyword
                raise PsmcNameError("an input cannot be named 'self'", v.span,
                                    hint="the generated layer is a Python class whose calls take inputs by "
                                         "keyword (layer(x=...)); rename the input, e.g. 'x' or 'self_'")
            clash = "dim" if v.name in self.dims else "param" if v.name in self.params else None
            if clash:
                raise PsmcNameError(f"input '{v.name}' has the name of a {clash}", v.span,
                                    hint="every name in an op must be unique")

    def _check_shared_inputs(self, lift_inputs, readout_inputs):
        """An input named in both lift and readout is one tensor: the types must agree."""
        lifted = {v.name: v for v in lift_inputs}
        for v in readout_inputs:
            first = lifted.get(v.name)
            if first is not None and (first.dtype != v.dtype or not shapes_equal(first.shape, v.shape)):
                raise PsmcTypeError(
                    f"input '{v.name}' is {type_str(v.dtype, v.shape)} here but "
                    f"{type_str(first.dtype, first.shape)} in lift", v.span,
                    notes=(("declared in lift here", first.span),),
                    hint="an input used by both lift and readout is the same tensor; give both the same type")

    def _check_chunk_axis(self, values, what):
        for v in values:
            if not v.shape or not dims_equal(v.shape[0], self.chunk):
                raise PsmcTypeError(
                    f"{what} '{v.name}' has type {type_str(v.dtype, v.shape)}, but a chunk op's inputs "
                    f"take a whole chunk: the first axis must be the chunk length {self.chunk}", v.span,
                    hint=f"declare it as {v.dtype}[{self.chunk}{', ' if v.shape else ''}"
                         f"{', '.join(str(d) for d in v.shape)}]")

    # ------------------------------------------------------------------ bodies
    def _enter(self, body: str, names: dict):
        self.body = body
        self.scope = dict(names)

    def _lift(self, lift_def, inputs, state) -> tuple[Node, ...]:
        args = {v.name: Node("arg", (), (v.name,), v.dtype, v.shape, v.span) for v in inputs}
        if lift_def is None:
            return tuple(args[f.name] for f in state)
        self._enter("lift", args)
        result = self._block(lift_def.body)
        return self._element_result(result, state, "lift", lift_def.body.result)

    def _combine(self, c: ast.CombineDef, state) -> tuple[Node, ...]:
        if c.left == c.right:
            raise PsmcNameError(f"combine's two elements are both called '{c.left}'", c.span,
                                hint="write `combine (l, r)`: l is the earlier element, r the later")
        names = {}
        for role, name in (("left", c.left), ("right", c.right)):
            self._check_not_reserved(name, c.span)
            fields = {f.name: Node("field", (), (role, f.name), f.dtype, f.shape, c.span) for f in state}
            names[name] = Element(role, fields, c.span)
        self._enter("combine", names)
        result = self._block(c.body)
        return self._element_result(result, state, "combine", c.body.result)

    def _identity(self, d: ast.IdentityDef, state) -> tuple[Node, ...]:
        self._enter("identity", {})
        items = d.value.items if isinstance(d.value, ast.TupleExpr) else (d.value,)
        if len(items) != len(state):
            raise PsmcTypeError(
                f"the identity has {len(items)} value{'s' if len(items) != 1 else ''} but the state has "
                f"{len(state)} field{'s' if len(state) != 1 else ''} ({', '.join(f.name for f in state)})",
                d.value.span, hint="give one value per state field, in field order")
        out = []
        for f, e in zip(state, items):
            self.identity_field = f
            node = self._node(self._expr(e), e)
            if node.batched:
                raise PsmcTypeError("the identity must be a constant", e.span,
                                    hint="use numbers, -inf, zeros, ones or eye(K): the value of the empty prefix")
            out.append(self._coerce(node, f, "the identity", e.span))
        self.identity_field = None
        return tuple(out)

    def _readout(self, r: ast.ReadoutDef | None, state, identity_def, chunk):
        if r is None:
            if chunk is not None:
                raise PsmcDeclarationError(
                    f"chunk op '{self.op.name}' needs a `readout exclusive (p, ...)`", self.op.name_span,
                    hint="a chunk op reads each chunk's outputs from the prefix before it and the chunk's own tokens")
            outputs = tuple(Value(f.name, f.dtype, f.shape, f.span) for f in state)
            nodes = tuple(Node("field", (), ("state", f.name), f.dtype, f.shape, f.span) for f in state)
            return (), nodes, outputs, False
        if r.exclusive and identity_def is None:
            raise PsmcDeclarationError(
                "`readout exclusive` needs a declared identity: the first position sees the empty prefix",
                r.span, hint="add `identity = ...;` (e.g. `identity = (ones, zeros);`)")
        if chunk is not None and not r.exclusive:
            raise PsmcDeclarationError(
                "a chunk op's readout must be `readout exclusive`: an inclusive readout would let token j "
                "see the chunk's later tokens through the state", r.span,
                hint="write `readout exclusive (p, x: ...)` and combine the prefix with the chunk's tokens")
        self._check_not_reserved(r.state, r.span)
        inputs = self._typed_values(r.inputs, "readout input")
        self._check_reserved(inputs)
        if r.state in {v.name for v in inputs}:
            raise PsmcNameError(f"duplicate name '{r.state}'", r.span, hint="rename the state or the input")
        if chunk is not None:
            self._check_chunk_axis(inputs, "readout input")
        fields = {f.name: Node("field", (), ("state", f.name), f.dtype, f.shape, r.span) for f in state}
        names = {v.name: Node("arg", (), (v.name,), v.dtype, v.shape, v.span) for v in inputs}
        names[r.state] = Element("state", fields, r.span)
        self._enter("readout", names)
        result = self._block(r.body)
        items = result.items if isinstance(result, TupleValue) else (result,)
        spans = r.body.result.items if isinstance(r.body.result, ast.TupleExpr) else (r.body.result,)
        nodes, outputs = [], []
        for i, (item, src) in enumerate(zip(items, spans)):
            node = self._node(item, src)
            if chunk is not None and (not node.shape or not dims_equal(node.shape[0], chunk)):
                raise PsmcTypeError(
                    f"a chunk readout returns one row per token (first axis {chunk}), got "
                    f"{type_str(node.dtype, node.shape)}", src.span,
                    hint=f"return a value whose first axis is the chunk length, e.g. {chunk} rows of outputs")
            nodes.append(node)
            outputs.append(Value("out" if len(items) == 1 else f"out{i}", node.dtype, node.shape, src.span))
        return inputs, tuple(nodes), tuple(outputs), r.exclusive

    def _check_not_reserved(self, name, span):
        if name in self.dims or name in self.params:
            raise PsmcNameError(f"'{name}' is already a {'dim' if name in self.dims else 'param'}", span,
                                hint="every name in an op must be unique")

    def _element_result(self, result, state, body, src) -> tuple[Node, ...]:
        if len(state) == 1:
            if isinstance(result, TupleValue):
                raise PsmcTypeError(f"{body} returns {len(result.items)} values but the state has one field "
                                    f"({state[0].name})", src.span,
                                    hint="with one field, return the bare value (no tuple)")
            return (self._coerce(self._node(result, src), state[0], body, src.span),)
        if isinstance(result, Element) and body == "combine":
            result = TupleValue(tuple(result.fields[f.name] for f in state), result.span)
        if not isinstance(result, TupleValue) or len(result.items) != len(state):
            got = len(result.items) if isinstance(result, TupleValue) else 1
            raise PsmcTypeError(
                f"{body} returns {got} value{'s' if got != 1 else ''} but the state has {len(state)} fields "
                f"({', '.join(f.name for f in state)})", src.span,
                hint="return a tuple with one value per state field, in field order")
        srcs = src.items if isinstance(src, ast.TupleExpr) else (src,) * len(state)
        return tuple(self._coerce(self._node(item, s), f, body, s.span)
                     for item, f, s in zip(result.items, state, srcs))

    def _coerce(self, node: Node, slot: Value, body: str, span) -> Node:
        if not can_store(node.dtype, slot.dtype):
            raise PsmcTypeError(f"{body} gives a {node.dtype} value for field '{slot.name}' of type "
                                f"{type_str(slot.dtype, slot.shape)}", span,
                                hint="a field keeps its declared dtype; convert the value or change the field type")
        if not shapes_equal(node.shape, slot.shape):
            fits = broadcast(node.shape, slot.shape)
            if node.shape and fits is not None and shapes_equal(fits, slot.shape):
                # NumPy would repeat the value along the missing axes: almost always a mistake
                raise PsmcTypeError(
                    f"{body} gives shape {shape_str(node.shape)} for field '{slot.name}' of shape "
                    f"{shape_str(slot.shape)}", span,
                    hint="only a scalar broadcasts to a field; a smaller value would be silently repeated. "
                         "Forgotten outer(a, b)? To repeat it on purpose, say so: e.g. "
                         f"`v[None, :] * ones({', '.join(str(d) for d in slot.shape)})`")
            if fits is None or not shapes_equal(fits, slot.shape):
                raise PsmcTypeError(
                    f"{body} gives shape {shape_str(node.shape)} for field '{slot.name}' of shape "
                    f"{shape_str(slot.shape)}", span, hint="the value must have (or broadcast to) the field's shape")
            node = Node("broadcast", (node,), (), node.dtype, slot.shape, node.span)
        if node.dtype != slot.dtype:
            node = Node("cast", (node,), (slot.dtype,), slot.dtype, node.shape, node.span)
        return node

    # ------------------------------------------------------------------ statements
    def _block(self, block: ast.Block):
        local_names = set()
        for let in block.lets:
            value = self._expr(let.value)
            if len(let.targets) == 1:
                values = (value,)
            else:
                if not isinstance(value, TupleValue) or len(value.items) != len(let.targets):
                    got = len(value.items) if isinstance(value, TupleValue) else 1
                    raise PsmcTypeError(f"cannot unpack {got} value{'s' if got != 1 else ''} into "
                                        f"{len(let.targets)} names", let.value.span,
                                        hint=f"write as many names as there are values ({got})")
                values = value.items
            spans = let.target_spans or (let.span,) * len(let.targets)
            for name, v, span in zip(let.targets, values, spans):
                if name in local_names or name in self.scope or name in self.dims or name in self.params:
                    raise PsmcNameError(f"'{name}' is already defined", span,
                                        hint="`let` names are single-assignment; choose a new name")
                local_names.add(name)
                self.scope[name] = v
                if isinstance(v, Node) and v.args:
                    self.let_names.setdefault(v, name)
        return self._expr(block.result)

    # ------------------------------------------------------------------ expressions
    def _node(self, value, src) -> Node:
        if isinstance(value, Node):
            return value
        span = getattr(src, "span", src)
        if isinstance(value, Element):
            names = ", ".join(value.fields)
            if len(value.fields) == 1:
                return next(iter(value.fields.values()))
            raise PsmcTypeError(f"this is a whole element with fields ({names}); pick a field", span,
                                hint=f"write e.g. `.{next(iter(value.fields))}`")
        raise PsmcTypeError(f"expected one value, got a tuple of {len(value.items)}", span,
                            hint="unpack it with `let (a, b) = ...;`")

    def _expr(self, e):
        self.budget -= 1
        if self.budget < 0:
            raise PsmcLimitError("the op expands to too many expressions (deeply nested helper calls?)", e.span,
                                 hint="call big helpers fewer times, or share their results with `let`")
        if self.depth >= MAX_EXPRESSION_DEPTH:
            raise PsmcLimitError(f"expressions are nested more than {MAX_EXPRESSION_DEPTH} deep", e.span,
                                 hint="name intermediate values with `let`")
        method = getattr(self, "_expr_" + type(e).__name__)
        self.depth += 1
        try:
            return method(e)
        finally:
            self.depth -= 1

    def _expr_Number(self, e: ast.Number):
        text = e.text
        if all(ch.isdigit() for ch in text):
            value = int(text)
            if value >= 2 ** 63:
                raise PsmcTypeError("integer literal does not fit in i64", e.span,
                                    hint="write it as a float (e.g. 1e20) or use a smaller value")
            return Node("const", (), (value,), "i64", (), e.span)
        value = float(text)
        if math.isinf(value):
            raise PsmcTypeError("number literal is too large for a float", e.span, hint="write `inf` for infinity")
        return Node("const", (), (value,), "f32", (), e.span)

    def _expr_Inf(self, e):
        return Node("const", (), (math.inf,), "f32", (), e.span)

    def _expr_Bool(self, e):
        return Node("const", (), (e.value,), "bool", (), e.span)

    def _expr_TupleExpr(self, e):
        return TupleValue(tuple(self._expr(i) for i in e.items), e.span)

    def _expr_Var(self, e: ast.Var):
        if e.name in self.scope:
            return self.scope[e.name]
        if e.name in self.params:
            p = self.params[e.name]
            if self.body == "identity":
                raise PsmcTypeError(f"the identity cannot read param '{p.name}'", e.span,
                                    hint="the identity is the value of the empty prefix, a constant the compiler "
                                         "checks: use numbers, -inf, zeros, ones or eye(K), not a learnable param")
            return Node("param", (), (p.name,), p.dtype, p.shape, e.span)
        if e.name in self.dims:
            return Node("dim", (), (e.name,), "i64", (), e.span)
        if e.name == "index" and self.body in ("lift", "readout"):
            return Node("index", (), (), "i64", (), e.span)
        if e.name in ("zeros", "ones") and self.identity_field is not None:
            f = self.identity_field
            return Node("fill", (), (0 if e.name == "zeros" else 1,), f.dtype, f.shape, e.span)
        return self._unknown_name(e)

    def _unknown_name(self, e: ast.Var):
        if e.name == "index":
            raise PsmcNameError(f"'index' (the position) is not available in {self.body}", e.span,
                                hint=_INDEX_HINTS.get(self.body, _INDEX_HINTS["combine"]))
        if e.name in ("zeros", "ones"):
            raise PsmcNameError(f"bare '{e.name}' takes its shape from a state field, so it only works in "
                                "`identity`", e.span, hint=f"write {e.name}(K, V) with an explicit shape")
        if e.name in BUILTINS or e.name in self.fns:
            call = usage(BUILTINS[e.name]) if e.name in BUILTINS else f"{e.name}({', '.join(self.fns[e.name].params)})"
            raise PsmcNameError(f"'{e.name}' is a function; call it with arguments", e.span, hint=f"e.g. {call}")
        candidates = list(self.scope) + list(self.params) + list(self.dims)
        hint = _suggest(e.name, candidates)
        if hint is None and self.body == "identity":
            hint = ("the identity is a constant (the value of the empty prefix): numbers, -inf, zeros, ones, "
                    "eye(K) and dims; inputs and fields are not visible")
        if hint is None:
            visible = ", ".join(candidates) if candidates else "none"
            hint = f"names visible in {self.body}: {visible}"
        raise PsmcNameError(f"unknown name '{e.name}'", e.span, hint=hint)

    def _expr_Field(self, e: ast.Field):
        value = self._expr(e.value)
        if isinstance(value, Element):
            if e.name not in value.fields:
                hint = _suggest(e.name, value.fields) or f"the fields are: {', '.join(value.fields)}"
                raise PsmcNameError(f"the state has no field '{e.name}'", e.span, hint=hint)
            return value.fields[e.name]
        if e.name == "T":
            node = self._node(value, e.value)
            return self._transpose(node, e.span)
        raise PsmcNameError(f"'.{e.name}' is not a field of this value", e.span,
                            hint="fields belong to state elements (l.a, r.S, s.h); `.T` transposes a matrix")

    def _expr_Unary(self, e: ast.Unary):
        x = self._node(self._expr(e.operand), e.operand)
        if e.op == "not":
            if x.dtype != "bool":
                raise PsmcTypeError(f"`not` needs a bool, got {x.dtype}", e.operand.span,
                                    hint="compare numbers to get a bool, e.g. `not (x > 0)`")
            return Node("not", (x,), (), "bool", x.shape, e.span)
        if x.dtype == "bool":
            raise PsmcTypeError("cannot negate a bool", e.span, hint="use `not` for booleans")
        if x.op == "const":
            return Node("const", (), (-x.attrs[0],), x.dtype, (), e.span)
        return Node("neg", (x,), (), x.dtype, x.shape, e.span)

    def _expr_Binary(self, e: ast.Binary):
        a = self._node(self._expr(e.left), e.left)
        b = self._node(self._expr(e.right), e.right)
        op = BINARY_OPERATORS[e.op]
        if op == "matmul":
            return self._matmul(a, b, e)
        result = self._elementwise(op, (a, b), e.span, e.op, (e.left, e.right))
        if op == "pow" and is_int(result.dtype) and b.op == "const" and b.attrs[0] < 0:
            # torch refuses integer tensors to negative integer powers at run time
            raise PsmcTypeError(f"an integer to the power {b.attrs[0]} is not an integer", e.span,
                                hint="make the base a float, e.g. `1.0 / x ** 2` or `x ** -1.0`")
        return result

    def _expr_Select(self, e: ast.Select):
        c = self._node(self._expr(e.cond), e.cond)
        a = self._node(self._expr(e.then), e.then)
        b = self._node(self._expr(e.other), e.other)
        return self._elementwise("where", (c, a, b), e.span, "if-then-else", (e.cond, e.then, e.other))

    def _elementwise(self, op: str, args: tuple, span, word: str, srcs) -> Node:
        kind = "div" if op in FLOAT_RESULT else {  # div, logaddexp: a float result (psmc.ir.registry)
            "add": "arith", "sub": "arith", "mul": "arith", "pow": "arith", "maximum": "arith", "minimum": "arith",
            "lt": "order", "le": "order", "gt": "order", "ge": "order", "eq": "equal", "ne": "equal",
            "and": "logic", "or": "logic", "where": "select"}[op]
        shape = broadcast(*(a.shape for a in args))
        if shape is None:
            shapes = " and ".join(shape_str(a.shape) for a in args)
            raise PsmcTypeError(f"shapes {shapes} do not broadcast in '{word}'", span,
                                hint="shapes broadcast like NumPy (right-aligned; equal or 1); "
                                     "use x[:, None] to add an axis")
        if kind == "select":
            c, a, b = args
            if c.dtype != "bool":
                raise PsmcTypeError(f"the condition must be a bool, got {c.dtype}", srcs[0].span,
                                    hint="compare values to get a bool, e.g. `r.v > l.v`")
            self._check_combinable(a, b, span, word)
            return Node(op, args, (), promote(a.dtype, b.dtype, a.op == "const", b.op == "const"), shape, span)
        a, b = args
        if kind == "logic":
            for x, s in zip(args, srcs):
                if x.dtype != "bool":
                    raise PsmcTypeError(f"`{word}` needs bools, got {x.dtype}", s.span,
                                        hint="compare numbers to get a bool")
            return Node(op, args, (), "bool", shape, span)
        if kind in ("arith", "div", "order"):
            for x, s in zip(args, srcs):
                if x.dtype == "bool":
                    raise PsmcTypeError(f"cannot use a bool in '{word}'", s.span,
                                        hint="use `if c then 1.0 else 0.0` to turn a bool into a number")
        self._check_combinable(a, b, span, word)
        dtype = promote(a.dtype, b.dtype, a.op == "const", b.op == "const")
        if kind in ("order", "equal"):
            dtype = "bool"
        elif kind == "div":
            dtype = float_of(dtype)
        return Node(op, args, (), dtype, shape, span)

    def _check_combinable(self, a: Node, b: Node, span, word):
        if (a.dtype == "bool") != (b.dtype == "bool"):
            raise PsmcTypeError(f"cannot combine {a.dtype} and {b.dtype} in '{word}'", span,
                                hint="both sides must be bools, or both numbers")

    def _matmul(self, a: Node, b: Node, e) -> Node:
        for x, s in ((a, e.left), (b, e.right)):
            if x.rank not in (1, 2):
                raise PsmcTypeError(f"'@' takes vectors and matrices, got shape {shape_str(x.shape)}", s.span,
                                    hint="for a scalar use '*'; index a higher-rank value down to a matrix first")
            if x.dtype == "bool":
                raise PsmcTypeError("cannot use a bool in '@'", s.span,
                                    hint="turn it into a number with `if c then 1.0 else 0.0`")
        inner_a = a.shape[-1]
        inner_b = b.shape[0]
        if not dims_equal(inner_a, inner_b):
            raise PsmcTypeError(f"shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not fit in '@': "
                                f"{inner_a} != {inner_b}", e.op_span or e.span,
                                hint="the last axis of the left operand must match the first axis of the right")
        shape = a.shape[:-1] + b.shape[1:]
        return Node("matmul", (a, b), (), promote(a.dtype, b.dtype), shape, e.span)

    def _transpose(self, x: Node, span) -> Node:
        if x.rank < 2:
            raise PsmcTypeError(f"transpose needs a matrix, got shape {shape_str(x.shape)}", span,
                                hint="a vector has no second axis; use x[:, None] or outer()")
        shape = x.shape[:-2] + (x.shape[-1], x.shape[-2])
        return Node("transpose", (x,), (), x.dtype, shape, span)

    def _expr_Subscript(self, e: ast.Subscript):
        x = self._node(self._expr(e.value), e.value)
        real = [i for i in e.indices if not isinstance(i, ast.NewAxis)]
        if len(real) > x.rank:
            raise PsmcTypeError(f"too many indices: {len(real)} for shape {shape_str(x.shape)}", e.span,
                                hint="the DSL sees one position of one lane: index only the declared axes")
        spec, shape, axis = [], [], 0
        for idx in list(e.indices) + [ast.Slice(None, None)] * (x.rank - len(real)):
            if isinstance(idx, ast.NewAxis):
                spec.append(("newaxis",))
                shape.append(sympy.Integer(1))
                continue
            size = x.shape[axis]
            if isinstance(idx, ast.Slice):
                lo = self._static_index(idx.lo, size, clamp=True) if idx.lo is not None else sympy.Integer(0)
                hi = self._static_index(idx.hi, size, clamp=True) if idx.hi is not None else size
                length = sympy.expand(hi - lo)
                if length.is_nonpositive:  # also decided for dims, e.g. x[K:] of an axis of size K
                    raise PsmcTypeError(f"empty slice of an axis of size {size}", idx.span or e.span,
                                        hint="a slice a:b keeps entries a..b-1 and must keep at least one")
                spec.append(("slice", lo, hi))
                shape.append(length)
            else:
                k = self._static_index(idx, size, clamp=False)
                spec.append(("index", k))
            axis += 1
        return Node("getitem", (x,), tuple(spec), x.dtype, tuple(shape), e.span)

    def _static_index(self, e, size, clamp: bool) -> sympy.Expr:
        written = self._static_int(e, "an index")
        k = sympy.expand(size + written) if written.is_negative else written  # -1 is the last entry
        limit = size if clamp else size - 1  # a slice bound may be one past the end
        # SymPy decides these for dims too (K is a positive integer): x[K] is out of range
        if k.is_negative or sympy.expand(k - limit).is_positive:
            raise PsmcTypeError(f"index {written} is out of range for an axis of size {size}", e.span,
                                hint=f"indices run from 0 to {size - 1} (or from -{size} to -1, from the end)")
        return k

    def _static_int(self, e, what) -> sympy.Expr:
        """A compile-time integer: literals, dims, and + - * of those (also through fn arguments)."""
        value = _static_value(self._node(self._expr(e), e))
        if value is None or isinstance(value, bool) or not (value.is_integer or value.is_number and value == int(value)):
            hint = ("data-dependent indexing is not supported; use where() to select" if what == "an index"
                    else "sizes and axes are fixed when the layer is built: use a number or a dim")
            raise PsmcTypeError(f"{what} must be a constant integer (a number, a dim, or + - * of those)",
                                e.span, hint=hint)
        return sympy.Integer(int(value)) if value.is_number else value

    # ------------------------------------------------------------------ calls
    def _expr_Call(self, e: ast.Call):
        if e.name in self.fns:
            return self._inline(e)
        b = BUILTINS.get(e.name)
        if b is None:
            hint = _suggest(e.name, list(BUILTINS) + list(self.fns))
            raise PsmcNameError(f"unknown builtin '{e.name}'", e.name_span or e.span,
                                hint=hint or "see docs/language.md for the builtins; define helpers with `fn`")
        n = len(e.args)
        if n < b.min_args or (b.max_args is not None and n > b.max_args):
            want = (f"{b.min_args}" if b.min_args == b.max_args else
                    f"at least {b.min_args}" if b.max_args is None else f"{b.min_args} to {b.max_args}")
            raise PsmcTypeError(f"{e.name}() takes {want} positional argument{'s' if want != '1' else ''}, "
                                f"got {n}", e.span, hint=f"call it as {usage(b)}: {b.doc}")
        kw = {}
        for k in e.kwargs:
            if k.name not in b.kwargs:
                allowed = ", ".join(b.kwargs) or "none"
                raise PsmcTypeError(f"{e.name}() has no keyword '{k.name}'", k.span,
                                    hint=f"its keywords: {allowed}; call it as {usage(b)}")
            if k.name in kw:
                raise PsmcTypeError(f"keyword '{k.name}' given twice", k.span, hint="give each keyword once")
            kw[k.name] = k
        static = {}
        for name, (kind, default) in b.kwargs.items():
            static[name] = self._static_kwarg(kw[name], kind) if name in kw else default
        rule = getattr(self, "_call_" + b.shape)
        return rule(b, e, static)

    def _static_kwarg(self, k: ast.Kwarg, kind):
        if kind == "bool":
            value = _static_value(self._node(self._expr(k.value), k.value))
            if not isinstance(value, bool):
                raise PsmcTypeError(f"'{k.name}' must be true or false", k.value.span,
                                    hint=f"write {k.name}=true or {k.name}=false")
            return value
        value = self._static_int(k.value, f"'{k.name}'")
        if kind == "int":
            if value.is_number and value < 1:
                raise PsmcTypeError(f"'{k.name}' must be a positive integer", k.value.span,
                                    hint=f"e.g. {k.name}=1, or a dim")
        return value

    def _args(self, e: ast.Call) -> list[Node]:
        return [self._node(self._expr(a), a) for a in e.args]

    def _axis(self, axis, rank, e) -> int:
        axis = sympy.sympify(axis)
        if not axis.is_number:
            raise PsmcTypeError("the axis must be a number", e.span,
                                hint="write axis=0, axis=-1, ...: an axis is a position in the declared shape")
        axis = int(axis)
        if not -rank <= axis < rank:
            raise PsmcTypeError(f"axis {axis} is out of range for a value of rank {rank}", e.span,
                                hint="axes count the declared shape only (the DSL sees one position)")
        return axis % rank

    def _call_same(self, b, e, static):
        (x,) = self._args(e)
        dtype = self._dtype_rule(b, x, e)
        attrs = ()
        if "axis" in static:
            if x.rank == 0:
                raise PsmcTypeError(f"{e.name}() needs at least a vector, got a scalar", e.span,
                                    hint="it works over an axis; a scalar has none")
            attrs = (self._axis(static["axis"], x.rank, e),)
        return Node(b.ir_op, (x,), attrs, dtype, x.shape, e.span)

    def _dtype_rule(self, b, x: Node, e) -> str:
        if x.dtype == "bool":
            raise PsmcTypeError(f"{e.name}() needs a number, got a bool", e.args[0].span)
        return float_of(x.dtype) if b.dtype == "float" else x.dtype

    def _call_broadcast(self, b, e, static):
        args = self._args(e)
        return self._elementwise(b.ir_op, tuple(args), e.span, e.name + "()", e.args)

    def _call_reduce(self, b, e, static):
        (x,) = self._args(e)
        dtype = self._dtype_rule(b, x, e)
        if x.rank == 0:
            raise PsmcTypeError(f"{e.name}() reduces an axis, but got a scalar", e.args[0].span,
                                hint="a scalar is already reduced; drop the call")
        axis = self._axis(static["axis"], x.rank, e)
        shape = x.shape[:axis] + x.shape[axis + 1:]
        return Node(b.ir_op, (x,), (axis,), dtype, shape, e.span)

    def _call_outer(self, b, e, static):
        x, y = self._args(e)
        for v, s in ((x, e.args[0]), (y, e.args[1])):
            if v.rank != 1:
                raise PsmcTypeError(f"outer() takes two vectors, got shape {shape_str(v.shape)}", s.span,
                                    hint="for matrices use '@'; for a scalar use '*'")
        self._check_combinable(x, y, e.span, "outer()")
        return Node("outer", (x, y), (), promote(x.dtype, y.dtype), (x.shape[0], y.shape[0]), e.span)

    def _static_size(self, e, what) -> sympy.Expr:
        n = self._static_int(e, what)
        if n.is_nonpositive:
            raise PsmcTypeError(f"{what} must be positive, got {n}", e.span,
                                hint="sizes are numbers or dims greater than zero")
        return n

    def _call_eye(self, b, e, static):
        n = self._static_size(e.args[0], "the size of eye()")
        return Node("eye", (), (), "f32", (n, n), e.span)

    def _call_fill(self, b, e, static):
        if not e.args and self.identity_field is not None:
            f = self.identity_field
            return Node("fill", (), (0 if e.name == "zeros" else 1,), f.dtype, f.shape, e.span)
        shape = tuple(self._static_size(a, f"a {e.name}() size") for a in e.args)
        return Node("fill", (), (0 if e.name == "zeros" else 1,), "f32", shape, e.span)

    def _call_concat(self, b, e, static):
        args = self._args(e)
        first = args[0]
        if first.rank == 0:
            raise PsmcTypeError("concat() joins arrays, got a scalar", e.args[0].span,
                                hint="make it a vector first, e.g. x[None] or reshape(x, 1)")
        axis = self._axis(static["axis"], first.rank, e)
        dtype = first.dtype
        total = 0
        for x, s in zip(args, e.args):
            if x.rank != first.rank or not all(dims_equal(p, q) for i, (p, q) in enumerate(zip(x.shape, first.shape))
                                               if i != axis):
                raise PsmcTypeError(f"concat() along axis {axis}: shapes {shape_str(first.shape)} and "
                                    f"{shape_str(x.shape)} differ off that axis", s.span,
                                    hint="the values must have the same rank and agree on every axis but the "
                                         "joined one; pick another axis= or transpose")
            self._check_combinable(first, x, e.span, "concat()")
            dtype = promote(dtype, x.dtype)
            total = total + x.shape[axis]
        shape = first.shape[:axis] + (sympy.expand(total),) + first.shape[axis + 1:]
        return Node("concat", tuple(args), (axis,), dtype, shape, e.span)

    def _call_split(self, b, e, static):
        x = self._node(self._expr(e.args[0]), e.args[0])
        n = self._static_int(e.args[1], "the number of parts")
        if not n.is_number or n < 1:
            got = "a dim expression" if not n.is_number else str(n)
            raise PsmcTypeError(f"split() needs a positive number of parts, written as a number; got {got}",
                                e.args[1].span,
                                hint="e.g. split(x, 3, axis=-1) gives three equal parts (the parts may be dims long)")
        if x.rank == 0:
            raise PsmcTypeError("split() needs an array, got a scalar", e.args[0].span,
                                hint="a scalar has no axis to cut")
        axis = self._axis(static["axis"], x.rank, e)
        size = x.shape[axis]
        part = sympy.simplify(size / n)
        if not part.is_integer and not (part.is_number and part == int(part)):
            raise PsmcTypeError(f"split() cannot cut an axis of size {size} into {n} equal parts", e.span,
                                hint="the number of parts must divide the axis; slice with x[a:b] for unequal parts")
        n = int(n)
        items = []
        for i in range(n):
            spec = tuple(("slice", sympy.Integer(0), d) if j != axis else ("slice", part * i, part * (i + 1))
                         for j, d in enumerate(x.shape))
            shape = x.shape[:axis] + (part,) + x.shape[axis + 1:]
            items.append(Node("getitem", (x,), spec, x.dtype, shape, e.span))
        return TupleValue(tuple(items), e.span)

    def _call_transpose(self, b, e, static):
        (x,) = self._args(e)
        return self._transpose(x, e.span)

    def _call_diag(self, b, e, static):
        (x,) = self._args(e)
        if x.rank != 1:
            raise PsmcTypeError(f"diag() takes a vector, got shape {shape_str(x.shape)}", e.args[0].span,
                                hint="diag(v) builds a matrix from a vector; multiply by x[:, None] to scale rows")
        return Node("diag", (x,), (), x.dtype, (x.shape[0], x.shape[0]), e.span)

    def _call_reshape(self, b, e, static):
        x = self._node(self._expr(e.args[0]), e.args[0])
        target = e.args[1]
        items = target.items if isinstance(target, ast.TupleExpr) else (target,)
        shape = tuple(self._static_size(i, "a reshape size") for i in items)
        before = sympy.prod(x.shape) if x.shape else sympy.Integer(1)
        after = sympy.prod(shape) if shape else sympy.Integer(1)
        if not dims_equal(before, after):
            raise PsmcTypeError(f"cannot reshape {shape_str(x.shape)} ({before} entries) into "
                                f"{shape_str(shape)} ({after} entries)", e.span,
                                hint="the new shape must hold exactly as many entries as the old one")
        return Node("reshape", (x,), (), x.dtype, shape, e.span)

    def _call_attention(self, b, e, static):
        q, k, v = self._args(e)
        for x, s in zip((q, k, v), e.args):
            if x.rank != 2:
                raise PsmcTypeError(f"attention() takes [tokens, width] matrices, got shape {shape_str(x.shape)}",
                                    s.span, hint="q, k and v are one row per token, e.g. f32[C, D]")
            if x.dtype == "bool":
                raise PsmcTypeError("attention() needs numbers, got a bool", s.span,
                                    hint="turn it into a number with `if c then 1.0 else 0.0`")
        if not dims_equal(q.shape[1], k.shape[1]):
            raise PsmcTypeError(f"attention(): q {shape_str(q.shape)} and k {shape_str(k.shape)} need the same "
                                "width", e.span, hint="queries and keys are compared by a dot product per row")
        if not dims_equal(k.shape[0], v.shape[0]):
            raise PsmcTypeError(f"attention(): k {shape_str(k.shape)} and v {shape_str(v.shape)} need the same "
                                "number of tokens", e.span, hint="every key needs one value row")
        heads = static["heads"]
        for x in (q, v):
            ratio = sympy.simplify(x.shape[1] / heads)
            if ratio.is_number and ratio != int(ratio):
                raise PsmcTypeError(f"attention(): width {x.shape[1]} is not divisible by heads={heads}", e.span,
                                    hint="each head gets width / heads columns; pick heads dividing the width")
        dtype = float_of(promote(promote(q.dtype, k.dtype), v.dtype))
        return Node("attention", (q, k, v), (heads, bool(static["causal"])), dtype,
                    (q.shape[0], v.shape[1]), e.span)

    # ------------------------------------------------------------------ helper fns
    def _inline(self, e: ast.Call):
        fn = self.fns[e.name]
        if e.kwargs:
            raise PsmcTypeError(f"fn '{fn.name}' takes positional arguments only", e.kwargs[0].span,
                                hint=f"call it as {fn.name}({', '.join(fn.params)})")
        if len(e.args) != len(fn.params):
            raise PsmcTypeError(f"fn '{fn.name}' takes {len(fn.params)} argument{'s' if len(fn.params) != 1 else ''}"
                                f", got {len(e.args)}", e.span,
                                notes=((f"'{fn.name}' is defined here", fn.name_span),))
        if fn.name in self.fn_stack:
            raise PsmcDeclarationError(f"fn '{fn.name}' calls itself; recursion is not allowed", e.span,
                                       hint="bodies are straight-line code; unroll the recursion by hand")
        if len(self.fn_stack) >= MAX_INLINE_DEPTH:
            raise PsmcLimitError("helper fns are nested too deeply", e.span)
        args = [self._expr(a) for a in e.args]
        saved_scope, saved_body = self.scope, self.body
        self.scope = {p: a for p, a in zip(fn.params, args)}
        self.fn_stack.append(fn.name)
        try:
            return self._block(fn.body)
        except PsmcError as err:
            note = (f"in fn '{fn.name}', called from here", e.span)
            if note not in err.notes:
                raise type(err)(err.message, err.span, err.hint, err.notes + (note,)) from None
            raise
        finally:
            self.fn_stack.pop()
            self.scope, self.body = saved_scope, saved_body


_STATIC_ARITH = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def _static_value(node: Node):
    """The compile-time value of a node built from literals and dims, else None."""
    if node.op == "const":
        v = node.attrs[0]
        return v if isinstance(v, bool) else sympy.Integer(v) if isinstance(v, int) else None
    if node.op == "dim":
        return dim_symbol(node.attrs[0])
    if node.op == "neg":
        v = _static_value(node.args[0])
        return None if v is None or isinstance(v, bool) else -v
    if node.op in _STATIC_ARITH:
        a, b = (_static_value(x) for x in node.args)
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            return None
        return _STATIC_ARITH[node.op](a, b)
    return None


def _op_source(op: ast.OpDef) -> str:
    span = op.span
    if span is None:
        return ""
    lines = span.source.text.split("\n")  # line numbers count '\n' only (see Source.line)
    return "\n".join(line.rstrip("\r") for line in lines[span.line - 1: span.end_line])
