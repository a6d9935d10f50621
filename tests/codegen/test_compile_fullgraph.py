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
# thread-local scratch: a graph takes the functional form; the gated rule shares the code), and
# the diagonal-plus-low-rank WY form (rwkv7: its per-key decay masks choose their form on the
# device in a graph). gated_delta_product: two delta-rule tokens per token, interleaved.
PLANS = ["gla", "linear_recurrence", "cumsum", "delta_rule", "gated_delta_product", "rwkv7"]


def _unbroken(fn, *args, **kwargs):
    """Dynamo's explanation of fn(*args, **kwargs), which must have no graph break."""
    explained = dynamo.explain(fn)(*args, **kwargs)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    return explained


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
    explained = _unbroken(layer, **inputs, return_state=True)
    assert explained.graph_count == 1
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    dynamo.reset()
    _unbroken(layer.step, state, **token)


def test_the_step_of_older_torch_builds_its_state_in_the_graph(monkeypatch):
    """Before torch 2.13, Dynamo graph-breaks on ScanState.make's __dict__ write (seen with torch
    2.11 on the H200); there the step builds its state through the dataclass __init__ inside the
    graph. That branch, taken here on purpose: one graph, no break, the eager step's values."""
    from psmc.runtime import state as state_module
    monkeypatch.setattr(state_module, "_DYNAMO_TRACES_DICT_WRITES", False)
    layer, inputs = build("gla", T=5)
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    dynamo.reset()
    _unbroken(layer.step, state, **token)
    y, got = torch.compile(layer.step, fullgraph=True, backend="eager")(state, **token)
    y_eager, want = layer.step(state, **token)
    torch.testing.assert_close(y, y_eager)  # (eager steps in C++ on CPU: a last-bit difference)
    assert type(got) is type(want) and got.size == want.size == 6
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["ema", "transformer_psm"])
def test_tree_forward_has_no_graph_breaks(name):
    layer, inputs = build(name, T=13)
    dynamo.reset()
    # a chunk op's returned state buffers the partial chunk token by token (host-side count)
    _unbroken(layer, **inputs, return_state=layer.spec.chunk is None)
    if layer.spec.chunk is not None:
        return  # tracing its attention blocks twice costs ~30 s on a shared 2-core machine
    dynamo.reset()
    want = as_tuple(layer(**inputs))
    got = as_tuple(torch.compile(layer, fullgraph=True, backend="eager")(**inputs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7"])
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
    _unbroken(layer.step, state, **token)
    dynamo.reset()
    _unbroken(layer, **inputs, state=state, return_state=True)
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
    """backend='auto' with the C++ kernels enabled: a graph cannot make a ctypes call, so the
    forward takes the kernel as a graph op when it is loaded (the next test) and the torch path
    when it is not, and the step takes the torch update: no graph break either way."""
    monkeypatch.setenv("PSMC_CPU", "1")
    layer, inputs = build("linear_recurrence", T=9)
    assert layer._cpu_kernels is not None
    dynamo.reset()
    _unbroken(layer, **inputs, return_state=True)
    layer.backend = "torch"  # the state, eagerly, without building the C++ kernels
    _, state = layer(**inputs, return_state=True)
    layer.backend = "auto"
    dynamo.reset()
    _unbroken(layer.step, state, **{n: x[:, 0] for n, x in inputs.items()})


def _kernel_calls(graphs) -> int:
    """How many psmc::cpu_kernel calls the graphs (and their nested subgraphs) make."""
    kernel = torch.ops.psmc.cpu_kernel.default
    return sum(n.target is kernel for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes)


def _trained(fn, inputs: dict):
    """(output, gradients of the float inputs) of one weighted training pass of `fn`."""
    floats = [n for n, x in inputs.items() if x.is_floating_point()]
    leaves = {n: inputs[n].clone().requires_grad_() for n in floats}
    out = fn(**{**inputs, **leaves})
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out, [leaves[n].grad for n in floats]


def test_a_graph_runs_the_loaded_cpp_kernels_as_ops(monkeypatch):
    """Once an eager call has loaded the C++ kernels, a graph holds each pass as one
    `psmc::cpu_kernel` op (no break) and equals eager bit for bit, outputs and gradients,
    through Dynamo's capture and through Inductor (which must hand the op its inputs in the
    traced layout)."""
    from psmc.runtime import cpu_support
    monkeypatch.setenv("PSMC_CPU", "1")
    layer, inputs = build("linear_recurrence", T=9)
    layer.backend = "cpu"
    with torch.no_grad():
        want, want_state = layer(**inputs, return_state=True)  # loads the kernels
    assert (layer._cpu_kernels.source, "forward", "f32") in cpu_support._LOADED
    want_out, want_grads = _trained(layer, inputs)
    for backend in ("eager", "inductor"):
        graphs = []

        def keep(gm, example_inputs, backend=backend):
            graphs.append(gm)
            return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)
        dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend=keep)
        with torch.no_grad():
            got, got_state = compiled(**inputs, return_state=True)
        assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_state.tensors(), want_state.tensors()))
        assert _kernel_calls(graphs) == 1, backend
        graphs.clear()
        out, grads = _trained(compiled, inputs)
        assert torch.equal(out, want_out) and all(torch.equal(a, b) for a, b in zip(grads, want_grads)), backend
        assert _kernel_calls(graphs) >= 1, backend  # (the forward's, inside the autograd function)


def test_before_torch_2_13_a_compiled_training_pass_takes_the_torch_path(monkeypatch):
    """torch 2.11 compiled the C++ kernels' backward into wrong gradients (the H200 image's torch,
    run here on CPU: off by 3.2 where the gradients are of order 1). There
    (cpu_support.COMPILED_BACKWARD_OK False, set here on purpose) a compiled training pass holds
    no kernel op and gives the eager gradients; compiled inference keeps the kernels."""
    from psmc.runtime import cpu_support
    monkeypatch.setenv("PSMC_CPU", "1")
    monkeypatch.setattr(cpu_support, "COMPILED_BACKWARD_OK", False)
    layer, inputs = build("linear_recurrence", T=9)
    layer.backend = "cpu"
    with torch.no_grad():
        want = layer(**inputs)  # loads the kernels
    want_out, want_grads = _trained(layer, inputs)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=keep)
    out, grads = _trained(compiled, inputs)
    assert _kernel_calls(graphs) == 0
    torch.testing.assert_close(out, want_out)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)
    graphs.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), want)
    assert _kernel_calls(graphs) == 1


def test_a_graph_chooses_the_cpp_kernels_as_eager_code_does(monkeypatch):
    """backend='auto' in a graph follows eager's rule: a matrix-state op with the chunkwise form
    runs a long forward with the chunkwise matmuls, a short one with the C++ kernel."""
    from psmc.runtime import cpu_support
    monkeypatch.setenv("PSMC_CPU", "1")
    short, inputs = build("gla", T=2)
    long = cpu_support.MATRIX_FORWARD_MAX_T + 1
    long_inputs = {n: x[:, :1].expand(x.shape[0], long, *x.shape[2:]) for n, x in inputs.items()}
    with torch.no_grad():
        short(**inputs)  # loads the kernels (a short forward runs them)
        assert (short._cpu_kernels.source, "forward", "f32") in cpu_support._LOADED
        for given, calls in ((inputs, 1), (long_inputs, 0)):
            graphs = []
            dynamo.reset()
            torch.compile(short, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm)(**given)
            assert _kernel_calls(graphs) == calls


def test_the_graph_kernel_op_refuses_inputs_laid_out_otherwise_than_traced():
    from psmc.runtime import cpu_support
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="traced with \\[1, 2\\]; run the layer with backend='torch'"):
        cpu_support.graph_kernel("key", "name", [x], [], [], 1, [1, 2])


def test_chunk_op_step_compiles_with_fullgraph_and_equals_eager():
    """A chunk op's step (`chunk C;`) traces into one graph: the partial chunk's fill level is a
    Python int beside its tensor (ChunkStream.n_filled) and the token's position comes from the
    inner state without a host read. Stepped through the end of a chunk (C = 3: the buffer fills,
    is pushed and restarts) from a state whose buffer already holds 2 tokens, the compiled step
    computes what the eager one does, token by token."""
    layer, inputs = build("transformer_psm", T=5)
    assert layer.spec.chunk is not None
    _, state = layer(**inputs, return_state=True)
    assert state.size == 2  # 5 = one chunk of 3 + 2 buffered
    dynamo.reset()
    step = torch.compile(layer.step, fullgraph=True, backend="eager")  # (fullgraph: a graph break is an error)
    got, want = state, state
    for t in range(5):  # 3 + 2 buffered: the chunk fills, is pushed, restarts; 3 more fill the next
        token = {n: x[:, t] for n, x in inputs.items()}
        y, got = step(got, **token)
        y_eager, want = layer.step(want, **token)
        torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
        assert got.size == want.size and torch.equal(got.filled, want.filled), t
    assert got.size == 1 and got.inner.size == want.inner.size == 3


def test_compiled_step_guards_only_what_the_update_reads():
    """Under torch.compile the step's checks run once per trace as a constant of the graph
    (psmc/runtime/compiled_step.py): Dynamo guards the inputs, the state, the layer's
    configuration and a few globals, not the op's spec slot by slot (159 guard checks before,
    about 60 now, against 38 for the hand-written update). A changed configuration is still
    guarded: switching the fast path off re-traces, and the compiled step then equals eager."""
    from psmc.runtime.layer import PsmLayer
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    layer, inputs = build("gla", T=3)
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    dynamo.reset()
    step = torch.compile(layer.step, fullgraph=True, backend="eager")
    y, _ = step(state, **token)
    torch.testing.assert_close(y, layer.step(state, **token)[0])
    entries = _debug_get_cache_entry_list(PsmLayer.step.__code__)
    assert len(entries) == 1
    guards = "\n".join(entries[0].guard_manager.code_parts)
    assert "lift_inputs" not in guards and "readout_inputs" not in guards and "named_parameters" not in guards
    # no guard that the generated module's `torch` is layer.py's (a Python lambda evaluated on
    # every call, about 0.1 us): the traced step reads no `torch` global of its own
    aliasing = [g.verbose_code_parts() for g in entries[0].guard_manager.root.get_epilogue_lambda_guards()]
    assert not aliasing, aliasing
    assert len(entries[0].guard_manager.code_parts) < 70, len(entries[0].guard_manager.code_parts)
    layer.use_fast_path = False  # guarded: a new trace, through the generic step
    y2, _ = step(state, **token)
    assert len(_debug_get_cache_entry_list(PsmLayer.step.__code__)) == 2
    torch.testing.assert_close(y2, layer.step(state, **token)[0])


@pytest.mark.parametrize("name", ["gla", "retention"])
def test_traced_chunkwise_step_updates_by_multiply_and_add_and_equals_eager(name):
    """A traced decayed-attention step (key decay: gla; scalar decay: retention) writes the state
    update as `decay * S + k v^T`, not eager's single `addcmul` (Inductor's CPU loop runs the
    multiply-add about 1 us per token faster: docs/benchmarks.md, "Decode step"); the compiled
    step carries a stream token by token exactly as eager does (outputs and states)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    layer, inputs = build(name, T=4)
    _, state = layer(**{n: x[:, :1] for n, x in inputs.items()}, return_state=True)
    dynamo.reset()
    step = torch.compile(layer.step, fullgraph=True, backend=capture)
    got, want = state, state
    for t in range(1, 4):
        token = {n: x[:, min(t, x.shape[1] - 1)] for n, x in inputs.items()}
        y, got = step(got, **token)
        y_eager, want = layer.step(want, **token)
        torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.tensors(), want.tensors(), rtol=1e-6, atol=1e-6)
        assert int(got.count) == int(want.count) == t + 1 and got.op == want.op
    assert len(graphs) == 1
    assert "addcmul" not in graphs[0] and "torch.exp" in graphs[0], graphs[0]


def test_compiled_step_raises_the_eager_errors_at_trace_time():
    """The checks still run when a call is traced: a wrong input shape gets eager `step`'s error
    (under fullgraph=True, Dynamo reports the raise as unsupported, quoting that error)."""
    layer, inputs = build("gla", T=3)
    _, state = layer(**inputs, return_state=True)
    token = {n: x[:, 0] for n, x in inputs.items()}
    token["k"] = token["k"][..., :-1]
    with pytest.raises(ValueError) as eager:
        layer.step(state, **token)
    dynamo.reset()
    with pytest.raises(ValueError) as compiled:
        torch.compile(layer.step, backend="eager")(state, **token)
    assert str(compiled.value) == str(eager.value)
    dynamo.reset()
    with pytest.raises(Exception) as full:
        torch.compile(layer.step, fullgraph=True, backend="eager")(state, **token)
    assert str(eager.value) in str(full.value)


def test_compiled_step_follows_a_batch_that_changes():
    """Batch 1, then 2 and 3: Dynamo re-traces once with a symbolic batch, which is no literal,
    so that graph takes the fully traced checks (no graph break); every call equals eager."""
    from torch._dynamo.utils import counters
    layer, inputs = build("gla", T=2)
    dynamo.reset()
    counters.clear()
    step = torch.compile(layer.step, fullgraph=True, backend="eager")
    for batch in (1, 2, 3):
        part = {n: x[:1].expand(batch, *x.shape[1:]).clone() + batch for n, x in inputs.items()}
        _, state = layer(**part, return_state=True)
        token = {n: x[:, 0] for n, x in part.items()}
        y, got = step(state, **token)
        y_eager, want = layer.step(state, **token)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(got.prefix[1], want.prefix[1])
        assert got.op == want.op and torch.equal(got.count, want.count)
    assert counters["stats"]["unique_graphs"] == 2


def test_attention_with_two_leading_axes_compiles_with_inductor():
    """A chunk op's readout calls `attention` on [B, lanes..., C, D] blocks: inductor's lowering of
    SDPA over five axes failed (an outside probe, examples/transformer_psm.psm under
    torch.compile); the leading axes now reach SDPA as one."""
    from psmc.runtime.ops import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 6, generator=g) for _ in range(3))
    dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, 2, True), fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, 2, True))
    manual = torch.softmax((q.unflatten(-1, (2, 3)).transpose(-2, -3) @ k.unflatten(-1, (2, 3)).permute(0, 1, 3, 4, 2))
                           / 3 ** 0.5 + torch.full((4, 4), -torch.inf).triu(1), dim=-1) @ v.unflatten(-1, (2, 3)).transpose(-2, -3)
    torch.testing.assert_close(attention(q, k, v, 2, True), manual.transpose(-2, -3).flatten(-2))
