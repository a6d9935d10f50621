"""Recognise, from the IR, ops whose parallel pass has a faster form than the generic scan.

Two shapes of exact-scan ops are recognised (nothing is matched by op name):

* `chunkwise`: decayed linear attention. State (A, S) or (S,), combine
  (l.A * r.A, r.A' * l.S + r.S) (or l.S + r.S), lift (exp(G), outer(k, v)) and a readout
  `q @ s.S` times a constant. The layer then calls `chunk_linear_attention` (the chunkwise
  matmul form: intra-chunk masked matmuls + inter-chunk state passing) and never builds a
  per-token K x V state. Decay kinds: none, scalar per lane, per key (A: [K] with r.A[:, None]).
* `first_order`: any elementwise first-order linear recurrence, state (A, H) with combine
  (l.A * r.A, r.A' * l.H + r.H). The layer lifts as usual, then runs `linear_recurrence`
  (a blocked sequential scan, exact) instead of the generic log-depth scan.

`choose_fast_path(op, plan)` returns a `FastPath` (extra methods for the generated class) or
None; `psmc check` reports the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir.nodes import Node, OpIR, leaves
from .torch_printer import BodyPrinter, shape_code


@dataclass(frozen=True)
class FastPath:
    name: str  # 'chunkwise:<decay>' | 'first_order'
    import_line: str
    lines: tuple

    def method_lines(self, op) -> list[str]:
        return list(self.lines)


def _field(node: Node, role: str, name: str) -> bool:
    return node.op == "field" and node.attrs == (role, name)


def _aligned_right(node: Node, name: str) -> bool:
    """r.A, or r.A[:, None] (a per-key decay broadcast over the value axis)."""
    if _field(node, "right", name):
        return True
    if node.op == "getitem" and _field(node.args[0], "right", name):
        spec = node.attrs
        full = all(e[0] == "newaxis" or (e[0] == "slice" and sympy.sympify(e[1]) == 0) for e in spec)
        return full and spec[-1] == ("newaxis",)
    return False


def _decay_update(node: Node, decay: str, value: str) -> bool:
    """node == r.A' * l.H + r.H (either operand order)."""
    if node.op != "add":
        return False
    for prod, rest in (node.args, node.args[::-1]):
        if _field(rest, "right", value) and prod.op == "mul":
            a, b = prod.args
            if (_aligned_right(a, decay) and _field(b, "left", value)) or \
               (_aligned_right(b, decay) and _field(a, "left", value)):
                return True
    return False


def _decay_product(node: Node, decay: str) -> bool:
    return node.op == "mul" and {tuple(a.attrs) for a in node.args} == {("left", decay), ("right", decay)} \
        and all(a.op == "field" for a in node.args)


def first_order_fields(op: OpIR) -> tuple[int, int] | None:
    """(index of A, index of H) when the combine is an elementwise first-order recurrence."""
    if len(op.state) != 2:
        return None
    for ia, ih in ((0, 1), (1, 0)):
        a, h = op.state[ia].name, op.state[ih].name
        if _decay_product(op.combine[ia], a) and _decay_update(op.combine[ih], a, h):
            if all(f.dtype in ("f32", "f64", "f16", "bf16") for f in op.state):
                return ia, ih
    return None


def _scale_of(node: Node):
    """(M, scale node or None) for M, M * c, c * M, M / c with c a constant scalar."""
    def constant(n):
        return not n.batched and n.rank == 0 and all(x.op in ("const", "dim") for x in leaves((n,)))
    if node.op in ("mul", "div"):
        a, b = node.args
        if constant(b):
            return a, (b, node.op)
        if node.op == "mul" and constant(a):
            return b, (a, "mul")
    return node, None


def _chunkwise(op: OpIR):
    """The pieces of a decayed-linear-attention op, or None."""
    if op.exclusive or op.chunk is not None or len(op.outputs) != 1 or not op.has_lift:
        return None
    if leaves(op.lift + op.readout, "index"):
        return None
    if len(op.state) == 1:
        s_index, decay_index = 0, None
        name = op.state[0].name
        c = op.combine[0]
        if not (c.op == "add" and {a.attrs for a in c.args} == {("left", name), ("right", name)}):
            return None
    else:
        fields = first_order_fields(op)
        if fields is None:
            return None
        decay_index, s_index = fields
    S = op.state[s_index]
    if len(S.shape) != 2:
        return None
    lift_S = op.lift[s_index]
    if lift_S.op != "outer":
        return None
    k_expr, v_expr = lift_S.args
    kind, g_expr = "none", None
    if decay_index is not None:
        A = op.state[decay_index]
        lift_A = op.lift[decay_index]
        g_expr = lift_A.args[0] if lift_A.op == "exp" else Node("log", (lift_A,), (), lift_A.dtype, lift_A.shape)
        if A.shape == ():
            kind = "scalar"
        elif len(A.shape) == 1 and sympy.expand(A.shape[0] - S.shape[0]) == 0:
            kind = "key"
        else:
            return None
    matmul, scale = _scale_of(op.readout[0])
    if matmul.op != "matmul" or not _field(matmul.args[1], "state", S.name) or matmul.args[0].rank != 1:
        return None
    q_expr = matmul.args[0]
    if leaves((q_expr,), "field"):
        return None
    return dict(s_index=s_index, decay_index=decay_index, kind=kind, k=k_expr, v=v_expr, g=g_expr,
                q=q_expr, scale=scale)


def choose_fast_path(op: OpIR, plan: dict) -> FastPath | None:
    if plan.get("plan") != "exact-scan" or op.exclusive:
        return None  # exclusive readouts keep the generic path (the prefix shift is not fused)
    pieces = _chunkwise(op)
    if pieces is not None:
        return _chunkwise_method(op, pieces)
    fields = first_order_fields(op)
    if fields is not None and op.chunk is None:
        return _first_order_method(op, *fields)
    return None


def _input_lines(op: OpIR) -> list[str]:
    return [f"        x_{v.name} = call.inputs[{v.name!r}]" for v in op.inputs]


def _chunkwise_method(op: OpIR, p: dict) -> FastPath:
    nodes = [p["k"], p["v"], p["q"]] + ([p["g"]] if p["g"] is not None else [])
    if p["scale"] is not None:
        nodes.append(p["scale"][0])
    printer = BodyPrinter(tuple(nodes))
    body = printer.run()
    ref = printer.names
    scale = "1.0"
    if p["scale"] is not None:
        node, kind = p["scale"]
        scale = ref[node] if kind == "mul" else f"1.0 / {ref[node]}"
    S = op.state[p["s_index"]]
    lines = [
        "    def _fast_forward(self, call, index, state):",
        f'        """Chunkwise matmul form (decay: {p["kind"]}), recognised from the IR."""',
        "        cx, lead = call.ctx, call.lead",
    ]
    lines += _input_lines(op)
    lines += ["        " + line for line in body]
    g = ref[p["g"]] if p["g"] is not None else "None"
    lines += [
        f"        k_, v_, q_ = {ref[p['k']]}, {ref[p['v']]}, {ref[p['q']]}",
        "        k_, v_, q_ = (_ops.as_field(t, lead, tuple(t.shape[len(lead):]) if hasattr(t, 'shape') else (), "
        "t.dtype, cx.dev) for t in (k_, v_, q_))",
        "        carry = None if state is None else state.prefix",
        f"        s0 = None if carry is None else carry[{p['s_index']}]",
    ]
    if p["kind"] != "none":
        lines += [
            f"        g_ = _ops.as_field({g}, lead, {'()' if p['kind'] == 'scalar' else '(k_.shape[-1],)'}, "
            "torch.float64 if k_.dtype == torch.float64 else torch.float32, cx.dev)",
        ]
    else:
        lines += ["        g_ = None"]
    lines += [
        f"        out, s_last = _chunkwise.chunk_linear_attention(q_, k_, v_, g_, decay={p['kind']!r}, "
        f"scale={scale}, initial_state=s0)",
        f"        s_last = s_last.to(cx.dt[{S.dtype!r}])",
        f"        out = _ops.as_field(out, lead, {shape_code(op.outputs[0].shape)}, cx.dt[{op.outputs[0].dtype!r}], "
        "cx.dev)",
    ]
    if p["decay_index"] is not None:
        A = op.state[p["decay_index"]]
        lines += [
            f"        a_total = torch.exp(g_.sum(dim=1)).to(cx.dt[{A.dtype!r}])",
            "        if carry is not None:",
            f"            a_total = a_total * carry[{p['decay_index']}]",
        ]
        element = ["a_total", "s_last"] if p["decay_index"] == 0 else ["s_last", "a_total"]
    else:
        element = ["s_last"]
    lines += [
        f"        new_state = _ScanState(prefix=({', '.join(element)},), count=(0 if state is None else "
        "state.size) + lead[1])",
        "        return (out,), new_state",
        "",
    ]
    return FastPath(f"chunkwise:{p['kind']}",
                    "from psmc.runtime import chunkwise as _chunkwise\nfrom psmc.runtime.state import ScanState as "
                    "_ScanState", tuple(lines))


def _first_order_method(op: OpIR, ia: int, ih: int) -> FastPath:
    a = op.state[ia].name
    uses_a = any(n.attrs == ("state", a) for n in leaves(op.readout, "field"))
    update = op.combine[ih]
    prod = update.args[0] if update.args[0].op == "mul" else update.args[1]
    aligned = prod.args[0] if _aligned_right(prod.args[0], a) else prod.args[1]
    printer = BodyPrinter((aligned,))
    body = printer.run()
    lines = [
        "    def _fast_forward(self, call, index, state):",
        '        """Blocked first-order linear recurrence h = a * h + b, recognised from the IR."""',
        "        cx, lead = call.ctx, call.lead",
        "        leaves = self._lift_batch(call, lead, call.inputs, index)",
        f"        r_{a} = leaves[{ia}]",
    ]
    lines += ["        " + line for line in body]
    lines += [
        "        carry = None if state is None else state.prefix",
        f"        h, h_last = _fastpaths.linear_recurrence({printer.names[aligned]}, leaves[{ih}], "
        f"None if carry is None else carry[{ih}])",
        f"        a_last = leaves[{ia}].prod(dim=1)",
        "        if carry is not None:",
        f"            a_last = a_last * carry[{ia}]",
    ]
    if uses_a:  # the readout reads the running product itself
        lines += [
            f"        a_cum = torch.cumprod(leaves[{ia}], dim=1)",
            "        if carry is not None:",
            f"            a_cum = a_cum * carry[{ia}].unsqueeze(1)",
        ]
    else:
        lines += ["        a_cum = None  # the readout never reads it"]
    prefix = ["a_cum", "h"] if ia == 0 else ["h", "a_cum"]
    lines += [
        f"        outputs = self._readout_batch(call, lead, ({', '.join(prefix)}), call.inputs, index)",
        f"        last = {'(a_last, h_last)' if ia == 0 else '(h_last, a_last)'}",
        "        new_state = _ScanState(prefix=last, count=(0 if state is None else state.size) + lead[1])",
        "        return tuple(outputs), new_state",
        "",
    ]
    return FastPath("first_order",
                    "from psmc.runtime import fastpaths as _fastpaths\nfrom psmc.runtime.state import ScanState as "
                    "_ScanState", tuple(lines))
