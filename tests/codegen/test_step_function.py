"""`layer.step_function(**token)`: the functional decode step over plain tensors (issue 13 item 7).

Over a stream of tokens it equals `layer.step` bit for bit in eager and closely under
torch.compile(fullgraph=True) (zero graph breaks, counted by torch._dynamo.explain); the ops
whose update needs the token count (tree scans, chunk ops, bodies that read `index`) are
refused with an error naming `step`; a call of another signature than the example's is an
error in eager and, retraced, under torch.compile. Backend "eager": Dynamo's capture is under
test, not Inductor's C++ builds (too slow for a small shared CI machine); benchmarks/step.py
times the Inductor-compiled function."""
from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo as dynamo

from layer_cases import CASES
from layer_harness import as_tuple, layer_class, make_inputs

# one op per step form: the chunkwise bound step (gla: key decay, retention: scalar decay with
# a per-sequence input broadcast over time), the first-order bound step (selective_ssm) and the
# delta rule (its compact stream layout, a runner given a _Call per token)
OPS = ["gla", "retention", "selective_ssm", "delta_rule"]
TOKENS = 5


def stream(name, batch=2):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    torch.manual_seed(0)
    layer = cls(**dims)
    inputs = make_inputs(cls, dims, batch, TOKENS, (2,), tuple((False,) for _ in cls.spec.inputs), seed=1,
                         kinds=case.kinds)
    inputs = {n: (x.float() if x.is_floating_point() else x) for n, x in inputs.items()}
    tokens = [{n: x[:, t] for n, x in inputs.items()} for t in range(TOKENS)]
    return layer, tokens


def run_step(layer, tokens):
    return run_step_from(layer, layer.init_state(), tokens)


def run_tokens(advance, tokens, state):
    """Each token through `advance(state, token) -> (out, state)`: outputs and the last state."""
    outs = []
    for token in tokens:
        out, state = advance(state, token)
        outs.append(as_tuple(out))
    return outs, state


def run_function(fn, tokens, state_tensors=()):
    return run_tokens(lambda state, token: fn(state, *token.values()), tokens, state_tensors)


@pytest.mark.parametrize("name", OPS)
def test_equals_step_bit_for_bit_in_eager(name):
    layer, tokens = stream(name)
    fn = layer.step_function(**tokens[0])
    want, state = run_step(layer, tokens)
    got, tensors = run_function(fn, tokens)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    assert len(tensors) == len(state.tensors()) >= 1
    assert all(torch.equal(a, b) for a, b in zip(tensors, state.tensors()))
    # continuing a state made by forward (its tensors()), positional example inputs
    fn2 = layer.step_function(*tokens[0].values())
    _, state2 = layer(**{n: x.unsqueeze(1) for n, x in tokens[0].items()}, return_state=True)
    want_rest, _ = run_step_from(layer, state2, tokens[1:])
    got_rest, _ = run_function(fn2, tokens[1:], state2.tensors())
    for g, w in zip(got_rest, want_rest):
        assert all(torch.equal(a, b) for a, b in zip(g, w))


def run_step_from(layer, state, tokens):
    return run_tokens(lambda state, token: layer.step(state, **token), tokens, state)


@pytest.mark.parametrize("name", OPS)
def test_compiled_fullgraph_equals_step(name):
    layer, tokens = stream(name)
    fn = layer.step_function(**tokens[0])
    _, state = run_step(layer, tokens[:1])
    dynamo.reset()
    explained = dynamo.explain(fn)(state.tensors(), *tokens[1].values())
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    want, state = run_step(layer, tokens)
    got, tensors = run_function(compiled, tokens)  # () first: a second graph, then the stream's
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b)
    for a, b in zip(tensors, state.tensors()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name, what", [("ema", "binary counter"), ("running_argmax", "position (index)"),
                                        ("transformer_psm", "chunk op")])
def test_count_reading_plans_are_refused_naming_step(name, what):
    layer, tokens = stream(name, batch=1)
    with pytest.raises(TypeError) as err:
        layer.step_function(**tokens[0])
    message = str(err.value)
    assert what in message and "layer.step(state, ...)" in message and name in message
    assert ("makes a TreeCache" in message) == (name == "ema")  # a token tree scan's serving state


def test_another_signature_is_an_error_eager_and_compiled():
    layer, tokens = stream("gla")
    fn = layer.step_function(**tokens[0])
    _, state = run_step(layer, tokens[:1])
    k, v, gk, q = tokens[1].values()
    wide = torch.cat([k, k])  # batch 4, built for 2
    shape, S = tuple(k.shape), tuple(state.tensors()[0].shape)
    built = re.escape(f"gla step function: input 'k' is {(4,) + shape[1:]} torch.float32 on cpu, but the function "
                      f"was built for {shape} torch.float32 on cpu: build one for this signature with "
                      "layer.step_function(...), or use layer.step")
    with pytest.raises(ValueError, match=built):
        fn(state.tensors(), wide, v, gk, q)
    with pytest.raises(ValueError, match=re.escape(f"input 'q' is {shape} torch.float64")):
        fn(state.tensors(), k, v, gk, q.double())
    with pytest.raises(ValueError, match=re.escape(f"the state tensors are ({shape} torch.float32 on cpu), but this "
                                                   f"signature's state is (S: {S} torch.float32 on cpu)")):
        fn((k,), k, v, gk, q)
    with pytest.raises(TypeError, match=r"takes the state tensors and 4 inputs \(k, v, gk, q\), got 3"):
        fn(state.tensors(), k, v, gk)
    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    out, _ = compiled(state.tensors(), k, v, gk, q)
    torch.testing.assert_close(out, fn(state.tensors(), k, v, gk, q)[0])
    # Dynamo's guards retrace: the same check, at trace time (static sizes: from the literals;
    # a batch Dynamo made symbolic after the first retrace: traced), raised through Dynamo
    with pytest.raises(Exception, match=re.escape(f"input 'q' is {shape} torch.float64 on cpu, but the function "
                                                  f"was built for {shape} torch.float32 on cpu")):
        compiled(state.tensors(), k, v, gk, q.double())
    with pytest.raises(Exception, match=r"input 'k' is .*torch.float32 on cpu'?, but the function was built for "
                                        + re.escape(f"{shape} torch.float32 on cpu")):
        compiled(state.tensors(), wide, v, gk, q)
    out2, _ = compiled(state.tensors(), k, v, gk, q)  # and the built signature still runs
    torch.testing.assert_close(out2, out)


def test_half_inputs_and_the_always_finite_check_as_step():
    """bf16 inputs are cast to the compute dtype and the outputs back to bf16, as `step` does;
    with check_finite='always' a NaN input is not the op's doing (no error) in either."""
    layer, tokens = stream("gla")
    layer.check_finite = "always"
    half = [{n: x.bfloat16() for n, x in token.items()} for token in tokens]
    fn = layer.step_function(**half[0])
    want, state = run_step(layer, half)
    got, tensors = run_function(fn, half)
    assert got[0][0].dtype == torch.bfloat16 and tensors[0].dtype == torch.float32
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    nan = dict(half[1], q=torch.full_like(half[1]["q"], float("nan")))
    out, _ = fn(tensors, *nan.values())
    assert torch.isnan(out).all()


def _guards(fn, *args):
    """The guard checks Dynamo runs on a call of torch.compile'd `fn` (backend eager), one frame."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    dynamo.reset()
    torch.compile(fn, fullgraph=True, backend="eager")(*args)
    (entry,) = _debug_get_cache_entry_list(fn.__code__)
    f_locals = dict(zip(fn.__code__.co_varnames, args))
    if fn.__code__.co_flags & 0x04:  # *inputs
        n = fn.__code__.co_argcount
        f_locals = dict(zip(fn.__code__.co_varnames, args[:n]), inputs=args[n:])
    return entry.guard_manager.check_verbose(f_locals).num_guards_executed


@pytest.mark.parametrize("name", ["gla", "retention"])
def test_traced_form_is_literal_source_guarded_like_a_hand_step(name):
    """The chunkwise forms' step function is generated source, its constants literals: no
    closure, no global but torch and its three helpers, the same text for the same signature,
    and compiled it costs the guards of its tensors and few more (what the hand step costs)."""
    layer, tokens = stream(name)
    fn = layer.step_function(**tokens[0])
    assert fn.__closure__ is None
    assert set(fn.__globals__) - {"__builtins__", fn.__name__} == {"torch", "_compiling", "_eager", "_mismatch"}
    assert fn.__source__ == layer.step_function(**tokens[0]).__source__
    lead = tuple(tokens[0]["k"].shape[:-1])
    assert f"    lead = {lead}\n" in fn.__source__ and "state_tensors[0]" in fn.__source__
    _, state = run_step(layer, tokens[:1])
    (S,) = state.tensors()
    k, v, g, q = tokens[1].values()

    def hand(S, k, v, g, q):  # the same update, written by hand (the scale read from the source)
        decay = torch.exp(g).unsqueeze(-1) if name == "gla" else torch.exp(g)[..., None, None]
        S = decay * S + k.unsqueeze(-1) * v.unsqueeze(-2)
        return (q.unsqueeze(-2) @ S).squeeze(-2) / 3.0, S

    # traced, the literals are the bound step's values exactly: bit for bit what a compiled `step` gives
    dynamo.reset()
    compiled_fn, compiled_step = (torch.compile(f, fullgraph=True, backend="eager") for f in (fn, layer.step))
    tensors, state = (), layer.init_state()
    for token in tokens:
        out, tensors = compiled_fn(tensors, *token.values())
        want, state = compiled_step(state, **token)
        assert torch.equal(out, want) and torch.equal(tensors[0], state.tensors()[0])
    ours, theirs = _guards(fn, (S,), k, v, g, q), _guards(hand, S, k, v, g, q)
    # the extra (11 with torch 2.13; the closure form had 31 more): the state and inputs tuples (type
    # and length each), the builtins len and isinstance, torch.Tensor, torch.float32, _compiling
    # (and the nodes that reach the last three)
    assert ours <= theirs + 11, (ours, theirs)


def test_literals_round_trip_exactly_or_are_refused():
    """A step function's constants are written as literals only when the text evaluates to the
    very value (floats by repr, every bit); anything else is refused (the closure form serves)."""
    from hypothesis import given, settings, strategies as st
    from psmc.runtime.compiled_step import _literal

    @settings(max_examples=60, deadline=None, database=None)
    @given(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(), st.booleans(),
                     st.tuples(st.integers(0, 9), st.integers(0, 9)), st.sampled_from([torch.float32, torch.bfloat16])))
    def round_trip(value):
        text = _literal(value)
        back = eval(text, {"torch": torch})
        assert back == value and type(back) is type(value)
        if isinstance(value, float):
            assert struct.pack("<d", back) == struct.pack("<d", value)  # -0.0 stays -0.0

    import struct
    round_trip()
    for refused in (float("nan"), float("inf"), torch.Size([2, 3]), torch.ones(1), "k", [1, 2]):
        assert _literal(refused) is None
