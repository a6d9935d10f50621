"""Products of delta steps per token (DeltaProduct, Siems et al. 2025; fla's
gated_delta_product): psmc.analysis.classes reads E = [g *] M_r @ ... @ M_1, M_j = I - b_j
outer(k_j, k_j), from any spelling, proves in SymPy that S's update is the r steps composed,
and the generated layer runs each token as r delta-rule tokens (psmc.runtime.delta). Near
misses stay matrix-affine with the reason."""
from pathlib import Path

import pytest
import torch

import psmc
from psmc.analysis.classes import classify
from psmc.compiler import compile_source
from psmc.ir import ops_from_source
from psmc.ir.rewrite import canonicalize

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gated_delta_product.psm"

OP = """op dp[K, V] {{
  state (E: f32[K, K], S: f32[K, V]);
  lift (k1: f32[K], v1: f32[V], b1: f32, k2: f32[K], v2: f32[V], b2: f32, k3: f32[K], v3: f32[V], b3: f32,
        g: f32) {{
    let m1 = eye(K) - b1 * outer(k1, k1);
    let m2 = eye(K) - b2 * outer(k2, k2);
    let m3 = eye(K) - b3 * outer(k3, k3);
    return ({e}, {s});
  }}
  combine (l, r) {{ return (r.E @ l.E, r.E @ l.S + r.S); }}
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) {{ return q @ s.S; }}
}}"""


def _class(e: str, s: str):
    (op,) = ops_from_source(OP.format(e=e, s=s))
    return classify(canonicalize(op), True)


@pytest.mark.parametrize("e,s,steps,detail", [
    ("m2 @ m1", "m2 @ (b1 * outer(k1, v1)) + b2 * outer(k2, v2)", 2, "plain"),
    # the scalars moved around: a write strength outside the product, inside the outer
    ("m2 @ m1", "b1 * (m2 @ outer(k1, v1)) + outer(k2, b2 * v2)", 2, "plain"),
    ("exp(g) * (m2 @ m1)", "b2 * outer(k2, v2) + m2 @ outer(b1 * k1, v1)", 2, "gated"),
    ("m2 @ (exp(g) * m1)", "m2 @ (b1 * outer(k1, v1)) + b2 * outer(k2, v2)", 2, "gated"),
    # three steps, nested (Horner) or as a sum of chained products, the matrices spelled out
    ("m3 @ m2 @ m1", "m3 @ (m2 @ (b1 * outer(k1, v1)) + b2 * outer(k2, v2)) + b3 * outer(k3, v3)", 3, "plain"),
    ("exp(g) * ((eye(K) - b3 * outer(k3, k3)) @ (m2 @ m1))",
     "m3 @ m2 @ (b1 * outer(k1, v1)) + m3 @ (b2 * outer(k2, v2)) + b3 * outer(k3, v3)", 3, "gated"),
])
def test_spellings_of_a_delta_product_are_one_class(e, s, steps, detail):
    got = _class(e, s)
    assert (got.name, got.detail) == ("identity-plus-low-rank", detail), got.reason
    assert len(got.piece("steps")) == steps
    assert f"a product of {steps} delta steps" in got.reason


@pytest.mark.parametrize("e,s", [
    ("m2 @ m1", "b1 * outer(k1, v1) + b2 * outer(k2, v2)"),  # the first write skips M2
    ("m2 @ m1", "m1 @ (b2 * outer(k2, v2)) + b1 * outer(k1, v1)"),  # the steps in the other order
    ("m2 @ m1", "m2 @ (b2 * outer(k1, v1)) + b2 * outer(k2, v2)"),  # the first write with b2
])
def test_an_update_that_is_not_the_steps_composed_stays_generic(e, s):
    got = _class(e, s)
    assert got.name == "matrix-affine"
    assert got.reason == (
        "E = I - beta_j * outer(k_j, k_j) multiplied over 2 steps, but S's update is not the 2 delta steps composed "
        "(sum over j of M_r .. M_(j+1) @ (beta_j * outer(k_j, v_j))): the generic scan serves it, forming E per "
        "token")


def test_two_steps_with_one_key_are_not_claimed():
    got = _class("(eye(K) - b2 * outer(k1, k1)) @ m1", "b1 * outer(k1, v1) + b2 * outer(k1, v2)")
    assert got.name == "matrix-affine" and "delta steps" not in got.reason


def test_the_plan_says_so():
    compiled = compile_source(EXAMPLE.read_text(), "gated_delta_product.psm")
    plan = compiled.plans["gated_delta_product"]
    assert plan.fast_path == "delta_rule"
    assert plan.structure_class.reason.startswith(
        "E = g * M_r @ ... @ M_1, M_j = I - beta_j * outer(k_j, k_j) (identity plus rank 2, a product of 2 delta "
        "steps), S = E @ S + the steps' updates, readout q @ S: run as 2 delta-rule tokens per token")


# ---------------------------------------------------------------------------- the layer
B, T, H, K, V = 2, 19, 3, 4, 5


def _inputs(seed: int = 0, length: int = T) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {}
    for j in (1, 2):
        x[f"k{j}"] = torch.nn.functional.normalize(torch.randn(B, length, H, K, generator=g, dtype=torch.float64), dim=-1)
        x[f"v{j}"] = torch.randn(B, length, H, V, generator=g, dtype=torch.float64)
        x[f"b{j}"] = 2 * torch.rand(B, length, H, generator=g, dtype=torch.float64)  # (beta in [0, 2]: reflections too)
    x["g"] = torch.nn.functional.logsigmoid(torch.randn(B, length, H, generator=g, dtype=torch.float64))
    x["q"] = torch.randn(B, length, H, K, generator=g, dtype=torch.float64)
    return x


def naive(x: dict, S=None):
    """The recurrence token by token, step by step, as fla's naive_recurrent_gated_delta_product
    spells it (h = h * exp(g); then per step h += b k (v - k^T h)^T; o = q h / sqrt(K))."""
    b, length, h = x["q"].shape[:3]
    S = torch.zeros(b, h, K, V, dtype=torch.float64) if S is None else S
    out = []
    for t in range(length):
        S = S * x["g"][:, t].exp()[..., None, None]
        for j in (1, 2):
            k, v, beta = x[f"k{j}"][:, t], x[f"v{j}"][:, t], x[f"b{j}"][:, t]
            S = S + beta[..., None, None] * k[..., None] * (v - (k[..., None] * S).sum(-2))[..., None, :]
        out.append((x["q"][:, t, ..., None] * S).sum(-2) * K ** -0.5)
    return torch.stack(out, 1), S


@pytest.fixture(scope="module")
def layer():
    return psmc.load(EXAMPLE).gated_delta_product(K=K, V=V)


def test_the_layer_runs_the_delta_rule_and_keeps_s_only(layer):
    assert layer.spec.fast == "delta_rule" and layer.spec.stream == ("S",)


def test_forward_equals_the_recurrence_and_the_generic_scan(layer):
    x = _inputs()
    want, S = naive(x)
    got, state = layer(**x, return_state=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.prefix[0], S, rtol=1e-10, atol=1e-12)
    layer.use_fast_path = False
    try:
        torch.testing.assert_close(layer(**x), want, rtol=1e-10, atol=1e-12)
    finally:
        layer.use_fast_path = True


def test_steps_continue_a_prefill(layer):
    x = _inputs(seed=1)
    want, _ = naive(x)
    _, state = layer(**{n: t[:, :7] for n, t in x.items()}, return_state=True)
    out, state = layer(**{n: t[:, 7:12] for n, t in x.items()}, state=state, return_state=True)
    torch.testing.assert_close(out, want[:, 7:12], rtol=1e-10, atol=1e-12)
    for t in range(12, T):
        o, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
        torch.testing.assert_close(o, want[:, t], rtol=1e-10, atol=1e-12)


def test_packed_sequences(layer):
    x = {n: t[:1] for n, t in _inputs(seed=2).items()}
    cu = torch.tensor([0, 4, 5, 13, T])
    got, state = layer(**x, cu_seqlens=cu, return_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want, S = naive({n: t[:, a:b] for n, t in x.items()})
        torch.testing.assert_close(got[:, a:b], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.row_states[i].prefix[0][0], S[0], rtol=1e-10, atol=1e-12)
    assert state.sizes == [4, 1, 8, T - 13]


def test_gradients(layer):
    x = {n: t[:1, :5, :2].detach().requires_grad_(True) for n, t in _inputs(seed=3).items()}
    names = list(x)
    assert torch.autograd.gradcheck(lambda *ts: layer(**dict(zip(names, ts))), tuple(x[n] for n in names))


def test_half_inputs_reach_the_delta_rule_as_given(layer, monkeypatch):
    """bf16 q and the steps' k and v are stacked in bf16 (the chunk kernels' tensor-core input on
    a GPU); the write strengths and the gate in float32; the output is bf16."""
    from psmc.runtime import delta
    seen = []
    real = delta.chunk_delta_rule

    def spy(q, k, v, beta, g, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, beta.dtype, g.dtype))
        return real(q, k, v, beta, g, **kwargs)

    monkeypatch.setattr(delta, "chunk_delta_rule", spy)
    low = {n: t.bfloat16() for n, t in _inputs(seed=4).items()}
    out = layer(**low)
    want = layer(**{n: t.float() for n, t in low.items()})
    assert seen[0] == (torch.bfloat16,) * 3 + (torch.float32,) * 2 and seen[1][0] == torch.float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.02, atol=0.02)


ROWS = """op dp_rows[K, V] {
  state (E: f32[K, K], S: f32[K, V]);
  lift (k: f32[3, K], v: f32[3, V], beta: f32[3]) {
    let m3 = eye(K) - beta[2] * outer(k[2], k[2]);
    return (m3 @ (eye(K) - beta[1] * outer(k[1], k[1])) @ (eye(K) - beta[0] * outer(k[0], k[0])),
            m3 @ ((eye(K) - beta[1] * outer(k[1], k[1])) @ (beta[0] * outer(k[0], v[0])) + beta[1] * outer(k[1], v[1]))
            + beta[2] * outer(k[2], v[2]));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) { return q @ s.S; }
}"""


def test_steps_as_rows_of_one_input(tmp_path):
    """k: [3, K] holds the three steps' keys (k[0] first): the steps are rows of the inputs."""
    (tmp_path / "dp_rows.psm").write_text(ROWS)
    layer = psmc.load(tmp_path / "dp_rows.psm").dp_rows(K=3, V=2)
    assert layer.spec.fast == "delta_rule"
    g = torch.Generator().manual_seed(5)
    x = {"k": torch.nn.functional.normalize(torch.randn(2, 11, 3, 3, generator=g, dtype=torch.float64), dim=-1),
         "v": torch.randn(2, 11, 3, 2, generator=g, dtype=torch.float64),
         "beta": torch.rand(2, 11, 3, generator=g, dtype=torch.float64),
         "q": torch.randn(2, 11, 3, generator=g, dtype=torch.float64)}
    fast = layer(**x)
    layer.use_fast_path = False
    torch.testing.assert_close(fast, layer(**x), rtol=1e-10, atol=1e-12)


def test_psmc_check_names_the_product_step(capsys):
    from psmc.cli import main
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert ("step           torch: psmc.runtime.delta.delta_product_step, O(2*K*V) per token: its 2 delta steps in "
            "one Triton kernel on CUDA tensors (psmc/runtime/triton_delta_step.py)") in out


COMPUTED = """op dp_computed[K, V] {
  state (E: f32[K, K], S: f32[K, V]);
  lift (k1: f32[K], v1: f32[V], b1: f32, k2: f32[K], v2: f32[V], b2: f32, g: f32) {
    let n1 = k1 / sqrt(sum(k1 * k1) + 1e-6);
    let n2 = k2 / sqrt(sum(k2 * k2) + 1e-6);
    let s1 = sigmoid(b1);
    let s2 = sigmoid(b2);
    let m2 = eye(K) - s2 * outer(n2, n2);
    return (exp(-softplus(g)) * (m2 @ (eye(K) - s1 * outer(n1, n1))), s1 * (m2 @ outer(n1, v1)) + outer(n2, s2 * v2));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) { return q @ s.S; }
}"""


def test_keys_gates_and_strengths_computed_in_the_lift(tmp_path):
    """Keys normalised, write strengths squashed and the gate made a decay inside the lift (as
    a model's layer would): the pieces are computed values, proven and run all the same."""
    (tmp_path / "dp_computed.psm").write_text(COMPUTED)
    layer = psmc.load(tmp_path / "dp_computed.psm").dp_computed(K=4, V=3)
    assert layer.spec.fast == "delta_rule"
    g = torch.Generator().manual_seed(6)
    x = {n: torch.randn(2, 9, 2, *shape, generator=g, dtype=torch.float64)
         for n, shape in (("k1", (4,)), ("v1", (3,)), ("b1", ()), ("k2", (4,)), ("v2", (3,)), ("b2", ()), ("g", ()),
                          ("q", (4,)))}
    fast, state = layer(**x, return_state=True)
    layer.use_fast_path = False
    torch.testing.assert_close(fast, layer(**x), rtol=1e-10, atol=1e-12)
    layer.use_fast_path = True
    o, _ = layer.step(state, **{n: t[:, 0] for n, t in x.items()})
    ref = layer(**{n: torch.cat([t, t[:, :1]], 1) for n, t in x.items()})[:, -1]
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-12)
