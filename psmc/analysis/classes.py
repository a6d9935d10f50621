"""Structure classes, derived from the CANONICAL IR (psmc.ir.rewrite), never from spelling.

`classify(op)` takes a canonicalised op and returns a `StructureClass`: a name, a detail, a
reason a reader can check, and the pieces later stages need (the nodes computing k, v, q, the
decay, ...). The classes, most specific first:

  decayed-linear-attention   S = a' * S + outer(k, v) (or S + outer(k, v)); readout c * (q @ S);
                             decay none, scalar, or per key (a[:, None])
  first-order                (a, h) with combine (l.a * r.a, l.h * r.a' + r.h): h = a * h + b,
                             decay scalar, per lane or per key (elementwise)
  elementwise-monoid         every combine output is elementwise in the fields
  identity-plus-low-rank     (E, S) with combine (r.E @ l.E, r.E @ l.S + r.S) and lift
                             E = g * (I - beta * outer(k, k)), S = beta * outer(k, v): the delta
                             rule (g = 1) and the gated delta rule
  diagonal-plus-low-rank     the same combine, lift E = diag(d) + outer(b, a) (rank one, d a
                             vector, a scalar or 1), S = outer(k, v), readout q @ S: RWKV-7, Kimi
                             Delta Attention, the gated delta rule with a per-key gate
  matrix-affine              linear in the earlier element, with products across entries
  general                    anything else, or a combine that is not associative (tree scan)

Because the input is canonical, `r.a[:, None] * l.S`, `l.S * r.a[:, None]` and
`diag(r.a) @ l.S` are one node, and so are `outer(k, v)`, `k[:, None] * v[None, :]` and
`transpose(outer(v, k))`: one class for every spelling.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..ir.nodes import Node, OpIR, leaves, render, walk
from ..ir.rewrite import binary, const, is_column, is_row
from ..ir.rewrite import matmul as matmul_node
from ..ir.rewrite import outer as outer_node
from ..ir.types import dims_equal, is_float, promote
from .structure import degree_in_left, elementwise_fields

CLASSES = ("decayed-linear-attention", "first-order", "elementwise-monoid", "identity-plus-low-rank",
           "diagonal-plus-low-rank", "matrix-affine", "general")


@dataclass(frozen=True)
class StructureClass:
    name: str  # one of CLASSES
    detail: str  # e.g. the decay kind: 'none' | 'scalar' | 'per-key' | 'per-lane' | 'gated' | ''
    reason: str  # why (one sentence, for `psmc check`)
    pieces: tuple = ()  # ((name, value), ...): nodes and indices later stages print

    def piece(self, name: str, default=None):
        return dict(self.pieces).get(name, default)

    def as_dict(self) -> dict:
        return {"name": self.name, "detail": self.detail, "reason": self.reason}


# ---------------------------------------------------------------------------- node tests
def _field(node: Node, role: str, name: str) -> bool:
    return node.op == "field" and node.attrs == (role, name)


def _factors(node: Node) -> list[Node]:
    """The factors of a canonical product (a node that is not a product is one factor)."""
    if node.op == "mul":
        return _factors(node.args[0]) + _factors(node.args[1])
    return [node]


def _product(factors: list[Node], like: Node | None = None) -> Node | None:
    if not factors:
        return None
    out = factors[0]
    for f in factors[1:]:
        out = binary("mul", out, f)
    return out


def _outer_update(node: Node):
    """(k, v) for an update c * outer(k0, v) [/ d] with scalar factors c (constants or per-token
    gates) and a scalar divisor d, k = c * k0 [/ d]; else None."""
    if node.op == "div" and node.args[1].rank == 0:
        inner = _outer_update(node.args[0])
        return None if inner is None else (binary("div", inner[0], node.args[1]), inner[1])
    factors = _factors(node)
    outers = [f for f in factors if f.op == "outer"]
    if len(outers) != 1 or any(f.rank != 0 for f in factors if f is not outers[0]):
        return None
    k, v = outers[0].args
    coeff = [f for f in factors if f is not outers[0]]
    if coeff:  # c * outer(k, v) = outer(c * k, v)
        k = binary("mul", _product(coeff, k), k)
    return k, v


def _constant(n: Node) -> bool:
    """A number fixed when the layer is built: literals and dims only."""
    return not n.batched and n.rank == 0 and all(x.op in ("const", "dim") for x in leaves((n,)))


def _scaled(node: Node):
    """(core, scale factors, divisor) of `c1 * ... * core / d` with constant scalars c, d."""
    divisor = None
    if node.op == "div" and _constant(node.args[1]):
        node, divisor = node.args[0], node.args[1]
    factors = _factors(node)
    core = [f for f in factors if not _constant(f)]
    if len(core) != 1:
        return None
    scale = [f for f in factors if _constant(f)]
    if core[0].op == "div" and _constant(core[0].args[1]) and divisor is None:  # c * (x / d)
        inner = _scaled(core[0].args[0])
        if inner is None or inner[2] is not None:
            return None
        return inner[0], scale + inner[1], core[0].args[1]
    return core[0], scale, divisor


_PLUS_EXTRA = " plus terms that read no state"


def _linear_readout(op: OpIR, s_name: str, exclusive: bool = False):
    """(q node, scale factors, divisor, extra) for a readout c * (q @ s.S) [/ d] [+ extra], where
    extra (None: none) is a sum of terms that read no state (a skip connection `D * x`, a bias),
    else None. Only additive terms: the fast paths add them to their outputs, which keeps the
    outputs affine in the state entering a pass (context parallelism corrects them so).
    `exclusive`: an exclusive readout is taken too (the chunkwise form reads S_{t-1})."""
    if (op.exclusive and not exclusive) or op.chunk is not None or len(op.outputs) != 1:
        return None
    terms = [t for term in _split_terms(op.readout[0]) for t in _distributed(term)]
    stateful = [t for t in terms if leaves((t,), "field")]
    if len(stateful) != 1:
        return None
    got = _scaled(stateful[0])
    if got is None:
        return None
    core, factors, divisor = got
    if core.op != "matmul" or not _field(core.args[1], "state", s_name) or core.args[0].rank != 1:
        return None
    q = core.args[0]
    if leaves((q,), "field"):
        return None
    extra = None
    for t in terms:
        if t is not stateful[0]:
            extra = t if extra is None else binary("add", extra, t)
    return q, factors, divisor, extra

def _distributed(term: Node) -> list[Node]:
    """A readout term c * (q @ (A + B + ...)) [/ d] (scalar factors c, a scalar divisor d) as the
    terms c * (q @ A) [/ d], ... (RWKV-6's r @ (p.S + outer(u * k, v))), each q @ outer(a, b)
    as sum(q * a) * b (a number times a vector: no [K, V] tensor per token); any other term as
    it is."""
    divisor = None
    if term.op == "div" and term.args[1].rank == 0:
        term, divisor = term.args
    factors = _factors(term)
    sums = [f for f in factors if f.op == "matmul" and f.args[0].rank == 1 and f.args[1].op == "add"]
    if len(sums) != 1 or any(f.rank != 0 for f in factors if f is not sums[0]):
        return [term if divisor is None else binary("div", term, divisor)]
    q, scalars = sums[0].args[0], [f for f in factors if f is not sums[0]]
    out = []
    for part in _split_terms(sums[0].args[1]):
        if part.op == "outer":
            a, b = part.args
            read = binary("mul", Node("sum", (binary("mul", q, a),), (0,), promote(q.dtype, a.dtype), (), None), b)
        else:
            read = matmul_node(q, part)
        for c in scalars:
            read = binary("mul", c, read)
        out.append(read if divisor is None else binary("div", read, divisor))
    return out


def _decay_term(node: Node, a: str, h: str):
    """node == l.h * D + r.h with D = r.a or r.a[:, None]: returns D, else None."""
    if node.op != "add":
        return None
    for prod, rest in (node.args, node.args[::-1]):
        if not _field(rest, "right", h) or prod.op != "mul":
            continue
        for x, d in (prod.args, prod.args[::-1]):
            if _field(x, "left", h) and (_field(d, "right", a) or (is_column(d) and _field(d.args[0], "right", a))):
                return d
    return None


def first_order(op: OpIR):
    """(index of a, index of h, the aligned decay node) for h = a * h + b, else None."""
    if len(op.state) != 2 or not all(is_float(f.dtype) for f in op.state):
        return None
    for ia, ih in ((0, 1), (1, 0)):
        a, h = op.state[ia].name, op.state[ih].name
        c = op.combine[ia]
        if not (c.op == "mul" and sorted(x.attrs for x in c.args if x.op == "field") == [("left", a), ("right", a)]):
            continue
        d = _decay_term(op.combine[ih], a, h)
        if d is not None:
            return ia, ih, d
    return None


def _decay_kind(a_shape, h_shape) -> str:
    """per-lane: a scalar state per lane; scalar: one decay for a whole vector/matrix state;
    per-key: a diagonal decay (a vector, broadcast over the rest of h)."""
    if not a_shape:
        return "per-lane" if not h_shape else "scalar"
    return "per-key"


# ---------------------------------------------------------------------------- the classes
def _decayed_linear_attention(op: OpIR, any_sign: bool = False):
    """The class of S = a * S + outer(k, v) with a linear readout, else None. `any_sign`: take
    a decay not known to be non-negative too (only to tell the user what the sign costs)."""
    if not op.has_lift or leaves(op.lift + op.readout, "index"):
        return None
    if len(op.state) == 1:
        name = op.state[0].name
        c = op.combine[0]
        if not (c.op == "add" and sorted(a.attrs for a in c.args if a.op == "field") == [("left", name),
                                                                                        ("right", name)]):
            return None
        s_index, a_index, aligned = 0, None, None
    else:
        fo = first_order(op)
        if fo is None:
            return None
        a_index, s_index, aligned = fo
    S = op.state[s_index]
    if len(S.shape) != 2:
        return None
    update = _outer_update(op.lift[s_index])
    if update is None:
        return None
    k, v = update
    readout = _linear_readout(op, S.name, exclusive=True)
    if readout is None:
        return None
    q, scale, divisor, extra = readout
    kind, g = "none", None
    if a_index is not None:
        A = op.state[a_index]
        lift_a = op.lift[a_index]
        if not _non_negative(lift_a) and not any_sign:
            return None  # (the chunkwise form takes log(a); the first-order scan takes any sign)
        g = lift_a.args[0] if lift_a.op == "exp" else Node("log", (lift_a,), (), lift_a.dtype, lift_a.shape)
        if not A.shape:
            kind = "scalar"
        elif len(A.shape) == 1 and dims_equal(A.shape[0], S.shape[0]) and is_column(aligned):
            kind = "key"
        else:
            return None
    reason = {"none": "S = S + outer(k, v)", "scalar": "S = a * S + outer(k, v) with a scalar decay a",
              "key": "S = a[:, None] * S + outer(k, v) with a per-key decay a"}[kind]
    read = "q @ S_{t-1}" if op.exclusive else "q @ S"
    pieces = (("s_index", s_index), ("decay_index", a_index), ("kind", kind), ("k", k), ("v", v), ("q", q),
              ("g", g), ("scale", _product(scale, q)), ("divisor", divisor), ("extra", extra))
    return StructureClass("decayed-linear-attention", kind,
                          f"{reason}, readout ({read}) times a constant{_PLUS_EXTRA if extra else ''}", pieces)


def _shared_key_reads(op: OpIR):
    """Decayed linear attention over several states read by one query (mLSTM: C [K, V] and the
    normaliser n [K], h = C q / max(|n . q|, 1)): one decay field a (or none), every other field
    S_j = a' * S_j + outer(k, v_j) (a matrix) or a' * s_j + c_j * k (a vector: one column whose
    value is c_j) with one key k, and a readout that reads each state only as q @ S_j (sum(q *
    s_j) for a vector) with one q, whatever it does with the reads. The chunkwise form computes
    every read at once, the values side by side (V_1 + ... + 1 columns), and the readout then
    runs on the reads. At least one state is a matrix (vector states alone, S6's, scan cheaper
    as a first-order recurrence). Else None."""
    if not op.has_lift or op.chunk is not None or len(op.outputs) != 1 \
            or leaves(op.lift + op.readout, "index") or not all(is_float(f.dtype) for f in op.state):
        return None
    decays = [i for i, c in enumerate(op.combine) if c.op == "mul" and
              sorted(x.attrs for x in c.args if x.op == "field") == [("left", op.state[i].name),
                                                                      ("right", op.state[i].name)]]
    if len(decays) > 1:
        return None
    a_index = decays[0] if decays else None
    kind, g = "none", None
    if a_index is not None:
        A, lift_a = op.state[a_index], op.lift[a_index]
        if not _non_negative(lift_a) or len(A.shape) > 1:
            return None
        kind = "scalar" if not A.shape else "key"
        g = lift_a.args[0] if lift_a.op == "exp" else Node("log", (lift_a,), (), lift_a.dtype, lift_a.shape)
    key, width, values = None, None, []
    for i, f in enumerate(op.state):
        if i == a_index:
            continue
        if len(f.shape) not in (1, 2) or (width is not None and not dims_equal(f.shape[0], width)):
            return None
        width = f.shape[0]
        c = op.combine[i]
        if a_index is None:
            if not (c.op == "add" and sorted(x.attrs for x in c.args if x.op == "field") == [("left", f.name),
                                                                                            ("right", f.name)]):
                return None
        else:
            d = _decay_term(c, op.state[a_index].name, f.name)
            if d is None or (kind == "key" and len(f.shape) == 2 and not is_column(d)) or \
                    (kind == "key" and not dims_equal(op.state[a_index].shape[0], f.shape[0])):
                return None
        lift, divisor = op.lift[i], None
        if lift.op == "div" and lift.args[1].rank == 0:  # an update over a scalar: the value carries it
            lift, divisor = lift.args
        factors = _factors(lift)
        vectors = [x for x in factors if x.rank == len(f.shape)]
        scalars = [x for x in factors if x.rank == 0]
        if len(vectors) != 1 or len(vectors) + len(scalars) != len(factors):
            return None
        if len(f.shape) == 2:
            if vectors[0].op != "outer":
                return None
            k, v = vectors[0].args
            value = v if not scalars else binary("mul", _product(scalars), v)
        else:
            k = vectors[0]
            value = _product(scalars) if scalars else const(1.0, f.dtype)
        if key is not None and k != key:
            return None
        key = k
        values.append((i, value if divisor is None else binary("div", value, divisor)))
    reads = {}
    for node in walk(op.readout):
        name = _read_of(node)
        if name is not None:
            if name in reads and reads[name] != node:
                return None  # (the same state read with two queries)
            reads[name] = node
    if not reads:
        return None
    if not any(len(op.state[i].shape) == 2 for i, _ in values):
        return None  # vector states alone (S6's h): the first-order scan stores less than the chunk form
    queries = {_query_of(n) for n in reads.values()}
    if len(queries) != 1 or None in queries:
        return None
    q = queries.pop()
    if leaves((q,), "field") or any(i == a_index or op.state[i].name not in reads for i, _ in values):
        return None
    # every field the readout reads is inside a read
    placeholder = {node: Node("field", (), ("state", f"read_{name}"), node.dtype, node.shape, None)
                   for name, node in reads.items()}
    readout = _substitute(op.readout[0], placeholder)
    if any(leaf.attrs[1] in {f.name for f in op.state} for leaf in leaves((readout,), "field")):
        return None
    pieces = (("decay_index", a_index), ("kind", kind), ("k", key), ("q", q), ("g", g),
              ("values", tuple(values)), ("reads", tuple((name, placeholder[node]) for name, node in reads.items())),
              ("readout", readout))
    names = ", ".join(f"q @ {f.name}{'_{t-1}' if op.exclusive else ''}" for f in op.state if f.name in reads)
    return StructureClass("decayed-linear-attention", kind, f"states {', '.join(op.state[i].name for i, _ in values)} "
                          f"decayed together with one key, readout a function of {names}: the reads in one chunkwise "
                          "pass, the readout on them", pieces)


def _read_of(node: Node) -> str | None:
    """The state field name when node is q @ s.S (a matrix) or sum(q * s.s) (a vector)."""
    if node.op == "matmul" and node.args[1].op == "field" and node.args[1].attrs[0] == "state" \
            and node.args[0].rank == 1:
        return node.args[1].attrs[1]
    if node.op == "sum" and node.attrs == (0,) and node.args[0].op == "mul":
        fields = [x for x in node.args[0].args if x.op == "field" and x.attrs[0] == "state"]
        if len(fields) == 1 and fields[0].rank == 1:
            return fields[0].attrs[1]
    return None


def _query_of(node: Node) -> Node | None:
    if node.op == "matmul":
        return node.args[0]
    others = [x for x in node.args[0].args if not (x.op == "field" and x.attrs[0] == "state")]
    return others[0] if len(others) == 1 else None


def _substitute(node: Node, table: dict) -> Node:
    if node in table:
        return table[node]
    args = tuple(_substitute(a, table) for a in node.args)
    return node if args == node.args else Node(node.op, args, node.attrs, node.dtype, node.shape, node.span)


def _split_terms(node: Node) -> list[Node]:
    if node.op == "add":
        return _split_terms(node.args[0]) + _split_terms(node.args[1])
    return [node]


def _minus(factors: list[Node], remove: list[Node]) -> list[Node] | None:
    """The multiset difference factors - remove, or None when remove is not contained."""
    left = list(factors)
    for r in remove:
        if r not in left:
            return None
        left.remove(r)
    return left


def _identity_plus_rank_one(lift_e: Node):
    """(gate factors, beta factors, const, k) for E = g * (I + c * b * outer(k, k)), c < 0."""
    outside = _factors(lift_e)
    matrices = [f for f in outside if f.rank == 2]
    if len(matrices) != 1 or any(f.rank != 0 for f in outside if f is not matrices[0]):
        return None
    gate = [f for f in outside if f is not matrices[0]]
    terms = _split_terms(matrices[0])
    if len(terms) != 2:
        return None
    eye_term = rank_term = None
    for t in terms:
        fs = _factors(t)
        cores = [f for f in fs if f.rank == 2]
        if len(cores) != 1 or any(f.rank != 0 for f in fs if f is not cores[0]):
            return None
        scal = [f for f in fs if f is not cores[0]]
        if cores[0].op == "eye":
            eye_term = scal
        elif cores[0].op == "outer" and cores[0].args[0] == cores[0].args[1]:
            rank_term = (scal, cores[0].args[0])
    if eye_term is None or rank_term is None:
        return None
    scal, k = rank_term
    beta = _minus(scal, eye_term)  # g * I - g * b * k k^T: the gate factors out of both terms
    if beta is None:
        return None
    gate = gate + eye_term
    consts = [f for f in beta if f.op == "const"]
    rest = [f for f in beta if f.op != "const"]
    c = 1.0
    for f in consts:
        c *= f.attrs[0]
    if c >= 0:
        return None
    return gate, rest, -c, k


def _affine_maps(op: OpIR):
    """(index of E, index of S) when the combine composes affine maps S -> E S + F, later on the
    left: (r.E @ l.E, r.E @ l.S + r.S) with E square over S's rows; else None."""
    if not op.has_lift or len(op.state) != 2 or leaves(op.lift + op.readout, "index"):
        return None
    for ie, is_ in ((0, 1), (1, 0)):
        E, S = op.state[ie], op.state[is_]
        if len(E.shape) != 2 or len(S.shape) != 2 or not dims_equal(E.shape[0], E.shape[1]) \
                or not dims_equal(E.shape[1], S.shape[0]):
            continue
        ce, cs = op.combine[ie], op.combine[is_]
        if not (ce.op == "matmul" and _field(ce.args[0], "right", E.name) and _field(ce.args[1], "left", E.name)):
            continue
        if cs.op == "add" and any(
                t.op == "matmul" and _field(t.args[0], "right", E.name) and _field(t.args[1], "left", S.name)
                and _field(o, "right", S.name) for t, o in (cs.args, cs.args[::-1])):
            return ie, is_
    return None


def _write_strength(c: float, beta: list[Node], k: Node) -> Node:
    """beta of E = I - beta * outer(k, k) as one node: the constant c times the factors `beta`."""
    return _product(([const(c, "f32")] if c != 1.0 else []) + beta, k) or const(1.0, "f32")


def _identity_plus_low_rank(op: OpIR):
    maps = _affine_maps(op)
    if maps is None:
        return None
    names = [f.name for f in op.state]
    ie, is_ = maps
    S = op.state[is_]
    got = _identity_plus_rank_one(op.lift[ie])
    if got is None:
        return None
    gate, beta, c, k = got
    if not all(_non_negative(f) for f in gate):
        return None  # (the runtime takes log(gate); the diagonal-plus-low-rank test says why not)
    lift_s = _factors(op.lift[is_])
    outers = [f for f in lift_s if f.op == "outer"]
    if len(outers) != 1 or outers[0].args[0] != k:
        return None
    s_coeff = [f for f in lift_s if f is not outers[0]]
    s_consts = 1.0
    for f in s_coeff:
        if f.op == "const":
            s_consts *= f.attrs[0]
    if Counter(f for f in s_coeff if f.op != "const") != Counter(beta) or s_consts != c:
        return None  # S's update must be beta * outer(k, v) with the same beta
    readout = _linear_readout(op, S.name)
    if readout is None:
        return None
    q, scale, divisor, extra = readout
    beta_node = _write_strength(c, beta, k)
    g = None
    if gate:
        g = gate[0].args[0] if len(gate) == 1 and gate[0].op == "exp" else \
            Node("log", (_product(gate, k),), (), gate[0].dtype, ())
    kind = "gated" if g is not None else "plain"
    pieces = (("e_index", ie), ("s_index", is_), ("k", k), ("v", outers[0].args[1]), ("q", q),
              ("beta", beta_node), ("g", g), ("scale", _product(scale, q)), ("divisor", divisor), ("extra", extra))
    what = "g * (I - beta * outer(k, k))" if g is not None else "I - beta * outer(k, k)"
    return StructureClass(
        "identity-plus-low-rank", kind,
        f"E = {what} (identity plus rank one), S = E @ S + beta * outer(k, v), readout q @ S"
        f"{_PLUS_EXTRA if extra else ''}: E is never built; the stream keeps {names[is_]} only", pieces)



def _matmul_chain(node: Node) -> list[Node]:
    """The factors of a chain of matrix products, leftmost first (a node that is not a matrix
    product is one factor)."""
    if node.op == "matmul" and node.args[0].rank == 2 and node.args[1].rank == 2:
        return _matmul_chain(node.args[0]) + _matmul_chain(node.args[1])
    return [node]


def _delta_product(op: OpIR):
    """The identity-plus-low-rank class with r > 1 delta steps per token (DeltaProduct, Siems et
    al. 2025; fla's gated_delta_product): E = g * M_r @ ... @ M_1 with M_j = I - beta_j
    outer(k_j, k_j), and S's update sum_j M_r .. M_{j+1} (beta_j outer(k_j, v_j)), the same
    map as r delta-rule tokens (the gate on the first). The factors come from E's spelling;
    the update is then proven equal to that sum in SymPy (`_update_is_composed`), so any
    spelling of it is accepted. None when E is not such a product; a matrix-affine class with
    the reason when S's update is not the composed one."""
    maps = _affine_maps(op)
    if maps is None:
        return None
    ie, is_ = maps
    S = op.state[is_]
    outside = _factors(op.lift[ie])
    cores = [f for f in outside if f.rank == 2]
    if len(cores) != 1 or any(f.rank != 0 for f in outside if f is not cores[0]):
        return None
    chain = _matmul_chain(cores[0])
    if len(chain) < 2:
        return None
    gate = [f for f in outside if f is not cores[0]]
    steps = []  # (k, beta node), in the order the steps apply: the rightmost factor first
    for factor in reversed(chain):
        got = _identity_plus_rank_one(factor)
        if got is None:
            return None
        factor_gate, beta, c, k = got
        gate += factor_gate  # (scalars commute: every factor's gate is one gate on the token)
        steps.append((k, _write_strength(c, beta, k)))
    if not all(_non_negative(f) for f in gate):
        return None
    keys = [k for k, _ in steps]
    if len(set(keys)) != len(keys):
        return None  # (two steps with one key: their updates could not be told apart)
    # the writes outer(k_j, v_j), wherever the update spells them (the factors M_i they pass
    # through hold outer(k_i, k_i)); one v per key, then the whole update is proven below
    values: dict = {}
    for n in walk((op.lift[is_],)):
        if n.op == "outer" and n.args[0] != n.args[1]:
            values.setdefault(n.args[0], set()).add(n.args[1])
    if set(values) != set(keys) or any(len(vs) != 1 for vs in values.values()):
        return None
    values = {k: next(iter(vs)) for k, vs in values.items()}
    readout = _linear_readout(op, S.name)
    if readout is None:
        return None
    parts = tuple((k, values[k], beta) for k, beta in steps)
    r = len(parts)
    if not _update_is_composed(op, op.lift[is_], parts):
        return StructureClass(
            "matrix-affine", "", f"E = I - beta_j * outer(k_j, k_j) multiplied over {r} steps, but {S.name}'s update "
            f"is not the {r} delta steps composed (sum over j of M_r .. M_(j+1) @ (beta_j * outer(k_j, v_j))): the "
            "generic scan serves it, forming E per token")
    q, scale, divisor, extra = readout
    g = None
    if gate:
        g = gate[0].args[0] if len(gate) == 1 and gate[0].op == "exp" else _log_of(gate)
    kind = "gated" if g is not None else "plain"
    pieces = (("e_index", ie), ("s_index", is_), ("steps", parts), ("k", parts[0][0]), ("v", parts[0][1]),
              ("q", q), ("beta", parts[0][2]), ("g", g), ("scale", _product(scale, q)), ("divisor", divisor),
              ("extra", extra))
    what = "g * M_r @ ... @ M_1" if g is not None else "M_r @ ... @ M_1"
    return StructureClass(
        "identity-plus-low-rank", kind,
        f"E = {what}, M_j = I - beta_j * outer(k_j, k_j) (identity plus rank {r}, a product of {r} delta steps), "
        f"S = E @ S + the steps' updates, readout q @ S{_PLUS_EXTRA if extra else ''}: run as {r} delta-rule "
        f"tokens per token; E is never built; the stream keeps {S.name} only", pieces)


# the dims at which `_update_is_composed` compares the two updates entry by entry
_PROOF_DIMS = (2, 3)


def _update_is_composed(op: OpIR, update: Node, parts: tuple) -> bool:
    """Whether S's update equals sum_j M_r .. M_{j+1} @ (beta_j outer(k_j, v_j)), M_j = I - beta_j
    outer(k_j, k_j), in exact arithmetic: both sides evaluated in SymPy over symbols for the
    lift's inputs, at every dim 2 and at every dim 3, and every entry's difference reduced to
    0 (psmc.analysis.prove.is_zero). A comparison (max, where on a float), a bool input or a
    budget run out is no proof: False."""
    import sympy

    from ..ir.interp import concrete_shape
    from .budget import Budget, OutOfTime
    from .grid import Grid
    from .prove import is_zero
    from .symbolic import Undecidable, evaluate

    composed = None
    for k, v, beta in parts:
        eye = Node("eye", (), (), k.dtype, (k.shape[0], k.shape[0]))
        m = binary("add", eye, binary("mul", const(-1.0, "f32"), binary("mul", beta, outer_node(k, k))))
        write = binary("mul", beta, outer_node(k, v))
        composed = write if composed is None else binary("add", matmul_node(m, composed), write)
    leaves_in = [n for n in walk((update, composed)) if n.op in ("arg", "param")]
    if any(n.dtype == "bool" for n in leaves_in):
        return False
    budget = Budget(4.0)
    try:
        for size in _PROOF_DIMS:
            dims = {d: size for d in op.dims}
            env = {}
            for n in leaves_in:
                key = (n.op, n.attrs[0])
                if key not in env:
                    env[key] = Grid.build(concrete_shape(n.shape, dims), lambda i, n=n: sympy.Symbol(
                        f"{n.op} {n.attrs[0]}" + (f"[{','.join(map(str, i))}]" if i else ""), real=True))
            got, want = evaluate((update, composed), env, dims)
            if not all(is_zero(a, b, budget) for a, b in zip(got.items, want.items)):
                return False
    except (Undecidable, OutOfTime, ZeroDivisionError, TypeError, ValueError):
        return False
    return True



def _diagonal_plus_outers(node: Node):
    """E as (diagonal factors, rank-one terms): diag(product of the factors; [] is I, None is
    no diagonal) + sum of c * outer(x, y) over the terms (c, x, y), c a list of scalar factors;
    None when E is not of that form. Products with a scalar, a row (E diag(d): d scales the
    diagonal and each y) or a column (diag(d) E: the diagonal and each x) distribute."""
    if node.op == "eye":
        return [], []
    if node.op == "diag":
        return [node.args[0]], []
    if node.op == "outer":
        return None, [([], node.args[0], node.args[1])]
    if node.op == "add":
        diagonal, terms = None, []
        for part in _split_terms(node):
            got = _diagonal_plus_outers(part)
            if got is None or (got[0] is not None and diagonal is not None):
                return None  # (two diagonals would be a sum: not kept as factors)
            diagonal = got[0] if got[0] is not None else diagonal
            terms += got[1]
        return diagonal, terms
    if node.op != "mul":
        return None
    factors = _factors(node)
    cores = [f for f in factors if f.rank == 2 and not is_column(f) and not is_row(f)]
    if len(cores) != 1:
        return None
    got = _diagonal_plus_outers(cores[0])
    if got is None:
        return None
    diagonal, terms = got
    for f in factors:
        if f is cores[0]:
            continue
        if f.rank == 0:
            terms = [(c + [f], x, y) for c, x, y in terms]
        elif f.rank == 1 or is_row(f):  # E * d[None, :] = E diag(d)
            d = f if f.rank == 1 else f.args[0]
            terms = [(c, x, binary("mul", y, d)) for c, x, y in terms]
        elif is_column(f):  # E * d[:, None] = diag(d) E
            d = f.args[0]
            terms = [(c, binary("mul", x, d), y) for c, x, y in terms]
        else:
            return None
        diagonal = None if diagonal is None else diagonal + [f if f.rank < 2 else f.args[0]]
    return diagonal, terms


_NON_NEGATIVE_UNARY = frozenset({"exp", "sigmoid", "softplus", "sqrt", "rsqrt", "abs", "relu"})


def _non_negative(node: Node) -> bool:
    """Whether node >= 0 for every value of its leaves (a sufficient syntactic test): the
    log-space forms take log(d), exact for d = 0 (log 0 = -inf gives an exact 0) but NaN for
    d < 0."""
    if node.op == "const":
        return node.attrs[0] >= 0
    if node.op == "dim" or node.op in _NON_NEGATIVE_UNARY:
        return True
    if node.op == "mul" and node.args[0] == node.args[1]:
        return True  # a square
    if node.op in ("mul", "div", "add", "min", "minimum"):
        return all(_non_negative(a) for a in node.args)
    if node.op in ("max", "maximum"):
        return any(_non_negative(a) for a in node.args)
    if node.op == "pow":
        power = node.args[1]
        even = power.op == "const" and float(power.attrs[0]).is_integer() and int(power.attrs[0]) % 2 == 0
        return even or _non_negative(node.args[0])
    return False


def _log_of(factors: list[Node]) -> Node:
    """log of a product of positive factors, exp(x) read back as x."""
    logs = [f.args[0] if f.op == "exp" else Node("log", (f,), (), f.dtype, f.shape) for f in factors]
    out = logs[0]
    for x in logs[1:]:
        out = binary("add", out, x)
    return out


def _diagonal_plus_low_rank(op: OpIR):
    maps = _affine_maps(op)
    if maps is None:
        return None
    ie, is_ = maps
    S = op.state[is_]
    got = _diagonal_plus_outers(op.lift[ie])
    if got is None or (got[0] is not None and not got[1]):
        return None  # not of the form (or diagonal alone: the first-order classes' when elementwise)
    if got[0] is None or len(got[1]) != 1:  # a near miss: say which, for `psmc check`
        terms = f"{len(got[1])} rank-one term{'s' if len(got[1]) > 1 else ''}"
        why = "no diagonal term (diag(d), a multiple of eye(K))" if got[0] is None else \
            f"{terms} (the fast form takes one; terms of one outer product are not merged)"
        return StructureClass("matrix-affine", "", f"E = diag(d) + outer(b, a) + ... with {why}: the generic "
                              "scan serves it, forming E per token")
    diagonal, [(coeff, b, a)] = got
    unsure = [f for f in diagonal if not _non_negative(f)]
    if unsure:
        return StructureClass(
            "matrix-affine", "", f"E = diag(d) + outer(b, a), but d's factor {render(unsure[0])} is not known to be "
            ">= 0, and the diagonal-plus-low-rank form computes with log(d): the generic scan serves it "
            "(spell a decay as exp(...) or sigmoid(...) to get the fast form)")
    if any(not dims_equal(x.shape[0], S.shape[0]) for x in (a, b) + tuple(f for f in diagonal if f.rank)):
        return None
    if coeff:  # c * outer(b, a) = outer(c * b, a)
        b = binary("mul", _product(coeff, b), b)
    update = _outer_update(op.lift[is_])
    if update is None:
        return None
    k, v = update
    readout = _linear_readout(op, S.name)
    if readout is None:
        return None
    q, scale, divisor, extra = readout
    log_decay = _log_of(diagonal) if diagonal else None
    kind = "none" if log_decay is None else "key" if log_decay.rank else "scalar"
    pieces = (("e_index", ie), ("s_index", is_), ("k", k), ("v", v), ("q", q), ("a", a), ("b", b),
              ("g", log_decay), ("scale", _product(scale, q)), ("divisor", divisor), ("extra", extra))
    what = {"none": "I", "scalar": "d I", "key": "diag(d)"}[kind]
    return StructureClass(
        "diagonal-plus-low-rank", kind,
        f"E = {what} + outer(b, a) (diagonal plus rank one), S = E @ S + outer(k, v), readout q @ S"
        f"{_PLUS_EXTRA if extra else ''}: E is never built; the stream keeps {S.name} only", pieces)


def classify(op: OpIR, associative: bool) -> StructureClass:
    """The class of a canonicalised op; `associative`: the scan is exact (proven or assumed)."""
    if not associative:
        return StructureClass("general", "tree-scan", "combine is not known to be associative: the fixed tree scan")
    fields = elementwise_fields(op)
    if all(fields.values()):
        found = _decayed_linear_attention(op) or _shared_key_reads(op)
        if found is not None:
            return found
        fo = first_order(op)
        if fo is not None and op.chunk is None:
            ia, ih, d = fo
            kind = _decay_kind(op.state[ia].shape, op.state[ih].shape)
            return StructureClass("first-order", kind, f"h = a * h + b over ({op.state[ia].name}, "
                                  f"{op.state[ih].name}) with a {kind} decay{_sign_note(op, ia)}",
                                  (("a_index", ia), ("h_index", ih), ("decay", d)))
        return StructureClass("elementwise-monoid", "", "every combine output is elementwise in the fields")
    found = _identity_plus_low_rank(op) or _delta_product(op) or _diagonal_plus_low_rank(op)
    if found is not None:
        return found
    flat = ", ".join(f for f, ok in fields.items() if not ok)
    if all(degree_in_left(n) <= 1 for n in op.combine):
        return StructureClass("matrix-affine", "", f"linear in the earlier element, not elementwise in {flat}")
    return StructureClass("general", "", f"not linear in the earlier element (in {flat})")


def _sign_note(op: OpIR, decay_index: int) -> str:
    """For an op that is decayed linear attention but for its decay's sign: what to write to get
    the chunkwise form (a first-order scan over a matrix state stores it at every token)."""
    if len(op.state[1 - decay_index].shape) != 2 or _decayed_linear_attention(op, any_sign=True) is None:
        return ""
    decay = render(op.lift[decay_index])
    shape = ", ".join(str(n) for n in op.state[1 - decay_index].shape)
    return (f"; its decay {decay} is not known to be non-negative, so it scans the [{shape}] state token by token "
            "instead of taking the chunkwise matmul form (decayed-linear-attention, which works with log decays): "
            "write the decay as exp(g), with g its log, or as sigmoid(u)")


def coarse_structure(op: OpIR) -> str:
    """elementwise | affine | general, of the canonical op (the `structure` key)."""
    if all(elementwise_fields(op).values()):
        return "elementwise"
    if all(degree_in_left(n) <= 1 for n in op.combine):
        return "affine"
    return "general"

