"""The chunked (gated) delta rule on Triton kernels under TRITON_INTERPRET=1, against a
float64 per-token recurrence written here: S_t = g_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,
o_t = scale * q_t @ S_t."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import triton_delta  # noqa: E402
from psmc.runtime.triton_delta import triton_chunk_delta_rule  # noqa: E402

pytestmark = pytest.mark.triton
# PSMC_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the same tests compiled on a GPU
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


def loop_reference(q, k, v, beta, log_decay, scale, h0):
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    B, T = q.shape[:2]
    lanes = torch.broadcast_shapes(q.shape[2:-1], k.shape[2:-1], v.shape[2:-1], beta.shape[2:])
    S = torch.zeros(B, *lanes, q.shape[-1], v.shape[-1], dtype=torch.float64, device=q.device)
    if h0 is not None:
        S = S + h0.double()
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, ..., None, None]
        gt = 1.0 if log_decay is None else torch.exp(log_decay[:, t].double())[..., None, None]
        S = gt * (S - bt * kt[..., :, None] * (kt[..., :, None] * S).sum(-2, keepdim=True)) \
            + bt * kt[..., :, None] * v[:, t, ..., None, :]
        outs.append(scale * (q[:, t, ..., :, None] * S).sum(-2))
    return torch.stack(outs, 1), S


def make(seed, B, T, lanes, K, V, gated, h0, strength=1.0, kill=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, v = r(B, T, *lanes, K), r(B, T, *lanes, V)
    k = torch.nn.functional.normalize(r(B, T, *lanes, K), dim=-1)  # the usual L2-normalised keys
    beta = torch.rand(B, T, *lanes, generator=gen)
    g = None
    if gated:
        g = -strength * torch.rand(B, T, *lanes, generator=gen)
        if kill:
            g.view(-1)[::5] = -torch.inf
    init = r(B, *lanes, K, V) if h0 else None
    return [None if x is None else x.to(DEVICE) for x in (q, k, v, beta, g, init)]


CASES = [
    # (B, T, lanes, K, V, gated, h0)
    (1, 7, (), 16, 8, False, False),
    (1, 37, (2,), 16, 16, False, True),
    (1, 40, (2,), 24, 12, True, True),
    (1, 33, (3,), 8, 20, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}-{'gated' if c[5] else 'plain'}" for c in CASES])
def test_forward_matches_loop(case):
    B, T, lanes, K, V, gated, h0 = case
    q, k, v, beta, g, init = make(T, *case)
    o, s = triton_chunk_delta_rule(q, k, v, beta, g, scale=0.5, initial_state=init, chunk_size=32)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, beta, g), 0.5, cpu(init)[0])
    o, s = o.cpu(), s.cpu()
    assert o.dtype == v.dtype and s.dtype == torch.float32 and o.shape == ref_o.shape
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_strong_gates_and_broadcast_lanes():
    """Gates down to e^-40 per token and exact zeros; beta and keys shared across lanes."""
    q, k, v, beta, g, init = make(5, 1, 40, (2,), 16, 16, True, True, strength=40.0, kill=True)
    k, beta = k[:, :, :1], beta[:, :, :1]
    o, s = triton_chunk_delta_rule(q, k, v, beta, g, initial_state=init, chunk_size=16)
    ref_o, ref_s = loop_reference(*cpu(q, k, v, beta, g), 1.0, cpu(init)[0])
    o, s = o.cpu(), s.cpu()
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_training_runs_the_differentiable_torch_form():
    """With gradients needed, the torch WY form runs (HAS_BACKWARD is False) and its gradients
    equal those of the per-token recurrence."""
    assert triton_delta.HAS_BACKWARD is False
    q, k, v, beta, g, init = make(9, 1, 21, (2,), 8, 8, True, True)
    xs = [x.double().requires_grad_() for x in (q, k, v, beta, g, init)]
    rs = [x.double().requires_grad_() for x in (q, k, v, beta, g, init)]
    o, s = triton_chunk_delta_rule(*xs[:5], scale=0.3, initial_state=xs[5], chunk_size=8)
    ro, rs_ = loop_reference(*rs[:5], 0.3, rs[5])
    do, ds = torch.randn_like(ro), torch.randn_like(rs_)
    ((o * do).sum() + (s * ds).sum()).backward()
    ((ro * do).sum() + (rs_ * ds).sum()).backward()
    for x, r in zip(xs, rs):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-8, atol=1e-8)
