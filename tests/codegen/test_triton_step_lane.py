"""The Triton decode lane (psmc.runtime.triton_lane.bind_step) under TRITON_INTERPRET=1: the
step kernel bound to one input signature, which `PsmLayer.step` runs from the second token of
a signature on. Every token is compared with backend='torch'.

What the lane must get right that the per-token step computed afresh: the stream position of
an op reading `index` (kept on the host, across the refills of its block of count tensors and
across streams that take turns), a dead field's slot, and handing every token it does not cover
to the general step (inputs laid out otherwise, grad mode, a replaced param)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import triton_lane, triton_support  # noqa: E402
from layer_harness import Unread  # noqa: E402
from triton_helpers import close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton


SSM_D, SSM_N = 6, 4  # the selective SSM's channels and state size in these tests


def _ssm(g, B: int, T: int | None = None, dtype=torch.float32) -> dict:
    """selective_ssm inputs: a token ([B, D]; A [1, D, N], B and C [B, 1, N]) when T is None,
    else a chunk of T tokens (A [1, 1, D, N], the others with their time axis)."""
    D, N = SSM_D, SSM_N
    t = () if T is None else (T,)
    x = {"u": torch.randn(B, *t, D, generator=g), "delta": torch.rand(B, *t, D, generator=g) * 0.5,
         "A": -torch.rand(1, *(1,) * len(t), D, N, generator=g) * 0.5, "B": torch.randn(B, *t, 1, N, generator=g),
         "C": torch.randn(B, *t, 1, N, generator=g)}
    return {n: v.to(dtype) for n, v in x.items()}


def _pair(name: str, **dims):
    cls = layer_class(name)
    ref, tri = cls(backend="torch", **dims), cls(backend="triton", **dims)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _general_steps(monkeypatch) -> list:
    """One entry per token the general (unbound) Triton step served."""
    seen = []
    real = triton_support.step

    def spy(layer, call, state):
        seen.append(1)
        return real(layer, call, state)
    monkeypatch.setattr(triton_support, "step", spy)
    return seen


def _same(ref_out, ref_state, out, state, what: str):
    for r, o in zip(_tuple(ref_out), _tuple(out)):
        close(r, o, what)
    for r, o in zip(ref_state.prefix, state.prefix):
        assert (r is None) == (o is None), f"{what}: a dead field is left out by both"
        if r is not None:
            close(r.expand_as(o), o, what)
    assert int(state.count) == int(ref_state.count), what


def test_positions_stay_right_across_count_blocks(monkeypatch):
    """running_argmax reads `index`: COUNT_BLOCK + 6 tokens run through one block of counts and
    into the next; only the first token (a state without a prefix) takes the general step."""
    monkeypatch.setattr(triton_lane, "COUNT_BLOCK", 8)
    ref, tri = _pair("running_argmax")
    general = _general_steps(monkeypatch)
    x = torch.randn(2, 14, 3, generator=torch.Generator().manual_seed(0))
    rs, ts = ref.init_state(), tri.init_state()
    with torch.no_grad():
        for t in range(x.shape[1]):
            r, rs = ref.step(rs, x=x[:, t])
            o, ts = tri.step(ts, x=x[:, t])
            _same(r, rs, o, ts, f"token {t}")
    assert len(general) == 1


def test_streams_that_take_turns_keep_their_own_positions(monkeypatch):
    """Two streams of different lengths alternate through the same lane; a third starts from a
    state made by a parallel pass (its count read once)."""
    ref, tri = _pair("running_argmax")
    g = torch.Generator().manual_seed(1)
    warm = torch.randn(2, 5, 3, generator=g)
    with torch.no_grad():
        _, ra = ref(x=warm, return_state=True)
        _, ta = tri(x=warm, return_state=True)
        _, rb = ref(x=warm[:, :2], return_state=True)
        _, tb = tri(x=warm[:, :2], return_state=True)
        for t in range(6):
            for name in ("a", "b"):
                x = torch.randn(2, 3, generator=g)
                rstate, tstate = (ra, ta) if name == "a" else (rb, tb)
                r, rstate = ref.step(rstate, x=x)
                o, tstate = tri.step(tstate, x=x)
                _same(r, rstate, o, tstate, f"stream {name} token {t}")
                if name == "a":
                    ra, ta = rstate, tstate
                else:
                    rb, tb = rstate, tstate


def test_a_dead_field_and_a_matrix_state(monkeypatch):
    """gla (its running decay is dead in a stream state) over [K, V] states per head."""
    ref, tri = _pair("gla", K=5, V=3)
    general = _general_steps(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x = {"k": torch.randn(1, 6, 2, 5, generator=g), "v": torch.randn(1, 6, 2, 3, generator=g),
         "gk": -torch.rand(1, 6, 2, 5, generator=g), "q": torch.randn(1, 6, 2, 5, generator=g)}
    with torch.no_grad():
        _, rs = ref(**{n: v[:, :2] for n, v in x.items()}, return_state=True)
        _, ts = tri(**{n: v[:, :2] for n, v in x.items()}, return_state=True)
        for t in range(2, 6):
            r, rs = ref.step(rs, **{n: v[:, t] for n, v in x.items()})
            o, ts = tri.step(ts, **{n: v[:, t] for n, v in x.items()})
            _same(r, rs, o, ts, f"token {t}")
    assert len(general) == 1  # the first token of the signature: the lane is bound after it


def test_tokens_the_lane_does_not_cover_take_the_general_step(monkeypatch):
    """A token whose input is laid out otherwise (same shape, other strides), a token in grad
    mode, and one after a param was replaced: each is right, served by the general step."""
    ref, tri = _pair("selective_ssm", N=4)
    general = _general_steps(monkeypatch)
    g = torch.Generator().manual_seed(3)
    D = SSM_D

    def token():
        return _ssm(g, 2)
    rs = ts = None
    with torch.no_grad():
        first = token()
        _, rs = ref(**{n: v.unsqueeze(1) for n, v in first.items()}, return_state=True)
        _, ts = tri(**{n: v.unsqueeze(1) for n, v in first.items()}, return_state=True)
        for t in range(2):  # the first binds the lane, the second runs on it
            x = token()
            r, rs = ref.step(rs, **x)
            o, ts = tri.step(ts, **x)
            _same(r, rs, o, ts, f"token {t}")
        assert len(general) == 1
        x = token()
        x["u"] = torch.randn(D, 2, generator=g).t()  # [2, D] with strides (1, 2)
        r, rs = ref.step(rs, **x)
        o, ts = tri.step(ts, **x)
        _same(r, rs, o, ts, "transposed input")
        assert len(general) == 2
    x = token()
    r, rs = ref.step(rs, **x)
    o, ts = tri.step(ts, **x)
    _same(r, rs, o, ts, "grad mode")
    assert len(general) == 3


SCALED = """
op scaled_sum {
  param w: f32 = uniform(0.5, 1.0);
  state (s: f32);
  lift (x: f32) { return x * w; }
  combine (l, r) { return l.s + r.s; }
}
"""


def test_a_replaced_param_is_read_again(monkeypatch, tmp_path):
    """A param object replaced (not updated in place) between tokens: the lane bound the old
    one, so that token goes to the general step, which reads the new one; a param updated in
    place is read where it lies, on the lane."""
    import psmc
    path = tmp_path / "scaled_sum.psm"
    path.write_text(SCALED)
    cls = psmc.load(path).__psmc_layers__["scaled_sum"]
    ref, tri = cls(backend="torch"), cls(backend="triton")
    tri.load_state_dict(ref.state_dict())
    general = _general_steps(monkeypatch)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        warm = torch.randn(2, 3, 5, generator=g)
        _, rs = ref(x=warm, return_state=True)
        _, ts = tri(x=warm, return_state=True)
        for t in range(5):
            if t == 2:  # in place: the lane's pointer sees it
                for layer in (ref, tri):
                    layer.p_w.mul_(2.0)
            if t == 4:  # a new object: the lane's is stale
                for layer in (ref, tri):
                    layer.p_w = torch.nn.Parameter(torch.full((), 0.25))
            x = torch.randn(2, 5, generator=g)
            r, rs = ref.step(rs, x=x)
            o, ts = tri.step(ts, x=x)
            _same(r, rs, o, ts, f"token {t}")
    assert len(general) == 2  # the binding token and the one after the replacement


def test_branches_from_one_state_each_count_from_it(monkeypatch):
    """Beam search: several tokens stepped from the same state, then each branch continued. A
    branch off a state that is no longer the newest of its chain of counts starts its own."""
    monkeypatch.setattr(triton_lane, "COUNT_BLOCK", 4)
    ref, tri = _pair("running_argmax")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        warm = torch.randn(2, 3, 3, generator=g)
        _, rs = ref(x=warm, return_state=True)
        _, ts = tri(x=warm, return_state=True)
        for _ in range(2):  # the first token binds the lane, the second is made on it
            x = torch.randn(2, 3, generator=g)
            _, rs = ref.step(rs, x=x)
            _, ts = tri.step(ts, x=x)
        branches = []
        for b in range(3):
            x = torch.randn(2, 3, generator=g)
            r, rb = ref.step(rs, x=x)
            o, tb = tri.step(ts, x=x)
            _same(r, rb, o, tb, f"branch {b}")
            branches.append((rb, tb))
        for t in range(6):
            for b, (rb, tb) in enumerate(branches):
                x = torch.randn(2, 3, generator=g)
                r, rb = ref.step(rb, x=x)
                o, tb = tri.step(tb, x=x)
                _same(r, rb, o, tb, f"branch {b} token {t}")
                branches[b] = (rb, tb)


def test_half_precision_tokens_run_on_the_lane_as_given(monkeypatch):
    """fp16 tokens (bf16 on a GPU alike): the lane hands them to the kernel uncast and the kernel
    writes fp16 outputs, as the general step gives them (computed in fp32, rounded once); the
    torch backend's outputs in fp16 are the reference. Only the binding token takes the
    general step (whose inputs are cast); before the lane took half tokens, every token did."""
    ref, tri = _pair("selective_ssm", N=4)
    general = _general_steps(monkeypatch)
    g = torch.Generator().manual_seed(7)

    def token():
        return _ssm(g, 2, dtype=torch.float16)
    with torch.no_grad():
        first = token()
        _, rs = ref(**{n: v.unsqueeze(1) for n, v in first.items()}, return_state=True)
        _, ts = tri(**{n: v.unsqueeze(1) for n, v in first.items()}, return_state=True)
        for t in range(4):
            x = token()
            r, rs = ref.step(rs, **x)
            o, ts = tri.step(ts, **x)
            assert o.dtype == r.dtype == torch.float16, (o.dtype, r.dtype)
            torch.testing.assert_close(o.float(), r.float(), rtol=2e-3, atol=2e-3)
            for a, b in zip(rs.prefix, ts.prefix):
                if a is not None:
                    close(a, b, f"token {t} state")
    assert len(general) == 1
    x = token()  # grad mode: the lane hands the token back, cast, its outputs in fp16 again
    r, rs = ref.step(rs, **x)
    o, ts = tri.step(ts, **x)
    assert o.dtype == r.dtype == torch.float16 and len(general) == 2
    torch.testing.assert_close(o.float(), r.float(), rtol=2e-3, atol=2e-3)


def test_an_op_that_does_not_read_index_never_reads_the_count():
    """selective_ssm continued from a state (a training chunk after chunk, a prefill after a
    prefix): the kernels take the stream position only for `index`, so its count stays on the
    device. (A lane reads a count it did not make once, when a stream enters it.)"""
    ref, tri = _pair("selective_ssm", N=4)
    g = torch.Generator().manual_seed(8)
    first, second = _ssm(g, 2, 3), _ssm(g, 2, 4)
    with torch.no_grad():
        _, rs = ref(**first, return_state=True)
        _, ts = tri(**first, return_state=True)
        ts = type(ts)(prefix=ts.prefix, count=ts.count.as_subclass(Unread), op=ts.op)
        r, rs = ref(**second, state=rs, return_state=True)
        o, ts = tri(**second, state=ts, return_state=True)
    close(r, o, "continued")
    assert int(ts.count.as_subclass(torch.Tensor)) == int(rs.count) == 7


def test_step_function_runs_on_the_lane(monkeypatch):
    """`layer.step_function` (state tensors in and out, for serving) binds the same lane; its
    states carry a plain int count, which the lane steps without keeping."""
    ref, tri = _pair("selective_ssm", N=4)
    general = _general_steps(monkeypatch)
    g = torch.Generator().manual_seed(9)

    def token():
        return _ssm(g, 2)
    x = token()
    with torch.no_grad():
        step_ref, step_tri = ref.step_function(**x), tri.step_function(**x)
        state_ref = state_tri = ()
        for t in range(4):
            x = token()
            out_ref, state_ref = step_ref(state_ref, *x.values())
            out_tri, state_tri = step_tri(state_tri, *x.values())
            close(out_ref, out_tri, f"token {t}")
            for a, b in zip(state_ref, state_tri):
                close(a, b, f"token {t} state")
    assert len(general) == 1  # the first token: no state tensors yet (a prefix of None)


@pytest.mark.parametrize("name", ["running_argmax", "selective_ssm"])
def test_a_ragged_batch_decodes_on_the_lane(name):
    """Rows of different lengths prefilled as packed sequences give a ragged state; decoding it
    runs an op that reads `index` group by group (each group's own positions) and one that
    does not as one batch: both against backend='torch'."""
    dims = {"N": 4} if name == "selective_ssm" else {}
    ref, tri = _pair(name, **dims)
    g = torch.Generator().manual_seed(10)
    if name == "selective_ssm":
        def inputs(B, T):
            return _ssm(g, B, T)
    else:
        def inputs(B, T):
            return {"x": torch.randn(B, T, 3, generator=g)}
    cu = torch.tensor([0, 2, 7, 8])
    packed = inputs(1, 8)
    with torch.no_grad():
        _, rs = ref(**packed, cu_seqlens=cu, return_state=True)
        _, ts = tri(**packed, cu_seqlens=cu, return_state=True)
        for t in range(4):
            x = {n: v[:, 0] for n, v in inputs(3, 1).items()}
            r, rs = ref.step(rs, **x)
            o, ts = tri.step(ts, **x)
            for a, b in zip(_tuple(r), _tuple(o)):
                close(a, b, f"token {t}")
