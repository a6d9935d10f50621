"""A seeded generator of random well-typed `.psm` programs (issue 11, in the spirit of Csmith).

`generate(seed)` returns a `Program`: the text of one op (plus `fn` helpers), the dims to build
it with, and how to draw each input's values. The same seed gives the same program on every
machine (only `random.Random(seed)` is used). `programs()` wraps it as a hypothesis strategy,
so a failing program shrinks towards a smaller seed-independent choice sequence.

An op is assembled from 1-3 *parts*; each part contributes state fields and the lift, combine,
identity and readout terms for them:
- associative families: sum, max / min, products, diagonal affine (scalar, per-key and per-row
  decay beside scalar, vector or matrix state), matrix affine, online softmax and logsumexp
  pairs, first / last, segmented sums with bool flags, argmax with an i64 index, counts (i32 /
  i64 / f32), Welford;
- random non-associative combines: typed random expressions over the builtins (elementwise,
  reductions, `@` with params, `where` / `if` with runtime or compile-time conditions, `fn`
  helpers, lets), bounded by a squashing function so long sequences stay finite.
A product of associative parts is associative; one non-associative part makes the op a tree
scan. On top of the parts: f32 and f64 fields and inputs, params, composite dims (`2 * D`),
lifts with 0-3 inputs (or no lift at all), identity present or absent, inclusive and exclusive
readouts with extra inputs (and `index`), tuple outputs or the state itself, and chunk ops
(`chunk C;`) with causal chunk readouts.

A share of token programs (`_low_rank_program`) are instead affine-map ops (E, S) whose E is
the identity or a diagonal plus a rank-one term: the delta rule, RWKV-7, KDA and their
spellings, and near misses that stay generic.

Value kinds (how the runner draws an input): "signed" uniform in [-0.5, 0.5], "log_gate" in
[-0.5, 0], "unit" in [0, 1], "unit_vector" signed values l2-normalised along the last axis,
"bool" true with probability 0.3, "int" in 0..4.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

DIM_NAMES = ("K", "V", "D")
# draws added after the generator's first campaigns come from a second stream seeded by the
# program seed and this salt, so that every earlier draw (and so every earlier seed's program
# structure) stays as it was
SIDE_SALT = 0x51DE
# the share of token programs that are low-rank affine-map ops (_low_rank_program), drawn
# from a stream of its own
LOW_RANK_SALT, LOW_RANK_RATE = 0x10AD, 0.08
# the share of those that are products of delta steps (_delta_product_program), drawn likewise
DELTA_PRODUCT_SALT, DELTA_PRODUCT_RATE = 0xDE17A, 0.3
# the share of token programs that are decayed linear attention (_linear_attention_program),
# from seed LINEAR_ATTENTION_FROM on (every earlier seed keeps the program it had: the seeds
# tests pin, and the campaigns recorded before the family existed)
LINEAR_ATTENTION_SALT, LINEAR_ATTENTION_RATE, LINEAR_ATTENTION_FROM = 0xD1A, 0.07, 5_050_000


@dataclass(frozen=True)
class Program:
    seed: int
    name: str
    text: str
    dims: dict  # dim -> int, every dim the op declares
    kinds: dict  # input name -> value kind
    features: frozenset = frozenset()  # what the program exercises (coverage counts)


@dataclass
class Part:
    fields: list  # (name, dtype, shape) shape: a tuple of dim spellings
    lift: list  # expression per field (over the lift inputs)
    combine: list  # expression per field (over l.<f> and r.<f>)
    identity: list | None  # expression per field, or None: no identity known / declared
    reads: list  # (expression over s.<f>, dtype, shape): what a readout may return
    lets: list = field(default_factory=list)  # combine lets: (name, expr)
    associative: bool = True
    feature: str = ""


def shape_text(shape: tuple) -> str:
    return f"[{', '.join(shape)}]" if shape else ""


def type_text(dtype: str, shape: tuple) -> str:
    return dtype + shape_text(shape)


class Builder:
    """State shared by the parts of one op: the rng, the dims, the inputs created so far."""

    def __init__(self, rng: random.Random, chunk: str | None):
        self.rng = rng
        self.dims = {}  # name -> value
        self.lift_inputs = []  # (name, dtype, shape, kind)
        self.max_lift_inputs = rng.choice([0, 1, 2, 3, 3])
        self.params = []  # (name, dtype, shape, init)
        self.fns = []  # helper texts
        self.features = set()
        self.float_dtype = "f64" if rng.random() < 0.25 else "f32"  # the op's default float
        self.chunk = chunk
        self.counter = 0
        self.side = random.Random(SIDE_SALT)  # _token_program / _chunk_program seed it per program

    # ----------------------------------------------------------------- names and shapes
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def dim(self) -> str:
        name = self.rng.choice(DIM_NAMES)
        self.dims.setdefault(name, self.rng.randint(1, 3))
        return name

    def shape(self, max_rank: int = 2) -> tuple:
        rank = self.rng.choice([0, 0, 1, 1, 2][: 2 * max_rank + 1])
        if rank == 0:
            return ()
        if rank == 1:
            if self.rng.random() < 0.15:
                d = self.dim()
                self.features.add("composite-dim")
                return (f"2 * {d}",)
            return (self.dim(),)
        return (self.dim(), self.dim())

    def fdt(self) -> str:
        """A float dtype for a field or input: mostly the op's default."""
        return self.rng.choice(["f32", "f64"]) if self.rng.random() < 0.2 else self.float_dtype

    # ----------------------------------------------------------------- values from inputs
    def source(self, shape: tuple, kind: str = "signed", dtype: str | None = None) -> str:
        """An expression of exactly `shape` for a lift, built from (new or reused) inputs."""
        dtype = dtype or self.fdt()
        full_shape = (("C",) + shape) if self.chunk else shape
        same = [n for n, d, s, k in self.lift_inputs if s == full_shape and k == kind]
        if same and (len(self.lift_inputs) >= self.max_lift_inputs or self.rng.random() < 0.5):
            name = self.rng.choice(same)
        elif len(self.lift_inputs) < self.max_lift_inputs:
            name = self.fresh("x")
            self.lift_inputs.append((name, dtype, full_shape, kind))
        else:
            return self.constant(shape, kind)
        if self.chunk:
            return f"sum({name}, axis=0)" if kind == "signed" else f"mean({name}, axis=0)"
        return name

    def constant(self, shape: tuple, kind: str) -> str:
        """No input left: a value from `index` or a literal, of `shape`."""
        self.features.add("constant-lift")
        if kind == "bool":
            return "false"
        value = {"signed": "0.25", "log_gate": "-0.125", "unit": "0.5"}[kind]
        if kind == "signed" and self.rng.random() < 0.5:
            self.features.add("index")
            value = "(0.01 * index - 0.2)" if not self.chunk else "0.25"
        if not shape:
            return value
        return f"{value} * ones({', '.join(shape)})"

    def param(self, shape: tuple, dtype: str | None = None) -> str:
        for n, d, s, _ in self.params:
            if s == shape and self.rng.random() < 0.5:
                return n
        name = self.fresh("W")
        init = self.rng.choice(["", " = normal(0.3)", " = uniform(-0.5, 0.5)", " = ones"]) if shape else \
            self.rng.choice([" = ones", " = normal(0.3)", " = uniform(-0.5, 0.5)"])
        if len(shape) == 2 and not init:
            init = " = xavier"
        if not init:
            init = " = normal(0.3)"
        self.params.append((name, dtype or self.fdt(), shape, init))
        self.features.add("param")
        return name


# ============================================================================ associative parts
def part_sum(b: Builder) -> Part:
    n, shape, dt = b.fresh("s"), b.shape(), b.fdt()
    lift = b.source(shape, dtype=dt)
    if b.rng.random() < 0.3:
        lift = f"tanh({lift})"
    return Part([(n, dt, shape)], [lift], [b.rng.choice([f"l.{n} + r.{n}", f"r.{n} + l.{n}"])],
                ["zeros" if shape else b.rng.choice(["0.0", "0", "zeros"])], [(f"s.{n}", dt, shape)],
                feature="sum")


def part_extreme(b: Builder) -> Part:
    n, shape, dt = b.fresh("m"), b.shape(), b.fdt()
    hi = b.rng.random() < 0.5
    fn = "max" if hi else "min"
    ident = "-inf" if hi else "inf"
    comb = b.rng.choice([f"{fn}(l.{n}, r.{n})", f"{fn}(r.{n}, l.{n})"])
    if not shape and b.rng.random() < 0.3:
        comb = f"if l.{n} {'>' if hi else '<'} r.{n} then l.{n} else r.{n}"
    ident_expr = ident if b.rng.random() < 0.7 else None
    return Part([(n, dt, shape)], [b.source(shape, dtype=dt)], [comb], [ident_expr] if ident_expr else None,
                [(f"s.{n}", dt, shape)], feature="max" if hi else "min")


def part_product(b: Builder) -> Part:
    n, shape, dt = b.fresh("p"), b.shape(), b.fdt()
    src = b.source(shape, dtype=dt)
    lift = b.rng.choice([f"exp(0.2 * {src})", f"1.0 + 0.1 * tanh({src})"])
    return Part([(n, dt, shape)], [lift], [b.rng.choice([f"l.{n} * r.{n}", f"r.{n} * l.{n}"])],
                [b.rng.choice(["ones", "1.0"]) if not shape else "ones"], [(f"s.{n}", dt, shape)],
                feature="product")


def part_diag_affine(b: Builder) -> Part:
    """h <- a * h + u, with a scalar, per-key or per-row decay beside a scalar/vector/matrix h."""
    a, h = b.fresh("a"), b.fresh("h")
    dt = b.fdt()
    hshape = b.shape()
    if not hshape:
        ashape = ()
    else:
        ashape = b.rng.choice([(), (hshape[0],)] + ([hshape] if len(hshape) == 1 else []))
    decay_src = b.source(ashape, kind="log_gate", dtype=dt)
    decay = b.rng.choice([f"exp({decay_src})", f"exp({decay_src})"] if "log_gate" else [])
    if not ashape and hshape:
        b.features.add("scalar-decay-beside-" + ("vector" if len(hshape) == 1 else "matrix"))
    if b.rng.random() < 0.1:
        decay = "0.9" if not ashape else f"0.9 * ones({', '.join(ashape)})"
        b.features.add("constant-decay")
    elif b.side.random() < 0.3:  # a learned decay rate, as Mamba's A: exp(delta * A), A > 0 here
        rate = "A" + a
        b.params.append((rate, dt, ashape, " = uniform(0.5, 1.5)"))
        decay = f"exp({decay_src} * {rate})"
        b.features.add("param-decay")
    ra = f"r.{a}[:, None]" if len(ashape) == 1 and len(hshape) == 2 else f"r.{a}"
    upd = b.source(hshape, dtype=dt) if len(hshape) != 2 or b.rng.random() < 0.5 else \
        f"outer({b.source((hshape[0],), dtype=dt)}, {b.source((hshape[1],), dtype=dt)})"
    comb_h = b.rng.choice([f"{ra} * l.{h} + r.{h}", f"r.{h} + l.{h} * {ra}"])
    comb_a = b.rng.choice([f"l.{a} * r.{a}", f"r.{a} * l.{a}"])
    reads = [(f"s.{h}", dt, hshape)]
    return Part([(a, dt, ashape), (h, dt, hshape)], [decay, upd], [comb_a, comb_h], ["ones", "zeros"], reads,
                feature="diag-affine")


def part_matrix_affine(b: Builder) -> Part:
    E, S = b.fresh("E"), b.fresh("S")
    dt = b.fdt()
    k = b.dim()
    sshape = b.rng.choice([(k,), (k, b.dim())])
    kk = b.source((k,), dtype=dt)
    beta = b.source((), kind="unit", dtype=dt)
    e = b.rng.choice([f"eye({k}) - 0.5 * {beta} * outer({kk}, {kk})", f"0.9 * eye({k}) + 0.05 * outer({kk}, {kk})"])
    if len(sshape) == 2:
        s = f"outer({kk}, {b.source((sshape[1],), dtype=dt)})"
    else:
        s = b.source(sshape, dtype=dt)
    return Part([(E, dt, (k, k)), (S, dt, sshape)], [e, s], [f"r.{E} @ l.{E}", f"r.{E} @ l.{S} + r.{S}"],
                [f"eye({k})", "zeros"], [(f"s.{S}", dt, sshape)], feature="matrix-affine")


def part_softmax(b: Builder) -> Part:
    """Online softmax (m, s[, acc]) or logsumexp (m, s)."""
    m, s = b.fresh("m"), b.fresh("z")
    dt = b.fdt()
    score = b.source((), dtype=dt)
    lets_m = b.fresh("mx")
    fields = [(m, dt, ()), (s, dt, ())]
    lift = [score, "1.0"]
    comb = [lets_m, f"l.{s} * exp(l.{m} - {lets_m}) + r.{s} * exp(r.{m} - {lets_m})"]
    ident = ["-inf", "0.0"]
    reads = [(f"s.{m} + log(s.{s})", dt, ())]
    feature = "logsumexp"
    if b.rng.random() < 0.5:
        acc = b.fresh("acc")
        vshape = b.rng.choice([(), (b.dim(),)])
        fields.append((acc, dt, vshape))
        lift.append(b.source(vshape, dtype=dt))
        comb.append(f"l.{acc} * exp(l.{m} - {lets_m}) + r.{acc} * exp(r.{m} - {lets_m})")
        ident.append("zeros" if vshape else "0.0")
        reads = [(f"s.{acc} / s.{s}", dt, vshape)]
        feature = "online-softmax"
    return Part(fields, lift, comb, ident, reads, lets=[(lets_m, f"max(l.{m}, r.{m})")], feature=feature)


def part_first_last(b: Builder) -> Part:
    n, shape, dt = b.fresh("v"), b.shape(), b.fdt()
    first = b.rng.random() < 0.5
    return Part([(n, dt, shape)], [b.source(shape, dtype=dt)], [f"l.{n}" if first else f"r.{n}"], None,
                [(f"s.{n}", dt, shape)], feature="first" if first else "last")


def part_logaddexp(b: Builder) -> Part:
    """A running log-sum-exp in one field: the builtin, or the naive spelling the rewrite pass
    turns into it (psmc.ir.rewrite)."""
    y, dt, shape = b.fresh("y"), b.fdt(), b.shape(1)
    comb = b.rng.choice([f"logaddexp(l.{y}, r.{y})", f"logaddexp(r.{y}, l.{y})", f"log(exp(l.{y}) + exp(r.{y}))"])
    return Part([(y, dt, shape)], [b.source(shape, dtype=dt)], [comb], ["-inf"], [(f"s.{y}", dt, shape)],
                feature="logaddexp")


def part_segmented(b: Builder) -> Part:
    f, s = b.fresh("f"), b.fresh("g")
    dt = b.fdt()
    shape = b.shape(1)
    flag = b.source((), kind="bool", dtype="bool") if not b.chunk else "false"
    if flag.startswith("0.") or flag.startswith("("):  # no input left: a flag from the position
        flag = "index % 3 == 0" if False else "false"
    comb = [f"l.{f} or r.{f}", b.rng.choice([f"if r.{f} then r.{s} else l.{s} + r.{s}",
                                              f"where(r.{f}, r.{s}, l.{s} + r.{s})"])]
    return Part([(f, "bool", ()), (s, dt, shape)], [flag, b.source(shape, dtype=dt)], comb,
                ["false", "zeros" if shape else "0.0"], [(f"s.{s}", dt, shape)], feature="segmented")


def part_argmax(b: Builder) -> Part:
    v, i = b.fresh("v"), b.fresh("i")
    dt = b.fdt()
    idt = b.rng.choice(["i64", "i32"])
    comb = [f"max(l.{v}, r.{v})", f"if r.{v} > l.{v} then r.{i} else l.{i}"]
    pos = "index" if idt == "i64" else "index"
    return Part([(v, dt, ()), (i, "i64", ())], [b.source((), dtype=dt), pos], comb, ["-inf", "0"] if
                b.rng.random() < 0.5 else None, [(f"s.{i}", "i64", ())], feature="argmax")


def part_count(b: Builder) -> Part:
    n = b.fresh("n")
    dt = b.rng.choice(["i64", "i32", "f32", "f64"])
    one = b.rng.choice(["1", "1.0"]) if dt.startswith("f") else "1"
    zero = "0" if dt.startswith("i") else b.rng.choice(["0", "0.0"])
    return Part([(n, dt, ())], [one], [f"l.{n} + r.{n}"], [zero], [(f"s.{n}", dt, ())], feature="count-" + dt)


def part_welford(b: Builder) -> Part:
    n, mu, m2 = b.fresh("n"), b.fresh("mu"), b.fresh("q")
    dt = b.fdt()
    tot, d = b.fresh("nt"), b.fresh("d")
    lets = [(tot, f"l.{n} + r.{n}"), (d, f"r.{mu} - l.{mu}")]
    comb = [tot, f"l.{mu} + {d} * r.{n} / {tot}", f"l.{m2} + r.{m2} + {d} * {d} * l.{n} * r.{n} / {tot}"]
    return Part([(n, dt, ()), (mu, dt, ()), (m2, dt, ())], ["1.0", b.source((), dtype=dt), "0.0"], comb, None,
                [(f"s.{m2} / s.{n}", dt, ()), (f"s.{mu}", dt, ())], lets=lets, feature="welford")


ASSOCIATIVE = [part_sum, part_extreme, part_product, part_diag_affine, part_matrix_affine, part_softmax,
               part_first_last, part_segmented, part_argmax, part_count, part_welford, part_logaddexp]
UNDEFINED_AT_IDENTITY = ("logsumexp", "online-softmax", "welford", "max", "min", "logaddexp")  # 0/0, log 0, inf
FIELD_COUNT = {part_diag_affine: 2, part_matrix_affine: 2, part_softmax: 3, part_segmented: 2, part_argmax: 2,
               part_welford: 3}


# ============================================================================ random expressions
UNARY = ["tanh", "sigmoid", "relu", "silu", "gelu", "softplus", "abs", "logsigmoid", "sign"]
SQUASH = ["tanh", "sigmoid"]


class Expr:
    """Typed random expressions of a given shape over a set of leaves."""

    def __init__(self, b: Builder, leaves: dict):
        self.b, self.rng = b, b.rng
        self.leaves = leaves  # shape -> [expression]

    def of(self, shape: tuple, depth: int) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.2:
            return self.leaf(shape)
        choice = rng.random()
        if choice < 0.3:
            op = rng.choice(["+", "-", "*"])
            left = self.of(shape, depth - 1)
            right = self.of(shape if rng.random() < 0.7 else (), depth - 1)
            return f"({left} {op} {right})"
        if choice < 0.5:
            return f"{rng.choice(UNARY)}({self.of(shape, depth - 1)})"
        if choice < 0.58:
            return f"{rng.choice(['max', 'min'])}({self.of(shape, depth - 1)}, {self.of(shape, depth - 1)})"
        if choice < 0.66:
            cond = self.condition(shape, depth - 1)
            a, c = self.of(shape, depth - 1), self.of(shape, depth - 1)
            if rng.random() < 0.5 and cond[1]:
                self.b.features.add("if-scalar")
                return f"(if {cond[0]} then {a} else {c})"
            self.b.features.add("where")
            return f"where({cond[0]}, {a}, {c})"
        if choice < 0.74 and not shape:
            vec = (self.b.dim(),)
            self.b.features.add("reduction")
            return f"{rng.choice(['sum', 'mean', 'amax', 'amin', 'logsumexp'])}({self.of(vec, depth - 1)})"
        if choice < 0.82 and len(shape) == 1:
            w = self.b.param((shape[0], shape[0]))
            self.b.features.add("matmul-param")
            return f"({self.of(shape, depth - 1)} @ {w})" if rng.random() < 0.5 else f"({w} @ {self.of(shape, depth - 1)})"
        if choice < 0.88:
            return self.helper(shape, depth)
        if choice < 0.94:
            p = self.b.param(shape if rng.random() < 0.7 else ())
            return f"({self.of(shape, depth - 1)} * {p})"
        return f"{rng.choice(SQUASH)}({self.of(shape, depth - 1)})"

    def condition(self, shape: tuple, depth: int) -> tuple:
        """(text, is_scalar): a bool, compile-time sometimes (a comparison of dims/literals)."""
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            self.b.features.add("compile-time-condition")
            d = self.b.dim()
            return rng.choice([f"{d} > 1", f"{d} == 2", "1 < 2", "true", "false", f"not ({d} < 3)"]), True
        scalar = not shape or rng.random() < 0.4
        x = self.of(() if scalar else shape, depth)
        return f"{x} {rng.choice(['>', '<', '>=', '<='])} {self.leaf(())}", scalar

    def helper(self, shape: tuple, depth: int) -> str:
        name = self.b.fresh("fh")
        body = self.rng.choice(["tanh(a + 0.5 * b)", "a * sigmoid(b)", "max(a, b) - 0.5 * min(a, b)",
                                "if true then a else b"])
        self.b.fns.append(f"fn {name}(a, b) {{ return {body}; }}")
        self.b.features.add("fn")
        return f"{name}({self.of(shape, depth - 1)}, {self.of(shape, depth - 1)})"

    def leaf(self, shape: tuple) -> str:
        options = list(self.leaves.get(shape, []))
        rng = self.rng
        if not options or rng.random() < 0.15:
            lit = rng.choice(["0.5", "2", "-1", "0.25", "1", "2.0"])
            return lit if not shape else f"({lit} * ones({', '.join(shape)}))"
        return rng.choice(options)


def part_nonassoc(b: Builder) -> Part:
    """1-2 fields whose combine is a random (bounded) expression: a tree scan."""
    count = b.rng.choice([1, 1, 2])
    fields = []
    for _ in range(count):
        fields.append((b.fresh("t"), b.fdt(), b.shape(1)))
    leaves = {}
    for n, _, s in fields:
        leaves.setdefault(s, []).extend([f"l.{n}", f"r.{n}"])
    ex = Expr(b, leaves)
    lets = []
    if b.rng.random() < 0.3:
        n0, _, s0 = fields[0]
        let = b.fresh("e")
        lets.append((let, ex.of(s0, 2)))
        leaves.setdefault(s0, []).append(let)
    comb = [f"{b.rng.choice(SQUASH)}({ex.of(s, 3)})" for _, _, s in fields]
    lift = [b.source(s, dtype=dt) for _, dt, s in fields]
    ident = None
    if b.rng.random() < 0.4:
        ident = ["zeros" if s else "0.0" for _, _, s in fields]
    reads = [(f"s.{n}", dt, s) for n, dt, s in fields]
    b.features.add("non-associative")
    return Part(fields, lift, comb, ident, reads, lets=lets, associative=False, feature="random-combine")


# ============================================================================ whole ops
def generate(seed: int) -> Program:
    return generate_with(random.Random(seed), seed)


def _token_program(seed: int, rng, name: str) -> Program:
    b = Builder(rng, None)
    b.side.seed(seed ^ SIDE_SALT)
    parts, fields = [], 0
    budget = rng.choice([1, 2, 2, 3, 3])
    while fields < budget:
        if rng.random() < 0.2:
            maker = part_nonassoc
        else:
            maker = rng.choice(ASSOCIATIVE)
        need = FIELD_COUNT.get(maker, 1)
        if parts and fields + need > 3:
            break
        part = maker(b)
        parts.append(part)
        fields += len(part.fields)
        b.features.add(part.feature)
    return _assemble(seed, rng, name, b, parts)


def _assemble(seed, rng, name, b: Builder, parts: list) -> Program:
    fields = [f for p in parts for f in p.fields]
    identity_known = all(p.identity is not None for p in parts)
    declare_identity = identity_known and rng.random() < 0.8
    has_lift = b.lift_inputs or rng.random() < 0.8  # else: inputs are the fields themselves
    no_lift = not has_lift and all(not p.lets for p in parts) and _lift_is_plain(parts)

    # readout
    readout_inputs, outs, exclusive = [], None, False
    reads = [r for p in parts for r in p.reads]
    if rng.random() >= 0.15:  # else no readout: the output is the state
        exclusive = declare_identity and rng.random() < 0.4
        if exclusive:  # the first position reads the identity: no read that is 0/0 or log(0) there
            reads = [r for p in parts if p.feature not in UNDEFINED_AT_IDENTITY for r in p.reads] or None
            exclusive = reads is not None
            reads = reads or [r for p in parts for r in p.reads]
        chosen = rng.sample(reads, k=min(len(reads), rng.choice([1, 1, 2])))
        outs = []
        for expr, dt, shape in chosen:
            expr = expr.replace("s.", "p.") if exclusive else expr
            if dt.startswith("f") and rng.random() < 0.6:
                expr, _ = _readout_extra(b, rng, expr, shape, readout_inputs)
            elif dt.startswith("f") and len(shape) == 1 and rng.random() < 0.3:
                q = _readout_input(rng, readout_inputs, shape, b)
                expr = f"{q} @ {expr}" if rng.random() < 0.5 else f"sum({expr} * {q})"
            if dt.startswith("f") and rng.random() < 0.1:
                b.features.add("readout-index")
                expr = f"{expr} + 0.001 * index"
            outs.append(expr)
    if not b.lift_inputs and not readout_inputs and not no_lift:
        # no input at all would leave the layer without a time axis: read one token input
        y = _readout_input(rng, readout_inputs, (), b)
        outs = (outs if outs is not None else [f"{'p' if exclusive else 's'}.{n}" for n, _, _ in fields])
        outs = outs + [f"tanh({y})"]
    readout_body = None if outs is None else _tuple(outs, len(outs) == 1)
    if exclusive:
        b.features.add("exclusive")
    lines = [*dict.fromkeys(b.fns)]
    dims = sorted(b.dims)
    lines.append(f"op {name}{'[' + ', '.join(dims) + ']' if dims else ''} {{")
    for pname, dt, shape, init in b.params:
        lines.append(f"  param {pname}: {type_text(dt, shape)}{init};")
    lines.append(f"  state ({', '.join(f'{n}: {type_text(dt, s)}' for n, dt, s in fields)});")
    one = len(fields) == 1
    lift_exprs = [e for p in parts for e in p.lift]
    kinds = {}
    if no_lift:
        b.features.add("no-lift")
        for n, dt, s in fields:
            kinds[n] = "bool" if dt == "bool" else "int" if dt.startswith("i") else "signed"
        # decays: a field that is multiplied keeps its values near 1
        for p in parts:
            if p.feature in ("product", "diag-affine"):
                kinds[p.fields[0][0]] = "gate"
    else:
        args = ", ".join(f"{n}: {type_text(dt, s)}" for n, dt, s, _ in b.lift_inputs)
        if not b.lift_inputs:
            b.features.add("lift-no-inputs")
        lines.append(f"  lift ({args}) {{ return {_tuple(lift_exprs, one)}; }}")
        kinds.update({n: k for n, _, _, k in b.lift_inputs})
    lets = [f"let {n} = {e};" for p in parts for n, e in p.lets]
    comb = [e for p in parts for e in p.combine]
    lines.append(f"  combine (l, r) {{ {' '.join(lets)}{' ' if lets else ''}return {_tuple(comb, one)}; }}")
    if declare_identity:
        lines.append(f"  identity = {_tuple([e for p in parts for e in p.identity], one)};")
        if not all(p.associative for p in parts):  # a random combine's "identity" is the empty prefix only
            lines.append("  assume empty_prefix;")
    if readout_body is not None:
        args = "".join(f", {n}: {type_text(dt, s)}" for n, dt, s, _ in readout_inputs)
        lines.append(f"  readout{' exclusive' if exclusive else ''} ({'p' if exclusive else 's'}{args}) "
                     f"{{ return {readout_body}; }}")
        kinds.update({n: k for n, _, _, k in readout_inputs})
    lines.append("}")
    b.features.add(f"fields-{len(fields)}")
    b.features.update(f"dtype-{dt}" for _, dt, _ in fields)
    b.features.update(f"rank-{len(s)}" for _, _, s in fields)
    if any(p.associative is False for p in parts):
        b.features.add("tree")
    b.features.add("identity" if declare_identity else "no-identity")
    return Program(seed, name, "\n".join(lines) + "\n", dict(b.dims), kinds, frozenset(b.features))


def _lift_is_plain(parts) -> bool:
    """Inputs can be the fields themselves when the families need no special lift values."""
    return all(p.feature in ("sum", "max", "min", "product", "diag-affine", "first", "last", "random-combine",
                             "segmented")
               for p in parts) and not any(p.feature == "matrix-affine" for p in parts)


def _readout_input(rng, readout_inputs: list, shape: tuple, b: Builder) -> str:
    for n, dt, s, k in readout_inputs:
        if s == shape and rng.random() < 0.5:
            return n
    name = b.fresh("y")
    readout_inputs.append((name, b.fdt(), shape, "signed"))
    return name


def _readout_extra(b: Builder, rng, expr: str, shape: tuple, readout_inputs: list):
    b.features.add("readout-inputs")
    if rng.random() < 0.3 and b.lift_inputs and not b.chunk:
        n, dt, s, k = rng.choice(b.lift_inputs)
        if s == shape and dt != "bool":
            if all(n != m for m, _, _, _ in readout_inputs):
                readout_inputs.append((n, dt, s, k))
            return f"{expr} + {n}", n  # a lift input read again by the readout
    y = _readout_input(rng, readout_inputs, shape if rng.random() < 0.7 else (), b)
    return rng.choice([f"{expr} * {y}", f"{expr} + {y}", f"tanh({expr}) - {y}"]), y


def _tuple(exprs: list, one: bool) -> str:
    return exprs[0] if one else f"({', '.join(exprs)})"


# ============================================================================ chunk ops
def _chunk_program(seed, rng, name) -> Program:
    """`chunk C;` ops: a chunk of tokens is lifted to a summary; the exclusive readout maps each
    token of the chunk to an output, causally."""
    b = Builder(rng, "C")
    b.side.seed(seed ^ SIDE_SALT)
    d = b.dim()
    c = rng.choice(["C", "1", "2", "3"])
    b.features.add("chunk")
    b.max_lift_inputs = 1
    x = b.fresh("x")
    dt = b.fdt()
    lines = []
    kind = rng.random()
    chunk_shape = f"[{c}, {d}]" if c != "C" else f"[C, {d}]"
    fields, lift, comb, ident = [], [], [], []
    if kind < 0.5:
        fields, lift = [("s", dt, f"[{d}]")], [f"sum({x}, axis=0)"]
        comb, ident = ["l.s + r.s"], ["zeros"]
        read = "p.s"
        b.features.add("chunk-sum")
    elif kind < 0.8:
        fields = [("a", dt, ""), ("s", dt, f"[{d}]")]
        lift = ["0.8", f"mean({x}, axis=0)"]
        comb, ident = ["l.a * r.a", "r.a * l.s + r.s"], ["1.0", "zeros"]
        read = "p.s"
        b.features.add("chunk-decay")
    else:
        fields, lift = [("X", dt, chunk_shape)], [x]
        comb, ident = ["tanh(0.5 * l.X + r.X)"], ["zeros"]
        read = f"mean(p.X, axis=0)"
        b.features.add("chunk-tree")
    y = b.fresh("y")
    readout = rng.choice([f"{y} * {read}", f"{y} + {read}", f"tanh({y}) - {read}",
                          f"attention({y}, {y}, {y}, causal=true) + {read}"])
    if "attention" in readout:
        b.features.add("attention")
    if c == "C":
        b.dims["C"] = rng.randint(1, 3)
    dims = sorted(b.dims)
    lines.append(f"op {name}[{', '.join(dims)}] {{")
    lines.append(f"  chunk {c};")
    lines.append(f"  state ({', '.join(f'{n}: {t}{s}' for n, t, s in fields)});")
    one = len(fields) == 1
    lines.append(f"  lift ({x}: {dt}{chunk_shape}) {{ return {_tuple(lift, one)}; }}")
    lines.append(f"  combine (l, r) {{ return {_tuple(comb, one)}; }}")
    lines.append(f"  identity = {_tuple(ident, one)};")
    lines.append("  assume empty_prefix;")  # the chunk combines need not have it as an identity
    lines.append(f"  readout exclusive (p, {y}: {b.fdt()}{chunk_shape}) {{ return {readout}; }}")
    lines.append("}")
    return Program(seed, name, "\n".join(lines) + "\n", dict(b.dims), {x: "signed", y: "signed"},
                   frozenset(b.features))


# ============================================================================ low-rank ops
# E spellings over k (a unit key), a, b (signed), w (a per-key log gate), g (a scalar log
# gate), beta (a write strength in [0, 1]): the delta rule and its gated form, the
# diagonal-plus-low-rank forms (RWKV-7, KDA, per-key gates, constant or scalar decays) and
# near misses that stay matrix-affine (rank two, no diagonal, a diagonal that may be negative)
LOW_RANK_E = (  # (rank-one terms of b, a are scaled to keep |1 + a^T b| near 1 over long sequences)
    ("eye({K}) - {beta} * outer({k}, {k})", "delta"),
    ("exp({g}) * (eye({K}) - {beta} * outer({k}, {k}))", "delta"),
    ("diag(exp({w})) + 0.25 * outer({b}, {a})", "dplr"),
    ("(eye({K}) - {beta} * outer({k}, {k})) @ diag(exp({w}))", "dplr"),
    ("diag(exp({w})) @ (eye({K}) - {beta} * outer({k}, {k}))", "dplr"),
    ("exp({w})[:, None] * (eye({K}) + 0.25 * outer({b}, {a}))", "dplr"),
    ("0.9 * eye({K}) + 0.25 * outer({b}, {a})", "dplr"),
    ("exp({g}) * eye({K}) - 0.25 * {beta} * outer({b}, {a})", "dplr"),
    ("eye({K}) + 0.25 * outer({b}, {a})", "dplr"),
    ("diag(exp({w})) + 0.25 * outer({b}, {a}) + 0.125 * outer({a}, {b})", "rank-two"),
    ("0.5 * outer({b}, {a})", "no-diagonal"),
    ("diag(tanh({w} + 1.0)) + 0.25 * outer({b}, {a})", "signed-diagonal"),  # log(d) undefined: generic
)


def _low_rank_program(seed, rng, name) -> Program:
    """(E, S) composed as affine maps S -> E S + F with E from LOW_RANK_E and F = c * outer(k, v),
    read out as q @ S (times a constant; sometimes exclusive or squashed, which no fast path
    takes): the identity-plus-low-rank and diagonal-plus-low-rank classes and their fast paths."""
    b = Builder(rng, None)
    dt = b.float_dtype
    K, V = "K", rng.choice(["V", "K"])
    b.dims["K"] = rng.randint(1, 3)
    b.dims.setdefault(V, rng.randint(1, 3))
    e_text, family = rng.choice(LOW_RANK_E)
    names = {"k": ("k", (K,), "unit_vector"), "a": ("a", (K,), "signed"), "b": ("b", (K,), "signed"),
             "w": ("w", (K,), "log_gate"), "g": ("g", (), "log_gate"), "beta": ("beta", (), "unit")}
    used = [n for n in names if "{" + n + "}" in e_text]
    write = rng.choice(["outer({k}, {v})", "{beta} * outer({k}, {v})", "outer({k} + {a}, {v})"])
    if family == "delta":
        write = "{beta} * outer({k}, {v})"
    used += [n for n in names if "{" + n + "}" in write and n not in used]
    inputs = [names[n] for n in used] + [("v", (V,), "signed")]
    refs = {n: n for n in names} | {"v": "v", "K": K}
    readout = rng.choice(["q @ {S}", "q @ {S}", "q @ {S} * K ** -0.5", "2.0 * (q @ {S})", "q @ {S} / 3.0",
                          "tanh(q @ {S})"])
    if rng.random() < 0.3:  # terms that read no state: the fast paths add them (class piece `extra`)
        readout = rng.choice(["{R} + 0.125", "{R} + 0.5 * sum(q * q)", "0.25 * tanh(sum(q)) - {R}"]).replace(
            "{R}", f"({readout})")
        b.features.add("low-rank-extra")
    exclusive = rng.random() < 0.15
    order = rng.random() < 0.5  # (E, S) or (S, E)
    fields = [("E", f"{dt}[{K}, {K}]"), ("S", f"{dt}[{K}, {V}]")]
    lifts = [e_text.format(**refs), write.format(**refs)]
    combines = ["r.E @ l.E", "r.E @ l.S + r.S"]
    idents = [f"eye({K})", "zeros"]
    if order:
        fields, lifts, combines, idents = (x[::-1] for x in (fields, lifts, combines, idents))
    b.features.update({"low-rank", f"low-rank-{family}"})
    if exclusive:
        b.features.add("exclusive")
    dims = sorted(b.dims)
    lines = [f"op {name}[{', '.join(dims)}] {{",
             f"  state ({', '.join(f'{n}: {t}' for n, t in fields)});",
             f"  lift ({', '.join(f'{n}: {dt}{shape_text(s)}' for n, s, _ in inputs)}) "
             f"{{ return ({', '.join(lifts)}); }}",
             f"  combine (l, r) {{ return ({', '.join(combines)}); }}",
             f"  identity = ({', '.join(idents)});",
             f"  readout{' exclusive' if exclusive else ''} (s, q: {dt}[{K}]) "
             f"{{ return {readout.format(S='s.S')}; }}",
             "}"]
    kinds = {n: kind for n, _, kind in inputs} | {"q": "signed"}
    return Program(seed, name, "\n".join(lines) + "\n", dict(b.dims), kinds, frozenset(b.features))


LINEAR_ATTENTION_DECAYS = {  # decay kind -> spellings of a decay known >= 0 (gate g: [] or [K])
    "scalar": ("exp(g)", "sigmoid(g)", "exp(-softplus(g))", "g * g"),
    "key": ("exp(g)", "sigmoid(g)", "exp(g - 0.5)", "1 / (1 + exp(-g))"),
}


def _linear_attention_program(seed, rng, name) -> Program:
    """Decayed linear attention S -> a * S + c * outer(k, v), with no decay, a scalar one or a
    per-key one (spelled exp(g), sigmoid(g), ...: known >= 0), read out as q @ S times a
    constant plus terms that read no state; a third exclusive (q @ S_{t-1}), half of those with
    RWKV-6's bonus inside the product, r @ (p.S + outer(u * k, v)); or, as mLSTM, a normaliser
    n = a * n + c * k beside S, the readout a function of q @ S and q @ n (or tanh of q @ S):
    the decayed-linear-attention class and its chunkwise fast path. A near miss, a decay of
    unknown sign, must stay off it (feature `linear-attention-miss`)."""
    b = Builder(rng, None)
    dt = b.float_dtype
    V = rng.choice(["V", "K"])
    b.dims["K"] = rng.randint(1, 3)
    b.dims.setdefault(V, rng.randint(1, 3))
    miss = rng.random() < 0.1  # a decay of unknown sign
    kind = rng.choice(["scalar", "key"] if miss else ["none", "scalar", "key", "key"])
    inputs = [("k", ("K",), "signed"), ("v", (V,), "signed")]
    reads = not miss and rng.random() < 0.3  # mLSTM: a normaliser state read beside S
    writes = ["outer(k, v)", "outer(k, v)", "beta * outer(k, v)", "outer(beta * k, v)"]
    write = rng.choice(writes if reads else writes + ["outer(k, v) / 2.0"])
    if "beta" in write:
        inputs.append(("beta", (), "unit"))
    fields, lifts, combines, idents = [("S", f"{dt}[K, {V}]")], [write], ["l.S + r.S"], ["zeros"]
    if reads:
        fields.append(("n", f"{dt}[K]"))
        lifts.append("beta * k" if "beta" in write else "k")
        combines.append("l.n + r.n")
        idents.append("zeros")
    if kind != "none":
        shape = () if kind == "scalar" else ("K",)
        decay = rng.choice(LINEAR_ATTENTION_DECAYS[kind])
        if miss:  # a gate in (0.6, 1) whose sign the compiler cannot know
            decay, gate_kind = "g", "gate"
        else:
            gate_kind = "log_gate" if decay.startswith("exp(g") else "signed"
        inputs.append(("g", shape, gate_kind))
        scaled = "r.a * l.S" if kind == "scalar" else "r.a[:, None] * l.S"
        fields.insert(0, ("a", f"{dt}{shape_text(shape)}"))
        lifts.insert(0, decay)
        combines = ["l.a * r.a", rng.choice([f"{scaled} + r.S", f"r.S + {scaled}"])] + \
            (["r.a * l.n + r.n"] if reads else [])
        idents = ["ones", "zeros"] + (["zeros"] if reads else [])
        if rng.random() < 0.5:
            fields, lifts, combines, idents = (x[::-1] for x in (fields, lifts, combines, idents))
    exclusive = not reads and rng.random() < 0.35
    state = "p.S" if exclusive else "s.S"
    readout = rng.choice(["q @ {S}", "q @ {S} * K ** -0.5", "(q @ {S}) / 2.0", "2.0 * (q @ {S})"])
    readout_inputs = [("q", ("K",), "signed")]
    if reads:
        readout = rng.choice(["(q @ {S}) / max(abs(q @ s.n), 1.0)", "(q @ {S}) * tanh(q @ s.n)",
                              "(q @ {S}) / (abs(sum(s.n * q)) + 1.0)"])
        b.features.add("linear-attention-reads")
    if exclusive and rng.random() < 0.5:  # RWKV-6: the bonus inside the product
        readout = "q @ ({S} + outer(u * k, v))"
        readout_inputs += [("u", ("K",), "signed"), ("k", ("K",), "signed"), ("v", (V,), "signed")]
        b.features.add("linear-attention-bonus")
    if rng.random() < 0.3:
        readout = rng.choice(["{R} + 0.125", "{R} + 0.5 * sum(q * q)", "0.25 * tanh(sum(q)) - {R}"]).replace(
            "{R}", f"({readout})")
    if not reads and "linear-attention-bonus" not in b.features and rng.random() < 0.15:
        # any function of the read (not yet one of a sum inside the product): after the chunk pass
        readout = f"tanh({readout})"
        b.features.add("linear-attention-squashed")
    if miss:
        b.features.add("linear-attention-miss")
    b.features.update({"linear-attention", f"linear-attention-{kind}"})
    if exclusive:
        b.features.update({"exclusive", "linear-attention-exclusive"})
    args = ", ".join(f"{n}: {dt}{shape_text(sh)}" for n, sh, _ in readout_inputs)
    one = len(fields) == 1
    lines = [f"op {name}[{', '.join(sorted(b.dims))}] {{",
             f"  state ({', '.join(f'{n}: {t}' for n, t in fields)});",
             f"  lift ({', '.join(f'{n}: {dt}{shape_text(sh)}' for n, sh, _ in inputs)}) "
             f"{{ return {_tuple(lifts, one)}; }}",
             f"  combine (l, r) {{ return {_tuple(combines, one)}; }}",
             f"  identity = {_tuple(idents, one)};",
             f"  readout{' exclusive' if exclusive else ''} ({'p' if exclusive else 's'}, {args}) "
             f"{{ return {readout.format(S=state)}; }}",
             "}"]
    kinds = {n: kind_ for n, _, kind_ in inputs + readout_inputs}
    return Program(seed, name, "\n".join(lines) + "\n", dict(b.dims), kinds, frozenset(b.features))


def _delta_product_program(seed, rng, name) -> Program:
    """A product of r = 2 or 3 delta steps per token (DeltaProduct; gated or not): E = [g *]
    M_r @ ... @ M_1 with M_j = I - b_j * outer(k_j, k_j), and S's update the steps composed,
    spelled nested (Horner), as a sum of chained products, or with the write strengths moved
    around; the matrices sometimes `let`-bound; the steps' k, v, b as inputs of their own or as
    rows of one [r, K] (k[0], k[1], ...). A near miss (a write that skips the later steps' M) is
    matrix-affine: no fast path may claim it."""
    b = Builder(rng, None)
    dt = b.float_dtype
    V = rng.choice(["V", "K"])
    b.dims["K"] = rng.randint(1, 3)
    b.dims.setdefault(V, rng.randint(1, 3))
    r = rng.choice([2, 2, 3])
    named = rng.random() < 0.5
    lets = [f"let m{j} = eye(K) - b{j} * outer(k{j}, k{j});" for j in range(1, r + 1)] if named else []
    m = [f"m{j}" if named else f"(eye(K) - b{j} * outer(k{j}, k{j}))" for j in range(1, r + 1)]
    gated = rng.random() < 0.5
    chain = " @ ".join(reversed(m))
    e = chain if not gated else rng.choice([f"exp(g) * ({chain})", " @ ".join(reversed(m[1:])) + f" @ (exp(g) * {m[0]})"])
    miss = rng.random() < 0.15
    spelling = rng.choice(["horner", "sum", "scaled"])
    if spelling == "horner":
        update = f"b1 * outer(k1, v1)"
        for j in range(2, r + 1):
            update = f"{m[j - 1]} @ ({update}) + b{j} * outer(k{j}, v{j})"
    else:
        terms = []
        for j in range(1, r + 1):
            later = " @ ".join(reversed(m[j:]))
            write = f"outer(k{j}, b{j} * v{j})" if spelling == "scaled" else f"b{j} * outer(k{j}, v{j})"
            if later and spelling == "scaled":
                terms.append(f"b{j} * ({later} @ outer(k{j}, v{j}))")
            else:
                terms.append(f"{later} @ ({write})" if later else write)
        update = " + ".join(terms)
    if miss:  # the first write skips the later steps: not the steps composed
        update = " + ".join(f"b{j} * outer(k{j}, v{j})" for j in range(1, r + 1))
    inputs = [x for j in range(1, r + 1) for x in ((f"k{j}", "[K]", "unit_vector"), (f"v{j}", f"[{V}]", "signed"),
                                                   (f"b{j}", "", "unit"))]
    if rng.random() < 0.3:  # the steps as rows of one input each: k: [r, K], k[0] the first step's key
        inputs = [("k", f"[{r}, K]", "unit_vector"), ("v", f"[{r}, {V}]", "signed"), ("b", f"[{r}]", "unit")]
        for j in range(r, 0, -1):  # (k12 is not a step of its own: the highest index first)
            lets = [line.replace(f"k{j}", f"k[{j - 1}]").replace(f"b{j}", f"b[{j - 1}]") for line in lets]
            e = e.replace(f"k{j}", f"k[{j - 1}]").replace(f"b{j}", f"b[{j - 1}]")
            update = update.replace(f"k{j}", f"k[{j - 1}]").replace(f"v{j}", f"v[{j - 1}]").replace(f"b{j}",
                                                                                                f"b[{j - 1}]")
        b.features.add("low-rank-delta-product-rows")
    if gated:
        inputs.append(("g", "", "log_gate"))
    readout = rng.choice(["q @ s.S", "q @ s.S", "q @ s.S * K ** -0.5", "2.0 * (q @ s.S)"])
    if rng.random() < 0.25:  # a term that reads no state: the fast path adds it to the last step's outputs
        readout = rng.choice(["{R} + 0.125", "{R} + 0.5 * sum(q * q)"]).replace("{R}", f"({readout})")
        b.features.add("low-rank-extra")
    b.features.update({"low-rank", "low-rank-delta-product-miss" if miss else "low-rank-delta-product"})
    dims = sorted(b.dims)
    lines = [f"op {name}[{', '.join(dims)}] {{",
             f"  state (E: {dt}[K, K], S: {dt}[K, {V}]);",
             f"  lift ({', '.join(f'{n}: {dt}{shape}' for n, shape, _ in inputs)}) {{",
             *(f"    {line}" for line in lets),
             f"    return ({e}, {update});",
             "  }",
             "  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }",
             "  identity = (eye(K), zeros);",
             f"  readout (s, q: {dt}[K]) {{ return {readout}; }}",
             "}"]
    kinds = {n: kind for n, _, kind in inputs} | {"q": "signed"}
    return Program(seed, name, "\n".join(lines) + "\n", dict(b.dims), kinds, frozenset(b.features))


class DrawRandom(random.Random):
    """A `random.Random` whose every choice is drawn by hypothesis: the generator unchanged,
    its decisions shrinkable (towards 0.0, the first option, the smallest integer)."""

    def __init__(self, draw):
        super().__init__(0)
        self.draw = draw  # hypothesis's draw (of st.composite)

    def random(self) -> float:
        from hypothesis import strategies as st
        return self.draw(st.floats(0.0, 1.0, exclude_max=True))

    def randrange(self, start, stop=None, step=1):
        from hypothesis import strategies as st
        if stop is None:
            start, stop = 0, start
        return start + step * self.draw(st.integers(0, (stop - start - 1) // step))

    def randint(self, a, b):
        return self.randrange(a, b + 1)

    def choice(self, seq):
        return seq[self.randrange(len(seq))]

    def sample(self, population, k):
        pool = list(population)
        return [pool.pop(self.randrange(len(pool))) for _ in range(k)]


def generate_with(rng: random.Random, seed: int = 0) -> Program:
    """`generate` with the choices from `rng` (a DrawRandom under hypothesis)."""
    name = f"g{seed}"
    if rng.random() < 0.12:
        return _chunk_program(seed, rng, name)
    # (a draw from the side stream: every earlier seed's program stays as it was)
    if random.Random(seed ^ LOW_RANK_SALT).random() < LOW_RANK_RATE:
        if random.Random(seed ^ DELTA_PRODUCT_SALT).random() < DELTA_PRODUCT_RATE:
            return _delta_product_program(seed, rng, name)
        return _low_rank_program(seed, rng, name)
    if seed >= LINEAR_ATTENTION_FROM and random.Random(seed ^ LINEAR_ATTENTION_SALT).random() < LINEAR_ATTENTION_RATE:
        return _linear_attention_program(seed, rng, name)
    return _token_program(seed, rng, name)


def programs():
    """A hypothesis strategy over generated programs, shrinking choice by choice."""
    from hypothesis import strategies as st
    return st.composite(lambda draw: generate_with(DrawRandom(draw)))()


if __name__ == "__main__":  # print a few: python tests/fuzz/generator.py [first seed] [count]
    import sys
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    for s in range(first, first + (int(sys.argv[2]) if len(sys.argv) > 2 else 5)):
        print(generate(s).text)
