"""Ops with a param, shared by the per-lane param tests, the C++ backend tests and the
torch.compile tests of the Triton kernels."""

GLA_W = """
op gla_w[K, V] {
  param w: f32[K] = uniform(0.5, 1.5);
  state (a: f32[K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], gk: f32[K]) { return (exp(gk * w), outer(k, v)); }
  combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); }
  identity = (ones, zeros);
  readout (s, q: f32[K]) { return q @ s.S / sqrt(K); }
}
"""

SSM_A = """
op ssm_a[N] {
  param A: f32[N] = uniform(-1.0, -0.1);
  state (a: f32[N], h: f32[N]);
  lift (u: f32, delta: f32, B: f32[N]) { return (exp(delta * A), delta * B * u); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout (s, C: f32[N]) { return sum(s.h * C); }
}
"""
