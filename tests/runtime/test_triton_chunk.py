"""The chunked Triton kernels of decayed linear attention under TRITON_INTERPRET=1.

Outputs and final states are checked against a float64 per-token recurrence written here;
gradients of every argument against the torch chunkwise path (autograd through per-chunk
torch ops) in float64. Shapes are small and odd: T shorter than a chunk, T not a multiple of
it, a ragged last sub-chunk, K and V not powers of two, lanes (), (H,), broadcast size-1
lanes, every decay kind, exclusive readouts, initial states, strong decays including -inf.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import chunkwise  # noqa: E402
from psmc.runtime.triton_chunk import triton_chunk_linear_attention  # noqa: E402

pytestmark = pytest.mark.triton
# PSMC_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the same tests compiled on a GPU
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


def loop_reference(q, k, v, g, decay, scale, h0, exclusive):
    """The textbook recurrence, one token at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, T = q.shape[:2]
    lanes = torch.broadcast_shapes(q.shape[2:-1], k.shape[2:-1], v.shape[2:-1],
                                   *(() if g is None else [g.shape[2:-1] if decay == "key" else g.shape[2:]]))
    K, V = q.shape[-1], v.shape[-1]
    S = torch.zeros(B, *lanes, K, V, dtype=torch.float64, device=q.device)
    if h0 is not None:
        S = S + h0.double()
    outs = []
    for t in range(T):
        if decay != "none":
            gt = g[:, t if g.shape[1] > 1 else 0].double()
            a = torch.exp(gt)[..., None] if decay == "key" else torch.exp(gt)[..., None, None]
        prev = S
        S = (S * a if decay != "none" else S) + k[:, t, ..., :, None] * v[:, t, ..., None, :]
        read = prev if exclusive else S
        outs.append(scale * (q[:, t, ..., :, None] * read).sum(-2))
    return torch.stack(outs, 1), S


def make(seed, B, T, lanes, K, V, decay, dtype=torch.float32, strength=1.0, h0=False, kill=False,
         bcast=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = r(B, T, *lanes, K), r(B, T, *lanes, K), r(B, T, *lanes, V)
    if bcast and lanes:
        k = r(B, T, *(1,) * len(lanes), K)  # keys shared by every lane
    g = None
    if decay != "none":
        shape = (B, T, *lanes, K) if decay == "key" else (B, T, *lanes)
        if bcast and decay == "scalar" and lanes:
            shape = (1, 1, *lanes)  # RetNet's constant per-head decay
        g = -strength * torch.rand(*shape, generator=gen, dtype=dtype)
        if kill:
            flat = g.view(-1)
            flat[:: 7] = -torch.inf
    init = r(B, *lanes, K, V) if h0 else None
    return [None if x is None else x.to(DEVICE) for x in (q, k, v, g, init)]


CASES = [
    # (B, T, lanes, K, V, decay, exclusive, h0, bcast)
    (1, 5, (), 8, 8, "none", False, False, False),  # T < one sub-chunk
    (2, 37, (2,), 16, 8, "key", False, True, False),  # ragged: 37 = 32 + 5
    (1, 50, (2,), 20, 12, "key", True, True, False),  # K, V not powers of two
    (1, 33, (3,), 16, 16, "scalar", False, True, True),  # RetNet's [1, 1, H] decay, shared keys
    (1, 19, (2, 1), 8, 24, "scalar", True, False, False),  # two lane axes
    (1, 20, (), 72, 70, "key", False, True, False),  # two K and two V blocks
]
@pytest.mark.parametrize("case", CASES, ids=[f"{c[5]}-T{c[1]}-{'excl' if c[6] else 'incl'}" for c in CASES])
def test_forward_matches_loop(case):
    B, T, lanes, K, V, decay, exclusive, h0, bcast = case
    q, k, v, g, init = make(T, B, T, lanes, K, V, decay, h0=h0, bcast=bcast)
    o, s = triton_chunk_linear_attention(q, k, v, g, decay=decay, scale=0.5, initial_state=init,
                                         exclusive=exclusive, chunk_size=32)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, g), decay, 0.5, cpu(init)[0], exclusive)
    o, s = o.cpu(), s.cpu()
    assert o.dtype == v.dtype and s.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay,exclusive", [("scalar", False), ("key", True)])
def test_strong_and_infinite_decays(decay, exclusive):
    """Decays of up to e^-60 per token and exact zeros (-inf): no NaN, no overflow, exact."""
    q, k, v, g, init = make(3, 1, 40, (2,), 16, 16, decay, strength=60.0, h0=True, kill=True)
    o, s = triton_chunk_linear_attention(q, k, v, g, decay=decay, initial_state=init, exclusive=exclusive,
                                         chunk_size=32)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, g), decay, 1.0, cpu(init)[0], exclusive)
    o, s = o.cpu(), s.cpu()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


GRAD_CASES = [
    (1, 37, (2,), 16, 8, "key", False, True, False),
    (1, 21, (2,), 16, 8, "key", True, True, False),
    (2, 21, (2,), 8, 16, "scalar", False, True, True),
    (1, 18, (3,), 8, 8, "none", True, True, True),
]
@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"{c[5]}-T{c[1]}-{'excl' if c[6] else 'incl'}" for c in GRAD_CASES])
def test_gradients_match_torch_chunkwise(case):
    B, T, lanes, K, V, decay, exclusive, h0, bcast = case
    inputs = make(100 + T, B, T, lanes, K, V, decay, h0=h0, bcast=bcast, strength=2.0)
    gen = torch.Generator().manual_seed(7)

    def run(fn, dtype):
        xs = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
        o, s = fn(*xs[:4], decay=decay, scale=0.7, initial_state=xs[4], exclusive=exclusive, chunk_size=16)
        return xs, o, s

    xs, o, s = run(triton_chunk_linear_attention, torch.float32)
    rxs, ro, rs = run(chunkwise._chunk_linear_attention_torch, torch.float64)
    backward_both((o, s), (ro, rs), gen)
    assert_grads_close(xs, rxs, rtol=2e-4, atol=lambda g: 2e-4)


def backward_both(outputs, reference_outputs, gen):
    """Backpropagate the same random output and final-state gradients through both runs."""
    (o, s), (ro, rs) = outputs, reference_outputs
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((ro * do).sum() + (rs * ds).sum()).backward()


def assert_grads_close(xs, rxs, rtol, atol):
    """Every input's gradient equals the float64 reference's (atol: a function of the reference)."""
    for name, x, rx in zip("q k v log_decay initial_state".split(), xs, rxs):
        if x is None:
            continue
        assert x.grad is not None and x.grad.shape == x.shape, name
        assert torch.isfinite(x.grad).all(), name
        torch.testing.assert_close(x.grad.double(), rx.grad, rtol=rtol, atol=atol(rx.grad),
                                   msg=lambda m: f"{name}: {m}")


def test_dispatch_switch_routes_cpu_tensors(monkeypatch):
    """chunk_linear_attention runs the Triton kernels when BACKEND asks for it."""
    calls = []
    from psmc.runtime import triton_chunk

    real = triton_chunk.triton_chunk_linear_attention
    monkeypatch.setattr(triton_chunk, "triton_chunk_linear_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    q, k, v, g, _ = make(1, 1, 9, (2,), 8, 8, "scalar")
    o, _ = chunkwise.chunk_linear_attention(q, k, v, g, decay="scalar")
    assert calls == [1]
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    o2, _ = chunkwise.chunk_linear_attention(q, k, v, g, decay="scalar")
    assert calls == [1]
    torch.testing.assert_close(o, o2, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(chunkwise, "BACKEND", "auto")  # Triton for CUDA tensors only
    chunkwise.chunk_linear_attention(q.cpu(), k.cpu(), v.cpu(), g.cpu(), decay="scalar")
    assert calls == [1]


@pytest.mark.parametrize("decay,exclusive", [("key", False), ("scalar", True)])
def test_gradients_with_strong_and_infinite_decays(decay, exclusive):
    """Decays down to e^-30 per token and exact zeros: every gradient finite and equal to the
    torch path's (at -inf log decays the exact gradient is 0; ours is the rounding residue of
    the reverse-cumsum identity, ~1e-6 of the gradient scale)."""
    inputs = make(11, 1, 30, (2,), 16, 8, decay, h0=True, strength=30.0, kill=True)

    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        o, s = fn(*xs[:4], decay=decay, scale=0.7, initial_state=xs[4], exclusive=exclusive, chunk_size=16)
        return xs, o, s

    xs, o, s = run(triton_chunk_linear_attention, torch.float32)
    rxs, ro, rs = run(chunkwise._chunk_linear_attention_torch, torch.float64)
    backward_both((o, s), (ro, rs), torch.Generator().manual_seed(7))
    assert all(x.grad is not None for x in xs)
    assert_grads_close(xs, rxs, rtol=1e-4, atol=lambda g: 2e-5 * float(g.abs().max()))


VARLEN_CASES = [
    # (lengths, lanes, K, V, decay, exclusive, h0)
    ((5, 17, 1, 23), (2,), 16, 8, "key", False, True),  # sequences inside, across and at sub-chunk ends
    ((16, 3, 33), (2,), 8, 16, "scalar", True, True),
    ((7, 9), (3,), 8, 8, "none", False, False),
    ((40, 2), (), 20, 12, "key", True, False),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[f"{c[4]}-{len(c[0])}seqs-{'excl' if c[5] else 'incl'}"
                                                    for c in VARLEN_CASES])
def test_packed_sequences_match_each_sequence_alone(case):
    """cu_seqlens: N sequences packed along time run in the same launches and give exactly what
    each gives alone (outputs, final states [N, ...], and every gradient, the initial states'
    included), checked against the float64 torch path one sequence at a time."""
    lengths, lanes, K, V, decay, exclusive, h0 = case
    total, n = sum(lengths), len(lengths)
    q, k, v, g, _ = make(sum(lengths) + n, 1, total, lanes, K, V, decay, strength=2.0)
    init = torch.randn(n, *lanes, K, V, generator=torch.Generator().manual_seed(n)).to(DEVICE) if h0 else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    inputs = (q, k, v, g, init)

    def run(fn, dtype):
        xs = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
        o, s = fn(*xs[:4], decay=decay, scale=0.7, initial_state=xs[4], exclusive=exclusive, chunk_size=16,
                  cu_seqlens=cu)
        return xs, o, s

    xs, o, s = run(triton_chunk_linear_attention, torch.float32)
    rxs, ro, rs = run(chunkwise._chunk_linear_attention_torch, torch.float64)
    assert o.shape == (1, total, *lanes, V) and s.shape == (n, *lanes, K, V)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), rs, rtol=1e-4, atol=1e-4)
    # the reference itself: each sequence through the per-token loop
    bounds = cu.tolist()
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        piece = [x[:, lo:hi] if x is not None else None for x in cpu(q, k, v, g)]
        lo_o, lo_s = loop_reference(*piece, decay, 0.7, None if init is None else init[i:i + 1].cpu(), exclusive)
        torch.testing.assert_close(ro[:, lo:hi].cpu(), lo_o, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rs[i:i + 1].cpu(), lo_s, rtol=1e-9, atol=1e-9)
    backward_both((o, s), (ro, rs), torch.Generator().manual_seed(3))
    assert_grads_close(xs, rxs, rtol=2e-4, atol=lambda g: 2e-4)


def test_a_packed_training_step_builds_its_device_tables_once(monkeypatch):
    """The forward and backward launches of one packing share its device tables; another
    packing gets its own, and only the last few are kept."""
    from psmc.runtime import triton_chunk
    built = []
    real = triton_chunk.sequences
    monkeypatch.setattr(triton_chunk, "sequences", lambda *a: built.append(a[0]) or real(*a))
    monkeypatch.setattr(triton_chunk, "_TABLES", {})
    q, k, v, g, _ = make(11, 1, 12, (2,), 8, 4, "key", strength=2.0)
    for bounds in ([0, 5, 12], [0, 5, 12], [0, 3, 12]):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        o, s = triton_chunk_linear_attention(*xs, decay="key", chunk_size=16, cu_seqlens=cu)
        (o.sum() + s.sum()).backward()
    assert [list(b) for b in built] == [[0, 5, 12], [0, 3, 12]]
    for n in range(3, 12):
        triton_chunk.packed_sequences([0, n, 12], 16, DEVICE)
    assert len(triton_chunk._TABLES) == triton_chunk._TABLES_KEPT


def test_packed_sequences_are_checked():
    q, k, v, g, _ = make(1, 1, 9, (2,), 8, 8, "scalar")
    with pytest.raises(ValueError, match="must end at|total_T = cu_seqlens"):
        triton_chunk_linear_attention(q, k, v, g, decay="scalar", cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE))
    with pytest.raises(ValueError, match="strictly increasing"):
        triton_chunk_linear_attention(q, k, v, g, decay="scalar", cu_seqlens=torch.tensor([0, 4, 4, 9], device=DEVICE))


@pytest.mark.heavy
def test_tuned_warps_give_the_same_results_and_every_launch_is_repeatable(monkeypatch):
    """fp16 operands: each kernel's launch is tuned between NUM_WARPS and twice as many
    (psmc.runtime.autotune), here with a clock under which the last candidate wins. The timing
    runs each kernel several times into the same buffers; the interpreter ignores the warps, so
    the tuned run equals the untuned one bit for bit unless a launch reads what an earlier one
    wrote (on a GPU, where 8 warps may sum in another order: to fp16 rounding)."""
    import itertools

    from psmc.runtime import autotune
    monkeypatch.setenv(autotune.ENV, "1")  # (benchmarks/gpu_check.sh runs the tests with it off)
    inputs = make(5, 1, 37, (2,), 16, 16, "key", dtype=torch.float16, h0=True, strength=2.0)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(1, 37, 2, 16, generator=gen).to(DEVICE, torch.float16)

    def run():
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        o, s = triton_chunk_linear_attention(*xs[:4], decay="key", scale=0.7, initial_state=xs[4], chunk_size=16)
        ((o.float() * do.float()).sum() + s.sum()).backward()
        return [o, s] + [x.grad for x in xs]

    plain = run()
    tuned = []
    real = autotune.launch
    monkeypatch.setattr(autotune, "launch", lambda key, c, r, d: tuned.append((key, tuple(c))) or real(key, c, r, d))
    ticks = itertools.count()
    with autotune.timed_by(lambda fn, device: (fn(), -float(next(ticks)))[1]):
        again = run()
        kept = autotune.kept()
    for name, a, b in zip("o s dq dk dv dlog_decay dh0".split(), plain, again):
        if DEVICE == "cpu":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name}: {m}")
    kernels = {key[1].fn.__name__ for key, _ in tuned}
    assert kernels == {"_state_kernel", "_out_kernel", "_readout_kernel"}, kernels
    assert all(c == (4, 8) and kept[key] == 8 for key, c in tuned)
