"""The CPU fast paths equal a plain per-token loop: values, final states and gradients.

References are written here as the textbook recurrences, one token at a time, in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from psmc.runtime import chunkwise, fastpaths
from psmc.runtime.chunkwise import chunk_linear_attention
from psmc.runtime.fastpaths import linear_recurrence

from closeness import assert_close

STEPS = (1, 2, 3, 17, 100, 130)
DTYPES = (torch.float32, torch.float64)
KINDS = ("none", "scalar", "key")


def random_shape(seed: int) -> tuple[int, int, int, int]:
    """(batch, heads, key width, value width), small and odd on purpose."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    return pick(1, 2), pick(1, 3), pick(1, 9), pick(1, 6)


# ---------------------------------------------------------------- first-order recurrence


def loop_recurrence(a, b, h0=None):
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.expand_as(b[:, 0])
    states = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


@pytest.fixture(params=["two-level", "plain-loop"])
def scan_path(request, monkeypatch):
    """Both strategies of fastpaths: the two-level chunked scan and the plain time loop."""
    grain = 1 << 40 if request.param == "two-level" else 1  # sqrt(T) chunks, or none
    monkeypatch.setattr(fastpaths, "_GRAIN", grain)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("with_initial", [False, True])
def test_linear_recurrence_matches_loop(scan_path, dtype, steps, with_initial):
    torch.manual_seed(steps)
    a = torch.rand(2, steps, 3, 4, dtype=dtype)
    b = torch.randn(2, steps, 3, 4, dtype=dtype)
    h0 = torch.randn(2, 3, 4, dtype=dtype) if with_initial else None
    h, last = linear_recurrence(a, b, h0)
    ref = loop_recurrence(a.double(), b.double(), None if h0 is None else h0.double())
    assert h.dtype == dtype
    assert_close(h, ref, dtype)
    assert_close(last, ref[:, -1], dtype)


@pytest.mark.parametrize("steps", STEPS)
def test_linear_recurrence_log_broadcast_and_exclusive(scan_path, steps):
    torch.manual_seed(100 + steps)
    log_a = -3 * torch.rand(2, steps, 3, 1, dtype=torch.float64)  # broadcast over the last axis
    b = torch.randn(2, steps, 3, 5, dtype=torch.float64)
    h0 = torch.randn(2, 3, 5, dtype=torch.float64)
    before, last = linear_recurrence(log_a, b, h0, log=True, exclusive=True)
    ref = loop_recurrence(log_a.exp(), b, h0)
    assert_close(before, torch.cat([h0[:, None], ref[:, :-1]], dim=1), torch.float64)
    assert_close(last, ref[:, -1], torch.float64)


@pytest.mark.parametrize("steps", STEPS)
def test_linear_recurrence_gradients_match_loop(scan_path, steps):
    torch.manual_seed(200 + steps)
    make = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    a, b, h0 = make(2, steps, 3, 1), make(2, steps, 3, 4), make(2, 3, 4)
    weights = torch.randn(2, steps, 3, 4, dtype=torch.float64)
    h, last = linear_recurrence(a, b, h0)
    ours = torch.autograd.grad((h * weights).sum() + last.square().sum(), (a, b, h0))
    ref = loop_recurrence(a, b, h0)
    theirs = torch.autograd.grad((ref * weights).sum() + ref[:, -1].square().sum(), (a, b, h0))
    for mine, expected in zip(ours, theirs):
        assert_close(mine, expected, torch.float64)


def test_linear_recurrence_gradcheck(scan_path):
    torch.manual_seed(3)
    make = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    inputs = (make(2, 7, 3, 1), make(2, 7, 3, 2), make(2, 3, 2))
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_recurrence(a, b, h0), inputs)
    assert torch.autograd.gradcheck(lambda a, b: linear_recurrence(a, b, log=True, exclusive=True)[0], inputs[:2])


def test_linear_recurrence_empty_sequence_returns_initial():
    h0 = torch.randn(2, 3)
    h, last = linear_recurrence(torch.ones(2, 0, 3), torch.ones(2, 0, 3), h0)
    assert h.shape == (2, 0, 3)
    assert torch.equal(last, h0)


def test_linear_recurrence_rejects_mismatched_time():
    with pytest.raises(ValueError):
        linear_recurrence(torch.ones(2, 4, 3), torch.ones(2, 5, 3))


# ------------------------------------------------------- chunkwise decayed linear attention


def loop_attention(q, k, v, log_decay=None, decay="none", scale=1.0, initial=None, exclusive=False):
    """S_t = decay_t S_{t-1} + k_t v_t^T, o_t = scale q_t S_t (S_{t-1} if exclusive); float64."""
    q, k, v = (x.double() for x in (q, k, v))
    batch, steps = q.shape[:2]
    lanes = torch.broadcast_shapes(q.shape[2:-1], k.shape[2:-1], v.shape[2:-1])
    state = torch.zeros(batch, *lanes, q.shape[-1], v.shape[-1], dtype=torch.float64)
    if initial is not None:
        state = state + initial.double()
    outputs = []
    for t in range(steps):
        before = state
        if decay == "none":
            factor = 1.0
        else:
            gate = log_decay.double().expand(batch, steps, *log_decay.shape[2:])[:, t].exp()
            factor = gate[..., None] if decay == "key" else gate[..., None, None]
        state = factor * state + k[:, t, ..., :, None] * v[:, t, ..., None, :]
        read = before if exclusive else state
        outputs.append(scale * (q[:, t, ..., None, :] @ read)[..., 0, :])
    return torch.stack(outputs, dim=1), state


def make_inputs(decay, steps, dtype, seed, lanes=None, decay_scale=None):
    batch, heads, width_k, width_v = random_shape(seed)
    lanes = lanes or (heads,)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = rand(batch, steps, *lanes, width_k), rand(batch, steps, *lanes, width_k), rand(batch, steps, *lanes, width_v)
    log_decay = None
    if decay != "none":
        shape = (batch, steps, *lanes) + ((width_k,) if decay == "key" else ())
        if decay_scale is None:  # fla's gates: logsigmoid of normal logits
            log_decay = F.logsigmoid(3 * rand(*shape))
        else:
            log_decay = decay_scale * torch.rand(*shape, generator=gen, dtype=dtype)
    initial = rand(batch, *lanes, width_k, width_v)
    return q, k, v, log_decay, initial


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", KINDS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("exclusive", [False, True])
def test_chunk_attention_matches_loop(dtype, decay, steps, exclusive):
    seed = steps * 7 + KINDS.index(decay) + 3 * exclusive
    q, k, v, log_decay, initial = make_inputs(decay, steps, dtype, seed)
    initial = initial if steps % 2 else None  # with and without an initial state
    scale = q.shape[-1] ** -0.5
    o, final = chunk_linear_attention(
        q, k, v, log_decay, decay=decay, scale=scale, initial_state=initial, exclusive=exclusive, chunk_size=16
    )
    ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, scale, initial, exclusive)
    assert o.dtype == dtype and final.dtype == dtype
    assert_close(o, ref_o, dtype)
    assert_close(final, ref_final, dtype)


@pytest.mark.parametrize("decay", KINDS)
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("max_spread", [math.inf, 0.0], ids=["factorised", "split-to-elementwise"])
def test_chunk_attention_gradients_match_loop(decay, exclusive, max_spread, monkeypatch):
    """Every intra-chunk strategy: one factorised block, or halving down to exact blocks."""
    monkeypatch.setattr(chunkwise, "_MAX_SPREAD", max_spread)
    inputs = make_inputs(decay, 37, torch.float64, seed=5 + KINDS.index(decay))
    leaves = [x.requires_grad_() for x in inputs if x is not None]
    q, k, v, log_decay, initial = inputs
    kwargs = dict(decay=decay, scale=0.7, initial_state=initial, exclusive=exclusive)
    o, final = chunk_linear_attention(q, k, v, log_decay, chunk_size=32, **kwargs)
    weights = torch.randn_like(o)
    ours = torch.autograd.grad((o * weights).sum() + final.square().sum(), leaves)
    ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, 0.7, initial, exclusive)
    assert_close(o, ref_o, torch.float64)
    theirs = torch.autograd.grad((ref_o * weights).sum() + ref_final.square().sum(), leaves)
    for mine, expected in zip(ours, theirs):
        assert_close(mine, expected, torch.float64)


@pytest.mark.parametrize("decay", KINDS)
def test_chunk_groups_carry_the_state(decay, monkeypatch):
    """One chunk per group (the cache-sized groups of a long input): the state crosses groups."""
    monkeypatch.setattr(chunkwise, "_GROUP_BYTES", 1)
    inputs = make_inputs(decay, 100, torch.float64, seed=41 + KINDS.index(decay))
    leaves = [x.requires_grad_() for x in inputs if x is not None]
    q, k, v, log_decay, initial = inputs
    o, final = chunk_linear_attention(q, k, v, log_decay, decay=decay, initial_state=initial, chunk_size=16)
    ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, 1.0, initial)
    assert_close(o, ref_o, torch.float64)
    assert_close(final, ref_final, torch.float64)
    ours = torch.autograd.grad(o.sum() + final.sum(), leaves)
    theirs = torch.autograd.grad(ref_o.sum() + ref_final.sum(), leaves)
    for mine, expected in zip(ours, theirs):
        assert_close(mine, expected, torch.float64)


@pytest.mark.parametrize("decay", KINDS)
@pytest.mark.parametrize("exclusive", [False, True])
def test_chunk_attention_gradcheck(decay, exclusive):
    q, k, v, log_decay, initial = make_inputs(decay, 6, torch.float64, seed=11, lanes=(1,))
    q, k, v, initial = q[:1, ..., :3], k[:1, ..., :3], v[:1, ..., :2], initial[:1, ..., :3, :2]
    if log_decay is not None:
        log_decay = log_decay[:1, ..., :3] if decay == "key" else log_decay[:1]
    inputs = [x.detach().requires_grad_() for x in (q, k, v, initial)]
    if log_decay is not None:
        inputs.append(log_decay.detach().requires_grad_())

    def run(q, k, v, initial, log_decay=None):
        return chunk_linear_attention(
            q, k, v, log_decay, decay=decay, scale=0.5, initial_state=initial, exclusive=exclusive, chunk_size=4
        )

    assert torch.autograd.gradcheck(run, tuple(inputs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", ["scalar", "key"])
@pytest.mark.parametrize("strength", [-5.0, -60.0, -1e4, -math.inf])
@pytest.mark.parametrize("exclusive", [False, True])
def test_strong_decays_stay_finite_and_exact(dtype, decay, strength, exclusive):
    """Large negative log decays (and -inf, a decay of exactly 0) never make inf or NaN."""
    scale = strength if math.isfinite(strength) else -5.0
    q, k, v, log_decay, _ = make_inputs(decay, 130, dtype, seed=17, decay_scale=scale)
    if not math.isfinite(strength):
        log_decay[:, ::7] = -math.inf
    leaves = [x.requires_grad_() for x in (q, k, v, log_decay)]
    o, final = chunk_linear_attention(q, k, v, log_decay, decay=decay, exclusive=exclusive, chunk_size=64)
    ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, 1.0, None, exclusive)
    assert_close(o, ref_o, dtype)
    assert_close(final, ref_final, dtype)
    for grad in torch.autograd.grad(o.sum() + final.sum(), leaves):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("decay", ["scalar", "key"])
def test_fla_typical_gates_are_exact_in_float32_at_chunk_64(decay):
    """logsigmoid-style gates ~U(-5, 0), a long sequence, the default chunk: fp32 tolerance."""
    q, k, v, log_decay, initial = make_inputs(decay, 300, torch.float32, seed=23, decay_scale=-5.0)
    o, final = chunk_linear_attention(q, k, v, log_decay, decay=decay, scale=0.3, initial_state=initial)
    ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, 0.3, initial)
    assert_close(o, ref_o, torch.float32)
    assert_close(final, ref_final, torch.float32)


def test_lanes_broadcast_and_flatten():
    """Two lane axes; q shared across one of them; a constant per-head decay (RetNet)."""
    gen = torch.Generator().manual_seed(29)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(2, 19, 1, 3, 4), rand(2, 19, 2, 3, 4), rand(2, 19, 2, 3, 5)
    log_gamma = -torch.rand(1, 1, 1, 3, generator=gen, dtype=torch.float64)
    initial = rand(1, 2, 1, 4, 5)
    o, final = chunk_linear_attention(q, k, v, log_gamma, decay="scalar", initial_state=initial, chunk_size=8)
    ref_o, ref_final = loop_attention(q, k, v, log_gamma, "scalar", 1.0, initial)
    assert o.shape == (2, 19, 2, 3, 5) and final.shape == (2, 2, 3, 4, 5)
    assert_close(o, ref_o, torch.float64)
    assert_close(final, ref_final, torch.float64)


def test_half_precision_inputs_accumulate_in_float32():
    q, k, v, log_decay, _ = make_inputs("key", 20, torch.float32, seed=31)
    halves = [x.to(torch.bfloat16) for x in (q, k, v, log_decay)]
    o, final = chunk_linear_attention(*halves, decay="key")
    ref_o, _ = loop_attention(*halves, decay="key")
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert (o.double() - ref_o).norm() / ref_o.norm() < 1e-2


@pytest.mark.parametrize("decay, log_decay", [("none", torch.zeros(1, 3, 2)), ("scalar", None), ("diag", None)])
def test_rejects_inconsistent_decay_kind(decay, log_decay):
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError):
        chunk_linear_attention(q, q, q, log_decay, decay=decay)


def test_chunk_count_keeps_slices_single_threaded():
    """~sqrt(T) chunks, fewer when a slice would wake torch's thread pool, none for short scans."""
    assert fastpaths._chunk_count(130, 12) == 11
    assert fastpaths._chunk_count(4096, 1024) == 31  # slices of 31 x 1024 < 32768 elements
    assert fastpaths._chunk_count(16, 32768) == 0  # chunk states: a plain loop
    assert fastpaths._chunk_count(3, 4) == 0


def test_chunk_attention_empty_sequence_returns_initial_state():
    q, v, initial = torch.randn(2, 0, 3, 4), torch.randn(2, 0, 3, 5), torch.randn(2, 3, 4, 5)
    o, final = chunk_linear_attention(q, q, v, torch.zeros(2, 0, 3), decay="scalar", initial_state=initial)
    assert o.shape == (2, 0, 3, 5)
    assert torch.equal(final, initial)


def _graphs_of(backend: str, graphs: list):
    """A torch.compile backend that keeps each Dynamo graph and hands it to `backend`."""
    from torch._dynamo.backends.registry import lookup_backend

    def keep(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)
    return keep


@pytest.mark.parametrize("decay, exclusive", [("scalar", False), ("key", True)])
def test_compiled_chunk_attention_chooses_the_form_on_the_device(decay, exclusive):
    """A graph cannot read the decays' spread on the host: torch.cond picks the factorised form
    (weak decays) or the exact one (strong decays) on the device. One graph serves both (no
    retrace), and its values and gradients equal the float64 loop in each regime."""
    import torch._dynamo as dynamo
    dynamo.reset()
    graphs = []
    run = torch.compile(lambda q, k, v, g, h0: chunk_linear_attention(q, k, v, g, decay=decay, exclusive=exclusive,
                                                                      initial_state=h0, chunk_size=16),
                        fullgraph=True, backend=_graphs_of("aot_eager", graphs))
    for scale in (-0.5, -60.0):  # spread within _MAX_SPREAD; far beyond it
        q, k, v, log_decay, initial = make_inputs(decay, 37, torch.float32, seed=31, decay_scale=scale)
        leaves = [x.requires_grad_() for x in (q, k, v, log_decay, initial)]
        o, final = run(q, k, v, log_decay, initial)
        ref_o, ref_final = loop_attention(q, k, v, log_decay, decay, 1.0, initial, exclusive)
        assert_close(o, ref_o, torch.float32)
        assert_close(final, ref_final, torch.float32)
        weights = torch.randn_like(o)
        ours = torch.autograd.grad((o * weights).sum() + final.sum(), leaves)
        theirs = torch.autograd.grad((ref_o * weights).sum() + ref_final.sum(), leaves)
        for mine, expected in zip(ours, theirs):
            assert_close(mine, expected.float(), torch.float32)
    assert len(graphs) == 1
    conds = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1


@pytest.mark.heavy
def test_inductor_compiles_the_chunkwise_form_choice_with_gradients():
    """The same through Inductor, which lowers the cond's branches itself: its operands must be
    the chunk views (a computed operand reached a branch in another layout than it was traced
    with, torch 2.13) and the two branches' gradients must agree in layout."""
    import torch._dynamo as dynamo
    dynamo.reset()
    run = torch.compile(lambda *x: chunk_linear_attention(*x, decay="key", exclusive=True, chunk_size=16),
                        fullgraph=True)
    for scale in (-0.5, -60.0):
        q, k, v, log_decay, _ = make_inputs("key", 37, torch.float32, seed=43, decay_scale=scale)
        leaves = [x.requires_grad_() for x in (q, k, v, log_decay)]
        o, final = run(q, k, v, log_decay)
        ref_o, ref_final = loop_attention(q, k, v, log_decay, "key", 1.0, None, True)
        assert_close(o, ref_o, torch.float32)
        ours = torch.autograd.grad(o.sum() + final.sum(), leaves)
        theirs = torch.autograd.grad(ref_o.sum() + ref_final.sum(), leaves)
        for mine, expected in zip(ours, theirs):
            assert_close(mine, expected.float(), torch.float32)


@pytest.mark.parametrize("time", [9, 1])
def test_decay_total_per_packed_sequence(time):
    """The decay a packed sequence's state carries is exp of ITS log decays' sum (a constant
    decay, time 1, counts once per token of each sequence)."""
    g = -torch.rand(1, time, 2, 3, dtype=torch.float64)
    cu = torch.tensor([0, 2, 3, 9])
    got = chunkwise.decay_total(g, cu)
    full = g.expand(1, 9, 2, 3)
    want = torch.stack([torch.exp(full[0, a:b].sum(0)) for a, b in ((0, 2), (2, 3), (3, 9))])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(chunkwise.decay_total(full), torch.exp(full.sum(1)))


@pytest.mark.parametrize("group_bytes", [None, 1])
@pytest.mark.parametrize("exclusive", [False, True])
def test_chunk_attention_packed_sequences_on_the_torch_path(group_bytes, exclusive, monkeypatch):
    """cu_seqlens on the torch path (one chunked pass, the chunk-state recurrence restarted per
    sequence): each sequence from its own initial state, final states [N], also when every
    group holds one chunk (a sequence then continues across groups), forward and gradients."""
    if group_bytes is not None:
        monkeypatch.setattr(chunkwise, "_GROUP_BYTES", group_bytes)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 11, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(1, 11, 2, 4, generator=gen, dtype=torch.float64)
    s0 = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 4, 5, 11])
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
    o, s = chunk_linear_attention(*leaves[:4], decay="key", initial_state=leaves[4], cu_seqlens=cu, chunk_size=2,
                                  exclusive=exclusive)
    parts, finals = [], []
    for i, (a, b) in enumerate(((0, 4), (4, 5), (5, 11))):
        oi, si = chunk_linear_attention(*(x[:, a:b] for x in leaves[:4]), decay="key",
                                        initial_state=leaves[4][i:i + 1], exclusive=exclusive)
        parts.append(oi)
        finals.append(si)
    torch.testing.assert_close(o, torch.cat(parts, 1))
    torch.testing.assert_close(s, torch.cat(finals, 0))
    w, ws = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(s.shape, generator=gen, dtype=s.dtype)
    got = torch.autograd.grad((o * w).sum() + (s * ws).sum(), leaves)
    want = torch.autograd.grad((torch.cat(parts, 1) * w).sum() + (torch.cat(finals, 0) * ws).sum(), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="packed as"):
        chunk_linear_attention(q, k, v, g, decay="key", cu_seqlens=torch.tensor([0, 4, 10]))
