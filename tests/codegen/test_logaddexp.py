"""logaddexp, the builtin, and the naive spelling `log(exp(a) + exp(b))` that the rewrite pass
turns into it (psmc.ir.registry, psmc.ir.rewrite): a running log-sum-exp over inputs near
100 and 1000 (where exp overflows in fp32) stays finite and equals torch.logcumsumexp on every
backend: torch, the C++ kernels and the Triton kernels (interpreted), forward, gradients and
the decode step. Before the rule, the naive spelling compiled as written and gave inf."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

import psmc  # noqa: E402

pytestmark = pytest.mark.triton

OP = """
op {name} {{
  state (y: f32);
  lift (x: f32) {{ return x; }}
  combine (l, r) {{ return {combine}; }}
  identity = (-inf);
  readout (s) {{ return s.y; }}
}}
"""
SPELLINGS = {"builtin": "logaddexp(l.y, r.y)", "naive": "log(exp(l.y) + exp(r.y))"}


def _layer_class(tmp_path, spelling: str):
    path = tmp_path / f"lae_{spelling}.psm"
    path.write_text(OP.format(name=f"lae_{spelling}", combine=SPELLINGS[spelling]))
    return psmc.load(path).__psmc_layers__[f"lae_{spelling}"]


def _inputs(scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 37, 3, generator=g) * 3.0 + scale  # [B, T, lanes]


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("scale", [0.0, 100.0, 1000.0])
def test_a_running_log_sum_exp_stays_finite_on_every_backend(tmp_path, spelling, backend, scale):
    layer = _layer_class(tmp_path, spelling)(backend=backend)
    x = _inputs(scale).requires_grad_()
    y = layer(x=x)
    want = torch.logcumsumexp(x.detach().double(), dim=1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6 * max(scale, 1.0))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * w).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (torch.logcumsumexp(x64, dim=1) * w.double()).sum().backward()
    # (exp(x - z) from fp32 values near `scale`: x - z is good to about an ulp of `scale`)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 + 2e-7 * scale)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_the_step_continues_the_forward(tmp_path, backend):
    layer = _layer_class(tmp_path, "naive")(backend=backend)
    x = _inputs(500.0, seed=2)
    with torch.no_grad():
        y, state = layer(x=x[:, :30], return_state=True)
        for t in range(30, 37):
            out, state = layer.step(state, x=x[:, t])
            torch.testing.assert_close(out.double(), torch.logcumsumexp(x[:, :t + 1].double(), dim=1)[:, -1],
                                       rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_minus_infinity_is_the_identity(tmp_path, backend):
    """Tokens at -inf: the prefix stays -inf until the first finite token (logaddexp(-inf, -inf)
    is -inf, not the NaN of a max-shifted form), then equals the finite tokens' log-sum-exp."""
    layer = _layer_class(tmp_path, "builtin")(backend=backend, check_finite=False)
    x = _inputs(0.0, seed=3)
    x[:, :5] = -torch.inf
    with torch.no_grad():
        y = layer(x=x)
    assert torch.equal(y[:, :5], torch.full_like(y[:, :5], -torch.inf))
    torch.testing.assert_close(y[:, 5:].double(), torch.logcumsumexp(x[:, 5:].double(), dim=1), rtol=1e-6, atol=1e-6)


def test_float64_gradcheck_through_the_torch_scan(tmp_path):
    layer = _layer_class(tmp_path, "naive")(backend="torch").double()
    x = (_inputs(50.0, seed=4)[:, :9]).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(x=t), (x,))


def test_both_spellings_compile_to_one_plan(tmp_path):
    """The naive spelling is canonicalised to the builtin: the same class, plan and kernels."""
    from psmc.compiler import codegen_notes, compile_source
    seen = []
    for spelling in sorted(SPELLINGS):
        compiled = compile_source(OP.format(name="lae", combine=SPELLINGS[spelling]), f"<{spelling}>")
        (op,) = compiled.ops
        plan = compiled.plans["lae"]
        seen.append((op.combine, plan.as_dict(), codegen_notes(op, plan)))
    assert "logaddexp" in str(seen[0][0])
    assert seen[0] == seen[1]


INT_AND_LITERAL = """
op lae_int {
  state (n: i64);
  lift (x: i64) { return x; }
  combine (l, r) { return l.n + r.n; }
  readout (s) { return logaddexp(s.n, 2); }
}
"""
DOUBLE = OP.replace("f32", "f64").format(name="lae_f64", combine="logaddexp(l.y, r.y)")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_integer_operands_and_literals_give_a_float(tmp_path, backend):
    """logaddexp(i64 count, 2): the count becomes a float, the literal a float constant (torch's
    logaddexp takes float tensors only, Triton's exp float operands only)."""
    path = tmp_path / "lae_int.psm"
    path.write_text(INT_AND_LITERAL)
    layer = psmc.load(path).__psmc_layers__["lae_int"](backend=backend)
    x = torch.randint(0, 5, (2, 9, 3), generator=torch.Generator().manual_seed(5))
    y = layer(x=x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.logaddexp(torch.cumsum(x, dim=1).float(), torch.tensor(2.0)))


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # (f64 ops have no Triton kernels)
def test_a_double_state_computes_in_double(tmp_path, backend):
    path = tmp_path / "lae_f64.psm"
    path.write_text(DOUBLE)
    layer = psmc.load(path).__psmc_layers__["lae_f64"](backend=backend)
    x = _inputs(300.0, seed=6).double()
    y = layer(x=x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.logcumsumexp(x, dim=1), rtol=1e-12, atol=1e-12)
