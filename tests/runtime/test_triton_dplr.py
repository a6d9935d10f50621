"""The diagonal-plus-low-rank parallel pass on chunked Triton kernels (psmc.runtime.triton_dplr),
under TRITON_INTERPRET=1: against the float64 per-token recurrence (test_dplr.reference) with
per-key, scalar or no decay, with and without an initial state, T below, at and past a chunk,
broadcast lanes, K and V not powers of two and K = 128 (the kernels' limit), exact zeros,
strong and growing decays, fp16 inputs (bf16 on a GPU); what it declines; that chunk_dplr routes to it; packed
sequences; and a generated RWKV-7 layer's forward through it. Training's chain kernels (triton_dplr.states, dstates): every
gradient against the float64 recurrence's, the same cases' kinds, what they decline, packed sequences in one call, a
compiled training pass, and a generated layer's gradients."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import chunkwise, dplr, triton_dplr  # noqa: E402
from test_dplr import check, make, reference, strong_decays  # noqa: E402
from test_triton_dplr_step import rwkv7_layer  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def run(q, k, v, a, b, g, scale=1.0, initial_state=None):
    """chunk_dplr's inputs through the kernels (float32 on DEVICE unless given lower)."""
    to = lambda t: None if t is None else t.to(DEVICE, torch.float32 if t.dtype == torch.float64 else t.dtype)  # noqa: E731
    q, k, v, a, b, g, batch, steps, lanes = dplr._shapes(*(to(t) for t in (q, k, v, a, b, g)))
    initial_state = to(initial_state)
    assert triton_dplr.takes(q, k, v, a, b, g, initial_state, None)
    return triton_dplr.triton_chunk_dplr(q, k, v, a, b, g, scale=scale, initial_state=initial_state,
                                         batch=batch, steps=steps, lanes=lanes)


@pytest.mark.parametrize("steps, lanes, K, V, decay, initial", [
    (1, (3,), 8, 8, "key", True),  # one token
    (16, (2,), 12, 20, "scalar", True),  # one whole chunk; K, V not powers of two
    (37, (2, 2), 16, 16, "key", True),  # two lane axes, a ragged tail
    (21, (3,), 16, 72, None, False),  # no decay; V past one block of value columns
    (5, (1,), 128, 16, "key", True),  # the largest K the kernels take
])
def test_the_kernels_equal_the_per_token_recurrence(steps, lanes, K, V, decay, initial):
    q, k, v, a, b, g = make(steps + K, 2, steps, lanes, K, V, decay=decay)
    s0 = torch.randn(2, *lanes, K, V, dtype=torch.float64) if initial else None
    ref_o, ref_state = reference(q, k, v, a, b, g, s0, scale=0.7)
    o, state = run(q, k, v, a, b, g, scale=0.7, initial_state=s0)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    check(o.cpu(), ref_o, 1e-5)
    check(state.cpu(), ref_state, 1e-5)


def test_leading_axes_broadcast():
    """A removal key shared by every lane and a decay shared by the batch: stride-0 reads."""
    shapes = {"a": (2, 19, 1), "log_decay": (1, 19, 3)}
    q, k, v, a, b, g = make(11, 2, 19, (3,), 8, 8, shapes=shapes)
    ref_o, ref_state = reference(q, k, v, a, b, g)
    o, state = run(q, k, v, a, b, g)
    check(o.cpu(), ref_o, 1e-5)
    check(state.cpu(), ref_state, 1e-5)


def test_zero_strong_and_growing_decays_are_exact():
    """-inf log decays give exact zeros (no NaN), -50 and -200 inside a chunk and a growth of
    +0.3 stay exact: every L x L entry takes its own masked cumsum."""
    q, k, v, a, b, g = make(7, 2, 35, (2,), 5, 4)
    g = strong_decays(g)
    s0 = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    ref_o, ref_state = reference(q, k, v, a, b, g, s0, scale=0.8)
    o, state = run(q, k, v, a, b, g, scale=0.8, initial_state=s0)
    check(o.cpu(), ref_o, 1e-5)
    check(state.cpu(), ref_state, 1e-5)


# the interpreter computes bf16 dots wrongly (numpy has no bf16): bf16 runs on a GPU (PSMC_TEST_DEVICE=cuda)
HALVES = [torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])


@pytest.mark.parametrize("dtype", HALVES)
def test_half_inputs_are_read_as_given(dtype):
    """bf16/fp16 inputs: read in their dtype, the chain's dots on half operands (fp32
    accumulation), the state fp32, the outputs in the inputs' dtype."""
    q, k, v, a, b, g = (t.to(dtype) for t in make(5, 1, 20, (2,), 16, 16))
    ref_o, ref_state = reference(q, k, v, a, b, g)
    o, state = run(q, k, v, a, b, g)
    assert o.dtype == dtype and state.dtype == torch.float32
    check(state.cpu(), ref_state, 1e-2)
    check(o.cpu(), ref_o, 1e-2)


def test_no_tokens_return_the_initial_state():
    q, k, v, a, b, g = make(1, 2, 0, (3,), 8, 8)
    s0 = torch.randn(2, 3, 8, 8)
    o, state = run(q, k, v, a, b, g, initial_state=s0)
    assert o.shape == (2, 0, 3, 8)
    torch.testing.assert_close(state.cpu(), s0.cpu())


def test_what_the_kernels_decline():
    q, k, v, a, b, g = (t.float() for t in make(1, 1, 4, (2,), 8, 8))
    assert triton_dplr.takes(q, k, v, a, b, g, None, None)
    assert not triton_dplr.takes(q.double(), k, v, a, b, g, None, None)  # float64
    assert not triton_dplr.takes(q, k, v, a, b, g, None, 32)  # a chunk size asked for
    wide = (t.float() for t in make(1, 1, 4, (2,), 130, 8))
    assert not triton_dplr.takes(*wide, None, None)  # K past MAX_K
    assert not triton_dplr.takes(q.requires_grad_(), k, v, a, b, g, None, None)  # a gradient wanted
    with torch.no_grad():
        assert triton_dplr.takes(q, k, v, a, b, g, None, None)


def test_chunk_dplr_routes_to_the_kernels(monkeypatch):
    """Without autograd chunk_dplr takes the kernels where they are wanted (CUDA tensors; here
    BACKEND='triton'), under autograd the torch terms and the chain kernels (below), with the
    same values; packed sequences reach them one group at a time."""
    calls = []
    real = triton_dplr.triton_chunk_dplr
    monkeypatch.setattr(triton_dplr, "triton_chunk_dplr", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    q, k, v, a, b, g = (t.float().to(DEVICE) for t in make(3, 1, 30, (2,), 8, 8))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    with torch.no_grad():
        o, state = dplr.chunk_dplr(q, k, v, a, b, g, scale=0.5)
    assert calls == [1]
    want, want_state = dplr.chunk_dplr(q, k, v, a, b, g, scale=0.5)  # (grad enabled, none wanted)
    assert calls == [1, 1]
    q.requires_grad_()
    dplr.chunk_dplr(q, k, v, a, b, g, scale=0.5)[0].sum().backward()
    assert calls == [1, 1] and torch.isfinite(q.grad).all()
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    with torch.no_grad():
        ref, ref_state = dplr.chunk_dplr(q, k, v, a, b, g, scale=0.5)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
    # packed: three sequences of 7, 16 and 7 tokens, each from its own state
    cu = torch.tensor([0, 7, 23, 30], device=DEVICE)
    s0 = torch.randn(3, 2, 8, 8, device=DEVICE)
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    with torch.no_grad():
        o, state = dplr.chunk_dplr(q, k, v, a, b, g, initial_state=s0, cu_seqlens=cu)
    assert calls == [1, 1, 1]  # all three sequences in one call
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    with torch.no_grad():
        for n in range(3):
            piece = slice(int(cu[n]), int(cu[n + 1]))
            ref, ref_state = dplr.chunk_dplr(*(t[:, piece] for t in (q, k, v, a, b, g)), initial_state=s0[n:n + 1])
            torch.testing.assert_close(o[:, piece], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state[n:n + 1], ref_state, rtol=1e-5, atol=1e-5)


def test_a_generated_layer_runs_its_forward_on_the_kernels(monkeypatch):
    """examples/rwkv7.psm: the layer's parallel pass (no autograd) on the kernels equals its
    torch form and its token-by-token stream."""
    layer, x = rwkv7_layer(20)
    calls = []
    real = triton_dplr.triton_chunk_dplr
    monkeypatch.setattr(triton_dplr, "triton_chunk_dplr", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    with torch.no_grad():
        out = layer(**x)
        monkeypatch.setattr(chunkwise, "BACKEND", "torch")
        want = layer(**x)
        state, outs = layer.init_state(), []
        for t in range(20):
            o, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            outs.append(o)
    assert calls == [1]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.stack(outs, 1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ training


def _gradients(fn, inputs, dtype, o_weight, s_weight):
    """fn's outputs and the gradients of sum(o * o_weight) + sum(state * s_weight) with respect
    to every input that is not None (each cast to dtype on DEVICE, a leaf of its own)."""
    leaves = [None if t is None else t.detach().to(DEVICE, dtype).clone().requires_grad_() for t in inputs]
    o, state = fn(*leaves)
    loss = 0.0
    if o_weight is not None:
        loss = loss + (o.double() * o_weight.to(o.device)).sum()
    if s_weight is not None:
        loss = loss + (state.double() * s_weight.to(state.device)).sum()
    loss.backward()
    # (an input the loss does not reach has no gradient: zeros)
    return [o, state] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves if t is not None]


def _through_the_chain(monkeypatch):
    """BACKEND='triton' with every training chain on the kernels counted (forward and backward:
    a 1 for each, so [1, 1] is one training pass)."""
    calls = []
    for name in ("states", "dstates"):
        real = getattr(triton_dplr, name)
        monkeypatch.setattr(triton_dplr, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    return calls


@pytest.mark.parametrize("steps, lanes, K, V, decay, loss", [
    (45, (2,), 12, 20, "key", "both"),  # a ragged second chunk; K, V not powers of two
    (70, (3,), 16, 8, "scalar", "outputs"),  # three chunks; the final state unused
    (32, (2, 2), 8, 16, None, "state"),  # one whole chunk, two lane axes; only the final state used
])
def test_training_runs_the_chain_kernels_with_the_recurrence_s_gradients(monkeypatch, steps, lanes, K, V, decay,
                                                                         loss):
    """Under autograd on Triton's device the chunks are chained by _dplr_states_kernel and
    _dplr_dstates_kernel: outputs, final state and the gradient of every input (the initial
    state's included) equal the float64 per-token recurrence's."""
    q, k, v, a, b, g = make(steps + K, 2, steps, lanes, K, V, decay=decay)
    s0 = torch.randn(2, *lanes, K, V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(steps)
    o_weight = None if loss == "state" else torch.randn(2, steps, *lanes, V, generator=gen, dtype=torch.float64)
    s_weight = None if loss == "outputs" else torch.randn(2, *lanes, K, V, generator=gen, dtype=torch.float64)
    inputs = (q, k, v, a, b, g, s0)
    want = _gradients(lambda *x: reference(*x[:6], x[6], scale=0.7), inputs, torch.float64, o_weight, s_weight)
    calls = _through_the_chain(monkeypatch)
    got = _gradients(lambda *x: dplr.chunk_dplr(*x[:6], scale=0.7, initial_state=x[6]), inputs, torch.float32,
                     o_weight, s_weight)
    assert calls == [1, 1]
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    names = ["o", "state", "q", "k", "v", "a", "b"] + (["log_decay"] if decay else []) + ["initial_state"]
    assert len(got) == len(want) == len(names)
    for name, out, ref in zip(names, got, want):
        assert out.shape == ref.shape, name
        check(out.detach().cpu(), ref.detach(), 2e-5)


def test_training_through_the_chain_keeps_exact_zeros_and_strong_decays(monkeypatch):
    """-inf, -50 and -200 log decays and a growth of +0.3 under autograd: finite gradients equal
    to the float64 recurrence's (the torch form's exact masks feed the chain)."""
    q, k, v, a, b, g = make(7, 2, 35, (2,), 5, 4)
    g = strong_decays(g)
    gen = torch.Generator().manual_seed(1)
    o_weight = torch.randn(2, 35, 2, 4, generator=gen, dtype=torch.float64)
    s_weight = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64)
    # (the -inf log decays have no finite gradient: compare the others)
    want = _gradients(lambda *x: reference(*x, g, scale=0.8), (q, k, v, a, b), torch.float64, o_weight, s_weight)
    calls = _through_the_chain(monkeypatch)
    got = _gradients(lambda *x: dplr.chunk_dplr(*x, g.float().to(DEVICE), scale=0.8), (q, k, v, a, b), torch.float32,
                     o_weight, s_weight)
    assert calls == [1, 1]
    for out, ref in zip(got, want):
        check(out.detach().cpu(), ref.detach(), 2e-5)


@pytest.mark.parametrize("dtype", HALVES)
def test_training_with_half_inputs_takes_half_operands(monkeypatch, dtype):
    """bf16/fp16 inputs: the chain's dots take operands in that dtype (fp32 accumulation, fp32
    states); outputs in the inputs' dtype, gradients within half precision of the recurrence's."""
    q, k, v, a, b, g = (t.to(dtype).double() for t in make(5, 1, 40, (2,), 16, 16))
    gen = torch.Generator().manual_seed(2)
    o_weight = torch.randn(1, 40, 2, 16, generator=gen, dtype=torch.float64)
    s_weight = torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64)
    want = _gradients(lambda *x: reference(*x), (q, k, v, a, b, g), torch.float64, o_weight, s_weight)
    calls = _through_the_chain(monkeypatch)
    operands = []
    for name in ("states", "dstates"):
        real = getattr(triton_dplr, name)
        monkeypatch.setattr(triton_dplr, name, lambda *x, real=real: operands.append(x[5]) or real(*x))
    got = _gradients(lambda *x: dplr.chunk_dplr(*x), (q, k, v, a, b, g), dtype, o_weight, s_weight)
    assert calls == [1, 1] and operands == [dtype, dtype]
    assert got[0].dtype == dtype
    for out, ref in zip(got, want):
        check(out.detach().cpu(), ref.detach(), 2e-2)


def test_what_the_chain_kernels_decline(monkeypatch):
    """Chunks shorter than a tl.dot tile (T <= 8: 8-token chunks), other than 16 or 32 tokens,
    K past MAX_K and float64 keep the torch loop, with the same gradients."""
    assert triton_dplr.chain_takes(32, 128) and triton_dplr.chain_takes(16, 8)
    assert not triton_dplr.chain_takes(8, 8) and not triton_dplr.chain_takes(24, 8)
    assert not triton_dplr.chain_takes(64, 8)  # (not compiled ahead of time: fp32 spills at 64)
    assert not triton_dplr.chain_takes(32, triton_dplr.MAX_K + 1)
    calls = _through_the_chain(monkeypatch)
    for steps, dtype, chunk in ((7, torch.float32, None), (40, torch.float64, None), (40, torch.float32, 24)):
        q, k, v, a, b, g = (t.to(DEVICE, dtype).requires_grad_() for t in make(3, 1, steps, (2,), 8, 8))
        o, state = dplr.chunk_dplr(q, k, v, a, b, g, chunk_size=chunk)
        (o.sum() + state.sum()).backward()
        assert torch.isfinite(q.grad).all()
    assert calls == []


@pytest.mark.parametrize("decay", ["key", "scalar"])
def test_packed_sequences_train_in_one_call(monkeypatch, decay):
    """cu_seqlens under autograd: all sequences in one call, each padded to whole chunks and
    chained from its own initial state (lengths inside, across and at chunk ends, one token, a
    removal key shared by the tokens); outputs, final states and every gradient equal those of
    each sequence run alone on the torch form."""
    q, k, v, a, b, g = (t.float() for t in make(4, 1, 100, (2,), 8, 8, decay=decay, shapes={"a": (1, 1, 2)}))
    cu = torch.tensor([0, 20, 21, 53, 90, 100])
    s0 = torch.randn(5, 2, 8, 8)
    weight = torch.randn(1, 100, 2, 8, dtype=torch.float64)
    s_weight = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    inputs = (q, k, v, a, b, g, s0)
    fn = lambda *x: dplr.chunk_dplr(*x[:6], initial_state=x[6], cu_seqlens=cu.to(DEVICE), scale=0.6)  # noqa: E731
    calls = _through_the_chain(monkeypatch)
    got = _gradients(fn, inputs, torch.float32, weight, s_weight)
    assert calls == [1, 1]
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    want = _gradients(fn, inputs, torch.float64, weight, s_weight)
    for out, ref in zip(got, want):
        check(out.detach().cpu(), ref.detach().cpu(), 2e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_a_generated_layer_trains_through_the_chain_kernels(monkeypatch, packed):
    """examples/rwkv7.psm under autograd, one sequence or three packed ones (cu_seqlens): the
    layer's gradients with the chain on the kernels (one call) equal those of its torch form."""
    layer, x = rwkv7_layer(40)
    cu = {"cu_seqlens": torch.tensor([0, 7, 31, 40], device=DEVICE)} if packed else {}

    def gradients():
        inputs = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        out = layer(**inputs, **cu)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        return [out] + [inputs[n].grad for n in sorted(inputs)]

    calls = _through_the_chain(monkeypatch)
    got = gradients()
    assert calls == [1, 1]
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    want = gradients()
    for out, ref in zip(got, want):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_a_compiled_training_graph_runs_the_chain_kernels(monkeypatch):
    """torch.compile (AOTAutograd, no Inductor) of a training pass: the chain op runs the
    kernels forward and backward inside the graphs, with the eager pass's gradients."""
    inputs = [t.float().to(DEVICE) for t in make(6, 1, 50, (2,), 8, 8)]
    calls = _through_the_chain(monkeypatch)
    eager = [t.clone().requires_grad_() for t in inputs]
    o, s = dplr.chunk_dplr(*eager)
    (o.sum() + (s * s).sum()).backward()
    assert calls == [1, 1]
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in inputs]
    got_o, got_s = torch.compile(dplr.chunk_dplr, backend="aot_eager", fullgraph=True)(*leaves)
    (got_o.sum() + (got_s * got_s).sum()).backward()
    assert calls == [1, 1, 1, 1]
    torch.testing.assert_close(got_o, o, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
