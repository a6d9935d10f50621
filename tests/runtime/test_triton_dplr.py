"""The diagonal-plus-low-rank parallel pass on chunked Triton kernels (psmc.runtime.triton_dplr),
under TRITON_INTERPRET=1: against the float64 per-token recurrence (test_dplr.reference) with
per-key, scalar or no decay, with and without an initial state, T below, at and past a chunk,
broadcast lanes, K and V not powers of two and K = 128 (the kernels' limit), exact zeros,
strong and growing decays, fp16 inputs (bf16 on a GPU); what it declines; that chunk_dplr routes to it; packed
sequences; and a generated RWKV-7 layer's forward through it."""
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
    torch.testing.assert_close(state.cpu(), s0)


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
    BACKEND='triton'), under autograd the torch form, with the same values; packed sequences
    reach them one group at a time."""
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
    assert len(calls) > 2
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
