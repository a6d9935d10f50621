"""Dead-field elimination for streams (psmc.analysis.liveness): a field of the running prefix
that feeds only its own next value, and nothing the readout reads, is left out of stream
states once the prefix is the left operand (exact scans); tree scans keep every field.

The parallel == streaming == continued agreement for every example is test_examples_agree;
here: which fields are dead (derived, per example and for small programs written to probe the
dataflow rule), the bytes a state holds, and the outputs of a layer with the elimination
switched off (the same generated class with `spec.dead = ()`) against the default one.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from layer_cases import CASES
from layer_harness import as_tuple, assert_agree, layer_class, make_inputs, stream, time_slice
from psmc.analysis.liveness import dataflow, dead_fields, live_fields, stream_dead_fields
from psmc.ir import ops_from_source

# what the dataflow rule must find in the examples (derived by hand from each combine/readout)
EXPECTED_DEAD = {
    "delta_rule": ("E",), "gated_delta_rule": ("E",), "gated_delta_product": ("E",), "kda": ("E",),
    "rwkv7": ("E",),  # r.E @ l.E: the transition
    "gla": ("a",), "simple_gla": ("a",), "rwkv6": ("a",), "selective_ssm": ("a",), "mamba2": ("a",),  # decays
    "linear_recurrence": ("a",), "retention": ("g",), "mlstm": ("f",),
    "segmented_sum": ("f",),  # the reset flag: r.f decides, l.f only feeds l.f | r.f
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dead_fields_of_every_example(name):
    op = next(o for o in ops_from_source(CASES[name].path.read_text(), str(CASES[name].path)) if o.name == name)
    assert dead_fields(op) == EXPECTED_DEAD.get(name, ())
    assert set(live_fields(op)) | set(dead_fields(op)) == {f.name for f in op.state}
    plan = "tree-scan" if CASES[name].tree else "exact-scan"
    assert stream_dead_fields(op, plan) == (() if CASES[name].tree else
                                             tuple(i for i, f in enumerate(op.state) if f.name in dead_fields(op)))


PROBES = {
    # b reads l.a, the readout reads b: a is live through b
    "chain": ("state (a: f32, b: f32);", "(l.a * r.a, r.a * l.b + l.a * r.b)", "s.b", ()),
    # c feeds only a, a feeds only itself and c: both dead although they read each other
    "cycle": ("state (a: f32, c: f32, h: f32);", "(l.c * r.a, l.a + r.c, r.a * l.h + r.h)", "s.h", ("a", "c")),
    # the readout reads a itself
    "read": ("state (a: f32, h: f32);", "(l.a * r.a, r.a * l.h + r.h)", "s.h + s.a", ()),
    # h reads only right fields: the prefix needs no field but h itself... which h does not read
    "reset": ("state (a: f32, h: f32);", "(l.a * r.a, r.h + r.a)", "s.h", ("a",)),
}


def probe_op(state: str, combine: str, readout: str):
    width = state.count(":")
    lifts = ", ".join(["x"] * width)
    source = f"""op probe {{
  {state}
  lift (x: f32) {{ return ({lifts}); }}
  combine (l, r) {{ return {combine}; }}
  readout (s) {{ return {readout}; }}
}}
"""
    return ops_from_source(source, "<probe>")[0]


@pytest.mark.parametrize("name", sorted(PROBES))
def test_dataflow_rule_on_probe_programs(name):
    state, combine, readout, dead = PROBES[name]
    op = probe_op(state, combine, readout)
    assert dead_fields(op) == dead
    graph = dataflow(op)
    assert set(graph.nodes) == {f.name for f in op.state} | {"readout"}


def test_a_readout_of_no_field_keeps_every_field():
    op = probe_op("state (a: f32, h: f32);", "(l.a * r.a, r.a * l.h + r.h)", "1.0")
    assert dead_fields(op) == ("a", "h") and stream_dead_fields(op, "exact-scan") == ()


# ------------------------------------------------------------------ states of generated layers

B, H = 2, 3
SIZES = [  # op, dims, lanes, the floats one stream state holds (per batch row and lane)
    ("selective_ssm", {"N": 4}, (H,), 4),  # h: N (was 2N: the decay product a)
    ("gla", {"K": 3, "V": 2}, (H,), 3 * 2),  # S: K V (was K + K V)
    ("delta_rule", {"K": 3, "V": 2}, (H,), 3 * 2),  # S: K V (was K^2 + K V)
    ("gated_delta_rule", {"K": 3, "V": 2}, (H,), 3 * 2),
]


def layer_and_inputs(name, dims, T, lanes, dead=None):
    cls = layer_class(name)
    if dead is not None:  # the same generated class with the elimination switched off
        # (and the delta-rule plan's own compact layout, spec.stream, with it)
        kept = tuple(f.name for i, f in enumerate(cls.spec.fields) if i not in dead)
        cls = type(cls.__name__, (cls,), {"spec": dataclasses.replace(cls.spec, kept=kept, compact=False)})
    torch.manual_seed(0)
    layer = cls(**dims).double()
    if dead is not None:  # the generic scan (a fast path's state layout is fixed when generated)
        layer.use_fast_path = False
    broadcast = tuple(tuple(False for _ in lanes) for _ in cls.spec.inputs)
    return layer, make_inputs(cls, dims, B, T, lanes, broadcast, seed=5, kinds=CASES[name].kinds)


@pytest.mark.parametrize("name, dims, lanes, floats", SIZES)
def test_stream_states_hold_only_live_fields(name, dims, lanes, floats):
    layer, inputs = layer_and_inputs(name, dims, 7, lanes)
    count_bytes = 8  # the int64 token count
    want = B * H * floats * 8 + count_bytes
    _, parallel = layer(**inputs, return_state=True)
    assert parallel.nbytes == want
    _, streamed = stream(layer, inputs, layer.init_state(), 0, 7)
    assert streamed.nbytes == want
    _, continued = layer(**time_slice(inputs, 3, 7), state=layer(**time_slice(inputs, 0, 3), return_state=True)[1],
                         return_state=True)
    assert continued.nbytes == want
    # and with the elimination switched off, the dead fields are back
    full, _ = layer_and_inputs(name, dims, 7, lanes, dead=())
    assert full(**inputs, return_state=True)[1].nbytes > want


@pytest.mark.parametrize("name, dims, lanes, floats", SIZES)
@pytest.mark.parametrize("fast", [True, False])
def test_outputs_equal_the_layer_that_keeps_every_field(name, dims, lanes, floats, fast):
    T, mid = 9, 4
    layer, inputs = layer_and_inputs(name, dims, T, lanes)
    full, _ = layer_and_inputs(name, dims, T, lanes, dead=())
    layer.use_fast_path = fast
    want = as_tuple(full(**inputs))
    assert_agree(as_tuple(layer(**inputs)), want, "parallel")
    assert_agree(stream(layer, inputs, layer.init_state(), 0, T)[0], want, "streamed")
    first, state = layer(**time_slice(inputs, 0, mid), return_state=True)
    rest = as_tuple(layer(**time_slice(inputs, mid, T), state=state))
    assert_agree(tuple(torch.cat([a, b], dim=1) for a, b in zip(as_tuple(first), rest)), want, "continued")
    assert_agree(stream(layer, inputs, state, mid, T)[0], tuple(w[:, mid:] for w in want), "streamed after a pass")


def test_tree_scan_states_keep_every_field():
    """ema's combine is not associative: a tree scan, whose roots are right operands too."""
    cls = layer_class("ema")
    assert cls.spec.scan == "tree" and cls.spec.dead == ()
    layer = cls().double()
    inputs = make_inputs(cls, {}, B, 11, (H,), tuple((False,) for _ in cls.spec.inputs), seed=6,
                         kinds=CASES["ema"].kinds)
    _, state = layer(**inputs, return_state=True)
    for root, fold in zip(state.roots, state.folds):
        assert root is None or all(t is not None for t in root)
        assert fold is None or all(t is not None for t in fold)
    _, streamed = stream(layer, inputs, layer.init_state(), 0, 11)
    assert all(t is not None for root in streamed.roots if root is not None for t in root)


CHUNK_OP = """
op decayed_chunk_sum[C] {
  chunk C;
  state (a: f32, h: f32);
  lift (x: f32[C], g: f32[C]) { return (exp(sum(g)), sum(x)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout exclusive (p, x: f32[C]) { return p.h + x; }
}
"""


def test_chunk_op_streams_keep_no_dead_field(tmp_path):
    """A chunk op's stream (ChunkStream) wraps the same exact-scan prefix: no decay product."""
    path = tmp_path / "chunk_sum.psm"
    path.write_text(CHUNK_OP)
    cls = layer_class("decayed_chunk_sum", path)
    assert cls.spec.scan == "exact" and cls.spec.dead == (0,)
    full_cls = type("Full", (cls,), {"spec": dataclasses.replace(cls.spec, kept=None)})
    gen = torch.Generator().manual_seed(7)
    T = 11
    inputs = {"x": torch.randn(B, T, H, generator=gen, dtype=torch.float64),
              "g": -torch.rand(B, T, H, generator=gen, dtype=torch.float64)}
    layer, full = cls(C=4).double(), full_cls(C=4).double()
    full.use_fast_path = False
    want = as_tuple(full(**inputs))
    assert_agree(as_tuple(layer(**inputs)), want, "parallel")
    streamed, state = stream(layer, inputs, layer.init_state(), 0, T)
    assert_agree(streamed, want, "streamed")
    assert state.inner.prefix[0] is None and state.inner.prefix[1].shape == (B, H)
    first, mid_state = layer(**time_slice(inputs, 0, 6), return_state=True)
    assert mid_state.inner.prefix[0] is None
    rest = as_tuple(layer(**time_slice(inputs, 6, T), state=mid_state))
    assert_agree(tuple(torch.cat([a, b], dim=1) for a, b in zip(as_tuple(first), rest)), want, "continued")
    _, full_state = stream(full, inputs, full.init_state(), 0, T)
    assert full_state.nbytes - state.nbytes == B * H * 8  # the scalar decay product per row and lane


def test_stream_and_dead_are_two_views_of_the_kept_fields():
    """Spec stores which fields a stream keeps (and whether its state drops the others or holds
    None in their slots); `stream` (the compact layout) and `dead` (the slotted one) derive from it."""
    from types import SimpleNamespace

    from psmc.runtime.layer import Spec
    fields = tuple(SimpleNamespace(name=n) for n in ("a", "S", "h"))
    spec = Spec("t", (), None, fields, (), (), (), (), (), "exact", False, False, False, False)
    assert (spec.stream, spec.dead) == (None, ())  # every field kept
    slotted = dataclasses.replace(spec, kept=("S", "h"))
    assert (slotted.stream, slotted.dead) == (None, (0,))
    compact = dataclasses.replace(slotted, compact=True)
    assert (compact.stream, compact.dead) == (("S", "h"), ())
    assert dataclasses.replace(compact, kept=None).stream is None
