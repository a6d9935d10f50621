"""psmc.runtime.delta: the chunked WY/UT delta rule and its O(K V) step equal the textbook
per-token recurrence, the matrix-affine scan of examples/delta_rule.psm and fla's naive
references; values, final states and gradients.

The reference here is the recurrence as written in the papers, one token at a time in float64,
with the K x K transition formed explicitly: S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} +
beta_t k_t v_t^T, o_t = scale * q_t @ S_t.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from psmc.runtime import chunkwise
from hypothesis import given, settings
from hypothesis import strategies as st

from psmc.runtime.delta import chunk_delta_rule, delta_rule_step

from closeness import assert_close
from shapes import result_shapes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def loop_reference(q, k, v, beta, log_decay=None, initial_state=None, scale=1.0):
    """The recurrence token by token in float64 with the K x K transition formed."""
    lanes = torch.broadcast_shapes(q.shape[2:-1], k.shape[2:-1], v.shape[2:-1], beta.shape[2:])
    width_k, width_v = q.shape[-1], v.shape[-1]
    S = torch.zeros(q.shape[0], *lanes, width_k, width_v, dtype=torch.float64)
    if initial_state is not None:
        S = S + initial_state.double()
    eye = torch.eye(width_k, dtype=torch.float64)
    outputs = []
    for t in range(q.shape[1]):
        kt, vt, qt = k[:, t].double(), v[:, t].double(), q[:, t].double()
        bt = beta[:, min(t, beta.shape[1] - 1)].double()[..., None, None]
        E = eye - bt * kt[..., :, None] * kt[..., None, :]
        if log_decay is not None:
            E = torch.exp(log_decay[:, min(t, log_decay.shape[1] - 1)].double())[..., None, None] * E
        S = E @ S + bt * kt[..., :, None] * vt[..., None, :]
        outputs.append(scale * (qt[..., None, :] @ S).squeeze(-2))
    return torch.stack(outputs, dim=1), S


def make(seed, batch, steps, lanes, width_k, width_v, dtype=torch.float32, gated=True, lane_shapes=None):
    """q, k, v, beta, log_decay; keys l2-normalised as DeltaNet layers do; lane_shapes overrides
    the lanes of (q, k, v, beta, log_decay) for broadcasting."""
    gen = torch.Generator().manual_seed(seed)
    shapes = lane_shapes or (lanes,) * 5
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q = rand(batch, steps, *shapes[0], width_k)
    k = F.normalize(rand(batch, steps, *shapes[1], width_k), dim=-1)
    v = rand(batch, steps, *shapes[2], width_v)
    beta = torch.rand(batch, steps, *shapes[3], generator=gen, dtype=dtype)
    log_decay = F.logsigmoid(2 + rand(batch, steps, *shapes[4])) if gated else None
    return q, k, v, beta, log_decay


CASES = [  # steps, chunk: T < chunk, T a multiple, T not a multiple, one token
    (1, 8), (5, 8), (16, 8), (19, 8), (40, 16), (37, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("steps, chunk", CASES)
def test_chunked_equals_the_per_token_recurrence(dtype, gated, steps, chunk):
    seed = steps * 10 + chunk + gated
    q, k, v, beta, g = make(seed, 2, steps, (3,), 5, 4, dtype=dtype, gated=gated)
    s0 = torch.randn(2, 3, 5, 4, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    for initial in (None, s0):
        o, state = chunk_delta_rule(q, k, v, beta, g, scale=0.7, initial_state=initial, chunk_size=chunk)
        ref_o, ref_state = loop_reference(q, k, v, beta, g, initial, scale=0.7)
        assert o.dtype == dtype and state.dtype == dtype  # fp32 state for fp32, fp64 for fp64
        assert_close(o, ref_o, dtype)
        assert_close(state, ref_state, dtype)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), steps=st.integers(1, 70),
       lanes=st.sampled_from([(), (1,), (3,), (2, 2)]), width_k=st.integers(1, 6), width_v=st.integers(1, 5),
       chunk=st.sampled_from([None, 1, 3, 8, 32, 64]), gated=st.booleans(), initial=st.booleans(),
       per_sequence=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       mode=st.sampled_from(["autograd", "no_grad", "inference_mode"]))
def test_buffer_and_autograd_paths_equal_the_recurrence(seed, batch, steps, lanes, width_k, width_v, chunk, gated,
                                                         initial, per_sequence, dtype, mode):
    """Without autograd the pass packs the inputs into preallocated chunk-major buffers (scale,
    beta and gamma applied in the copy) and writes the chunk loop into them; with autograd it
    runs the same algebra on functional ops. Both equal the per-token recurrence, for any chunk
    length (None: the defaults, 32 and 64), padding, broadcast lane and time axes, and in
    inference mode."""
    q, k, v, beta, g = make(seed, batch, steps, lanes, width_k, width_v, dtype=dtype, gated=gated)
    if per_sequence:  # beta (and the gate) once per sequence, broadcast over time
        beta, g = beta[:, :1], None if g is None else g[:, :1]
    s0 = torch.randn(batch, *lanes, width_k, width_v, dtype=dtype) if initial else None
    ref_o, ref_state = loop_reference(q, k, v, beta, g, s0, scale=0.6)
    args = (q, k, v, beta, g)
    if mode == "autograd":
        args = tuple(None if t is None else t.clone().requires_grad_() for t in args)
        o, state = chunk_delta_rule(*args, scale=0.6, initial_state=s0, chunk_size=chunk)
        assert o.grad_fn is not None
    else:
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            o, state = chunk_delta_rule(*args, scale=0.6, initial_state=s0, chunk_size=chunk)
    assert o.dtype == dtype and state.dtype == dtype
    assert_close(o.detach(), ref_o, dtype)
    assert_close(state.detach(), ref_state, dtype)


def test_reused_scratch_never_leaks_into_results():
    """The buffer path keeps its scratch for the next call in the thread: results of earlier calls
    (outputs and final states) stay what they were, across shapes, gates, dtypes and inference
    mode, and a call in normal mode after one in inference mode still runs."""
    calls = [(1, 40, (2,), 4, 3, True, torch.float32, False), (1, 40, (2,), 4, 3, True, torch.float32, False),
             (2, 40, (2,), 4, 3, False, torch.float32, True), (2, 33, (3,), 5, 2, True, torch.float64, False),
             (2, 40, (2,), 4, 3, False, torch.float32, False)]
    kept = []
    for seed, (batch, steps, lanes, width_k, width_v, gated, dtype, inference) in enumerate(calls):
        q, k, v, beta, g = make(100 + seed, batch, steps, lanes, width_k, width_v, dtype=dtype, gated=gated)
        with torch.inference_mode(inference):
            o, state = chunk_delta_rule(q, k, v, beta, g)
        kept.append((o, state, loop_reference(q, k, v, beta, g), dtype))
    for o, state, (ref_o, ref_state), dtype in kept:
        assert_close(o, ref_o, dtype)
        assert_close(state, ref_state, dtype)


@pytest.mark.parametrize("lane_shapes", [
    ((), (), (), (), ()),  # no lane axis
    ((2, 3),) * 5,  # two lane axes
    ((1,), (3,), (3,), (1,), (3,)),  # q and beta shared by the heads
    ((3,), (1,), (3,), (3,), (1,)),  # one key and one gate for every head
])
def test_lanes_broadcast(lane_shapes):
    q, k, v, beta, g = make(1, 2, 13, None, 4, 3, lane_shapes=lane_shapes)
    o, state = chunk_delta_rule(q, k, v, beta, g, chunk_size=4)
    ref_o, ref_state = loop_reference(q, k, v, beta, g)
    assert_close(o, ref_o, torch.float32)
    assert_close(state, ref_state, torch.float32)


def test_per_sequence_beta_and_gate_broadcast_over_time():
    q, k, v, _, _ = make(2, 2, 11, (2,), 4, 3)
    beta = torch.rand(2, 1, 2)
    g = -torch.rand(2, 1, 2)
    o, state = chunk_delta_rule(q, k, v, beta, g, chunk_size=4)
    ref_o, ref_state = loop_reference(q, k, v, beta, g)
    assert_close(o, ref_o, torch.float32)
    assert_close(state, ref_state, torch.float32)


def test_strong_and_zero_gates_stay_finite_and_exact():
    """log gates of -30 and -inf (a gate of exactly 0) inside chunks: every exponent is a sum
    over the spanned tokens, so nothing overflows and a zero gate forgets exactly."""
    q, k, v, beta, g = make(3, 1, 29, (2,), 4, 3, dtype=torch.float64)
    g = g.clone()
    g[0, 5] = -30.0
    g[0, 9, 1] = -torch.inf
    g[0, 17] = -torch.inf
    o, state = chunk_delta_rule(q, k, v, beta, g, chunk_size=8)
    ref_o, ref_state = loop_reference(q, k, v, beta, g)
    assert_close(o, ref_o, torch.float64)
    assert_close(state, ref_state, torch.float64)
    # after a zero gate, the outputs do not depend on anything before it
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[:, :17], v2[:, :17] = torch.randn_like(k2[:, :17]), torch.randn_like(v2[:, :17])
    o2, _ = chunk_delta_rule(q2, k2, v2, beta, g, chunk_size=8)
    assert torch.allclose(o2[:, 17:], o[:, 17:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_step_equals_the_recurrence_and_the_chunked_pass(gated):
    q, k, v, beta, g = make(4, 2, 9, (3,), 5, 4, gated=gated)
    s0 = torch.randn(2, 3, 5, 4)
    ref_o, ref_state = loop_reference(q, k, v, beta, g, s0, scale=0.5)
    S, outputs = s0, []
    for t in range(q.shape[1]):
        o, S = delta_rule_step(S, q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], scale=0.5)
        outputs.append(o)
    assert S.shape == (2, 3, 5, 4) and S.dtype == torch.float32
    assert_close(torch.stack(outputs, dim=1), ref_o, torch.float32)
    assert_close(S, ref_state, torch.float32)
    # streaming after a parallel pass continues it
    o_par, s_par = chunk_delta_rule(q[:, :6], k[:, :6], v[:, :6], beta[:, :6], None if g is None else g[:, :6],
                                    scale=0.5, initial_state=s0, chunk_size=4)
    o7, _ = delta_rule_step(s_par, q[:, 6], k[:, 6], v[:, 6], beta[:, 6], None if g is None else g[:, 6], scale=0.5)
    assert_close(o7, ref_o[:, 6], torch.float32)


def test_step_never_forms_the_key_by_key_transition():
    """O(K V): no tensor of the step has two K axes (K = 7 differs from V = 3)."""
    q, k, v, beta, g = make(5, 2, 1, (2,), 7, 3)
    shapes = result_shapes(lambda: delta_rule_step(torch.randn(2, 2, 7, 3), q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0]))
    assert shapes
    assert not [s for s in shapes if s[-2:] == (7, 7)], shapes


def test_gradients_f64_gradcheck():
    q, k, v, beta, g = make(6, 1, 7, (2,), 3, 2, dtype=torch.float64)
    s0 = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (q, k, v, beta, g, s0)]

    def chunked(q, k, v, beta, g, s0):
        return chunk_delta_rule(q, k, v, beta, g, scale=0.8, initial_state=s0, chunk_size=4)

    assert torch.autograd.gradcheck(chunked, args)
    step_args = [s0.clone().requires_grad_()] + [t[:, 0].clone().requires_grad_() for t in (q, k, v, beta, g)]

    def step(S, q, k, v, beta, g):
        return delta_rule_step(S, q, k, v, beta, g, scale=0.8)

    assert torch.autograd.gradcheck(step, step_args)


def test_gradients_equal_the_recurrence_in_fp32():
    q, k, v, beta, g = make(7, 2, 21, (2,), 4, 3)
    s0 = torch.randn(2, 2, 4, 3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g, s0)]
    o, state = chunk_delta_rule(*leaves[:5], initial_state=leaves[5], chunk_size=8)
    weights = torch.randn_like(o), torch.randn_like(state)
    grads = torch.autograd.grad((o * weights[0]).sum() + (state * weights[1]).sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, beta, g, s0)]
    ref_o, ref_state = loop_reference(*ref_leaves[:5], ref_leaves[5])
    ref = torch.autograd.grad((ref_o * weights[0]).sum() + (ref_state * weights[1]).sum(), ref_leaves)
    for got, want in zip(grads, ref):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("name, gated", [("delta_rule", False), ("gated_delta_rule", True)])
def test_equals_the_matrix_affine_scan_of_the_example(name, gated):
    """The example layer's generic scan (the K x K transition composed by the matrix-affine
    combine) gives the same outputs, continued state and gradients."""
    import psmc

    cls = getattr(psmc.load(str(EXAMPLES / f"{name}.psm")), name)
    layer = cls(K=4, V=3, backend="torch")
    layer.use_fast_path = False  # the generic scan, whatever plan the compiler picks
    q, k, v, beta, g = make(8, 2, 12, (2,), 4, 3, gated=gated)
    scale = 4 ** -0.5 if gated else 1.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta) + ((g,) if gated else ())]
    got_o, got_state = chunk_delta_rule(*leaves, scale=scale, chunk_size=4)
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    ref_extra = {"g": ref_leaves[4]} if gated else {}
    ref_o, ref_state = layer(q=ref_leaves[0], k=ref_leaves[1], v=ref_leaves[2], beta=ref_leaves[3], **ref_extra,
                             return_state=True)
    assert_close(got_o, ref_o, torch.float32)
    prefix = ref_state.prefix
    assert_close(got_state, prefix[-1], torch.float32)  # S, the field the readout reads
    weights = torch.randn_like(got_o)
    grads = torch.autograd.grad((got_o * weights).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_o * weights).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, torch.float32)
    # the continued pass from the layer's state equals the chunked pass from the final state
    more = make(9, 2, 5, (2,), 4, 3, gated=gated)
    more_extra = {"g": more[4]} if gated else {}
    cont = layer(q=more[0], k=more[1], v=more[2], beta=more[3], **more_extra, state=ref_state)
    want, _ = chunk_delta_rule(*more[:4], more[4] if gated else None, scale=scale, initial_state=got_state.detach())
    assert_close(cont.detach(), want, torch.float32)


def _fla(module, attribute):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla warns that Triton has no GPU here
        import importlib

        return getattr(importlib.import_module(module), attribute)


def test_equals_fla_naive_recurrences():
    """fla's references: delta_rule_recurrence takes [B, H, T, ...] and scales q by K ** -0.5;
    naive_recurrent_gated_delta_rule takes [B, T, H, ...] and a log gate."""
    recurrence = _fla("fla.ops.delta_rule.naive", "delta_rule_recurrence")
    gated = _fla("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule")
    q, k, v, beta, g = make(10, 2, 23, (3,), 8, 5)
    s0 = torch.randn(2, 3, 8, 5)
    heads_first = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    ref_o, ref_state = recurrence(*map(heads_first, (q, k, v, beta)), initial_state=s0)
    o, state = chunk_delta_rule(q, k, v, beta, scale=8 ** -0.5, initial_state=s0, chunk_size=8)
    assert_close(o, heads_first(ref_o), torch.float32)
    assert_close(state, ref_state, torch.float32)
    ref_o, ref_state = gated(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    o, state = chunk_delta_rule(q, k, v, beta, g, scale=8 ** -0.5, initial_state=s0, chunk_size=8)
    assert_close(o, ref_o, torch.float32)
    assert_close(state, ref_state, torch.float32)


def test_mismatched_shapes_are_named():
    q, k, v, beta, g = make(11, 2, 5, (3,), 4, 3)
    with pytest.raises(ValueError, match=r"chunk_delta_rule: lane axes do not broadcast: q \[3\], k \[3\], v \[3\], "
                                         r"beta \[2\]"):
        chunk_delta_rule(q, k, v, beta[..., :2])
    with pytest.raises(ValueError, match=r"number of lane axes.*log_decay \[3, 1\]"):
        chunk_delta_rule(q, k, v, beta, g[..., None])
    with pytest.raises(ValueError, match=r"shapes do not match \[B, T, \*lanes, \.\.\.\]: q \(2, 5, 3, 4\), "
                                         r"k \(2, 4, 3, 4\)"):
        chunk_delta_rule(q, k[:, :4], v, beta)


@pytest.mark.parametrize("packed", ["never", "always"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("lengths, chunk", [((5, 17, 1, 23), 8), ((16, 3, 33), None), ((4, 5, 5, 1, 5), 2)])
def test_packed_sequences_equal_separate_calls(lengths, chunk, grad, gated, packed, monkeypatch):
    """cu_seqlens on the torch path: the packed sequences [1, total_T, ...] give each sequence's
    own outputs and final state (stacked [N, ...]), from its own initial state, and the same
    gradients as separate calls (beta shared over time broadcasts to every sequence), run one
    by one or in padded groups (chunkwise.PACKED; the groups pad time-1 inputs with zeros too)."""
    monkeypatch.setattr(chunkwise, "PACKED", packed)
    total, n = sum(lengths), len(lengths)
    q, k, v, beta, g = make(n, 1, total, (2,), 6, 5, dtype=torch.float64, gated=gated)
    beta = beta[:, :1] if chunk is None else beta  # time 1: shared by every sequence
    init = torch.randn(n, 2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = [x for x in (q, k, v, beta, g, init) if x is not None]

    def leaves():
        xs = [x.detach().clone().requires_grad_(grad) for x in inputs]
        return xs, (dict(zip(("q", "k", "v", "beta"), xs[:4]))
                    | {"log_decay": xs[4] if gated else None, "initial_state": xs[-1]})

    xs, kw = leaves()
    o, s = chunk_delta_rule(**kw, scale=0.6, chunk_size=chunk, cu_seqlens=cu)
    assert o.shape == (1, total, 2, 5) and s.shape == (n, 2, 6, 5)
    rxs, rkw = leaves()
    outs, finals = [], []
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        piece = {name: x if x is None or name == "initial_state" or x.shape[1] == 1 else x[:, lo:hi]
                 for name, x in rkw.items()}
        piece["initial_state"] = rkw["initial_state"][i:i + 1]
        o_i, s_i = chunk_delta_rule(**piece, scale=0.6, chunk_size=chunk)
        ref_o, ref_s = loop_reference(*(piece[name] for name in ("q", "k", "v", "beta", "log_decay",
                                                                  "initial_state")), scale=0.6)
        torch.testing.assert_close(o_i, ref_o, rtol=1e-10, atol=1e-10)
        outs.append(o_i)
        finals.append(s_i)
    ro, rs = torch.cat(outs, 1), torch.cat(finals)
    torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-12)
    if grad:
        gen = torch.Generator().manual_seed(2)
        do, ds = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(s.shape, generator=gen, dtype=s.dtype)
        ((o * do).sum() + (s * ds).sum()).backward()
        ((ro * do).sum() + (rs * ds).sum()).backward()
        for x, rx in zip(xs, rxs):
            assert x.grad is not None
            torch.testing.assert_close(x.grad, rx.grad, rtol=1e-10, atol=1e-10)


def test_packed_sequences_are_checked():
    q, k, v, beta, g = make(3, 1, 9, (2,), 4, 3)
    with pytest.raises(ValueError, match="chunk_delta_rule: .*total_T = cu_seqlens"):
        chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="strictly increasing"):
        chunk_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 4, 4, 9]))


def test_empty_sequence_and_bf16_inputs():
    q, k, v, beta, g = make(12, 2, 0, (3,), 4, 3)
    s0 = torch.randn(2, 3, 4, 3)
    o, state = chunk_delta_rule(q, k, v, beta, g, initial_state=s0)
    assert o.shape == (2, 0, 3, 3) and torch.equal(state, s0)
    q, k, v, beta, g = make(13, 2, 9, (3,), 4, 3)
    half = [t.to(torch.bfloat16) for t in (q, k, v, beta, g)]
    o, state = chunk_delta_rule(*half, chunk_size=4)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32  # fp32 accumulation
    ref_o, ref_state = loop_reference(*half)
    assert (o.double() - ref_o).abs().max() < 2e-2 and (state.double() - ref_state).abs().max() < 1e-5


# ---------------------------------------------------------------------- the fused C++ token
def _counted_native_steps(monkeypatch) -> list:
    """Records, per call of the C++ `delta_step`, whether it ran the token (False: it declined
    and the torch code served)."""
    from psmc.runtime import cpu_support

    lane = cpu_support.decode_lane()
    assert lane is not None, "the C++ decode lane did not build on a machine with a compiler"
    ran = []

    class Counted:
        def delta_step(self, *args):
            done = lane.delta_step(*args)
            ran.append(done is not None)
            return done

    monkeypatch.setattr(cpu_support, "decode_lane", lambda: Counted())
    return ran


def _has_compiler() -> bool:
    from psmc.runtime import cpu_support
    return cpu_support.compiler() is not None


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [False, True])
def test_the_fused_cpp_step_equals_the_recurrence(dtype, gated, monkeypatch):
    """delta_rule_step(native=True) runs each token as one C++ loop (two lane axes, a state
    given and a fresh stream) and agrees with the K x K recurrence and with the torch code."""
    ran = _counted_native_steps(monkeypatch)
    q, k, v, beta, g = make(6, 2, 7, (3, 2), 6, 5, dtype=dtype, gated=gated)
    s0 = torch.randn(2, 3, 2, 6, 5, dtype=dtype)
    ref_o, ref_state = loop_reference(q, k, v, beta, g, s0, scale=0.7)
    with torch.no_grad():
        S, outputs = s0, []
        for t in range(q.shape[1]):
            o, S = delta_rule_step(S, q[:, t].contiguous(), k[:, t].contiguous(), v[:, t].contiguous(),
                                   beta[:, t].contiguous(), None if g is None else g[:, t].contiguous(), scale=0.7,
                                   native=True)
            outputs.append(o)
        token = [x[:, 0].contiguous() for x in (q, k, v, beta)] + [None if g is None else g[:, 0].contiguous()]
        fresh = delta_rule_step(None, *token, scale=0.7, native=True)
        want = delta_rule_step(None, *token, scale=0.7)
    assert ran == [True] * (q.shape[1] + 1)
    assert S.dtype == dtype and o.dtype == dtype
    assert_close(torch.stack(outputs, dim=1), ref_o, dtype)
    assert_close(S, ref_state, dtype)
    for got, w in zip(fresh, want):
        assert_close(got, w, dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_cpp_token_runs_the_steps_of_a_product_in_one_call(dtype, monkeypatch):
    """delta_product_step(native=True) runs a DeltaProduct token's r steps in one C++ call,
    bit for bit the r one-step C++ tokens (the same arithmetic, the state updated in place),
    close to the torch code; a fresh stream and an ungated token too."""
    from psmc.runtime.delta import delta_product_step
    ran = _counted_native_steps(monkeypatch)
    r = 3
    steps = [make(20 + j, 2, 1, (3,), 6, 5, dtype=dtype) for j in range(r)]
    q, g = steps[0][0][:, 0].contiguous(), steps[0][4][:, 0].contiguous()
    keys, values, betas = ([s[i][:, 0].contiguous() for s in steps] for i in (1, 2, 3))
    S = torch.randn(2, 3, 6, 5, dtype=dtype)
    with torch.no_grad():
        for s0, gate in ((S, g), (None, g), (S, None)):
            got = delta_product_step(s0, q, keys, values, betas, gate, scale=0.7, native=True)
            assert ran[-1] and len(ran) == 1
            one = s0
            for j in range(r):
                o, one = delta_rule_step(one, q, keys[j], values[j], betas[j], gate if j == 0 else None, scale=0.7,
                                         native=True)
            assert torch.equal(got[0], o) and torch.equal(got[1], one)
            want = delta_product_step(s0, q, keys, values, betas, gate, scale=0.7)
            for a, b in zip(got, want):
                assert_close(a, b, dtype)
            ran.clear()
    # a state of another dtype: the product call declines, and so does each one-step token
    other = S.to(torch.float32 if dtype == torch.float64 else torch.float64)
    with torch.no_grad():
        got = delta_product_step(other, q, keys, values, betas, g, native=True)
        want = delta_product_step(other, q, keys, values, betas, g)
    assert ran == [False] * (1 + r)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_compiler
def test_the_fused_cpp_step_declines_what_it_does_not_cover(monkeypatch):
    """Broadcast lanes, mixed dtypes and grad mode go to the torch code (same results; grad
    mode records the graph); the C++ token never reads them. A strided input is copied."""
    ran = _counted_native_steps(monkeypatch)
    q, k, v, beta, g = make(7, 2, 1, (3,), 4, 5)
    q, k, v, beta, g = (x[:, 0].contiguous() for x in (q, k, v, beta, g))
    S = torch.randn(2, 3, 4, 5)
    cases = {"beta broadcast over the lanes": (S, q, k, v, beta[:, :1], g),
             "a float64 state": (S.double(), q, k, v, beta, g)}
    with torch.no_grad():
        for what, args in cases.items():
            got, want = delta_rule_step(*args, native=True), delta_rule_step(*args)
            for a, b in zip(got, want):
                assert torch.equal(a, b), what
    assert ran == [False] * len(cases)
    strided = F.normalize(torch.randn(2, 4, 3), dim=1).transpose(1, 2)
    with torch.no_grad():
        got, want = delta_rule_step(S, q, strided, v, beta, g, native=True), delta_rule_step(S, q, strided, v, beta, g)
    assert ran[-1] and not strided.is_contiguous()
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)
    leaf = q.clone().requires_grad_()
    o, _ = delta_rule_step(S, leaf, k, v, beta, g, native=True)  # grad mode: not even asked
    assert o.requires_grad and len(ran) == len(cases) + 1
    o.sum().backward()
    assert leaf.grad is not None


@needs_compiler
@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
def test_auto_steps_the_example_with_the_fused_cpp_token(name, monkeypatch):
    """backend='auto' streams the example with the C++ token (not with PSMC_CPU=0, nor with
    backend='torch'), equal to the torch backend's step; torch.compile(fullgraph=True) traces
    the step (the torch code, no graph break)."""
    import psmc

    monkeypatch.delenv("PSMC_CPU", raising=False)
    ran = _counted_native_steps(monkeypatch)
    cls = getattr(psmc.load(str(EXAMPLES / f"{name}.psm")), name)
    auto, ref = cls(K=6, V=5), cls(K=6, V=5, backend="torch")
    q, k, v, beta, g = make(9, 2, 6, (3,), 6, 5, gated=name.startswith("gated"))
    tokens = [dict(q=q[:, t], k=k[:, t], v=v[:, t], beta=beta[:, t], **({"g": g[:, t]} if g is not None else {}))
              for t in range(q.shape[1])]
    with torch.no_grad():
        s, r = auto.init_state(), ref.init_state()
        for token in tokens[:4]:
            (y, s), (w, r) = auto.step(s, **token), ref.step(r, **token)
            assert_close(y, w, torch.float32)
        assert ran and all(ran) and len(ran) == 4
        monkeypatch.setenv("PSMC_CPU", "0")
        (y, s), (w, r) = auto.step(s, **tokens[4]), ref.step(r, **tokens[4])
        assert_close(y, w, torch.float32)
        assert len(ran) == 4
        monkeypatch.delenv("PSMC_CPU")
        torch._dynamo.reset()
        compiled = torch.compile(lambda state, token: auto.step(state, **token), fullgraph=True, backend="eager")
        (y, s), (w, r) = compiled(s, tokens[5]), ref.step(r, **tokens[5])
        assert_close(y, w, torch.float32)
        assert len(ran) == 4  # (traced: the torch code)
