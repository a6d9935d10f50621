"""torch.compile(layer, fullgraph=True): forward and step of the exact-scan plans, and the
forward pass of the tree-scan plans (token and chunk ops), trace into one graph with zero graph
breaks (counted by torch._dynamo.explain), and the compiled layer computes what the eager one
does. (A tree-scan step, or a tree forward continuing a state, reads the token count on the
host: the counter's structure follows it.) Backend "eager": Dynamo's capture is what is under test,
not Inductor's C++ builds (too slow for a small shared CI machine)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from layer_cases import CASES
from layer_harness import as_tuple, layer_class, make_inputs

# one op per exact-scan form: chunkwise (gla; the scalar and no-decay kinds share its code),
# first-order recurrence, the generic scan (T past one block of 64, so the block carries are
# traced) and the delta rule's chunked WY form (without autograd its eager path writes into a
# thread-local scratch: a graph takes the functional form; the gated rule shares the code).
PLANS = ["gla", "linear_recurrence", "cumsum", "delta_rule"]


def build(name, T):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    torch.manual_seed(0)
    layer = cls(**dims)
    inputs = make_inputs(cls, dims, 2, T, (2,), tuple((False,) for _ in cls.spec.inputs), seed=0, kinds=case.kinds)
    return layer, {n: (x.float() if x.is_floating_point() else x) for n, x in inputs.items()}


@pytest.mark.parametrize("name", PLANS)
def test_forward_and_step_have_no_graph_breaks(name):
    layer, inputs = build(name, T=70)
    dynamo.reset()
    explained = dynamo.explain(layer)(**inputs, return_state=True)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    dynamo.reset()
    explained = dynamo.explain(layer.step)(state, **token)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]


@pytest.mark.parametrize("name", ["ema", "transformer_psm"])
def test_tree_forward_has_no_graph_breaks(name):
    layer, inputs = build(name, T=13)
    dynamo.reset()
    # a chunk op's returned state buffers the partial chunk token by token (host-side count)
    explained = dynamo.explain(layer)(**inputs, return_state=layer.spec.chunk is None)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    if layer.spec.chunk is not None:
        return  # tracing its attention blocks twice costs ~30 s on a shared 2-core machine
    dynamo.reset()
    want = as_tuple(layer(**inputs))
    got = as_tuple(torch.compile(layer, fullgraph=True, backend="eager")(**inputs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["gla", "delta_rule"])
def test_fullgraph_compiled_forward_and_step_equal_eager(name):
    layer, inputs = build(name, T=70)
    dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    want, state = layer(**inputs, return_state=True)
    got, got_state = compiled(**inputs, return_state=True)
    for g, w in zip(as_tuple(got), as_tuple(want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    step = torch.compile(layer.step, fullgraph=True, backend="eager")
    token = {n: x[:, 0] for n, x in inputs.items()}
    for g, w in zip(as_tuple(step(got_state, **token)[0]), as_tuple(layer.step(state, **token)[0])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_tree_step_traces_without_graph_breaks_one_graph_per_position():
    """A tree-scan step (and a tree forward continuing a state) reads the token count off the
    counter's structure, not a tensor: no graph break. The structure (which levels hold a root:
    the count's bits) is what a graph specialises on, so a compiled step has one graph per
    position; a second stream over the same positions reuses them (no new graph)."""
    from torch._dynamo.utils import counters
    layer, inputs = build("ema", T=6)
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    dynamo.reset()
    explained = dynamo.explain(layer.step)(state, **token)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    dynamo.reset()
    explained = dynamo.explain(layer)(**inputs, state=state, return_state=True)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(recompile_limit=16):
        step = torch.compile(layer.step, fullgraph=True, backend="eager")
        for stream in range(2):
            got, want = layer.init_state(), layer.init_state()
            for t in range(5):
                token = {n: x[:, t] for n, x in inputs.items()}
                y, got = step(got, **token)
                y_eager, want = layer.step(want, **token)
                assert torch.equal(y, y_eager), (stream, t)
            assert got.size == 5 and torch.equal(got.count, want.count)
            if stream == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert graphs == 5 and counters["stats"]["unique_graphs"] == graphs  # positions 0..4, reused


def test_cpp_kernels_stay_out_of_a_graph(monkeypatch):
    """backend='auto' with the C++ kernels enabled: inside a torch.compile graph the torch paths
    serve (a ctypes call cannot be traced), so forward and step still have no graph break."""
    monkeypatch.setenv("PSMC_CPU", "1")
    layer, inputs = build("linear_recurrence", T=9)
    assert layer._cpu_kernels is not None
    dynamo.reset()
    explained = dynamo.explain(layer)(**inputs, return_state=True)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    layer.backend = "torch"  # the state, eagerly, without building the C++ kernels
    _, state = layer(**inputs, return_state=True)
    layer.backend = "auto"
    dynamo.reset()
    explained = dynamo.explain(layer.step)(state, **{n: x[:, 0] for n, x in inputs.items()})
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
