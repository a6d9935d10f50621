"""The diagonal-plus-low-rank class (psmc/analysis/classes.py) wired to psmc.runtime.dplr:
RWKV-7, Kimi Delta Attention and every spelling of E = diag(d) + outer(b, a) that the class
claims compile to the chunked WY form, E never built, and each equals the generic
matrix-affine scan of the same program (which builds every K x K transition) in float64:
forward, final state, step, continued streams, packed sequences and gradients. The examples
also equal fla's naive references."""
import importlib
from pathlib import Path

import pytest
import torch

import psmc
from psmc.compiler import compile_source

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

B, T, H, K, V = 2, 21, 2, 4, 3

TEMPLATE = """op {name}[K, V] {{
  state (E: f32[K, K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], a: f32[K], b: f32[K], w: f32[K], beta: f32, c: f32) {{
    return ({e}, {s});
  }}
  combine (l, r) {{ return (r.E @ l.E, r.E @ l.S + r.S); }}
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) {{ return {readout}; }}
}}"""

# (E, S's update, readout, the class's decay kind): each a spelling the class must claim
SPELLINGS = {
    "rwkv7": ("diag(exp(w)) + outer(b, a)", "outer(k, v)", "q @ s.S", "key"),
    "minus_term": ("diag(exp(w)) - beta * outer(b, a)", "outer(k, v)", "q @ s.S", "key"),
    "kda_matmul": ("(eye(K) - beta * outer(k, k)) @ diag(exp(w))", "beta * outer(k, v)", "q @ s.S * K ** -0.5",
                   "key"),
    "kda_row": ("(eye(K) - beta * outer(k, k)) * exp(w)[None, :]", "beta * outer(k, v)", "q @ s.S", "key"),
    "gated_per_key": ("diag(exp(w)) @ (eye(K) - beta * outer(k, k))", "beta * outer(k, v)", "q @ s.S", "key"),
    "gated_column": ("exp(w)[:, None] * (eye(K) - beta * outer(k, k))", "beta * outer(k, v)", "2.0 * (q @ s.S)",
                     "key"),
    "scalar_gate": ("exp(-c * c) * (diag(exp(w)) + outer(b, a))", "outer(k, v)", "q @ s.S", "key"),
    "scalar_decay": ("exp(-c * c) * eye(K) + outer(b, a)", "c * outer(k, v)", "q @ s.S / 3.0", "scalar"),
    "constant_decay": ("0.9 * eye(K) + 0.5 * outer(b, a)", "outer(k, v)", "q @ s.S", "scalar"),
    "identity_plus": ("eye(K) + outer(b, a)", "outer(k, v)", "q @ s.S", "none"),
    "sigmoid_decay": ("diag(sigmoid(w + 2.0)) + outer(b, a)", "outer(a + k, v)", "q @ s.S", "key"),
}


def _source(name: str) -> str:
    e, s, readout, _ = SPELLINGS[name]
    return TEMPLATE.format(name=name, e=e, s=s, readout=readout)


def _inputs(seed: int, t: int = T, strong: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    k = torch.nn.functional.normalize(draw(B, t, H, K) - 0.5, dim=-1)
    w = -0.7 * draw(B, t, H, K)
    if strong:  # a decay of exactly 0 and decays far below the chunks' factorised range
        w[:, 3, :, 1] = -torch.inf
        w[:, 5:9] = -60.0 * draw(B, 4, H, K)
    return dict(k=k, v=draw(B, t, H, V) - 0.5, a=draw(B, t, H, K) - 0.5, b=draw(B, t, H, K) - 0.5, w=w,
                beta=draw(B, t, H), c=draw(B, t, H), q=draw(B, t, H, K) - 0.5)


def _layer(name: str, tmp_path):
    path = tmp_path / f"{name}.psm"
    path.write_text(_source(name))
    return getattr(psmc.load(path), name)(backend="torch")


def _both(layer, **kwargs):
    """(fast, generic): the layer's output (and state) on its fast path and on the generic scan."""
    layer.use_fast_path = True
    fast = layer(**kwargs)
    layer.use_fast_path = False
    try:
        return fast, layer(**kwargs)
    finally:
        layer.use_fast_path = True


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_is_one_class(name):
    plan = compile_source(_source(name), f"{name}.psm").plans[name]
    assert plan.structure_class.name == "diagonal-plus-low-rank"
    assert plan.structure_class.detail == SPELLINGS[name][3]
    assert plan.fast_path == "dplr" and plan.stream_fields == ("S",)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_forward_and_state_equal_the_generic_scan(name, tmp_path):
    layer = _layer(name, tmp_path)
    assert layer.spec.fast == "dplr" and layer.spec.stream == ("S",)
    for strong in (False, True):
        x = _inputs(seed=len(name), strong=strong)
        (fast, s_fast), (slow, s_slow) = _both(layer, **x, return_state=True)
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)
        assert len(s_fast.prefix) == 1 and s_fast.prefix[0].shape == (B, H, K, V)
        torch.testing.assert_close(s_fast.prefix[0], s_slow.prefix[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["rwkv7", "kda_matmul", "scalar_decay", "identity_plus"])
def test_steps_and_continued_streams(name, tmp_path):
    layer = _layer(name, tmp_path)
    x = _inputs(seed=7)
    layer.use_fast_path = False
    want = layer(**x)
    for fast_first, fast_then in ((True, True), (True, False), (False, True)):
        layer.use_fast_path = fast_first
        _, state = layer(**{n: t[:, :9] for n, t in x.items()}, return_state=True)
        layer.use_fast_path = fast_then
        rest, state = layer(**{n: t[:, 9:15] for n, t in x.items()}, state=state, return_state=True)
        torch.testing.assert_close(rest, want[:, 9:15], rtol=1e-9, atol=1e-11)
        for t in range(15, T):
            out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            torch.testing.assert_close(out, want[:, t], rtol=1e-9, atol=1e-11)
        assert len(state.prefix) == 1 and state.prefix[0].shape == (B, H, K, V)
    layer.use_fast_path = True


@pytest.mark.parametrize("name", ["rwkv7", "kda_matmul", "scalar_gate"])
def test_packed_sequences_equal_each_alone(name, tmp_path):
    layer = _layer(name, tmp_path)
    bounds = [0, 5, 6, 17]
    x = {n: t[:1, :bounds[-1]] for n, t in _inputs(seed=3).items()}
    packed, state = layer(**x, cu_seqlens=torch.tensor(bounds), return_state=True)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        alone, s_alone = layer(**{n: t[:, lo:hi] for n, t in x.items()}, return_state=True)
        torch.testing.assert_close(packed[:, lo:hi], alone, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(state[i].prefix[0], s_alone.prefix[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["rwkv7", "kda_row", "scalar_decay"])
def test_gradients_through_the_fast_path(name, tmp_path):
    layer = _layer(name, tmp_path)
    x = {n: t[:1, :6].detach().requires_grad_(True) for n, t in _inputs(seed=2).items()}
    names = list(x)
    assert torch.autograd.gradcheck(lambda *ts: layer(**dict(zip(names, ts))), tuple(x[n] for n in names))


def test_gradients_equal_the_generic_scan_with_strong_decays(tmp_path):
    layer = _layer("rwkv7", tmp_path)
    x = {n: t.detach().requires_grad_(True) for n, t in _inputs(seed=5, strong=True).items()}
    grads = []
    for fast in (True, False):
        layer.use_fast_path = fast
        out = layer(**x)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), [x[n] for n in ("k", "v", "a", "b", "q")]))
    layer.use_fast_path = True
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- the examples
def _fla(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _example(name: str):
    return getattr(psmc.load(EXAMPLES / f"{name}.psm"), name)(backend="torch")


def test_rwkv7_equals_fla_dplr_recurrence():
    dplr_recurrence = _fla("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence")
    layer = _example("rwkv7")
    g = torch.Generator().manual_seed(11)
    r, k, w = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(3))
    w = -torch.exp(-0.5 + 0.5 * w)  # RWKV-7's log decay, in (-inf, 0)
    kappa = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    iclr = torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    a, b = -kappa, kappa * iclr
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    # fla's naive computes in float32 (and casts all but alpha): it gets float32 values, psmc
    # the same values in float64
    r, w, k, v, a, b, s0 = (x.float().double() for x in (r, w, k, v, a, b, s0))
    heads_first = lambda x: x.transpose(1, 2).float()  # noqa: E731  fla's naive takes [B, H, T, ...]
    want, s_want = dplr_recurrence(heads_first(r) * K ** 0.5, *(heads_first(x) for x in (k, v, a, b, w)),
                                   initial_state=s0.float(), output_final_state=True)
    got, state = layer(w=w, k=k, v=v, a=a, b=b, r=r, initial_state=s0, return_state=True)
    torch.testing.assert_close(got, heads_first(want).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.prefix[0], s_want.double(), rtol=1e-5, atol=1e-5)


def test_kda_equals_fla_naive_recurrent_kda():
    naive_recurrent_kda = _fla("fla.ops.kda.naive", "naive_recurrent_kda")
    layer = _example("kda")
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    q, k, v, gate, beta = (x.float().double() for x in (q, k, v, gate, beta))  # (fla computes in float32)
    want, s_want = naive_recurrent_kda(q, k, v, gate, beta, output_final_state=True)
    got, state = layer(k=k, v=v, beta=beta, g=gate, q=q, return_state=True)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.prefix[0], s_want.double(), rtol=1e-5, atol=1e-5)


F64 = """op {name}[K, V] {{
  state (E: f64[K, K], S: f64[K, V]);
  lift (k: f64[K], v: f64[V], a: f64[K], b: f64[K], beta: f64) {{ return ({e}, {s}); }}
  combine (l, r) {{ return (r.E @ l.E, r.E @ l.S + r.S); }}
  identity = (eye(K), zeros);
  readout (s, q: f64[K]) {{ return q @ s.S / 3.0; }}
}}"""


@pytest.mark.parametrize("name,e,s", [
    ("literal_decay", "0.9 * eye(K) + 0.25 * outer(b, a)", "outer(k, v)"),
    ("computed_beta", "eye(K) - 0.5 * tanh(beta) * outer(k, k)", "0.5 * tanh(beta) * outer(k, v)"),
])
def test_a_float64_op_computes_every_piece_in_float64(name, e, s, tmp_path):
    """Literals (`0.9`) are f32 in the IR; beside an f64 state the pieces must still be f64 in
    the fast forward and in the step (found by the fuzz campaign: errors of 1e-8 in float64)."""
    path = tmp_path / f"{name}.psm"
    path.write_text(F64.format(name=name, e=e, s=s))
    layer = getattr(psmc.load(path), name)(backend="torch")
    assert layer.spec.fast in ("dplr", "delta_rule")
    x = {n: t for n, t in _inputs(seed=9).items() if n in ("k", "v", "a", "b", "beta", "q")}
    (fast, state), (slow, _) = _both(layer, **x, return_state=True)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    _, state = layer(**{n: t[:, :5] for n, t in x.items()}, return_state=True)
    for t in range(5, T):
        out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
        torch.testing.assert_close(out, slow[:, t], rtol=1e-12, atol=1e-14)
