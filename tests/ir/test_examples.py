"""Every shipped program lowers to typed IR; golden summaries pin down what a few of them mean.

A golden summary lists dims, chunk, params (with shape and initialiser), state fields, inputs
(call order), outputs and `render()` of every body, one fact a line, so that a change in the
front end's interpretation of the language shows up as a readable diff.
"""
from pathlib import Path

import pytest
import sympy

from psmc.ir import ops_from_file, ops_from_source
from psmc.ir.nodes import dim_symbol, render, walk

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.psm"))
ANALYSIS_OPS = sorted((ROOT / "tests/analysis/ops").glob("*.psm"))


def summary(op) -> str:
    dims = f"[{', '.join(op.dims)}]" if op.dims else ""
    lines = [f"op {op.name}{dims}" + (f" chunk {op.chunk}" if op.chunk is not None else "")]
    lines += [f"param {p} = {p.init}" for p in op.params]
    lines += [f"state {v}" for v in op.state]
    lines += [f"input {v}" for v in op.inputs]
    lines += [f"output {v}" for v in op.outputs]
    lines.append(f"exclusive={op.exclusive} lift={op.has_lift} readout={op.has_readout}")
    for part in ("lift", "combine", "identity", "readout"):
        nodes = getattr(op, part)
        if nodes is None:
            lines.append(f"{part}: none")
        for node in nodes or ():
            lines.append(f"{part}: {render(node)}")
    return "\n".join(lines)


@pytest.mark.parametrize("path", EXAMPLES + ANALYSIS_OPS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_program_lowers(path):
    ops = ops_from_file(path)
    assert ops
    for op in ops:
        assert len(op.lift) == len(op.state) == len(op.combine)
        assert len(op.readout) == len(op.outputs) >= 1
        if op.identity is not None:
            assert len(op.identity) == len(op.state)
        # every body's outputs have exactly the declared field types
        for part in ("lift", "combine") + (("identity",) if op.identity is not None else ()):
            for node, slot in zip(getattr(op, part), op.state):
                assert node.dtype == slot.dtype, (part, slot.name)
                assert tuple(map(sympy.expand, node.shape)) == tuple(map(sympy.expand, slot.shape))
        for node, out in zip(op.readout, op.outputs):
            assert (node.dtype, node.shape) == (out.dtype, out.shape)
        # combine reads only the two elements, params and dims: never an input or the position
        assert not {n.op for n in walk(op.combine)} & {"arg", "index"}
        assert {n.attrs[0] for n in walk(op.combine) if n.op == "field"} <= {"left", "right"}


def test_every_language_md_example_ships():
    names = {p.stem for p in EXAMPLES}
    assert {"gla", "running_argmax", "logcumsumexp", "delta_rule", "rwkv6", "ema", "tree_rnn",
            "transformer_psm"} <= names


GLA = """\
op gla[K, V]
state a: f32[K]
state S: f32[K, V]
input k: f32[K]
input v: f32[V]
input gk: f32[K]
input q: f32[K]
output out: f32[V]
exclusive=False lift=True readout=True
lift: exp(gk)
lift: outer(k, v)
combine: mul(left.a, right.a)
combine: add(mul(getitem(right.a, ('slice', 0, K), ('newaxis',)), left.S), right.S)
identity: fill(1, [K])
identity: fill(0, [K, V])
readout: div(matmul(q, state.S), sqrt(K))"""

RUNNING_ARGMAX = """\
op running_argmax
state v: f32
state i: i64
input x: f32
output out: i64
exclusive=False lift=True readout=True
lift: x
lift: index
combine: maximum(left.v, right.v)
combine: where(gt(right.v, left.v), right.i, left.i)
identity: none
readout: state.i"""

LOGCUMSUMEXP = """\
op logcumsumexp
state m: f32
state s: f32
input x: f32
output out: f32
exclusive=False lift=True readout=True
lift: x
lift: 1.0
combine: maximum(left.m, right.m)
combine: add(mul(left.s, exp(sub(left.m, maximum(left.m, right.m)))), \
mul(right.s, exp(sub(right.m, maximum(left.m, right.m)))))
identity: -inf
identity: 0.0
readout: add(state.m, log(state.s))"""

TREE_RNN = """\
op tree_rnn[D]
param W1: f32[D, D] = ('xavier',)
param W2: f32[D, D] = ('xavier',)
param b: f32[D] = ('zeros',)
state h: f32[D]
input h: f32[D]
output h: f32[D]
exclusive=False lift=False readout=False
lift: h
combine: tanh(add(add(matmul(left.h, W1), matmul(right.h, W2)), b))
identity: none
readout: state.h"""


@pytest.mark.parametrize("name,expected", [
    ("gla", GLA), ("running_argmax", RUNNING_ARGMAX), ("logcumsumexp", LOGCUMSUMEXP), ("tree_rnn", TREE_RNN),
])
def test_golden_summary(name, expected):
    (op,) = ops_from_file(ROOT / "examples" / f"{name}.psm")
    assert summary(op) == expected


def test_golden_node_types():
    (gla,) = ops_from_file(ROOT / "examples/gla.psm")
    readout = gla.readout[0]
    assert (readout.op, readout.dtype, readout.shape) == ("div", "f32", (dim_symbol("V"),))
    sqrt_k = readout.args[1]
    assert (sqrt_k.op, sqrt_k.dtype, sqrt_k.args[0].op, sqrt_k.args[0].dtype) == ("sqrt", "f32", "dim", "i64")
    (argmax,) = ops_from_file(ROOT / "examples/running_argmax.psm")
    assert [(n.op, n.dtype) for n in argmax.lift] == [("arg", "f32"), ("index", "i64")]
    assert argmax.combine[1].args[0].dtype == "bool"


TRANSFORMER_HEAD = """\
op transformer_psm[C, D, H] chunk C
param agg_qkv: f32[D, 3*D] = ('xavier',)
param agg_out: f32[D, D] = ('xavier',)
param agg_up: f32[D, 4*D] = ('xavier',)
param agg_down: f32[4*D, D] = ('xavier',)
param inf_qkv: f32[D, 3*D] = ('xavier',)
param inf_out: f32[D, D] = ('xavier',)
param inf_up: f32[D, 4*D] = ('xavier',)
param inf_down: f32[4*D, D] = ('xavier',)
state X: f32[C, D]
input x: f32[C, D]
output out: f32[C, D]
exclusive=True lift=True readout=True
lift: x
combine: getitem(add(add(concat(left.X, right.X, 0), matmul(attention(getitem(matmul(layernorm(\
concat(left.X, right.X, 0)), agg_qkv), ('slice', 0, 2*C), ('slice', 0, D)), """


def test_golden_transformer_psm():
    (op,) = ops_from_file(ROOT / "examples/transformer_psm.psm")
    text = summary(op)
    assert text.startswith(TRANSFORMER_HEAD)
    lines = text.splitlines()
    assert "identity: fill(0, [C, D])" in lines
    combine = next(line for line in lines if line.startswith("combine: "))
    readout = next(line for line in lines if line.startswith("readout: "))
    # the aggregator block is bidirectional and keeps the newer chunk's rows; the inference
    # block is causal over [prefix | chunk]
    assert combine.endswith("agg_down)), ('slice', C, 2*C), ('slice', 0, D))")
    assert combine.count(", H, False)") == 2 and ", H, True)" not in combine
    assert readout.startswith("readout: getitem(add(add(concat(state.X, x, 0), matmul(attention(")
    assert readout.count(", H, True)") == 2 and "agg_" not in readout
    # the IR is hash-consed: the fn body's repeated subexpressions are one node each
    ops = [n.op for n in walk(op.combine)]
    assert ops.count("concat") == 1 and ops.count("layernorm") == 2 and ops.count("attention") == 1
    # shape arithmetic: [C, 3D] split three ways, attention gives [2C, D], the slice keeps C rows
    attention = next(n for n in walk(op.combine) if n.op == "attention")
    C, D = dim_symbol("C"), dim_symbol("D")
    assert attention.shape == (2 * C, D)
    assert [a.shape for a in attention.args] == [(2 * C, D)] * 3
    # parameter count for D = 4: 2 blocks x (3D^2 + D^2 + 4D^2 + 4D^2)
    count = sum(sympy.prod(p.shape) for p in op.params).subs(D, 4)
    assert count == 2 * 12 * 16


def test_fn_inlining_checks_each_call_site():
    text = """
    fn twice(x) { return x + x; }
    op a[K] {
      state (s: f32, v: f32[K]);
      lift (u: f32, w: f32[K]) { return (twice(u), twice(w)); }
      combine (l, r) { return (l.s + r.s, twice(l.v) + r.v); }
    }"""
    (op,) = ops_from_source(text)
    assert [render(n) for n in op.lift] == ["add(u, u)", "add(w, w)"]
    assert [n.shape for n in op.lift] == [(), (dim_symbol("K"),)]


def test_defaults_without_lift_and_readout():
    (op,) = ops_from_source("op ema { state (y: f32); combine (l, r) { return 0.9 * l.y + 0.1 * r.y; } }")
    assert not op.has_lift and not op.has_readout
    assert [str(v) for v in op.inputs] == ["y: f32"] and [str(v) for v in op.outputs] == ["y: f32"]
    assert render(op.combine[0]) == "add(mul(0.9, left.y), mul(0.1, right.y))"


def test_shared_input_is_one_tensor():
    # rwkv6 names k and v in both lift and readout: one input each, in declaration order
    (op,) = ops_from_file(ROOT / "examples/rwkv6.psm")
    names = [v.name for v in op.inputs]
    assert len(names) == len(set(names))
    assert names[:3] == [v.name for v in op.lift_inputs]
    assert {"k", "v"} <= {v.name for v in op.readout_inputs}


def test_literal_promotion_and_casts():
    text = """
    op a {
      state (n: i64, x: f64, b: bool);
      lift (u: i32, w: f16) { return (u + 1, w * 2.0, u > 0); }
      combine (l, r) { return (l.n + r.n, l.x + r.x, l.b or r.b); }
      identity = (0, 0.0, false);
    }"""
    (op,) = ops_from_source(text)
    # i32 + literal stays i32 and is then cast to the i64 field; f16 * literal stays f16 -> f64
    assert [render(n) for n in op.lift] == ["cast(add(u, 1), i64)", "cast(mul(w, 2.0), f64)", "gt(u, 0)"]
    assert [n.dtype for n in op.identity] == ["i64", "f64", "bool"]


def test_broadcast_into_field_shape():
    (op,) = ops_from_source("op a[K] { state (x: f32[K]); lift (u: f32) { return u; } "
                            "combine (l, r) { return l.x + r.x; } identity = 0.0; }")
    assert render(op.lift[0]) == "broadcast(u)" and op.lift[0].shape == (dim_symbol("K"),)
    assert op.identity[0].shape == (dim_symbol("K"),)
