"""An op with a param, shared by the per-lane param tests and the C++ backend tests."""

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
