"""Print the fast path the plan chose (psmc.plan): extra methods for the generated class.

Nothing here recognises anything: the structure class (psmc.analysis.classes, derived from
the canonical IR) says what the op is and hands over the nodes computing k, v, q, the decay,
beta and the scale; this module prints them and the call into the runtime.

* `chunkwise:<decay>` (decayed linear attention): `chunk_linear_attention`, the chunkwise
  matmul form (intra-chunk masked matmuls + inter-chunk state passing); no per-token K x V state.
* `first_order`: lift as usual, then `linear_recurrence` (a blocked sequential scan, exact).
* `delta_rule` (identity plus rank one): `psmc.runtime.delta.chunk_delta_rule` for the
  forward and `delta_rule_step` for the step; E is never built, the stream state is S only.
* `dplr` (diagonal plus rank one): `psmc.runtime.dplr.chunk_dplr` and `dplr_step`, likewise.

`choose_fast_path(op, plan)` returns a `FastPath` or None.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import re

from ..ir.nodes import OpIR, leaves, walk
from ..ir.types import promote
from .torch_printer import BodyPrinter, shape_code


@dataclass(frozen=True)
class FastPath:
    name: str  # 'chunkwise:<decay>' | 'first_order' | 'delta_rule' | 'dplr'
    import_line: str
    lines: tuple

    def method_lines(self, op) -> list[str]:
        return list(self.lines)


def choose_fast_path(op: OpIR, plan) -> FastPath | None:
    """`op` canonical, `plan` its psmc.plan.Plan."""
    cls = plan.structure_class
    if plan.fast_path is None:
        return None
    # the fields the stream state leaves out (None in their slots)
    dead = tuple(i for i, f in enumerate(op.state) if f.name not in plan.stream_fields)
    if plan.fast_path.startswith("chunkwise:") and cls.piece("reads"):
        return _chunkwise_reads_method(op, dict(cls.pieces), dead)
    if plan.fast_path.startswith("chunkwise:"):
        return _chunkwise_method(op, dict(cls.pieces), dead)
    if plan.fast_path == "first_order":
        return _first_order_method(op, cls.piece("a_index"), cls.piece("h_index"), cls.piece("decay"), dead)
    if plan.fast_path == "delta_rule":
        return _delta_method(op, dict(cls.pieces))
    if plan.fast_path == "dplr":
        return _dplr_method(op, dict(cls.pieces))
    raise AssertionError(f"no printer for fast path {plan.fast_path!r}")


def _extra_lines(p: dict, ref: dict, indent: str, out_node, name: str = "out") -> list[str]:
    """`name` (the output, [*lead, *declared]) plus the readout's terms that read no state (class
    piece `extra`: a skip connection `D * x`, RWKV-7's bonus, a bias), when it has any: as a
    field of the lead axes, its declared axes right-aligned with the output's (`sum(q * q)` is
    one number per position: [*lead, 1] against [*lead, V])."""
    extra = p.get("extra")
    if extra is None:
        return []
    dtype = str(promote(extra.dtype, out_node.dtype))
    code = f"_ops.as_field({ref[extra]}, lead, {shape_code(extra.shape)}, cx.dt[{dtype!r}], cx.dev)"
    code += f".unsqueeze({-extra.rank - 1})" * (len(out_node.shape) - extra.rank)
    return [f"{indent}{name} = {name} + {code}  # the readout's terms that read no state"]


def _scale_code(p: dict, ref: dict) -> str:
    scale = ref[p["scale"]] if p["scale"] is not None else "1.0"
    if p["divisor"] is not None:
        scale = f"{scale} / {ref[p['divisor']]}"
    return scale


def _input_lines(op: OpIR, p: dict | None = None) -> list[str]:
    """`x_<name> = call.inputs[name]` per input. With the pattern `p` of a chunk fast path whose
    q, k and v are inputs as they are, bf16/fp16 inputs reach the chunk kernels uncast
    (`call.half`: tensor-core dots with fp32 accumulation on a GPU; the torch path computes in
    fp32 all the same, from the same values). Reading them from `call.half` instead of
    `call.inputs` means the float32 copy is never made (`_Inputs` casts on first read). An
    operand the other bodies also read (a gate computed from k) is read cast as well."""
    names = _half_operand_names(p) if p is not None else ()
    if not names:
        return [f"        x_{v.name} = call.inputs[{v.name!r}]" for v in op.inputs]
    shared = _shared_operands(p)
    lines = ["        half = call.half is not None and call.carry_terms is None  # q, k, v reach the kernels as given"]
    for v in op.inputs:
        if v.name in names and v.name not in shared:
            lines.append(f"        x_{v.name} = call.half[{v.name!r}] if half else call.inputs[{v.name!r}]")
        else:
            lines.append(f"        x_{v.name} = call.inputs[{v.name!r}]")
    return lines


def _half_operand_names(p: dict) -> tuple:
    """The inputs that are q, k and v as they are (all three, else none; none when the readout
    adds terms to the kernels' outputs, which must then stay unrounded: one rounding, after).
    A product of delta steps: q and every step's k and v, and none when a body other than
    theirs reads one of them (the steps are stacked from one reading)."""
    steps = p.get("steps")
    nodes = [p["q"]] + [n for k, v, _ in steps for n in (k, v)] if steps else [p[n] for n in ("k", "v", "q")]
    if not all(n.op == "arg" for n in nodes) or p.get("extra") is not None:
        return ()
    names = tuple(dict.fromkeys(n.attrs[0] for n in nodes))
    return () if steps and _shared_operands(p) & set(names) else names


def _shared_operands(p: dict) -> set:
    """The inputs that a body other than q, k and v reads (a gate, a write strength, a scale)."""
    others = [p[n] for n in ("g", "beta", "scale", "divisor", "extra") if p.get(n) is not None] + \
        [beta for _, _, beta in p.get("steps") or ()]
    return {n.attrs[0] for n in walk(tuple(others)) if n.op == "arg"}


def _half_operand_lines(p: dict) -> list[str]:
    """When another body reads q, k or v too (a gate computed from k), `_input_lines` read it
    cast for the bodies: the kernels then get all three as given."""
    names = _half_operand_names(p)
    if not names or not _shared_operands(p) & set(names):
        return []
    return [
        "        if half:  # (an operand another body reads was read cast above)",
        "            k_, v_, q_ = (_ops.as_field(t, lead, tuple(t.shape[len(lead):]), t.dtype, cx.dev) "
        f"for t in (call.half[n] for n in {names!r}))",
    ]


def _chunkwise_method(op: OpIR, p: dict, dead: tuple) -> FastPath:
    nodes = [p["k"], p["v"], p["q"]] + [p[n] for n in ("g", "scale", "divisor", "extra") if p[n] is not None]
    printer = BodyPrinter(tuple(nodes), op.let_names)
    body = printer.run()
    ref = printer.names
    scale = _scale_code(p, ref)
    S = op.state[p["s_index"]]
    lines = [
        "    _packs_sequences = True  # _fast_forward runs packed sequences (call.cu_seqlens) in one call",
        "",
        "    def _fast_forward(self, call, index, state):",
        f'        """Chunkwise matmul form (decay: {p["kind"]}), recognised from the IR."""',
        "        cx, lead = call.ctx, call.lead",
    ]
    lines += _input_lines(op, p)
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
    lines += _half_operand_lines(p)
    lines += [
        f"        out, s_last = _chunkwise.chunk_linear_attention(q_, k_, v_, g_, decay={p['kind']!r}, "
        f"scale={scale}, initial_state=s0, {'exclusive=True, ' if op.exclusive else ''}cu_seqlens=call.cu_seqlens)",
        f"        s_last = s_last.to(cx.dt[{S.dtype!r}])",
        *_extra_lines(p, ref, "        ", op.outputs[0]),
        f"        out = _ops.as_field(out, lead, {shape_code(op.outputs[0].shape)}, cx.dt[{op.outputs[0].dtype!r}], "
        "cx.dev)",
    ]
    lines += _decay_total_lines(op, p["decay_index"], dead)
    if p["decay_index"] is not None:
        element = ["a_total", "s_last"] if p["decay_index"] == 0 else ["s_last", "a_total"]
    else:
        element = ["s_last"]
    lines += [
        "        if call.carry_terms is not None:  # what _fast_carry reads",
        f"            call.carry_terms.update(q=q_, g=g_, scale={scale})",
        f"        new_state = _ScanState(prefix=({', '.join(element)},), count=(0 if state is None else "
        "state.count) + lead[1])",
        "        return (out,), new_state",
        "",
    ]
    lines += _chunkwise_carry(op, p)
    step_element = element
    if p["decay_index"] is not None and p["decay_index"] in dead:
        step_element = ["None", "s_last"] if p["decay_index"] == 0 else ["s_last", "None"]
    lines += _chunkwise_step(op, p, body, ref, scale, step_element, dead)
    return FastPath(f"chunkwise:{p['kind']}",
                    "from psmc.runtime import chunkwise as _chunkwise\nfrom psmc.runtime.state import ScanState as "
                    "_ScanState", tuple(lines))


def _chunkwise_reads_method(op: OpIR, p: dict, dead: tuple) -> FastPath:
    """Several states decayed together with one key and read by one query (mLSTM's C and n):
    their values side by side as one [K, V_1 + ... ] state, one chunkwise pass for every read
    (a vector state is one column), then the readout on the reads. The step is the generic one
    (the state update is a handful of elementwise ops; the reads are one matvec each)."""
    values = p["values"]  # ((field index, value node), ...)
    printer = BodyPrinter(tuple([p["k"], p["q"]] + [v for _, v in values] + ([p["g"]] if p["g"] is not None else [])),
                          op.let_names)
    body = printer.run()
    ref = printer.names
    lines = [
        "    _packs_sequences = True  # _fast_forward runs packed sequences (call.cu_seqlens) in one call",
        "",
        "    def _fast_forward(self, call, index, state):",
        f'        """Chunkwise matmul form of states read by one query (decay: {p["kind"]}), recognised from the IR."""',
        "        cx, lead = call.ctx, call.lead",
    ]
    lines += _input_lines(op)
    lines += ["        " + line for line in body]
    lines += [
        f"        k_, q_ = {ref[p['k']]}, {ref[p['q']]}",
        "        k_, q_ = (_ops.as_field(t, lead, tuple(t.shape[len(lead):]), t.dtype, cx.dev) for t in (k_, q_))",
        "        carry = None if state is None else state.prefix",
    ]
    columns, widths = [], []
    for i, value in values:
        f = op.state[i]
        if len(f.shape) == 2:
            lines.append(f"        v_{f.name} = _ops.as_field({ref[value]}, lead, {shape_code(f.shape[1:])}, "
                         f"cx.dt[{f.dtype!r}], cx.dev)")
            widths.append(f"v_{f.name}.shape[-1]")
        else:  # a vector state: one column
            lines.append(f"        v_{f.name} = _ops.as_field({ref[value]}, lead, (), cx.dt[{f.dtype!r}], cx.dev)"
                         ".unsqueeze(-1)")
            widths.append("1")
        columns.append(f"v_{f.name}")
    lines += [
        f"        rows = torch.broadcast_shapes({', '.join(c + '.shape[:-1]' for c in columns)})",
        f"        v_ = torch.cat([t.expand(*rows, t.shape[-1]) for t in ({', '.join(columns)},)], dim=-1)  "
        "# the values side by side",
        "        s0 = None",
        "        if carry is not None:  # the entering states side by side too",
        "            s0 = torch.cat([" + ", ".join(
            f"carry[{i}]" if len(op.state[i].shape) == 2 else f"carry[{i}].unsqueeze(-1)" for i, _ in values) + "], dim=-1)",
    ]
    if p["kind"] != "none":
        lines.append(f"        g_ = _ops.as_field({ref[p['g']]}, lead, {'()' if p['kind'] == 'scalar' else '(k_.shape[-1],)'}, "
                     "torch.float64 if k_.dtype == torch.float64 else torch.float32, cx.dev)")
    else:
        lines.append("        g_ = None")
    lines += [
        f"        o_, s_last = _chunkwise.chunk_linear_attention(q_, k_, v_, g_, decay={p['kind']!r}, scale=1.0, "
        f"initial_state=s0, {'exclusive=True, ' if op.exclusive else ''}cu_seqlens=call.cu_seqlens)",
        "        start, states = 0, {}",
    ]
    reads = dict(p["reads"])  # field name -> its placeholder field node
    for (i, _), width in zip(values, widths):
        f = op.state[i]
        lines += [f"        stop = start + {width}"]
        if f.name in reads:
            pick = "[..., start:stop]" if len(f.shape) == 2 else "[..., start]"
            lines += [f"        s_read_{f.name} = o_{pick}  # q @ {f.name}"]
        pick = "[..., start:stop]" if len(f.shape) == 2 else "[..., start]"
        lines += [f"        states[{i}] = s_last{pick}.to(cx.dt[{f.dtype!r}])", "        start = stop"]
    readout = BodyPrinter((p["readout"],), op.let_names)
    lines += ["        " + line for line in readout.run()]
    out = op.outputs[0]
    lines += [f"        out = _ops.as_field({readout.names[p['readout']]}, lead, {shape_code(out.shape)}, "
              f"cx.dt[{out.dtype!r}], cx.dev)"]
    a = p["decay_index"]
    lines += _decay_total_lines(op, a, dead)
    element = ", ".join("a_total" if i == a else f"states[{i}]" for i in range(len(op.state)))
    lines += [
        f"        new_state = _ScanState(prefix=({element},), count=(0 if state is None else state.count) + lead[1])",
        "        return (out,), new_state",
        "",
    ]
    return FastPath(f"chunkwise:{p['kind']}",
                    "from psmc.runtime import chunkwise as _chunkwise\nfrom psmc.runtime.state import ScanState as "
                    "_ScanState", tuple(lines))


def _decay_total_lines(op: OpIR, a: int | None, dead: tuple) -> list[str]:
    """`a_total`, the decay field of the state a chunkwise pass leaves (its decays' product, times
    the entering one): None when the stream keeps no decay, unless context parallelism asks for
    a slice's total; no lines for an op without a decay."""
    if a is None:
        return []
    A = op.state[a]
    total = f"_chunkwise.decay_total(g_, call.cu_seqlens).to(cx.dt[{A.dtype!r}])"
    if a in dead:  # the stream state keeps the decayed states only
        return ["        a_total = None  # dead in a stream prefix: nothing it feeds is read",
                "        if call.carry_terms is not None:  # context parallelism: a slice's total needs it",
                f"            a_total = {total}"]
    return [f"        a_total = {total}", "        if carry is not None:", f"            a_total = a_total * carry[{a}]"]


def _bound_step_header(doc: str) -> list[str]:
    """`_fast_step(call, state)` and `_bind_step(call)`: the step of one input signature as a
    closure (dims, dtypes and lanes fixed; `PsmLayer.step` caches it per signature), so a token
    only reads its inputs and the state."""
    return [
        "    def _fast_step(self, call, state):",
        f'        """{doc}"""',
        "        return self._bind_step(call)(call.inputs, state)",
        "",
        "    def _bind_step(self, call, *traced):",
        '        """The decode step of this call\'s input signature, as a closure (PsmLayer.step caches it); '
        '(True,) or (False,): the form torch.compile traces or the eager one (none: whether it traces now; '
        'a default value would be one more guard of a compiled step)."""',
        "        cx, lead = call.ctx, call.lead",
        "        stream = self.spec.stream is not None",
        "",
        "        def step(inputs, state):",
    ]


def _split_constant(body: list) -> tuple[list, list]:
    """Body lines that depend on dims and literals only (e.g. `sqrt(K)`) and the rest: a line is
    constant when it assigns a temporary from no input, no index, no param (`self.`, which an
    optimizer changes) and no non-constant temporary."""
    constant, per_token, known = [], [], {"cx", "torch", "_ops", "math", "_F"}
    for line in body:
        m = re.match(r"(t\d+) = ([^#]*)", line)
        names = set(re.findall(r"(?<![.\w])[A-Za-z_]\w*", re.sub(r"'[^']*'", "", m.group(2)))) if m else None
        if names is not None and names <= known:  # every name a module, cx or a constant temporary
            constant.append(line)
            known.add(m.group(1))
        else:
            per_token.append(line)
    return constant, per_token


def _on_numbers(line: str) -> str:
    """A constant line (dims and literals only: its operands are Python numbers) with
    `_ops.unary(torch.f, x)` as `math.f(x)` where math has f: what `unary` does for a number,
    without a call into psmc.runtime.ops (under torch.compile, fewer globals to guard)."""
    m = re.fullmatch(r"(t\d+) = _ops\.unary\(torch\.(\w+), (.+)\)(  # .*)?", line)
    if m is None or not hasattr(math, m.group(2)):
        return line
    return f"{m.group(1)} = math.{m.group(2)}({m.group(3)}){m.group(4) or ''}"


def _chunkwise_carry(op: OpIR, p: dict) -> list[str]:
    """The outputs of a pass run from zero, corrected for a carry-in S0 entering before the
    first token: S_t gains (prod of decays up to t) * S0, so o_t gains scale * (q_t * decays) S0,
    one matmul per token instead of a second chunkwise pass (context parallelism). An exclusive
    readout reads S_{t-1}: the decays up to t - 1."""
    out = op.outputs[0]
    total = "torch.cumsum(g_, dim=1) - g_" if op.exclusive else "torch.cumsum(g_, dim=1)"
    if p["kind"] == "key":
        decayed = f"q_ * torch.exp({total}).to(q_.dtype)"
    elif p["kind"] == "scalar":
        decayed = f"q_ * torch.exp({total}).to(q_.dtype).unsqueeze(-1)"
    else:
        decayed = "q_"
    return [
        "    def _fast_carry(self, call, outputs, carry):",
        '        """`outputs` of `_fast_forward(call, ...)` run from zero (with call.carry_terms), as if run from '
        'the full state element `carry`."""',
        "        cx, lead = call.ctx, call.lead",
        "        terms = call.carry_terms",
        "        q_, g_ = terms['q'], terms['g']",
        f"        s0 = carry[{p['s_index']}].unsqueeze(1)  # [B, 1, *lanes, K, V]",
        f"        extra = (({decayed}).unsqueeze(-2) @ s0.to(q_.dtype)).squeeze(-2) * (terms['scale'])",
        f"        extra = _ops.as_field(extra, lead, {shape_code(out.shape)}, cx.dt[{out.dtype!r}], cx.dev)",
        "        return (outputs[0] + extra,)",
        "",
    ]


def _chunkwise_step(op: OpIR, p: dict, body: list, ref: dict, scale: str, element: list, dead: tuple) -> list[str]:
    """The decode step of the same form, S = decay * S + k v^T, o = scale * q S: the update a
    hand-written step would make, with no per-field broadcasting (lead = [B, *lanes])."""
    g = ref[p["g"]] if p["g"] is not None else "None"
    lines = _bound_step_header(f"One token of the chunkwise form (decay: {p['kind']}): the state update by hand.")
    constant, per_token = _split_constant(body)
    lines[-2:-2] = ["        " + _on_numbers(line) for line in constant]  # dims only: computed once per signature
    # (read once here: a compiled step then guards one dtype, not the dtype table)
    lines[-2:-2] = [f"        o_dtype = cx.dt[{op.outputs[0].dtype!r}]  # the output's dtype"]
    lines[-2:-2] = ["        traced = traced[0] if traced else torch.compiler.is_compiling()  # (traced: a step "
                    "torch.compile traces)"]
    lines += [f"            x_{v.name} = inputs[{v.name!r}]" for v in op.inputs]
    head = per_token + [
        f"k_, v_, q_ = {ref[p['k']]}, {ref[p['v']]}, {ref[p['q']]}",
        "kv = k_.unsqueeze(-1) * v_.unsqueeze(-2)  # inputs arrive in the compute dtype",
    ]
    lines += ["            " + line for line in head]
    lines += [
        "            carry = state.prefix",
        f"            if carry is not None and len(carry) != {len(op.state)}:  # a stream layout without the dropped fields",
        "                carry = self._full_state(call, state).prefix",
    ]
    start = len(lines)
    if p["kind"] != "none":
        lines += [
            f"            e_ = torch.exp({g})",
            f"            decay = {'e_.unsqueeze(-1)' if p['kind'] == 'key' else 'e_[..., None, None]'}",
            # eager, one addcmul; traced, a multiply and an add, which Inductor's loop runs faster
            "            if carry is None:",
            "                s_last = kv",
            "            elif traced:",
            f"                s_last = decay * carry[{p['s_index']}] + kv",
            "            else:",
            f"                s_last = torch.addcmul(kv, decay, carry[{p['s_index']}])",
        ]
    else:
        lines += [f"            s_last = kv if carry is None else carry[{p['s_index']}] + kv"]
    lines += [
        "            if s_last.shape[:-2] != lead:  # size-1 (broadcast) batch or lane axes",
        "                s_last = s_last.expand(*lead, *s_last.shape[-2:])",
    ]
    read = "s_last"
    if op.exclusive:  # the readout reads the state before the token
        read = "s_prev"
        lines += [f"            s_prev = torch.zeros_like(s_last) if carry is None else carry[{p['s_index']}]"]
    lines += [
        # eager, one matmul; traced, a multiply and a sum, which Inductor fuses with the update into
        # one loop instead of calling a separate matmul kernel
        "            if traced:",
        f"                out = (q_.unsqueeze(-1) * {read}).sum(-2) * ({scale})",
        "            else:",
        f"                out = (q_.unsqueeze(-2) @ {read}).squeeze(-2) * ({scale})",
        *_extra_lines(p, ref, "            ", op.outputs[0]),
        "            if out.dtype != o_dtype:  # (its lead is s_last's: [B, *lanes])",
        "                out = out.to(o_dtype)",
    ]
    if p["decay_index"] is not None and p["decay_index"] not in dead:  # else: None in its slot
        A = op.state[p["decay_index"]]
        spread = "e_" if p["kind"] == "key" or not A.shape else "e_" + "[..., None]" * len(A.shape)
        lines += [
            f"            a_total = _ops.as_field({spread}, lead, {shape_code(A.shape)}, cx.dt[{A.dtype!r}], cx.dev)",
            "            if carry is not None:",
            f"                a_total = a_total * carry[{p['decay_index']}]",
        ]
    # the update alone, from x_<input>s and `carry` (the full prefix or None) to `out` and the new
    # prefix `element`, for PsmLayer.step_function's source (its constants written as literals)
    update = head + [line[12:] for line in lines[start:]]
    lines += [
        f"            new_state = _ScanState.make(({', '.join(element)},), state.count + 1, state.op)",
        "            return (out,), (self._stream_state(new_state) if stream else new_state)",
        "        return step",
        "",
        "    # step's update alone, from x_<input>s and `carry` to `out` and the new prefix _STEP_ELEMENT:",
        "    # PsmLayer.step_function writes it out with the constants as literals",
        "    _STEP_UPDATE = (",
        *(f"        {line!r}," for line in update),
        "    )",
        f"    _STEP_ELEMENT = {tuple(element)!r}",
        "",
    ]
    return lines


def _first_order_method(op: OpIR, ia: int, ih: int, aligned, dead: tuple) -> FastPath:
    a = op.state[ia].name
    uses_a = any(n.attrs == ("state", a) for n in leaves(op.readout, "field"))
    printer = BodyPrinter((aligned,), op.let_names)
    body = printer.run()
    lines = [] if op.exclusive else [
        "    _packs_sequences = True  # _fast_forward runs packed sequences (call.cu_seqlens) in one call", ""]
    lines += [
        "    def _fast_forward(self, call, index, state):",
        '        """Blocked first-order linear recurrence h = a * h + b, recognised from the IR."""',
        "        cx, lead = call.ctx, call.lead",
        "        leaves = self._lift_batch(call, lead, call.inputs, index)",
        f"        r_{a} = leaves[{ia}]",
    ]
    lines += ["        " + line for line in body]
    lines += [
        "        carry = None if state is None else state.prefix",
        # the decay as a [*lead, *h] broadcastable tensor: a scalar or per-row decay beside a
        # vector or matrix state gets its singleton axes after the leading (batch, time, lane)
        # axes, never NumPy's right alignment against the lanes
        f"        decay = _ops.lift_rank({printer.names[aligned]}, {aligned.rank}, {len(op.state[ih].shape)})",
        f"        h, h_last = _fastpaths.linear_recurrence(decay, leaves[{ih}], "
        f"None if carry is None else carry[{ih}], kernel=cx.scan_kernel, cu_seqlens=call.cu_seqlens)",
    ]
    if ia in dead:  # the stream state keeps h only
        lines += [
            "        a_last = None  # dead in a stream prefix: nothing it feeds is read",
            "        if call.carry_terms is not None:  # context parallelism: a slice's total needs it",
            f"            a_last = _fastpaths.segment_prod(leaves[{ia}], call.cu_seqlens)",
        ]
    else:
        lines += [
            f"        a_last = _fastpaths.segment_prod(leaves[{ia}], call.cu_seqlens)",
            "        if carry is not None:",
            f"            a_last = a_last * carry[{ia}]",
        ]
    if uses_a:  # the readout reads the running product itself
        lines += [
            f"        a_cum = _fastpaths.segment_cumprod(leaves[{ia}], call.cu_seqlens)",
            "        if carry is not None:",
            f"            a_cum = a_cum * _fastpaths.per_token(carry[{ia}], call.cu_seqlens)",
        ]
    else:
        lines += ["        a_cum = None  # the readout never reads it"]
    prefix = ["a_cum", "h"] if ia == 0 else ["h", "a_cum"]
    lines += [
        "        if call.carry_terms is not None:  # what _fast_carry reads",
        "            call.carry_terms.update(leaves=leaves, h=h, decay=decay, index=index)",
        f"        outputs = self._readout_batch(call, lead, ({', '.join(prefix)}), call.inputs, index)",
        f"        last = {'(a_last, h_last)' if ia == 0 else '(h_last, a_last)'}",
        "        new_state = _ScanState(prefix=last, count=(0 if state is None else state.count) + lead[1])",
        "        return tuple(outputs), new_state",
        "",
        "    def _fast_carry(self, call, outputs, carry):",
        '        """`outputs` of `_fast_forward(call, ...)` run from zero (with call.carry_terms), as if run from '
        'the full state element `carry`: h_t += (prod of decays up to t) * carry, then the readout again (no '
        'second scan)."""',
        "        lead, terms = call.lead, call.carry_terms",
        "        leaves, decay = terms['leaves'], terms['decay']",
        f"        h = terms['h'] + torch.cumprod(decay, dim=1) * carry[{ih}].unsqueeze(1)",
    ]
    if uses_a:
        lines += [f"        a_cum = torch.cumprod(leaves[{ia}], dim=1) * carry[{ia}].unsqueeze(1)"]
    else:
        lines += ["        a_cum = None  # the readout never reads it"]
    lines += [
        f"        return tuple(self._readout_batch(call, lead, ({', '.join(prefix)}), call.inputs, terms['index']))",
        "",
    ]
    if not op.exclusive:
        lines += _first_order_step(op, ia, ih, aligned, dead, printer, body)
    return FastPath("first_order",
                    "from psmc.runtime import fastpaths as _fastpaths\nfrom psmc.runtime.state import ScanState as "
                    "_ScanState", tuple(lines))


def _first_order_step(op: OpIR, ia: int, ih: int, aligned, dead: tuple, printer, body: list) -> list[str]:
    """The decode step of the same recurrence, fused as a hand-written one would be: the lift's
    two leaves, h = a * h + b (one addcmul) and the readout printed inline from the IR, no
    `_lift`/`_readout` call and no materialising of a leaf at full shape (lead = [B, *lanes];
    a result is expanded or cast only when it is not already a full field of its dtype)."""
    a, h = op.state[ia], op.state[ih]
    reads_index = bool(leaves(op.lift, "index") or leaves(op.readout, "index"))
    lift = BodyPrinter((op.lift[ia], op.lift[ih]), op.let_names)
    lift_body = lift.run()
    readout = BodyPrinter(tuple(op.readout), op.let_names)
    readout_body = readout.run()
    lines = _bound_step_header("One token of the first-order recurrence h = a * h + b.")
    lines[-2:-2] = [  # per signature: the full shape and dtype of h and of each output
        f"        h_full, h_dtype = (*lead, *{shape_code(h.shape)}), cx.dt[{h.dtype!r}]",
    ]
    lines[-2:-2] = [f"        out{i}_full, out{i}_dtype = (*lead, *{shape_code(slot.shape)}), cx.dt[{slot.dtype!r}]"
                    for i, slot in enumerate(op.outputs)]
    lines += [f"            x_{v.name} = inputs[{v.name!r}]" for v in op.inputs]
    if reads_index:
        lines += ["            index = self._step_index(call, state)"]
    lines += ["            " + line for line in lift_body]
    lines += [
        f"            r_{a.name}, b_ = {lift.names[op.lift[ia]]}, {lift.names[op.lift[ih]]}",
        f"            if not isinstance(r_{a.name}, torch.Tensor):  # a literal leaf (a constant decay)",
        f"                r_{a.name} = _ops.as_field(r_{a.name}, lead, {shape_code(a.shape)}, cx.dt[{a.dtype!r}], cx.dev)",
        "            if not isinstance(b_, torch.Tensor):",
        "                b_ = _ops.as_field(b_, lead, h_full[len(lead):], h_dtype, cx.dev)",
    ]
    lines += ["            " + line for line in body]  # the decay, aligned with h, from r_a
    lines += [
        "            carry = state.prefix",
        f"            if carry is not None and len(carry) != {len(op.state)}:  # a stream layout without the dropped fields",
        "                carry = self._full_state(call, state).prefix",
        f"            if carry is None or carry[{ih}] is None:  # the first token: the prefix is the leaf",
        "                h = b_",
        "            else:",
        f"                decay = _ops.lift_rank({printer.names[aligned]}, {aligned.rank}, {len(h.shape)})"
        if aligned.rank < len(h.shape) else f"                decay = {printer.names[aligned]}",
        f"                h = torch.addcmul(b_, decay, carry[{ih}])",
        "            if h.shape != h_full or h.dtype != h_dtype:  # a broadcast leaf, or the first token",
        f"                h = _ops.as_field(h, lead, h_full[len(lead):], h_dtype, cx.dev)",
    ]
    if ia in dead:
        lines += [f"            s_{a.name} = None  # dead in a stream prefix"]
    else:
        lines += [
            f"            s_{a.name} = r_{a.name} if carry is None else carry[{ia}] * r_{a.name}",
            f"            s_{a.name} = _ops.as_field(s_{a.name}, lead, {shape_code(a.shape)}, cx.dt[{a.dtype!r}], cx.dev)",
        ]
    lines += [f"            s_{h.name} = h"]
    lines += ["            " + line for line in readout_body]
    outs = []
    for i, (node, slot) in enumerate(zip(op.readout, op.outputs)):
        name = readout.names[node]
        lines += [
            f"            out{i} = {name}",
            f"            if not isinstance(out{i}, torch.Tensor) or out{i}.shape != out{i}_full or out{i}.dtype != out{i}_dtype:",
            f"                out{i} = _ops.as_field(out{i}, lead, out{i}_full[len(lead):], out{i}_dtype, cx.dev)",
        ]
        outs.append(f"out{i}")
    prefix = f"(s_{a.name}, h)" if ia == 0 else f"(h, s_{a.name})"
    lines += [
        f"            outputs = ({', '.join(outs)},)",
        f"            new_state = _ScanState.make({prefix}, state.count + 1, state.op)",
        "            return outputs, (self._stream_state(new_state) if stream else new_state)",
        "        return step",
        "",
    ]
    return lines


@dataclass(frozen=True)
class _WyRule:
    """A fast path in the chunked WY form (psmc.runtime.delta, psmc.runtime.dplr): how its
    pieces reach the runtime's chunk and step functions."""

    name: str  # the plan's fast path
    module: str  # the runtime module's alias in the generated file
    chunk: str  # its parallel pass: chunk(q, k, v, *operands, scale=, initial_state=, cu_seqlens=)
    step: str  # its decode step: step(s0, q, k, v, *operands, scale=, ...)
    operands: tuple  # the class's pieces between v and the log gate g
    what: str  # E in words, for docstrings
    step_extra: str = ""  # more keywords of the step call


_DELTA = _WyRule("delta_rule", "delta", "chunk_delta_rule", "delta_rule_step", ("beta",),
                 "identity plus rank one", ", native=_delta.native_for(self.backend)")
_DPLR = _WyRule("dplr", "dplr", "chunk_dplr", "dplr_step", ("a", "b"), "diagonal plus rank one")


def _delta_method(op: OpIR, p: dict) -> FastPath:
    return _wy_method(op, p | {"s_dtype": op.state[p["s_index"]].dtype}, _DELTA)


def _dplr_method(op: OpIR, p: dict) -> FastPath:
    return _wy_method(op, p | {"s_dtype": op.state[p["s_index"]].dtype}, _DPLR)


def _wy_operand_lines(p: dict, ref: dict, rule: _WyRule) -> list[str]:
    """k_, v_, q_, the rule's operands and g_ as the runtime takes them: fields of the lead axes
    (a scalar gate of the diagonal-plus-low-rank form as a last axis of 1)."""
    g = p["g"]
    if p.get("steps"):
        return _delta_steps_lines(p, ref)
    if rule is _DELTA:  # (beta and the gate: one scalar per token and lane)
        lines = [
            f"        k_, v_, q_ = {ref[p['k']]}, {ref[p['v']]}, {ref[p['q']]}",
            "        k_, v_, q_ = (_ops.as_field(t, lead, tuple(t.shape[len(lead):]) if hasattr(t, 'shape') else (), "
            "t.dtype, cx.dev) for t in (k_, v_, q_))",
            "        gates = torch.float64 if k_.dtype == torch.float64 else torch.float32  # (k_ may be bf16/fp16)",
            f"        beta_ = _ops.as_field({ref[p['beta']]}, lead, (), gates, cx.dev)",
        ]
        return lines + [f"        g_ = _ops.as_field({ref[g]}, lead, (), gates, cx.dev)" if g is not None else
                        "        g_ = None  # no gate: E = I - beta * outer(k, k)"]
    names = ("k", "v", "q") + rule.operands
    lines = [f"        {', '.join(n + '_' for n in names)} = (",
             *(f"            _ops.as_field({ref[p[n]]}, lead, {shape_code(p[n].shape)}, "
               f"cx.dt[{_wy_dtype(p, p[n])!r}], cx.dev)," for n in names), "        )"]
    if g is None:
        return lines + ["        g_ = None  # no diagonal decay: E = I + outer(b, a)"]
    return lines + [f"        g_ = _ops.as_field({ref[g]}, lead, {shape_code(g.shape)}, cx.dt[{_wy_dtype(p, g)!r}], "
                    "cx.dev)" + ("" if g.rank else "[..., None]  # a scalar decay: a last axis of 1")]


def _delta_steps_lines(p: dict, ref: dict) -> list[str]:
    """k_, v_, q_, beta_ and g_ of a product of r delta steps per token (DeltaProduct) as one
    delta-rule sequence r times as long: step j of token t is its token t * r + j. The gate
    goes on each token's first step, q on its last (whose outputs are the layer's)."""
    steps, r = p["steps"], len(p["steps"])
    as_given = {n for k, v, _ in steps for n in (k, v)} | {p["q"]} if _half_operand_names(p) else set()

    def field(node) -> str:
        """As a field of the lead axes: q, k and v inputs in their dtype (bf16/fp16 ones as given,
        `_input_lines`), the rest in the dtype the WY form computes them in."""
        dtype = f"{ref[node]}.dtype" if node in as_given else f"cx.dt[{_wy_dtype(p, node)!r}]"
        return f"_ops.as_field({ref[node]}, lead, {shape_code(node.shape)}, {dtype}, cx.dev)"

    def interleaved(nodes) -> list[str]:
        return ["torch.stack([", *(f"            {field(n)}," for n in nodes), "        ], dim=2).flatten(1, 2)"]

    lines = [f"        # {r} delta steps per token: one delta-rule sequence {r} times as long (step j of token t "
             f"is its token t * {r} + j)"]
    for name, at in (("k", 0), ("v", 1), ("beta", 2)):
        first, *rest = interleaved([step[at] for step in steps])
        lines += [f"        {name}_ = {first}", *rest]
    lines += [f"        q_ = {field(p['q'])}",
              f"        q_ = torch.stack({_padded('torch.zeros_like(q_)', 'q_', r, last=True)}, dim=2).flatten(1, 2)  "
              "# read after each token's last step"]
    g = p["g"]
    if g is None:
        return lines + ["        g_ = None  # no gate: E = M_r @ ... @ M_1"]
    return lines + [f"        g_ = {field(g)}",
                    f"        g_ = torch.stack({_padded('torch.zeros_like(g_)', 'g_', r, last=False)}, dim=2).flatten(1, 2)  "
                    "# the gate on each token's first step"]


def _padded(zero: str, value: str, r: int, last: bool) -> str:
    """A list of r entries as code: `value` last (or first), `zero` elsewhere."""
    zeros = f"{zero}, " * (r - 1) if r <= 3 else f"*[{zero}] * {r - 1}, "
    return f"[{zeros}{value}]" if last else f"[{value}, {zeros.rstrip(', ')}]"


def _wy_dtype(p: dict, node) -> str:
    """The dtype a piece of the WY form is computed in: its own or the state's, the wider (a
    literal such as the 0.9 of `0.9 * eye(K)` is f32 in the IR, but f64 beside an f64 state)."""
    return str(promote(node.dtype, p["s_dtype"]))


def _wy_method(op: OpIR, p: dict, rule: _WyRule) -> FastPath:
    S = op.state[p["s_index"]]
    out = op.outputs[0]
    steps = _step_count(p)
    printer = BodyPrinter(_wy_nodes(p, rule), op.let_names)
    body = printer.run()
    ref = printer.names
    call = f"_{rule.module}.{rule.chunk}"
    operands = ", ".join(n + "_" for n in rule.operands)
    lines = ["    _packs_sequences = True  # _fast_forward runs packed sequences (call.cu_seqlens) in one call", "",
             "    def _fast_forward(self, call, index, state):",
             f'        """The parallel pass in the chunked WY form, E never built ({_what(rule, steps)}, from the IR)."""',
             "        cx, lead = call.ctx, call.lead  # [B, T, *lanes]"]
    lines += _input_lines(op, p if rule is _DELTA else None)
    lines += ["        " + line for line in body]
    lines += _wy_operand_lines(p, ref, rule)
    lines += ["        s0 = None if state is None or state.prefix is None else state.prefix[0]"]
    if rule is _DELTA and steps == 1:
        lines += _half_operand_lines(p)
    E = op.state[p["e_index"]]
    full = "(e_last, s_last)" if p["s_index"] == 1 else "(s_last, e_last)"
    lines += [
        "        if call.carry_terms is not None:  # context parallelism: the slice's E and q_t E_<=t too",
        "            # S's columns evolve independently (S <- E_t S + k v^T): K more columns starting",
        "            # at the identity with v = 0 carry E_<=t, so their outputs are scale * q_t E_<=t",
        "            _width, _kk = v_.shape[-1], k_.shape[-1]",
        "            _eye = torch.eye(_kk, dtype=v_.dtype, device=v_.device)",
        "            _start = _eye.new_zeros(_kk, _width) if s0 is None else s0.to(v_.dtype)",
        "            _start = torch.cat([_start, _eye.expand(*_start.shape[:-2], _kk, _kk)], dim=-1)",
        "            _v_all = torch.cat([v_, v_.new_zeros(*v_.shape[:-1], _kk)], dim=-1)",
        f"            out, _s_all = {call}(q_, k_, _v_all, {operands}, g_, scale={_scale_code(p, ref)}, "
        "initial_state=_start)",
        *_last_steps(steps, "            "),
        "            call.carry_terms.update(q_e=out[..., _width:])",
        "            out, s_last = out[..., :_width], _s_all[..., :_width]",
        f"            e_last = _s_all[..., _width:].to(cx.dt[{E.dtype!r}])",
        "        else:",
        f"            out, s_last = {call}(q_, k_, v_, {operands}, g_, scale={_scale_code(p, ref)}, "
        "initial_state=s0, cu_seqlens=" + ("call.cu_seqlens)" if steps == 1 else
                                           f"None if call.cu_seqlens is None else call.cu_seqlens.stretched({steps}))"),
        *_last_steps(steps, "            "),
        "        count = (0 if state is None else state.count) + lead[1]",
        *_extra_lines(p, ref, "        ", out),
        f"        out = _ops.as_field(out, lead, {shape_code(out.shape)}, cx.dt[{out.dtype!r}], cx.dev)",
        "        if call.carry_terms is not None:  # the full element (E too): a slice's total",
        f"            s_last = s_last.to(cx.dt[{S.dtype!r}])",
        f"            return (out,), _ScanState(prefix={full}, count=count)",
        f"        new_state = _ScanState(prefix=(s_last.to(cx.dt[{S.dtype!r}]),), count=count)  # spec.stream: "
        f"{S.name} only",
        "        return (out,), new_state",
        "",
        "    def _fast_carry(self, call, outputs, carry):",
        '        """`outputs` of `_fast_forward(call, ...)` run from zero (with call.carry_terms), as if run '
        'from the full state element `carry`: S_t gains E_<=t S0, so o_t gains (scale * q_t E_<=t) S0."""',
        "        cx, lead = call.ctx, call.lead",
        "        q_e = call.carry_terms['q_e']",
        f"        s0 = carry[{p['s_index']}].unsqueeze(1).to(q_e.dtype)  # [B, 1, *lanes, K, V]",
        "        extra = (q_e.unsqueeze(-2) @ s0).squeeze(-2)",
        f"        extra = _ops.as_field(extra, lead, {shape_code(out.shape)}, cx.dt[{out.dtype!r}], cx.dev)",
        "        return (outputs[0] + extra,)",
        "",
    ]
    lines += _wy_step(op, p, rule)
    return FastPath(rule.name, f"from psmc.runtime import {rule.module} as _{rule.module}\n"
                    "from psmc.runtime.state import ScanState as _ScanState", tuple(lines))


def _wy_nodes(p: dict, rule: _WyRule) -> tuple:
    """The class's pieces the generated code computes: k, v, q, the rule's operands (every
    step's k, v and beta in a product of delta steps), the gate and the readout's scalars."""
    if p.get("steps"):
        nodes = [p["q"]] + [n for step in p["steps"] for n in step]
    else:
        nodes = [p["k"], p["v"], p["q"]] + [p[n] for n in rule.operands]
    return tuple(nodes + [p[n] for n in ("g", "scale", "divisor", "extra") if p[n] is not None])


def _step_count(p: dict) -> int:
    """Delta steps per token: 1, or r for a product of r delta steps (DeltaProduct)."""
    return len(p.get("steps") or ()) or 1


def _what(rule: _WyRule, steps: int) -> str:
    return rule.what if steps == 1 else f"identity plus rank {steps}: {steps} delta steps per token"


def _last_steps(steps: int, indent: str) -> list[str]:
    """The outputs after each token's last delta step (a product of `steps` steps per token)."""
    if steps == 1:
        return []
    return [f"{indent}out = out[:, {steps - 1}::{steps}]  # each token's last step"]


def _wy_step(op: OpIR, p: dict, rule: _WyRule) -> list[str]:
    """The decode step bound to one input signature: the IR's pieces (k, v, q, the rule's
    operands, the gate, the scale; constants once per signature), then the runtime's step (for
    the delta rule one fused C++ token under backend='auto', else torch ops) and the stream
    state (S only)."""
    S, out = op.state[p["s_index"]], op.outputs[0]
    printer = BodyPrinter(_wy_nodes(p, rule), op.let_names)
    constant, per_token = _split_constant(printer.run())
    ref = printer.names
    lines = _bound_step_header(f"One token in O(K*V): S <- E S + k v^T, E ({_what(rule, _step_count(p))}) "
                               "never built.")
    lines[-2:-2] = ["        " + _on_numbers(line) for line in constant]  # dims only: once per signature
    lines[-2:-2] = [f"        o_full, o_dtype = (*lead, *{shape_code(out.shape)}), cx.dt[{out.dtype!r}]",
                    f"        s_dtype = cx.dt[{S.dtype!r}]"]
    lines += [f"            x_{v.name} = inputs[{v.name!r}]" for v in op.inputs]
    lines += ["            " + line for line in per_token]

    def piece(name: str, node=None) -> str:
        """A piece as the step takes it (`node`: one step's, in a product of delta steps): an
        input as it comes (it broadcasts lanes and casts), anything else (a number, a computed
        value) as a field of the lanes; a scalar gate of the diagonal-plus-low-rank form with a
        last axis of 1."""
        node = p[name] if node is None else node
        code = ref[node]
        if not code.startswith("x_"):  # (its shape from the IR: a param has no lead axes)
            code = f"_ops.as_field({code}, lead, {shape_code(node.shape)}, cx.dt[{_wy_dtype(p, node)!r}], cx.dev)"
        return code + ("[..., None]" if rule is _DPLR and name == "g" and not node.rank else "")
    g = piece("g") if p["g"] is not None else "None"
    operands = "".join(f"{piece(n)}, " for n in rule.operands)
    lines += ["            s0 = None if state.prefix is None else state.prefix[0]"]
    if p.get("steps"):  # the token's delta steps in order, the gate before the first (one kernel on a GPU)
        def each(at: int, name: str) -> str:
            return "(" + ", ".join(piece(name, step[at]) for step in p["steps"]) + ")"
        lines.append(f"            o, s_last = _{rule.module}.delta_product_step(s0, {piece('q')}, {each(0, 'k')}, "
                     f"{each(1, 'v')}, {each(2, 'beta')}, {g}, scale={_scale_code(p, ref)}{rule.step_extra})")
    else:
        lines.append(f"            o, s_last = _{rule.module}.{rule.step}(s0, {piece('q')}, {piece('k')}, {piece('v')}, "
                     f"{operands}{g}, scale={_scale_code(p, ref)}{rule.step_extra})")
    lines += [
        *_extra_lines(p, ref, "            ", out, name="o"),
        "            if o.shape != o_full or o.dtype != o_dtype:  # broadcast pieces",
        "                o = _ops.as_field(o, lead, o_full[len(lead):], o_dtype, cx.dev)",
        f"            # the stream state: {S.name} only (spec.stream)",
        "            return (o,), _ScanState.make((s_last if s_last.dtype == s_dtype else s_last.to(s_dtype),), "
        "state.count + 1, state.op)",
        "        return step",
        "",
    ]
    return lines
