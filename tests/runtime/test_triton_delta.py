"""The chunked (gated) delta rule on Triton kernels under TRITON_INTERPRET=1, against a
float64 per-token recurrence written here: S_t = g_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,
o_t = scale * q_t @ S_t."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from psmc.runtime import triton_delta  # noqa: E402
from psmc.runtime.triton_delta import triton_chunk_delta_rule  # noqa: E402

pytestmark = pytest.mark.triton
# PSMC_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the same tests compiled on a GPU
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


def loop_reference(q, k, v, beta, log_decay, scale, h0):
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    B, T = q.shape[:2]
    lanes = torch.broadcast_shapes(q.shape[2:-1], k.shape[2:-1], v.shape[2:-1], beta.shape[2:])
    S = torch.zeros(B, *lanes, q.shape[-1], v.shape[-1], dtype=torch.float64, device=q.device)
    if h0 is not None:
        S = S + h0.double()
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, ..., None, None]
        gt = 1.0 if log_decay is None else torch.exp(log_decay[:, t].double())[..., None, None]
        S = gt * (S - bt * kt[..., :, None] * (kt[..., :, None] * S).sum(-2, keepdim=True)) \
            + bt * kt[..., :, None] * v[:, t, ..., None, :]
        outs.append(scale * (q[:, t, ..., :, None] * S).sum(-2))
    return torch.stack(outs, 1), S


def make(seed, B, T, lanes, K, V, gated, h0, strength=1.0, kill=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, v = r(B, T, *lanes, K), r(B, T, *lanes, V)
    k = torch.nn.functional.normalize(r(B, T, *lanes, K), dim=-1)  # the usual L2-normalised keys
    beta = torch.rand(B, T, *lanes, generator=gen)
    g = None
    if gated:
        g = -strength * torch.rand(B, T, *lanes, generator=gen)
        if kill:
            g.view(-1)[::5] = -torch.inf
    init = r(B, *lanes, K, V) if h0 else None
    return [None if x is None else x.to(DEVICE) for x in (q, k, v, beta, g, init)]


CASES = [
    # (B, T, lanes, K, V, gated, h0)
    (1, 7, (), 16, 8, False, False),
    (1, 37, (2,), 16, 16, False, True),
    (1, 40, (2,), 24, 12, True, True),
    (1, 33, (3,), 8, 20, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}-{'gated' if c[5] else 'plain'}" for c in CASES])
def test_forward_matches_loop(case):
    B, T, lanes, K, V, gated, h0 = case
    q, k, v, beta, g, init = make(T, *case)
    o, s = triton_chunk_delta_rule(q, k, v, beta, g, scale=0.5, initial_state=init, chunk_size=32)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, beta, g), 0.5, cpu(init)[0])
    o, s = o.cpu(), s.cpu()
    assert o.dtype == v.dtype and s.dtype == torch.float32 and o.shape == ref_o.shape
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_strong_gates_and_broadcast_lanes():
    """Gates down to e^-40 per token and exact zeros; beta and keys shared across lanes."""
    q, k, v, beta, g, init = make(5, 1, 40, (2,), 16, 16, True, True, strength=40.0, kill=True)
    k, beta = k[:, :, :1], beta[:, :, :1]
    o, s = triton_chunk_delta_rule(q, k, v, beta, g, initial_state=init, chunk_size=16)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, beta, g), 1.0, cpu(init)[0])
    o, s = o.cpu(), s.cpu()
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


GRAD_CASES = [
    # (B, T, lanes, K, V, gated, h0, final-state gradient, chunk_size)
    (1, 7, (), 16, 8, False, False, False, 32),  # T < chunk, no initial state, o only
    (2, 37, (2,), 16, 16, False, True, True, 16),  # B, H > 1, ragged tail, both gradients
    (1, 40, (2,), 24, 12, True, True, True, 16),  # gated; K, V not powers of two
    (1, 33, (3,), 8, 20, True, False, False, 32),  # gated, fp32 training chunks of 32, ragged
]


def grads(fn, xs, do, ds):
    """Gradients of <o, do> + <S, ds> (ds None: o only) with respect to xs (None stays None)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    o, s = fn(leaves)
    loss = (o.double() * do).sum() + (0 if ds is None else (s.double() * ds).sum())
    loss.backward()
    return [None if x is None else x.grad.double() for x in leaves]


def delta_grads_case(case, dtype=torch.float32, seed=0):
    B, T, lanes, K, V, gated, h0, dh, chunk = case
    q, k, v, beta, g, init = make(seed + T, B, T, lanes, K, V, gated, h0)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, *lanes, V, generator=gen, dtype=torch.float64).to(DEVICE)
    ds = torch.randn(B, *lanes, K, V, generator=gen, dtype=torch.float64).to(DEVICE) if dh else None
    xs = [q, k, v, beta, g, init]
    got = grads(lambda a: triton_chunk_delta_rule(*a[:5], scale=0.5, initial_state=a[5], chunk_size=chunk), xs, do, ds)
    ref = grads(lambda a: loop_reference(*a[:5], 0.5, a[5]), [None if x is None else x.double() for x in xs], do, ds)
    return xs, got, ref


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"T{c[1]}-{'gated' if c[5] else 'plain'}-h0{int(c[6])}-dS{int(c[7])}"
                                                  for c in GRAD_CASES])
def test_gradients_match_float64_recurrence(case, monkeypatch):
    """Every gradient (q, k, v, beta, log gate, initial state) from the Triton backward kernels
    against autograd through the float64 per-token recurrence; the torch WY form must not run."""
    assert triton_delta.HAS_BACKWARD is True

    def no_torch(*a, **k):
        raise AssertionError("the torch WY form ran instead of the Triton backward")

    monkeypatch.setattr(triton_delta._delta, "_chunk_delta_rule_torch", no_torch)
    xs, got, ref = delta_grads_case(case)
    for name, x, a, r in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), xs, got, ref):
        if x is None:
            continue
        assert a.shape == x.shape, name
        torch.testing.assert_close(a.cpu(), r.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gradients_match_the_torch_wy_form_with_broadcasts():
    """Keys and beta shared across lanes, beta with time 1 broadcast over T, strong gates (down
    to e^-30 per token) and exact zeros (log gate -inf): the kernels' gradients are finite, equal
    autograd through the torch WY form (same inputs, fp32) and reduce over the broadcast axes."""
    q, k, v, beta, g, init = make(3, 2, 21, (2,), 16, 16, True, True, strength=30.0, kill=True)
    k, beta = k[:, :, :1], beta[:, :1, :1]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(2, 21, 2, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    ds = torch.randn(2, 2, 16, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    xs = [q, k, v, beta, g, init]
    got = grads(lambda a: triton_chunk_delta_rule(*a[:5], scale=0.7, initial_state=a[5], chunk_size=16), xs, do, ds)
    ref = grads(lambda a: triton_delta._delta._chunk_delta_rule_torch(*a[:5], 0.7, a[5], 16), xs, do, ds)
    for name, x, a, r in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), xs, got, ref):
        assert a.shape == x.shape and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.cpu(), r.cpu(), rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


def test_second_derivatives_are_refused():
    """The backward kernels are differentiable once: a second derivative raises, it is never a
    silent zero."""
    q, k, v, beta, g, init = make(2, 1, 9, (), 8, 8, True, False)
    q.requires_grad_()
    o, _ = triton_chunk_delta_rule(q, k, v, beta, g)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


def test_fp16_gradients():
    """fp16 inputs read as fp16 (tensor-core operands), fp32 accumulation: gradients in fp16
    within fp16 rounding of the float64 recurrence's."""
    xs, got, ref = delta_grads_case(GRAD_CASES[2], dtype=torch.float16, seed=4)
    for name, x, a, r in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), xs, got, ref):
        scale = r.abs().max().item()
        err = (a - r).abs().max().item()
        assert err <= 5e-3 * scale, (name, err, scale)


@settings(max_examples=3 if settings.default.max_examples <= 5 else settings.default.max_examples)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), steps=st.integers(1, 40),
       lanes=st.sampled_from([(), (2,), (2, 1)]), width_k=st.integers(1, 20), width_v=st.integers(1, 20),
       gated=st.booleans(), initial=st.booleans(), final_grad=st.booleans(), chunk=st.sampled_from([16, 32, 64]))
def test_gradients_property(seed, batch, steps, lanes, width_k, width_v, gated, initial, final_grad, chunk):
    """Generated shapes (T from 1, K and V from 1, multi-axis lanes, any chunk size): every
    gradient equals autograd through the float64 per-token recurrence."""
    case = (batch, steps, lanes, width_k, width_v, gated, initial, final_grad, chunk)
    xs, got, ref = delta_grads_case(case, seed=seed)
    for name, x, a, r in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), xs, got, ref):
        if x is None:
            continue
        assert a.shape == x.shape, name
        torch.testing.assert_close(a.cpu(), r.cpu(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


VARLEN_CASES = [
    # (lengths, lanes, K, V, gated, h0, dtype, chunk_size)
    ((5, 17, 1, 23), (2,), 16, 8, True, True, torch.float32, 16),  # inside, across and at chunk ends
    ((5, 17, 1, 23), (2,), 16, 8, False, False, torch.float32, 16),
    ((16, 3, 33), (2,), 8, 16, False, True, torch.float32, 16),
    ((16, 3, 33), (), 12, 8, True, False, torch.float32, 16),
    ((40, 2, 30), (2,), 16, 16, True, True, torch.float32, 64),  # fp32 training plan: 32-token chunks
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[
    f"{'gated' if c[4] else 'plain'}-{len(c[0])}seqs-h0{int(c[5])}-chunk{c[7]}" for c in VARLEN_CASES])
def test_packed_sequences_match_each_sequence_alone(case, monkeypatch):
    """cu_seqlens: N sequences packed along time run in the same Triton launches (the torch WY
    form must not run) and give what each gives alone: outputs, final states [N, ...] and every
    gradient (q, k, v, beta, log gate, initial states), against the float64 torch path with the
    same offsets, itself checked against the per-token recurrence one sequence at a time."""
    lengths, lanes, K, V, gated, h0, dtype, chunk = case
    total, n = sum(lengths), len(lengths)
    q, k, v, beta, g, _ = make(total + n, 1, total, lanes, K, V, gated, False, strength=2.0)
    init = torch.randn(n, *lanes, K, V, generator=torch.Generator().manual_seed(n)).to(DEVICE) if h0 else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    inputs = (q, k, v, beta, g, init)
    torch_path = triton_delta._delta._chunk_delta_rule_torch

    def run(fn, dtype):
        xs = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
        o, s = fn(xs)
        return xs, o, s

    def no_torch(*a, **kw):
        raise AssertionError("the torch WY form ran instead of the Triton kernels")

    with monkeypatch.context() as m:
        m.setattr(triton_delta._delta, "_chunk_delta_rule_torch", no_torch)
        xs, o, s = run(lambda a: triton_chunk_delta_rule(*a[:5], scale=0.7, initial_state=a[5], chunk_size=chunk,
                                                         cu_seqlens=cu), dtype)
        with torch.no_grad():  # the inference forward (its own plan, no saved inverses)
            o_inf, s_inf = triton_chunk_delta_rule(*inputs[:5], scale=0.7, initial_state=init, chunk_size=chunk,
                                                   cu_seqlens=cu)
    rxs, ro, rs = run(lambda a: torch_path(*a[:5], 0.7, a[5], chunk, cu_seqlens=cu), torch.float64)
    assert o.shape == (1, total, *lanes, V) and s.shape == (n, *lanes, K, V) and s.dtype == torch.float32
    for got_o, got_s in ((o, s), (o_inf, s_inf)):
        torch.testing.assert_close(got_o.double(), ro, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_s.double(), rs, rtol=1e-4, atol=1e-4)
    # the reference itself: each sequence through the per-token recurrence
    bounds = cu.tolist()
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        piece = [None if x is None else x[:, lo:hi] for x in cpu(q, k, v, beta, g)]
        lo_o, lo_s = loop_reference(*piece, 0.7, None if init is None else init[i:i + 1].cpu())
        torch.testing.assert_close(ro[:, lo:hi].detach().cpu(), lo_o, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rs[i:i + 1].detach().cpu(), lo_s, rtol=1e-9, atol=1e-9)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    with monkeypatch.context() as m:
        m.setattr(triton_delta._delta, "_chunk_delta_rule_torch", no_torch)
        ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((ro * do).sum() + (rs * ds).sum()).backward()
    for name, x, rx in zip(("q", "k", "v", "beta", "log_decay", "initial_state"), xs, rxs):
        if x is None:
            continue
        assert x.grad is not None and x.grad.shape == x.shape, name
        torch.testing.assert_close(x.grad.double(), rx.grad, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


def test_packed_sequences_are_checked():
    q, k, v, beta, g, _ = make(1, 1, 9, (2,), 8, 8, True, False)
    with pytest.raises(ValueError, match="total_T = cu_seqlens"):
        triton_chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 4, 8], device=DEVICE))
    with pytest.raises(ValueError, match="strictly increasing"):
        triton_chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 4, 4, 9], device=DEVICE))
    with pytest.raises(ValueError, match="start at 0"):
        triton_chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([1, 4, 9], device=DEVICE))
    two = [torch.cat([x, x]) for x in (q, k, v, beta, g)]
    with pytest.raises(ValueError, match="got batch 2"):
        triton_chunk_delta_rule(*two, cu_seqlens=torch.tensor([0, 4, 9], device=DEVICE))
    with pytest.raises(TypeError, match="int32/int64"):
        triton_chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0.0, 9.0], device=DEVICE))
