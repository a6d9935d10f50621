"""Structure classes (psmc/analysis/classes.py), the Plan (psmc/plan) and the delta-rule
class wired to psmc.runtime.delta: E is never built, the stream state is S only, and the
layer equals the generic matrix-affine scan (forward, step, continued streams, gradients)."""
import dataclasses
from pathlib import Path

import pytest
import torch

import psmc
from psmc.analysis import compute
from psmc.analysis.classes import CLASSES, classify
from psmc.cli import main
from psmc.compiler import compile_source, plan_op
from psmc.ir import ops_from_file, ops_from_source
from psmc.ir.rewrite import canonicalize

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

EXPECTED = {  # example -> (class, detail)
    "cumsum": ("elementwise-monoid", ""),
    "delta_rule": ("identity-plus-low-rank", "plain"),
    "gated_delta_rule": ("identity-plus-low-rank", "gated"),
    "gated_delta_product": ("identity-plus-low-rank", "gated"),  # two delta steps per token
    "kda": ("diagonal-plus-low-rank", "key"),
    "rwkv7": ("diagonal-plus-low-rank", "key"),
    "gla": ("decayed-linear-attention", "key"),
    "linear_attention": ("decayed-linear-attention", "none"),
    "simple_gla": ("decayed-linear-attention", "scalar"),
    "mamba2": ("decayed-linear-attention", "scalar"),  # its skip term D x reads no state
    "retention": ("decayed-linear-attention", "scalar"),
    "linear_recurrence": ("first-order", "per-lane"),
    "selective_ssm": ("first-order", "per-key"),
    "rwkv6": ("decayed-linear-attention", "key"),  # its exclusive readout: the chunkwise form reads S_{t-1}
    "mlstm": ("decayed-linear-attention", "scalar"),  # C and n read by one q: one chunkwise pass
    "running_argmax": ("elementwise-monoid", ""),
    "tree_rnn": ("general", "tree-scan"),
    "transformer_psm": ("general", "tree-scan"),
}


def _class(op, associative=True):
    return classify(canonicalize(op), associative)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_classes(name):
    (op,) = ops_from_file(EXAMPLES / f"{name}.psm")
    analysis = compute(op, seconds=2.0)
    got = _class(op, analysis.plan == "exact-scan")
    assert (got.name, got.detail) == EXPECTED[name]
    assert got.name in CLASSES and got.reason


AFFINE = """op m[D] {{
  state (A: f32[D, D], b: f32[D]);
  lift (x: f32[D, D], y: f32[D]) {{ return (x, y); }}
  combine (l, r) {{ return ({}, r.A @ l.b + r.b); }}
}}"""


def test_matrix_affine_and_general_on_associativity():
    (op,) = ops_from_source(AFFINE.format("r.A @ l.A"))
    assert _class(op).name == "matrix-affine"
    assert _class(op, associative=False).name == "general"


HGRN2 = """op hgrn2[K, V] {{
  state (a: f32[K], S: f32[K, V]);
  lift (f: f32[K], v: f32[V]) {{ return ({}, outer(1 - f, v)); }}
  combine (l, r) {{ return (l.a * r.a, r.a[:, None] * l.S + r.S); }}
  identity = (ones, zeros);
  readout (s, q: f32[K]) {{ return q @ s.S; }}
}}"""


def test_a_decay_of_unknown_sign_says_how_to_get_the_chunkwise_form():
    """HGRN2 spelled with its forget gate as a raw input: the chunkwise form takes log decays,
    so the op scans token by token, and the class says which spelling would take it."""
    (op,) = ops_from_source(HGRN2.format("f"))
    got = _class(op)
    assert (got.name, got.detail) == ("first-order", "per-key")
    assert got.reason == (
        "h = a * h + b over (a, S) with a per-key decay; its decay f is not known to be non-negative, so it scans "
        "the [K, V] state token by token instead of taking the chunkwise matmul form (decayed-linear-attention, "
        "which works with log decays): write the decay as exp(g), with g its log, or as sigmoid(u)")
    for positive in ("sigmoid(f)", "exp(f)", "f * f", "f ** 2"):
        (op,) = ops_from_source(HGRN2.format(positive))
        assert _class(op).name == "decayed-linear-attention", positive
    # a first-order op over a vector state has no chunkwise form: no note
    (op,) = ops_from_file(EXAMPLES / "selective_ssm.psm")
    assert "not known to be non-negative" not in _class(op).reason


DLA = """op dla[K, V] {{
  state (a: f32[K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], g: f32[K]) {{ return (exp(g), {}); }}
  combine (l, r) {{ return (l.a * r.a, r.a[:, None] * l.S + r.S); }}
  identity = (ones, zeros);
  readout{} ({}, q: f32[K], u: f32[K], k: f32[K], v: f32[V]) {{ return {}; }}
}}"""


@pytest.mark.parametrize("update,exclusive,readout", [
    ("outer(k, v) / 2.0", "", "q @ s.S"),  # the update over a constant
    ("outer(k, v)", "", "0.25 * tanh(sum(q)) - ((q @ s.S) / 2.0)"),  # a scaled quotient, minus
    ("outer(k, v)", " exclusive", "q @ (p.S + outer(u * k, v))"),  # RWKV-6: the bonus in the product
    ("outer(k, v)", " exclusive", "1.0 - 2.0 * (q @ (p.S + outer(u * k, v)))"),  # ... scaled, minus
])
def test_spellings_of_decayed_linear_attention_are_one_class(update, exclusive, readout):
    """Spellings the fuzz generator's linear-attention family found off the class (2026-12-04):
    each takes the chunkwise form; an exclusive readout says it reads S_{t-1}."""
    p = "p" if exclusive else "s"
    (op,) = ops_from_source(DLA.format(update, exclusive, p, readout))
    got = _class(op)
    assert (got.name, got.detail) == ("decayed-linear-attention", "key"), got.reason
    assert ("q @ S_{t-1}" in got.reason) == bool(exclusive)


NEAR = """op near[K, V] {{
  state (E: f32[K, K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], beta: f32) {{ return ({}, {}); }}
  combine (l, r) {{ return (r.E @ l.E, r.E @ l.S + r.S); }}
  readout (s, q: f32[K]) {{ return q @ s.S; }}
}}"""


@pytest.mark.parametrize("e,s", [
    ("eye(K) - beta * outer(k, k)", "outer(k, v)"),  # S's update lacks beta
    ("eye(K) - beta * outer(k, k)", "beta * beta * outer(k, v)"),  # another coefficient
    ("eye(K) + beta * outer(k, k)", "beta * outer(k, v)"),  # the sign: not I - beta k k^T
    ("eye(K) - beta * outer(k, v[0:1] * k)", "beta * outer(k, v)"),  # not k k^T
])
def test_near_misses_of_the_delta_rule_are_diagonal_plus_low_rank(e, s):
    """Not the delta rule: that class must not claim them (its runtime would compute another
    thing); they are identity plus rank one in general, whose runtime computes them as written
    (tests/codegen/test_dplr_layer.py checks such spellings against the generic scan)."""
    (op,) = ops_from_source(NEAR.format(e, s))
    got = _class(op)
    assert (got.name, got.detail) == ("diagonal-plus-low-rank", "none")


@pytest.mark.parametrize("e,why", [
    ("eye(K) - beta * outer(k, k) - outer(k, k)", "with 2 rank-one terms"),
    ("eye(K) + outer(k, v[0:1] * k) + outer(v[0:1] * k, k)", "with 2 rank-one terms"),
    ("0.5 * outer(k, k)", "with no diagonal term"),
])
def test_near_misses_of_rank_one_stay_matrix_affine_and_say_why(e, why):
    (op,) = ops_from_source(NEAR.format(e, "beta * outer(k, v)"))
    got = _class(op)
    assert got.name == "matrix-affine" and why in got.reason and "the generic scan serves it" in got.reason


def test_the_plan_is_typed_frozen_and_printed():
    text = (EXAMPLES / "gated_delta_rule.psm").read_text()
    compiled = compile_source(text, "gated_delta_rule.psm")
    plan = compiled.plans["gated_delta_rule"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fast_path = None
    assert plan.scan == "exact-scan" and plan.structure == "affine"
    assert plan.structure_class.name == "identity-plus-low-rank" and plan.fast_path == "delta_rule"
    assert plan.stream_fields == ("S",) and plan.state_size == "(K*V) floats"
    assert plan.backends == {"forward": ("torch",), "backward": ("torch",), "step": ("torch",)}
    paths = dict(plan.not_taken)
    assert "triton" in paths and "stream field E" in paths
    # the analysis keeps its own verdicts: the plan is not written back into it
    assert compiled.analyses["gated_delta_rule"].state_size == "(K**2 + K*V) floats"


def test_psmc_check_prints_the_class(capsys):
    assert main(["check", str(EXAMPLES / "delta_rule.psm")]) == 0
    out = capsys.readouterr().out
    assert "class          identity-plus-low-rank (plain): E = I - beta * outer(k, k)" in out
    assert ("step           torch: psmc.runtime.delta.delta_rule_step, O(K*V) per token (backend='auto' on CPU "
            "tensors: one fused C++ token, psmc/runtime/cpu_lane.cpp, when a compiler is present; CUDA tensors: one "
            "Triton kernel, psmc/runtime/triton_delta_step.py)") in out
    assert "stream state   (K*V) floats: the inclusive prefix (S)" in out


# ---------------------------------------------------------------------------- the delta layer
B, T, H, K, V = 2, 23, 3, 4, 5


def _inputs(gated: bool, seed: int = 0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = dict(k=torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1),
             v=torch.randn(B, T, H, V, generator=g, dtype=torch.float64),
             beta=torch.rand(B, T, H, generator=g, dtype=torch.float64),
             q=torch.randn(B, T, H, K, generator=g, dtype=torch.float64))
    if gated:
        x["g"] = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    return {n: t.requires_grad_(requires_grad) for n, t in x.items()}


@pytest.fixture(scope="module", params=["delta_rule", "gated_delta_rule"])
def layer(request):
    module = psmc.load(EXAMPLES / f"{request.param}.psm")
    return getattr(module, request.param)()


def test_the_layer_is_wired_to_the_delta_runtime(layer):
    assert layer.spec.fast == "delta_rule" and layer.spec.stream == ("S",)


def test_forward_equals_the_matrix_affine_scan(layer):
    x = _inputs(layer.spec.name.startswith("gated"))
    layer.use_fast_path = True
    fast, s_fast = layer(**x, return_state=True)
    layer.use_fast_path = False
    slow, s_slow = layer(**x, return_state=True)
    layer.use_fast_path = True
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert len(s_fast.prefix) == 1 and s_fast.prefix[0].shape == (B, H, K, V)  # S only: K*V floats
    assert s_fast.nbytes == s_slow.nbytes  # the generic scan's stream drops E too (spec.stream)
    torch.testing.assert_close(s_fast.prefix[0], s_slow.prefix[0], rtol=1e-10, atol=1e-12)


def test_steps_and_continued_streams(layer):
    x = _inputs(layer.spec.name.startswith("gated"), seed=1)
    layer.use_fast_path = False
    want = layer(**x)
    for fast_first, fast_then in ((True, True), (True, False), (False, True)):
        layer.use_fast_path = fast_first
        _, state = layer(**{n: t[:, :9] for n, t in x.items()}, return_state=True)
        layer.use_fast_path = fast_then
        rest = layer(**{n: t[:, 9:15] for n, t in x.items()}, state=state, return_state=True)
        torch.testing.assert_close(rest[0], want[:, 9:15], rtol=1e-10, atol=1e-12)
        state = rest[1]
        for t in range(15, T):
            out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            torch.testing.assert_close(out, want[:, t], rtol=1e-10, atol=1e-12)
        assert len(state.prefix) == 1
    layer.use_fast_path = True


def test_gradients_through_the_fast_path(layer):
    gated = layer.spec.name.startswith("gated")
    x = {n: t[:, :6].detach().requires_grad_(True) for n, t in _inputs(gated, seed=2).items()}
    names = list(x)
    layer.use_fast_path = True
    assert torch.autograd.gradcheck(lambda *ts: layer(**dict(zip(names, ts))), tuple(x[n] for n in names))


def test_a_scalar_gate_on_the_update_folds_into_the_key(tmp_path):
    """S = S + beta * outer(k, v) with a per-token input beta is linear attention with key beta * k."""
    text = ("op gated_la[K, V] { state (S: f32[K, V]); lift (k: f32[K], v: f32[V], beta: f32) "
            "{ return beta * outer(k, v); } combine (l, r) { return l.S + r.S; } identity = zeros; "
            "readout (s, q: f32[K]) { return q @ s.S; } }")
    compiled = compile_source(text, "gated_la.psm")
    assert compiled.plans["gated_la"].fast_path == "chunkwise:none"
    (tmp_path / "gated_la.psm").write_text(text)
    layer = psmc.load(tmp_path / "gated_la.psm").gated_la(backend="torch")
    g = torch.Generator().manual_seed(3)
    x = dict(k=torch.randn(2, 9, 3, generator=g, dtype=torch.float64),
             v=torch.randn(2, 9, 2, generator=g, dtype=torch.float64),
             beta=torch.rand(2, 9, generator=g, dtype=torch.float64),
             q=torch.randn(2, 9, 3, generator=g, dtype=torch.float64))
    fast = layer(**x)
    layer.use_fast_path = False
    torch.testing.assert_close(fast, layer(**x), rtol=1e-10, atol=1e-12)


FIRST_ORDER_LITERALS = """
op constdecay[N] {
  state (a: f32, h: f32[N]);
  lift (x: f32[N]) { return (0.5, x); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (1.0, zeros);
  readout (s) { return s.h * 2.0; }
}
op constleaf[N] {
  state (a: f32[N], h: f32[N]);
  lift (x: f32[N]) { return (exp(-x * x), 1.0); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout (s, q: f32[N]) { return sum(s.h * q); }
}
"""


@pytest.mark.parametrize("name", ["constdecay", "constleaf"])
def test_the_fused_first_order_step_takes_literal_leaves(tmp_path, name):
    """The first-order step prints its lift inline (no `_lift`, no leaf materialised): a leaf
    that is a literal (a constant decay, a constant update) is a Python number there, made a
    tensor before the addcmul; stepping continues a prefill exactly as the parallel pass does."""
    (tmp_path / "literals.psm").write_text(FIRST_ORDER_LITERALS)
    layer = getattr(psmc.load(tmp_path / "literals.psm"), name)(N=3, backend="torch")
    assert layer.spec.fast == "first_order"
    torch.manual_seed(0)
    inputs = {s.name: torch.randn(2, 6, 3) for s in layer.spec.inputs}
    want = layer(**inputs)
    got, state = layer(**{n: x[:, :2] for n, x in inputs.items()}, return_state=True)
    steps = [got]
    for t in range(2, 6):
        y, state = layer.step(state, **{n: x[:, t] for n, x in inputs.items()})
        steps.append(y.unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-5, atol=1e-6)


SIGNED = """op {name}[K, V] {{
  state ({state});
  lift (k: f32[K], v: f32[V], w: f32[K], beta: f32, c: f32) {{ return ({lift}); }}
  combine (l, r) {{ return ({combine}); }}
  identity = ({identity});
  readout (s, q: f32[K]) {{ return q @ s.S; }}
}}"""
AFFINE_MAPS = dict(state="E: f32[K, K], S: f32[K, V]", combine="r.E @ l.E, r.E @ l.S + r.S", identity="eye(K), zeros")
DIAGONAL = dict(state="a: f32[K], S: f32[K, V]", combine="l.a * r.a, r.a[:, None] * l.S + r.S", identity="ones, zeros")


@pytest.mark.parametrize("name,parts,lift,want", [
    ("tanh_gla", DIAGONAL, "tanh(w), outer(k, v)", "first-order"),
    ("tanh_gate", AFFINE_MAPS, "tanh(c) * (eye(K) - beta * outer(k, k)), beta * outer(k, v)", "matrix-affine"),
    ("tanh_diagonal", AFFINE_MAPS, "diag(tanh(w)) - beta * outer(k, k), beta * outer(k, v)", "matrix-affine"),
])
def test_a_decay_not_known_non_negative_keeps_out_of_the_log_space_forms(name, parts, lift, want, tmp_path):
    """The chunkwise, delta-rule and DPLR forms compute with log(decay): a decay that may be
    negative (tanh) would give NaN there. Such ops take a form that is exact for any sign (the
    first-order scan, the generic scan), and `psmc check` says why."""
    text = SIGNED.format(name=name, lift=lift, **parts)
    plan = compile_source(text, f"{name}.psm").plans[name]
    assert plan.structure_class.name == want
    if want == "matrix-affine":
        assert "tanh(" in plan.structure_class.reason and "not known to be >= 0" in plan.structure_class.reason
    (tmp_path / f"{name}.psm").write_text(text)
    layer = getattr(psmc.load(tmp_path / f"{name}.psm"), name)(backend="torch")
    g = torch.Generator().manual_seed(4)
    x = dict(k=torch.randn(2, 40, 2, 3, generator=g, dtype=torch.float64) * 0.5,
             v=torch.randn(2, 40, 2, 2, generator=g, dtype=torch.float64),
             w=torch.randn(2, 40, 2, 3, generator=g, dtype=torch.float64),
             beta=torch.rand(2, 40, 2, generator=g, dtype=torch.float64),
             c=torch.randn(2, 40, 2, generator=g, dtype=torch.float64),
             q=torch.randn(2, 40, 2, 3, generator=g, dtype=torch.float64))
    used = {n: t for n, t in x.items() if n in {s.name for s in layer.spec.inputs}}
    layer.check_finite = False  # (no NaN rerun to hide behind)
    got = layer(**used)
    layer.use_fast_path = False
    torch.testing.assert_close(got, layer(**used), rtol=1e-10, atol=1e-12)
