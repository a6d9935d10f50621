"""Readouts `c * (q @ S) + terms that read no state` (a skip connection `D * x`, RWKV-7's bonus,
a bias) keep their class's fast path: the class hands the extra terms over as piece `extra`,
and the chunkwise, delta-rule and DPLR printers add them to their outputs, in the forward and
in the step. Each op equals the generic scan of the same program in float64 (forward, state,
step, step_function, packed sequences, gradients), and a near miss whose extra term reads the
state keeps off the fast paths."""
import pytest
import torch

import psmc
from psmc.compiler import compile_source

B, T, H, K, V = 2, 37, 2, 3, 4

OPS = {
    # Mamba-2's SSD with its skip term (examples/mamba2.psm has it with A, D per head)
    "ssd_skip": ("decayed-linear-attention", "chunkwise:scalar", """op ssd_skip[K, V] {
  state (a: f32, S: f32[K, V]);
  lift (k: f32[K], v: f32[V], g: f32) { return (exp(g), outer(k, v)); }
  combine (l, r) { return (l.a * r.a, r.a * l.S + r.S); }
  identity = (ones, zeros);
  readout (s, q: f32[K], v: f32[V], u: f32) { return q @ s.S * K ** -0.5 + u * v; }
}"""),
    # GLA with a bias and a skip term from a param
    "gla_bias": ("decayed-linear-attention", "chunkwise:key", """op gla_bias[K, V] {
  param W: f32[V] = normal(0.3);
  state (a: f32[K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], gk: f32[K]) { return (exp(gk), outer(k, v)); }
  combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); }
  identity = (ones, zeros);
  readout (s, q: f32[K], v: f32[V]) { return 0.5 + (q @ s.S) / 2.0 + W * tanh(v); }
}"""),
    # RWKV-7 with its bonus term sum(r * u * k) v (u per head)
    "rwkv7_bonus": ("diagonal-plus-low-rank", "dplr", """op rwkv7_bonus[K, V] {
  state (E: f32[K, K], S: f32[K, V]);
  lift (w: f32[K], k: f32[K], v: f32[V], a: f32[K], b: f32[K]) {
    return (diag(exp(w)) + outer(b, a), outer(k, v));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, r: f32[K], k: f32[K], v: f32[V], u: f32[K]) { return r @ s.S + sum(r * u * k) * v; }
}"""),
    # the gated delta rule with a skip term
    "delta_skip": ("identity-plus-low-rank", "delta_rule", """op delta_skip[K, V] {
  state (E: f32[K, K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], beta: f32, g: f32) {
    return (exp(g) * (eye(K) - beta * outer(k, k)), beta * outer(k, v));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, q: f32[K], v: f32[V]) { return q @ s.S + 0.25 * v; }
}"""),
    # one number per position added to a [V] output (found by the fuzz campaign: a crash, the
    # scalar was aligned with the output's last axis instead of its lead axes)
    "la_scalar_extra": ("decayed-linear-attention", "chunkwise:none", """op la_scalar_extra[K, V] {
  state (S: f32[K, V]);
  lift (k: f32[K], v: f32[V]) { return outer(k, v); }
  combine (l, r) { return l.S + r.S; }
  identity = zeros;
  readout (s, q: f32[K]) { return q @ s.S + 0.5 * sum(q * q); }
}"""),
    "dplr_scalar_extra": ("diagonal-plus-low-rank", "dplr", """op dplr_scalar_extra[K, V] {
  state (E: f32[K, K], S: f32[K, V]);
  lift (w: f32[K], k: f32[K], v: f32[V], a: f32[K], b: f32[K]) {
    return (diag(exp(w)) + 0.5 * outer(b, a), outer(k, v));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) { return 0.25 * tanh(sum(q)) - q @ s.S; }
}"""),
}


def _inputs(layer, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        shape = (B, T, H) + tuple(int(s) for s in slot.shape({"K": K, "V": V}))
        x = torch.rand(shape, generator=g, dtype=torch.float64)
        if slot.name in ("g", "gk", "w"):
            x = -0.6 * x
        elif slot.name in ("beta", "u"):
            pass
        elif slot.name == "k":
            x = torch.nn.functional.normalize(x - 0.5, dim=-1)
        else:
            x = x - 0.5
        out[slot.name] = x
    return out


def _layer(name: str, tmp_path):
    path = tmp_path / f"{name}.psm"
    path.write_text(OPS[name][2])
    return getattr(psmc.load(path), name)(backend="torch", K=K, V=V)


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_class_and_fast_path_stay(name):
    cls, fast, text = OPS[name]
    plan = compile_source(text, f"{name}.psm").plans[name]
    assert (plan.structure_class.name, plan.fast_path) == (cls, fast)
    assert plan.structure_class.reason and "plus terms that read no state" in plan.structure_class.reason
    assert plan.structure_class.piece("extra") is not None


@pytest.mark.parametrize("name", sorted(OPS))
def test_forward_step_and_packed_sequences_equal_the_generic_scan(name, tmp_path):
    layer = _layer(name, tmp_path)
    x = _inputs(layer, seed=len(name))
    fast, state = layer(**x, return_state=True)
    layer.use_fast_path = False
    slow, slow_state = layer(**x, return_state=True)
    layer.use_fast_path = True
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    for got, want in zip(state.prefix, slow_state.prefix):
        if got is not None and want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    _, state = layer(**{n: t[:, :20] for n, t in x.items()}, return_state=True)
    for t in range(20, 26):
        out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
        torch.testing.assert_close(out, slow[:, t], rtol=1e-10, atol=1e-12)
    bounds = [0, 9, 10, T]
    one = {n: t[:1] for n, t in x.items()}
    packed = layer(**one, cu_seqlens=torch.tensor(bounds))
    for lo, hi in zip(bounds, bounds[1:]):
        torch.testing.assert_close(packed[:, lo:hi], layer(**{n: t[:, lo:hi] for n, t in one.items()}),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ssd_skip", "gla_bias", "la_scalar_extra"])
def test_step_function_adds_the_extra_terms(name, tmp_path):
    """PsmLayer.step_function writes the chunkwise step's update out as source: it must carry
    the extra terms too."""
    layer = _layer(name, tmp_path)
    x = _inputs(layer, seed=3)
    want = layer(**x)
    names = [slot.name for slot in layer.spec.inputs]
    step = layer.step_function(**{n: x[n][:, 0] for n in names})
    state = ()
    for t in range(6):
        out, state = step(state, *(x[n][:, t] for n in names))
        torch.testing.assert_close(out if torch.is_tensor(out) else out[0], want[:, t], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradients_through_the_fast_path(name, tmp_path):
    layer = _layer(name, tmp_path)
    x = {n: t[:1, :5].detach().requires_grad_(True) for n, t in _inputs(layer, seed=5).items()}
    names = list(x)
    assert torch.autograd.gradcheck(lambda *ts: layer(**dict(zip(names, ts))), tuple(x[n] for n in names))


def test_an_extra_term_that_reads_the_state_keeps_off_the_fast_paths():
    text = OPS["ssd_skip"][2].replace("+ u * v;", "+ u * sum(s.S, axis=0);").replace("ssd_skip", "reads_state")
    plan = compile_source(text, "reads_state.psm").plans["reads_state"]
    assert plan.fast_path != "chunkwise:scalar"


@pytest.mark.parametrize("name", ["delta_skip", "dplr_scalar_extra", "ssd_skip"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_tokens_round_once(name, half, tmp_path):
    """bf16/fp16 tokens: the step and the parallel pass both add the extra terms to the
    unrounded output and round once, so they agree to the half dtype's rounding (found by the
    fuzz campaign: the parallel pass gave the kernels q, k, v in half, whose output came back
    rounded to half before the extra terms were added and it was rounded again)."""
    layer = _layer(name, tmp_path)
    x = {n: t.to(half) for n, t in _inputs(layer, seed=11).items()}
    parallel = layer(**x)
    assert parallel.dtype == half
    _, state = layer(**{n: t[:, :20] for n, t in x.items()}, return_state=True)
    for t in range(20, 30):
        out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
        torch.testing.assert_close(out.double(), parallel[:, t].double(), rtol=torch.finfo(half).eps, atol=1e-5)
