"""psmc.runtime.dplr: the chunked WY form of the diagonal-plus-low-rank recurrence and its O(K V)
step equal the textbook per-token recurrence and fla's naive references (RWKV-7, KDA); values,
final states and gradients, strong and zero decays, packed sequences, bf16 and torch.compile.

The reference here is the recurrence as written, one token at a time in float64, with the
K x K transition E_t = diag(exp(lam_t)) + b_t a_t^T formed explicitly:
S_t = E_t S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from psmc.runtime import chunkwise, dplr
from psmc.runtime.dplr import chunk_dplr, dplr_step

from closeness import assert_close
from shapes import result_shapes


def reference(q, k, v, a, b, log_decay=None, initial_state=None, scale=1.0):
    """The recurrence token by token in float64 with E_t formed; every leading axis broadcasts."""
    vectors = [q, k, v, a, b] + ([] if log_decay is None else [log_decay])
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in vectors))
    width_k, width_v = q.shape[-1], v.shape[-1]
    batch, steps, lanes = lead[0], lead[1], lead[2:]
    S = torch.zeros(batch, *lanes, width_k, width_v, dtype=torch.float64)
    if initial_state is not None:
        S = S + initial_state.double()
    at = lambda x, t: x.double().expand(*lead, x.shape[-1])[:, t]  # noqa: E731
    outputs = []
    for t in range(steps):
        decay = torch.ones(batch, *lanes, width_k, dtype=torch.float64) if log_decay is None else \
            torch.exp(at(log_decay, t)).expand(batch, *lanes, width_k)
        E = torch.diag_embed(decay) + at(b, t)[..., :, None] * at(a, t)[..., None, :]
        S = E @ S + at(k, t)[..., :, None] * at(v, t)[..., None, :]
        outputs.append(scale * (at(q, t)[..., None, :] @ S).squeeze(-2))
    return torch.stack(outputs, dim=1), S


def make(seed, batch, steps, lanes, width_k, width_v, dtype=torch.float64, decay="key", shapes=None):
    """q, k, v, a, b, log_decay [B, T, *lanes, ...] (shapes: per-input leading shapes overriding
    (batch, steps, *lanes)). a, b: a contracting rank-one term (RWKV-7-like, b a^T = -c kappa
    kappa^T with |kappa| = 1, c in (0, 1)) plus noise, so that long products stay bounded."""
    gen = torch.Generator().manual_seed(seed)
    full = (batch, steps, *lanes)
    shapes = shapes or {}
    rand = lambda name, width: torch.randn(*shapes.get(name, full), width, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = rand("q", width_k), rand("k", width_k) * width_k ** -0.5, rand("v", width_v)
    kappa = F.normalize(rand("a", width_k), dim=-1)
    a = -kappa + 0.1 * rand("a", width_k) * width_k ** -0.5
    b_shape = shapes.get("b", full)
    b = F.normalize(torch.randn(*b_shape, width_k, generator=gen, dtype=dtype), dim=-1) * \
        torch.rand(*b_shape, 1, generator=gen, dtype=dtype)
    if decay == "key":
        log_decay = F.logsigmoid(2 + rand("log_decay", width_k))
    elif decay == "scalar":
        log_decay = F.logsigmoid(2 + rand("log_decay", 1))
    else:
        log_decay = None
    return q, k, v, a, b, log_decay


def check(out, ref, rel):
    """Shapes equal, finite, and max |out - ref| <= rel * max(|ref|, 1), on the host (under
    PSMC_TEST_DEVICE=cuda the references are made on the GPU too)."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values"
    err = (out.double() - ref.double()).abs().max().item()
    bound = rel * max(ref.double().abs().max().item(), 1.0)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


CASES = [  # steps, chunk, lanes, decay, initial
    (1, 8, (3,), "key", True),  # one token
    (5, 8, (3,), "key", False),  # T < L
    (16, 8, (3,), "scalar", True),  # T a multiple of L
    (19, 8, (), "key", True),  # no lane axis, T not a multiple
    (37, 16, (2, 2), "key", True),  # two lane axes
    (37, 16, (3,), None, True),  # no decay: D = I
    (40, 64, (2,), "scalar", False),  # one padded chunk
    (70, 16, (2,), "key", True),
    (23, None, (2,), "key", True),  # the default chunk length
]


@pytest.mark.parametrize("steps, chunk, lanes, decay, initial", CASES)
def test_chunked_equals_the_per_token_recurrence(steps, chunk, lanes, decay, initial):
    q, k, v, a, b, g = make(steps * 7 + len(lanes), 2, steps, lanes, 5, 4, decay=decay)
    s0 = torch.randn(2, *lanes, 5, 4, dtype=torch.float64) if initial else None
    ref_o, ref_state = reference(q, k, v, a, b, g, s0, scale=0.7)
    o, state = chunk_dplr(q, k, v, a, b, g, scale=0.7, initial_state=s0, chunk_size=chunk)
    assert o.dtype == torch.float64 and state.dtype == torch.float64
    check(o, ref_o, 1e-10)
    check(state, ref_state, 1e-10)
    # float32: the same within ~1e-4 relative (state accumulated in float32)
    o32, state32 = chunk_dplr(*(None if t is None else t.float() for t in (q, k, v, a, b, g)), scale=0.7,
                              initial_state=None if s0 is None else s0.float(), chunk_size=chunk)
    assert o32.dtype == torch.float32 and state32.dtype == torch.float32
    check(o32, ref_o, 1e-4)
    check(state32, ref_state, 1e-4)


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes(seed):
    """Random batch, length, lanes, widths, chunk length (None included), decay kind, initial
    state, a time-1 (per-sequence) decay, with and without autograd: float64 to 1e-10."""
    gen = torch.Generator().manual_seed(1000 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    batch, steps, lanes = pick([1, 2]), pick([1, 2, 7, 31, 45, 66]), pick([(), (1,), (3,), (2, 2)])
    width_k, width_v = pick([1, 3, 6]), pick([1, 2, 5])
    chunk, decay, grad = pick([None, 1, 4, 8, 16, 64]), pick(["key", "scalar", None]), pick([False, True])
    shapes = {"log_decay": (batch, 1, *lanes)} if decay is not None and pick([False, True]) else None
    q, k, v, a, b, g = make(2000 + seed, batch, steps, lanes, width_k, width_v, decay=decay, shapes=shapes)
    s0 = torch.randn(batch, *lanes, width_k, width_v, dtype=torch.float64, generator=gen) if pick([0, 1]) else None
    ref_o, ref_state = reference(q, k, v, a, b, g, s0, scale=0.9)
    args = [None if t is None else t.clone().requires_grad_(grad) for t in (q, k, v, a, b, g)]
    o, state = chunk_dplr(*args, scale=0.9, initial_state=s0, chunk_size=chunk)
    assert (o.grad_fn is not None) == grad
    check(o.detach(), ref_o, 1e-10)
    check(state.detach(), ref_state, 1e-10)


@pytest.mark.parametrize("grad", [False, True])
def test_default_chunks_with_and_without_autograd(grad):
    """chunk_size=None (the measured defaults, with and without autograd); inference mode too."""
    q, k, v, a, b, g = make(3, 1, 150, (2,), 6, 3)
    s0 = torch.randn(1, 2, 6, 3, dtype=torch.float64)
    ref_o, ref_state = reference(q, k, v, a, b, g, s0)
    args = [t.clone().requires_grad_(grad) for t in (q, k, v, a, b, g)]
    with torch.inference_mode(not grad):
        o, state = chunk_dplr(*args, initial_state=s0)
    assert (o.grad_fn is not None) == grad
    check(o.detach(), ref_o, 1e-10)
    check(state.detach(), ref_state, 1e-10)


@pytest.mark.parametrize("shapes", [
    {"a": (1, 1, 3), "b": (1, 1, 3)},  # a per-lane constant a and b
    {"q": (2, 13, 1), "log_decay": (2, 13, 1)},  # one query and decay for every lane
    {"k": (1, 13, 3), "v": (2, 1, 3), "b": (2, 13, 1)},  # shared over batch, time, lanes
])
def test_leading_axes_broadcast(shapes):
    q, k, v, a, b, g = make(4, 2, 13, (3,), 4, 3, shapes=shapes)
    s0 = torch.randn(3, 4, 3, dtype=torch.float64)  # [*lanes, K, V]: broadcast over the batch
    o, state = chunk_dplr(q, k, v, a, b, g, initial_state=s0, chunk_size=4)
    ref_o, ref_state = reference(q, k, v, a, b, g, s0)
    assert o.shape == (2, 13, 3, 3) and state.shape == (2, 3, 4, 3)
    check(o, ref_o, 1e-10)
    check(state, ref_state, 1e-10)


# ------------------------------------------------------------------ realistic parameterisations
def _fla(module, attribute):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla warns that Triton has no GPU here
        import importlib

        return getattr(importlib.import_module(module), attribute)


def rwkv7_inputs(seed, batch, steps, heads, width_k, width_v):
    """RWKV-7's transition diag(w) - kappa_hat (iclr kappa_hat)^T in the column convention:
    a = -kappa_hat, b = kappa_hat * iclr, kappa_hat l2-normalised, iclr in (0, 1), the log decay
    -exp(w) with w = -softplus(-x) - 0.5 (decays in (exp(-exp(-0.5)), 1))."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda width: torch.randn(batch, steps, heads, width, generator=gen)  # noqa: E731
    q, k, v = rand(width_k), rand(width_k) * 0.5, rand(width_v)
    kappa = F.normalize(rand(width_k), dim=-1)
    iclr = torch.sigmoid(rand(width_k))
    w = -F.softplus(-2.0 * rand(width_k)) - 0.5
    return q, k, v, -kappa, kappa * iclr, -torch.exp(w)


def test_rwkv7_equals_fla_dplr_recurrence():
    """fla's dplr_recurrence: S <- S exp(gk) + k v^T + beta (alpha^T S), layout [B, H, T, D], q
    scaled by K ** -0.5 inside."""
    recurrence = _fla("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence")
    q, k, v, a, b, g = rwkv7_inputs(5, 2, 45, 2, 16, 8)
    s0 = torch.randn(2, 2, 16, 8)
    heads_first = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    ref_o, ref_state = recurrence(*map(heads_first, (q, k, v, a, b, g)), initial_state=s0.clone())
    ref_o = heads_first(ref_o)
    o, state = chunk_dplr(q, k, v, a, b, g, scale=16 ** -0.5, initial_state=s0, chunk_size=16)
    check(o, ref_o, 1e-4)
    check(state, ref_state, 1e-4)
    f64_o, f64_state = reference(q, k, v, a, b, g, s0, scale=16 ** -0.5)
    check(o, f64_o, 1e-4)
    check(state, f64_state, 1e-4)


def kda_inputs(seed, batch, steps, heads, width_k, width_v):
    """KDA's gates: g = -A softplus(x + dt_bias) per key (A in [1, 16] as fla initialises it:
    decays from mild to so strong that some chunks take the exact form), beta in (0, 1),
    l2-normalised keys."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(batch, steps, heads, *s, generator=gen)  # noqa: E731
    q, k, v = rand(width_k), F.normalize(rand(width_k), dim=-1), rand(width_v)
    A = torch.empty(heads, 1).uniform_(1, 16, generator=gen)
    g = -A * F.softplus(rand(width_k) - 1.0)
    beta = torch.sigmoid(rand())
    return q, k, v, g, beta


def test_kda_equals_fla_naive_recurrent_kda():
    """KDA, E = (I - beta k k^T) diag(exp(g)): a = k exp(g), b = -beta k, lam = g, write beta k;
    fla's naive_recurrent_kda takes [B, T, H, ...], the log gate g and scale K ** -0.5."""
    naive = _fla("fla.ops.kda.naive", "naive_recurrent_kda")
    q, k, v, g, beta = kda_inputs(6, 2, 50, 2, 16, 8)
    s0 = torch.randn(2, 2, 16, 8)
    ref_o, ref_state = naive(q, k, v, g, beta, initial_state=s0.clone(), output_final_state=True)
    args = (q, beta[..., None] * k, v, k * torch.exp(g), -beta[..., None] * k, g)
    o, state = chunk_dplr(*args, scale=16 ** -0.5, initial_state=s0, chunk_size=16)
    check(o, ref_o, 1e-4)
    check(state, ref_state, 1e-4)
    f64_o, f64_state = reference(*args, s0, scale=16 ** -0.5)
    check(o, f64_o, 1e-4)
    check(state, f64_state, 1e-4)
    o64, state64 = chunk_dplr(*(t.double() for t in args), scale=16 ** -0.5, initial_state=s0.double(),
                              chunk_size=16)
    check(o64, f64_o, 1e-10)
    check(state64, f64_state, 1e-10)


# ------------------------------------------------------------------ strong, zero and growing decays
def strong_decays(g):
    """Per-key log decays with an exact 0 (-inf) on some tokens and keys, -50 and -200 inside
    chunks (spreads far beyond the factorised form's) and a mild growth (+0.3)."""
    g = g.clone()
    g[:, 3, ..., 1] = -torch.inf
    g[:, 11] = -torch.inf  # every key of one token
    g[:, 14:17, ..., 2] = -50.0
    g[:, 20, ..., 0] = -200.0
    g[:, 25:29] = 0.3
    return g


@pytest.mark.parametrize("chunk", [8, 16])
def test_strong_zero_and_growing_decays_are_exact(chunk, monkeypatch):
    """Chunks whose exponents spread too far take the exact [L, L, K] form (here one chunk a
    group: _EXACT_BYTES forced small), the rest the factorised one; every value equals the
    float64 loop, and float32 stays finite and close."""
    monkeypatch.setattr(dplr, "_EXACT_BYTES", 1)
    q, k, v, a, b, g = make(7, 2, 35, (2,), 5, 4)
    g = strong_decays(g)
    s0 = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    ref_o, ref_state = reference(q, k, v, a, b, g, s0, scale=0.8)
    o, state = chunk_dplr(q, k, v, a, b, g, scale=0.8, initial_state=s0, chunk_size=chunk)
    check(o, ref_o, 1e-10)
    check(state, ref_state, 1e-10)
    o32, state32 = chunk_dplr(*(t.float() for t in (q, k, v, a, b, g)), scale=0.8, initial_state=s0.float(),
                              chunk_size=chunk)
    check(o32, ref_o, 1e-4)
    check(state32, ref_state, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_with_zero_decays_are_finite_and_exact(dtype, monkeypatch):
    """Backward through -inf decays (both forms, the exact one recomputed by checkpointing, a
    group of one chunk at a time): no NaN, and the float64 loop's gradients."""
    monkeypatch.setattr(dplr, "_EXACT_BYTES", 1)
    q, k, v, a, b, g = make(8, 1, 35, (2,), 5, 4)
    g = strong_decays(g)
    s0 = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    inputs = (q, k, v, a, b, g, s0)
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    o, state = chunk_dplr(*leaves[:6], scale=0.8, initial_state=leaves[6], chunk_size=8)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(o.shape, generator=gen, dtype=dtype), torch.randn(state.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((o * weights[0]).sum() + (state * weights[1]).sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    ref_o, ref_state = reference(*ref_leaves[:6], ref_leaves[6], scale=0.8)
    ref = torch.autograd.grad((ref_o * weights[0].double()).sum() + (ref_state * weights[1].double()).sum(),
                              ref_leaves)
    for name, got, want in zip(("q", "k", "v", "a", "b", "log_decay", "initial_state"), grads, ref):
        assert torch.isfinite(got).all(), name
        check(got, want, 1e-10 if dtype == torch.float64 else 1e-4)
    assert (grads[5][:, 11] == 0).all()  # nothing depends on a decay that is exactly 0


@pytest.mark.parametrize("strong", [False, True])
def test_gradcheck_f64(strong):
    """All of q, k, v, a, b, log_decay and initial_state; the second case with strong but finite
    decays (the exact form for one chunk, the factorised one for the other)."""
    q, k, v, a, b, g = make(9, 1, 7, (2,), 3, 2)
    if strong:
        g = g.clone()
        g[:, 1, 0, 0] = -60.0  # lane 0, key 0 of chunk 0 spreads over 95 > 2 * _MAX_SPREAD
        g[:, 2, 0, 0] = -35.0
        g[:, 5, 1] = -30.0
    s0 = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (q, k, v, a, b, g, s0)]

    def chunked(q, k, v, a, b, g, s0):
        return chunk_dplr(q, k, v, a, b, g, scale=0.8, initial_state=s0, chunk_size=4)

    assert torch.autograd.gradcheck(chunked, args)


def test_gradcheck_step_f64():
    q, k, v, a, b, g = make(10, 2, 1, (2,), 3, 2)
    s0 = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    args = [s0.clone().requires_grad_()] + [t[:, 0].clone().requires_grad_() for t in (q, k, v, a, b, g)]
    assert torch.autograd.gradcheck(lambda *x: dplr_step(*x, scale=0.8), args)


# ------------------------------------------------------------------ packed sequences
@pytest.mark.parametrize("packed", ["never", "always"])
@pytest.mark.parametrize("lengths", [(5, 17, 1, 23), (6, 5, 1, 6, 6)])
@pytest.mark.parametrize("grad", [False, True])
def test_packed_sequences_equal_separate_calls(grad, lengths, packed, monkeypatch):
    """cu_seqlens: each sequence from its own initial state, final states stacked [N, ...], the
    same outputs and gradients as separate calls (a time-1 a shared by every sequence), run one
    by one or in padded groups (chunkwise.PACKED)."""
    monkeypatch.setattr(chunkwise, "PACKED", packed)
    total, n = sum(lengths), len(lengths)
    q, k, v, a, b, g = make(11, 1, total, (2,), 5, 4)
    a = a[:, :1]
    init = torch.randn(n, 2, 5, 4, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = (q, k, v, a, b, g, init)
    leaves = [t.clone().requires_grad_(grad) for t in inputs]
    o, s = chunk_dplr(*leaves[:6], scale=0.6, initial_state=leaves[6], chunk_size=8, cu_seqlens=cu)
    assert o.shape == (1, total, 2, 4) and s.shape == (n, 2, 5, 4)
    ref_leaves = [t.clone().requires_grad_(grad) for t in inputs]
    outs, finals = [], []
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        piece = [t if t.shape[1] == 1 else t[:, lo:hi] for t in ref_leaves[:6]]
        o_i, s_i = chunk_dplr(*piece, scale=0.6, initial_state=ref_leaves[6][i:i + 1], chunk_size=8)
        ref_o, ref_s = reference(*piece, ref_leaves[6][i:i + 1], scale=0.6)
        check(o_i.detach(), ref_o.detach(), 1e-10)
        check(s_i.detach(), ref_s.detach(), 1e-10)
        outs.append(o_i)
        finals.append(s_i)
    ro, rs = torch.cat(outs, 1), torch.cat(finals)
    torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-12)
    if grad:
        gen = torch.Generator().manual_seed(2)
        do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        ds = torch.randn(s.shape, generator=gen, dtype=s.dtype)
        got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
        want = torch.autograd.grad((ro * do).sum() + (rs * ds).sum(), ref_leaves)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_packed_sequences_are_checked():
    q, k, v, a, b, g = make(12, 1, 9, (2,), 4, 3)
    with pytest.raises(ValueError, match="chunk_dplr: .*total_T = cu_seqlens"):
        chunk_dplr(q, k, v, a, b, g, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="strictly increasing"):
        chunk_dplr(q, k, v, a, b, g, cu_seqlens=torch.tensor([0, 4, 4, 9]))


# ------------------------------------------------------------------ the step
@pytest.mark.parametrize("decay", ["key", "scalar", None])
def test_step_chained_equals_the_chunked_pass(decay):
    """dplr_step token by token (from state None) gives chunk_dplr's outputs and final state;
    continuing a parallel pass's final state gives the next token."""
    q, k, v, a, b, g = make(13, 2, 11, (3,), 5, 4, dtype=torch.float32, decay=decay)
    o_par, s_par = chunk_dplr(q, k, v, a, b, g, scale=0.5, chunk_size=4)
    S, outputs = None, []
    for t in range(q.shape[1]):
        o, S = dplr_step(S, q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], None if g is None else g[:, t], scale=0.5)
        outputs.append(o)
    assert S.shape == (2, 3, 5, 4) and S.dtype == torch.float32 and outputs[0].dtype == torch.float32
    assert_close(torch.stack(outputs, dim=1), o_par, torch.float32)
    assert_close(S, s_par, torch.float32)
    ref_o, _ = reference(q, k, v, a, b, g, scale=0.5)
    o7, _ = chunk_dplr(q[:, :7], k[:, :7], v[:, :7], a[:, :7], b[:, :7], None if g is None else g[:, :7],
                       scale=0.5, chunk_size=4)
    head = chunk_dplr(q[:, :6], k[:, :6], v[:, :6], a[:, :6], b[:, :6], None if g is None else g[:, :6],
                      scale=0.5, chunk_size=4)[1]
    o_next, _ = dplr_step(head, q[:, 6], k[:, 6], v[:, 6], a[:, 6], b[:, 6], None if g is None else g[:, 6],
                          scale=0.5)
    assert_close(o_next, ref_o[:, 6], torch.float32)
    assert_close(o7[:, 6], ref_o[:, 6], torch.float32)


def test_step_broadcasts_and_reads_the_old_state():
    """Per-lane constant a, b [1, H, K] and a scalar decay [B, H, 1]; a^T S reads the state
    before the token (E_t S_{t-1}), in float64 for float64 inputs."""
    gen = torch.Generator().manual_seed(14)
    S = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    q, k = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    a, b = (torch.randn(1, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    g = -torch.rand(2, 3, 1, generator=gen, dtype=torch.float64)
    o, new = dplr_step(S, q, k, v, a, b, g, scale=0.3)
    E = torch.exp(g)[..., None] * torch.eye(4, dtype=torch.float64) + b[..., :, None] * a[..., None, :]
    want = E @ S + k[..., :, None] * v[..., None, :]
    assert new.dtype == torch.float64 and o.dtype == torch.float64
    torch.testing.assert_close(new, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o, 0.3 * (q[..., None, :] @ want).squeeze(-2), rtol=1e-12, atol=1e-12)


def test_step_never_forms_the_key_by_key_transition():
    """O(K V): no tensor of the step has two K axes (K = 7 differs from V = 3)."""
    q, k, v, a, b, g = make(15, 2, 1, (2,), 7, 3, dtype=torch.float32)
    shapes = result_shapes(lambda: dplr_step(torch.randn(2, 2, 7, 3), q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], g[:, 0]))
    assert shapes
    assert not [s for s in shapes if s[-2:] == (7, 7)], shapes


# ------------------------------------------------------------------ dtypes, shapes, compile
def test_bf16_inputs_compute_in_float32():
    q, k, v, a, b, g = make(16, 2, 21, (3,), 8, 4, dtype=torch.float32)
    s0 = torch.randn(2, 3, 8, 4)
    o32, s32 = chunk_dplr(q, k, v, a, b, g, initial_state=s0, chunk_size=8)
    half = [t.to(torch.bfloat16) for t in (q, k, v, a, b, g)]
    o, state = chunk_dplr(*half, initial_state=s0, chunk_size=8)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    check(o, o32, 5e-2)
    check(state, s32, 5e-2)
    # the same inputs rounded to bf16 and run in float32: only the output's rounding differs
    o_r, s_r = chunk_dplr(*(t.float() for t in half), initial_state=s0, chunk_size=8)
    check(o, o_r, 1e-2)
    check(state, s_r, 1e-5)
    o1, s1 = dplr_step(s0.to(torch.bfloat16), *(t[:, 0] for t in half))
    assert o1.dtype == torch.bfloat16 and s1.dtype == torch.float32


def test_empty_sequence_returns_the_initial_state():
    q, k, v, a, b, g = make(17, 2, 0, (3,), 4, 3, dtype=torch.float32)
    s0 = torch.randn(2, 3, 4, 3)
    o, state = chunk_dplr(q, k, v, a, b, g, initial_state=s0)
    assert o.shape == (2, 0, 3, 3) and torch.equal(state, s0)


def test_mismatched_shapes_are_named():
    q, k, v, a, b, g = make(18, 2, 5, (3,), 4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"chunk_dplr: leading axes do not broadcast.*a \(2, 5, 2, 4\)"):
        chunk_dplr(q, k, v, a[:, :, :2], b, g)
    with pytest.raises(ValueError, match=r"same K.*b \(2, 5, 3, 3\)"):
        chunk_dplr(q, k, v, a, b[..., :3], g)


def _graphs_of(backend: str, graphs: list):
    """A torch.compile backend that keeps each Dynamo graph and hands it to `backend`."""
    from torch._dynamo.backends.registry import lookup_backend

    def keep(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)
    return keep


def test_compiled_equals_eager():
    """torch.compile (one full graph, aot_eager): the form is chosen on the device by torch.cond
    (factorised for mild decays, exact with -inf and -200 decays), with the values and gradients
    of eager code and the float64 loop."""
    import torch._dynamo as dynamo
    dynamo.reset()
    graphs = []
    run = torch.compile(lambda *x: chunk_dplr(*x[:6], scale=0.5, initial_state=x[6], chunk_size=8),
                        fullgraph=True, backend=_graphs_of("aot_eager", graphs))
    q, k, v, a, b, g = make(19, 1, 21, (2,), 4, 3, dtype=torch.float32)
    s0 = torch.randn(1, 2, 4, 3)
    for decays in (g, strong_decays(g)):
        inputs = (q, k, v, a, b, decays, s0)
        leaves = [t.clone().requires_grad_() for t in inputs]
        o, state = run(*leaves)
        eager = [t.clone().requires_grad_() for t in inputs]
        e_o, e_state = chunk_dplr(*eager[:6], scale=0.5, initial_state=eager[6], chunk_size=8)
        ref_o, ref_state = reference(*inputs[:6], s0, scale=0.5)
        assert_close(o, e_o, torch.float32)
        assert_close(state, e_state, torch.float32)
        check(o, ref_o, 1e-4)
        weights = torch.randn_like(o)
        ours = torch.autograd.grad((o * weights).sum() + state.sum(), leaves)
        theirs = torch.autograd.grad((e_o * weights).sum() + e_state.sum(), eager)
        for mine, expected in zip(ours, theirs):
            assert torch.isfinite(mine).all()
            assert_close(mine, expected, torch.float32)
    assert len(graphs) == 1
    assert [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.cond]


def test_a_graph_holds_the_chunk_chain_as_one_op():
    """Under torch.compile the chunks are chained by one `psmc::dplr_chain` node (its backward
    one `psmc::dplr_chain_backward`), not a product per chunk unrolled into the graph; the
    compiled pass and its gradients equal the eager ones."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = [t.float() for t in make(5, 2, 200, (2,), 8, 8)]  # 7 chunks of 32
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch._dynamo.reset()
    o, s = torch.compile(lambda *x: dplr.chunk_dplr(*x, scale=0.5), backend=keep, fullgraph=True)(*leaves)
    # (the chain's autograd.Function is a subgraph of the Dynamo graph: every module's nodes)
    targets = [str(n.target) for g in graphs for m in g.modules() for n in m.graph.nodes if n.op == "call_function"]
    assert targets.count("psmc.dplr_chain.default") == 1
    # (the batched products of the terms and the outputs, not one per chunk)
    assert sum("baddbmm" in t for t in targets) <= 3, targets
    (o.sum() + (s * s).sum()).backward()
    eager = [t.clone().requires_grad_() for t in inputs]
    want_o, want_s = dplr.chunk_dplr(*eager, scale=0.5)
    (want_o.sum() + (want_s * want_s).sum()).backward()
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_the_chain_op_s_loop_over_packed_sequences_and_its_gradients():
    """psmc::dplr_chain without the kernels (the loop): with cu_chunks each sequence's chunks
    run from its own initial state, equal to a call per sequence, and its gradient (`_Chain`)
    passes gradcheck (float64), for a regular batch and for packed sequences."""
    gen = torch.Generator().manual_seed(3)
    L, K, V, H = 4, 3, 2, 2
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)  # three sequences of 2, 1 and 3 chunks
    chunks = 6 * H
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    w, b_out, written = r(chunks, L, K) * 0.5, r(chunks, L, K) * 0.5, r(chunks, K, V)
    gate, state = torch.rand(chunks, K, generator=gen, dtype=torch.float64), r(3 * H, K, V)
    entering, final = dplr._chain(w, b_out, written, gate, state, torch.float64, False, cu)
    for n, (first, last) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        part = slice(first * H, last * H)
        want_entering, want_final = dplr._chain(w[part], b_out[part], written[part], gate[part],
                                                state[n * H:(n + 1) * H], torch.float64, False)
        torch.testing.assert_close(entering[first:last], want_entering)
        torch.testing.assert_close(final[n * H:(n + 1) * H], want_final)
    leaves = [x.requires_grad_() for x in (w, b_out, written, gate, state)]
    assert torch.autograd.gradcheck(lambda *x: dplr._Chain.apply(*x, torch.float64, False, cu), leaves)
    assert torch.autograd.gradcheck(lambda *x: dplr._Chain.apply(*x[:4], x[4][:H], torch.float64, False, None), leaves)
