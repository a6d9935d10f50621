"""The state tile (psmc.codegen.triton_matrix.StatePrinter) under TRITON_INTERPRET=1: ops whose
values are scalars or vectors over one state axis S run a token loop over [BLOCK_R lanes, S]
tiles (mamba's selective-scan layout), lift, recurrence and readout fused.

What is checked against backend='torch' (fp32, DESIGN.md tolerances): outputs, final states and
the gradient of every input and initial state, with lane counts that leave a ragged last lane
tile and a state axis that is not a power of two; packed sequences; an exclusive readout of a
vector state (which the block scan never had). And that the backward sums the adjoints of
broadcast inputs where they arise: the selective SSM's A (the same at every token) once per
program, its B and C (shared by the lanes) once per lane tile, so no [B, T, L, S] buffer is
written for them."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import psmc  # noqa: E402
from psmc.codegen.triton_kernels import describe  # noqa: E402
from psmc.ir import ops_from_source  # noqa: E402
from psmc.runtime import triton_support  # noqa: E402
from triton_helpers import close as _close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

D, N = 37, 5  # 37 lanes: tiles of 16 leave 5 in the last; N = 5 pads to 8 columns


def _pair(cls, **dims):
    ref = cls(backend="torch", **dims)
    tri = cls(backend="triton", **dims)
    tri.triton_block_t = 4  # below T: carries saved and reloaded between blocks
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _ssm_inputs(B: int, T: int, seed: int) -> dict:
    """u, delta [B, T, D]; A [1, 1, D, N] (a per-channel constant: every token reads it); the
    input matrices B, C [B, T, 1, N] (every channel reads them)."""
    g = torch.Generator().manual_seed(seed)
    return {"u": torch.randn(B, T, D, generator=g), "delta": torch.rand(B, T, D, generator=g) * 0.5,
            "A": -torch.rand(1, 1, D, N, generator=g) * 0.5, "B": torch.randn(B, T, 1, N, generator=g),
            "C": torch.randn(B, T, 1, N, generator=g)}


def _leaves(x: dict) -> dict:
    return {n: v.clone().requires_grad_() for n, v in x.items()}


def _weights(o: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape) + shift


def _loss(out, state) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * _weights(o)).sum() for o in outs)
    return total + sum((f * _weights(f, 1.0 + i)).sum() for i, f in enumerate(state.prefix) if f is not None)


def _same_states(ref, out, what: str):
    """The same live fields (a dead one is None in both), each close."""
    assert [f is None for f in ref.prefix] == [f is None for f in out.prefix], what
    for a, b in zip(ref.prefix, out.prefix):
        if a is not None:
            _close(a, b, what)


def _backward_launches(monkeypatch) -> list:
    """The arguments of every backward launch of the generated kernels."""
    seen = []
    real = triton_support._run

    def spy(kernel, kind, g, k, args, block_t):
        if kind == "backward":
            seen.append((g, dict(args)))
        return real(kernel, kind, g, k, args, block_t)
    monkeypatch.setattr(triton_support, "_run", spy)
    return seen


@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued"])
def test_the_selective_ssm_on_state_tiles_equals_torch(continued, monkeypatch):
    ref, tri = _pair(layer_class("selective_ssm"), N=N)
    x = _ssm_inputs(2, 11, seed=1)
    start = None
    if continued:  # the initial state's gradient too
        warm = _ssm_inputs(2, 3, seed=2)
        _, start = ref(**warm, return_state=True)
        start = type(start)(prefix=tuple(None if f is None else f.detach().requires_grad_() for f in start.prefix),
                            count=start.count)
    launches = _backward_launches(monkeypatch)
    results = []
    for layer in (ref, tri):
        leaves = _leaves(x)
        out, state = layer(**leaves, state=start, return_state=True)
        wrt = list(leaves.values()) + ([f for f in start.prefix if f is not None] if continued else [])
        results.append((out, state, torch.autograd.grad(_loss(out, state), wrt)))
    (out_r, state_r, grads_r), (out_t, state_t, grads_t) = results
    _close(out_r, out_t, "output")
    _same_states(state_r, state_t, "final state")
    names = list(x) + ["initial state"] * 2 * continued
    for name, a, b in zip(names, grads_r, grads_t):
        _close(a, b, f"gradient of {name}")

    # one backward launch: 16 lanes per program (three lane tiles), A summed over the tokens,
    # B and C over each tile's lanes
    (g, args), = launches
    inputs = tri._triton_kernels.inputs
    assert g.tile == "state" and g.block_r == 16 and g.grid[0] == 3, g
    assert args["TIME_SUM"] == 1 << inputs.index("A")
    assert args["LANE_SUM"] == (1 << inputs.index("B")) | (1 << inputs.index("C"))
    assert tuple(args[f"din{inputs.index('A')}"].shape) == (2, 1, D, N)
    assert tuple(args[f"din{inputs.index('B')}"].shape) == (2, 11, 3, N)
    assert tuple(args[f"din{inputs.index('u')}"].shape) == (2, 11, D, 1)


def test_packed_sequences_with_broadcast_inputs_equal_torch(monkeypatch):
    ref, tri = _pair(layer_class("selective_ssm"), N=N)
    cu = torch.tensor([0, 3, 4, 9, 11])
    x = _ssm_inputs(1, 11, seed=3)
    launches = _backward_launches(monkeypatch)
    results = []
    for layer in (ref, tri):
        leaves = _leaves(x)
        out, states = layer(**leaves, cu_seqlens=cu, return_state=True)
        loss = (out * _weights(out)).sum() + sum(_loss(torch.zeros(()), s) for s in states)
        results.append((out, states, torch.autograd.grad(loss, list(leaves.values()))))
    (out_r, states_r, grads_r), (out_t, states_t, grads_t) = results
    _close(out_r, out_t, "output")
    for i, (sr, st) in enumerate(zip(states_r, states_t)):
        _same_states(sr, st, f"sequence {i} final state")
    for name, a, b in zip(x, grads_r, grads_t):
        _close(a, b, f"gradient of {name}")
    (g, args), = launches  # the four sequences in one backward launch
    assert g.cu is not None and args["TIME_SUM"] and args["LANE_SUM"]
    assert tuple(args[f"din{tri._triton_kernels.inputs.index('A')}"].shape) == (4, 1, D, N)  # per sequence


EXCLUSIVE = """
op decayed_sum[N] {
  state (a: f32[N], h: f32[N]);
  lift (x: f32, g: f32[N]) { return (exp(-softplus(g)), x * g); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout exclusive (p, q: f32[N], x: f32) { return sum(q * p.h) + x; }
}
"""


def _compiled(tmp_path, source: str, name: str):
    path = tmp_path / f"{name}.psm"
    path.write_text(source)
    return psmc.load(path).__psmc_layers__[name]


def _chained_calls_equal_torch(ref, tri, calls: list, packed_cu=None):
    """Three chained calls (the identity only at the very first token), a decode step after
    them and, with `packed_cu`, the first call's first row cut into packed sequences: outputs,
    final state, step output and every gradient of `tri` against `ref` (backend='torch')."""
    results = []
    for layer in (ref, tri):
        leaves = [_leaves(c) for c in calls]
        state, total, outs = None, 0.0, []
        for c in leaves:
            out, state = layer(**c, state=state, return_state=True)
            outs.append(out)
            total = total + (out * _weights(out)).sum()
        total = total + _loss(torch.zeros(()), state)
        step_out, _ = layer.step(state, **{n: v[:, 0].detach() for n, v in calls[0].items()})
        if packed_cu is not None:
            packed = layer(**{n: v[:1, :int(packed_cu[-1])] for n, v in leaves[0].items()}, cu_seqlens=packed_cu)
            outs.append(packed)
            total = total + (packed * _weights(packed)).sum()
        wrt = [v for c in leaves for v in c.values()]
        results.append((outs, state, step_out, torch.autograd.grad(total, wrt)))
    (outs_r, state_r, step_r, grads_r), (outs_t, state_t, step_t, grads_t) = results
    for a, b in zip(outs_r, outs_t):
        _close(a, b, "output")
    _same_states(state_r, state_t, "final state")
    _close(step_r, step_t, "decode step")
    for a, b in zip(grads_r, grads_t):
        _close(a, b, "gradient")


def test_an_exclusive_readout_of_a_vector_state_gets_kernels(tmp_path):
    (op,) = ops_from_source(EXCLUSIVE, "decayed_sum.psm")
    line = describe(op, {"plan": "exact-scan", "structure": "elementwise"})
    assert line == ("triton: forward + backward + step kernels, token loop over [lanes, N] tiles (a block of lanes x "
                    "all of N), exclusive readout; packed sequences in one launch")
    cls = _compiled(tmp_path, EXCLUSIVE, "decayed_sum")
    assert cls._triton_kernels is not None
    ref, tri = _pair(cls, N=3)
    g = torch.Generator().manual_seed(4)
    calls = [{"x": torch.randn(2, T, 5, generator=g), "g": torch.randn(2, T, 5, 3, generator=g),
              "q": torch.randn(2, T, 5, 3, generator=g)} for T in (6, 1, 9)]
    _chained_calls_equal_torch(ref, tri, calls)


EXCLUSIVE_SCALAR = """
op excl_scaled {
  state (n: f32, h: f32);
  lift (x: f32) { return (1.0, x); }
  combine (l, r) { return (l.n + r.n, l.h + r.h); }
  identity = (zeros, zeros);
  readout exclusive (p, x: f32) { return p.h * x + p.n; }
}
"""


def test_an_exclusive_readout_of_scalar_states_runs_on_a_tile_of_one_column(tmp_path, monkeypatch):
    """The lanes' block scan has no exclusive readout, so scalar states with one take the state
    tile with S = 1 ([lanes, 1] tiles): three chained calls (the identity at the very first
    token only), a decode step, packed sequences, every gradient, against backend='torch'."""
    (op,) = ops_from_source(EXCLUSIVE_SCALAR, "excl_scaled.psm")
    assert describe(op, {"plan": "exact-scan", "structure": "elementwise"}) == (
        "triton: forward + backward + step kernels, token loop over [lanes, 1] tiles (a block of lanes x "
        "one column: scalar states), exclusive readout; packed sequences in one launch")
    cls = _compiled(tmp_path, EXCLUSIVE_SCALAR, "excl_scaled")
    assert cls._triton_kernels.mode == "state"
    ref, tri = _pair(cls)
    launches = _backward_launches(monkeypatch)
    g = torch.Generator().manual_seed(6)
    calls = [{"x": torch.randn(2, T, 37, generator=g)} for T in (6, 1, 9)]
    _chained_calls_equal_torch(ref, tri, calls, packed_cu=torch.tensor([0, 2, 3, 6]))
    assert launches and all(g.tile == "state" and g.S == 1 and g.block_c == 1 for g, _ in launches)


def test_the_selective_ssm_takes_the_state_loop_over_the_first_order_scan(monkeypatch):
    """Both Triton paths serve it; the first-order scan would run the lift and the readout in
    torch over [B, T, L, N] tensors, so the fused state loop is cheaper (psmc.runtime.dispatch)."""
    from psmc.runtime import dispatch
    ran = []
    real = triton_support._run
    monkeypatch.setattr(triton_support, "_run", lambda kernel, kind, *a, **kw: ran.append(kind) or real(
        kernel, kind, *a, **kw))
    layer = layer_class("selective_ssm")(backend="triton", N=N)
    assert layer.use_fast_path
    with torch.no_grad():
        layer(**_ssm_inputs(1, 4, seed=5))
    assert ran == ["forward"]
    costs = {p.name: p.cost(layer, None) for p in dispatch.PATHS
             if p.name in ("triton-first-order", "triton-state-loop")}
    assert costs == {"triton-first-order": 30.0, "triton-state-loop": 20.0}
    scalar = layer_class("linear_recurrence")(backend="triton")
    first_order = next(p for p in dispatch.PATHS if p.name == "triton-first-order")
    assert first_order.cost(scalar, None) == 10.0  # a scalar state: the one-pass scan stays first


LOGS = """
op log_sum[N] {
  state (h: f32[N]);
  lift (x: f32, s: f32[N]) { return x * log(s); }
  combine (l, r) { return l.h + r.h; }
  readout (p, c: f32[N]) { return sum(p.h * log(c)); }
}
"""


def test_broadcast_adjoints_leave_out_the_padding_lanes_and_tokens(tmp_path, monkeypatch):
    """Padding lanes and tokens load 0, where log's adjoint is 0 / 0: the sums over a tile's
    lanes (c, shared by the lanes) and over the tokens (s, one value for all) must skip them."""
    ref, tri = _pair(_compiled(tmp_path, LOGS, "log_sum"), N=N)
    g = torch.Generator().manual_seed(6)
    x = {"x": torch.randn(2, 11, D, generator=g), "s": torch.rand(1, 1, 1, N, generator=g) + 0.5,
         "c": torch.rand(2, 11, 1, N, generator=g) + 0.5}
    launches = _backward_launches(monkeypatch)
    grads = []
    for layer in (ref, tri):
        leaves = _leaves(x)
        out = layer(**leaves)
        grads.append(torch.autograd.grad((out * _weights(out)).sum(), list(leaves.values())))
    for name, a, b in zip(x, *grads):
        _close(a, b, f"gradient of {name}")
    (_, args), = launches
    inputs = tri._triton_kernels.inputs
    assert args["TIME_SUM"] == 1 << inputs.index("s")
    assert args["LANE_SUM"] == (1 << inputs.index("s")) | (1 << inputs.index("c"))
