"""The delta rule's decode token as one Triton kernel (psmc.runtime.triton_delta_step), under
TRITON_INTERPRET=1: the same token as the torch form of `delta_rule_step`, gated or not, from a
state or from none, lanes broadcast, K and V not powers of two, K up to 256 (the kernel's
limit) and past it (the torch form serves), and a stream of tokens through a generated layer."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import chunkwise, delta, triton_delta_step  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def token(seed, lead, K, V, gated, state, lanes_shared=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(*lead, K), torch.nn.functional.normalize(r(*lead, K), dim=-1), r(*lead, V)
    if lanes_shared:  # one key per batch row, shared by every lane
        k = torch.nn.functional.normalize(r(lead[0], *(1,) * (len(lead) - 1), K), dim=-1)
    beta = torch.rand(*lead, generator=g)
    log_g = -torch.rand(*lead, generator=g) if gated else None
    S = r(*lead, K, V) if state else None
    return [None if t is None else t.to(DEVICE) for t in (S, q, k, v, beta, log_g)]


@pytest.mark.parametrize("lead, K, V, gated, state, shared", [
    ((2, 3), 16, 16, True, True, False),
    ((1, 2), 20, 12, False, True, False),  # neither a power of two
    ((3,), 8, 40, True, False, False),  # a stream's first token, two V blocks
    ((2, 4), 16, 8, True, True, True),  # keys broadcast over the lanes
    ((1, 1), 256, 16, True, True, False),  # the largest K the kernel takes
])
def test_the_kernel_equals_the_torch_token(lead, K, V, gated, state, shared):
    S, q, k, v, beta, log_g = token(K + V, lead, K, V, gated, state, shared)
    assert triton_delta_step.takes(S, q, k, v, beta, log_g)
    o, S1 = triton_delta_step.triton_delta_step(S, q, k, v, beta, log_g, scale=0.5)
    ro, rS1 = delta.delta_rule_step(None if S is None else S.double(), q.double(), k.double(), v.double(),
                                    beta.double(), None if log_g is None else log_g.double(), scale=0.5)
    assert o.dtype == v.dtype and S1.dtype == torch.float32
    assert o.shape == ro.shape and S1.shape == rS1.shape
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S1.double(), rS1, rtol=1e-5, atol=1e-5)


def test_what_the_kernel_declines():
    S, q, k, v, beta, log_g = token(1, (1, 2), 16, 16, True, True)
    assert not triton_delta_step.takes(S.double(), q, k, v, beta, log_g)  # a float64 state
    big = token(2, (1, 1), 300, 8, True, True)
    assert not triton_delta_step.takes(*big)  # K past MAX_K
    assert not triton_delta_step.takes(S, q.requires_grad_(), k, v, beta, log_g)  # a gradient wanted
    with torch.no_grad():
        assert triton_delta_step.takes(S, q, k, v, beta, log_g)


def test_delta_rule_step_routes_to_the_kernel(monkeypatch):
    """delta_rule_step takes the kernel where it is wanted (CUDA tensors; here BACKEND='triton'),
    the torch form otherwise, with the same values."""
    calls = []
    real = triton_delta_step.triton_delta_step
    monkeypatch.setattr(triton_delta_step, "triton_delta_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    S, q, k, v, beta, log_g = token(3, (2, 2), 16, 24, True, True)
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    o, S1 = delta.delta_rule_step(S, q, k, v, beta, log_g, scale=0.25)
    assert calls == [1]
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    ro, rS1 = delta.delta_rule_step(S, q, k, v, beta, log_g, scale=0.25)
    assert calls == [1]
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S1, rS1, rtol=1e-5, atol=1e-5)


def test_a_generated_layer_decodes_through_the_kernel(monkeypatch):
    """gated_delta_rule's bound step: a stream of tokens through the kernel equals the torch
    steps and the parallel pass."""
    import pathlib

    import psmc
    root = pathlib.Path(__file__).resolve().parents[2]
    cls = psmc.load(root / "examples/gated_delta_rule.psm").__psmc_layers__["gated_delta_rule"]
    layer = cls(K=8, V=8, backend="torch")
    g = torch.Generator().manual_seed(0)
    x = {"q": torch.randn(1, 6, 2, 8, generator=g), "k": torch.nn.functional.normalize(torch.randn(1, 6, 2, 8, generator=g), dim=-1),
         "v": torch.randn(1, 6, 2, 8, generator=g), "beta": torch.rand(1, 6, 2, generator=g),
         "g": -torch.rand(1, 6, 2, generator=g)}
    x = {n: t.to(DEVICE) for n, t in x.items()}
    calls = []
    real = triton_delta_step.triton_delta_step
    monkeypatch.setattr(triton_delta_step, "triton_delta_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    with torch.no_grad():
        state = layer.init_state()
        outs = []
        for t in range(6):
            o, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            outs.append(o)
        monkeypatch.setattr(chunkwise, "BACKEND", "torch")
        want = layer(**x)
    assert len(calls) == 6
    torch.testing.assert_close(torch.stack(outs, 1), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps, lead, K, V, gated, state, shared", [
    (2, (2, 3), 16, 16, True, True, False),
    (3, (1, 2), 20, 12, False, True, False),  # neither a power of two
    (2, (3,), 8, 40, True, False, False),  # a stream's first token, two V blocks
    (2, (2, 4), 16, 8, True, True, True),  # the first step's key broadcast over the lanes
])
def test_a_product_of_delta_steps_is_one_launch(steps, lead, K, V, gated, state, shared, monkeypatch):
    """delta_product_step: r delta steps of one token in one kernel launch (STEPS = r), equal to
    r torch steps, the gate before the first."""
    S, q, k, v, beta, log_g = token(K + V + steps, lead, K, V, gated, state, shared)
    more = [token(K + V + steps + j, lead, K, V, False, False)[2:5] for j in range(1, steps)]
    keys, values, betas = zip((k, v, beta), *more)
    launches = []
    real = triton_delta_step._delta_step_kernel
    monkeypatch.setattr(triton_delta_step, "_delta_step_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    o, S1 = delta.delta_product_step(S, q, keys, values, betas, log_g, scale=0.5)
    assert len(launches) == 1
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    ro, rS1 = delta.delta_product_step(None if S is None else S.double(), q.double(), [t.double() for t in keys],
                                       [t.double() for t in values], [t.double() for t in betas],
                                       None if log_g is None else log_g.double(), scale=0.5)
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S1.double(), rS1, rtol=1e-5, atol=1e-5)
    # the torch form is r delta-rule tokens
    want_S = None if S is None else S.double()
    for j in range(steps):
        want_o, want_S = delta.delta_rule_step(want_S, q.double(), keys[j].double(), values[j].double(),
                                               betas[j].double(), None if j or log_g is None else log_g.double(),
                                               scale=0.5)
    torch.testing.assert_close(ro, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rS1, want_S, rtol=1e-12, atol=1e-12)


def test_a_generated_delta_product_decodes_in_one_launch_per_token(monkeypatch):
    """gated_delta_product's bound step: one kernel launch per token (both steps), equal to the
    parallel pass."""
    import pathlib

    import psmc
    root = pathlib.Path(__file__).resolve().parents[2]
    layer = psmc.load(root / "examples/gated_delta_product.psm").gated_delta_product(K=8, V=8, backend="torch")
    g = torch.Generator().manual_seed(1)
    x = {"q": torch.randn(1, 5, 2, 8, generator=g), "g": -torch.rand(1, 5, 2, generator=g)}
    for j in (1, 2):
        x |= {f"k{j}": torch.nn.functional.normalize(torch.randn(1, 5, 2, 8, generator=g), dim=-1),
              f"v{j}": torch.randn(1, 5, 2, 8, generator=g), f"b{j}": torch.rand(1, 5, 2, generator=g)}
    x = {n: t.to(DEVICE) for n, t in x.items()}
    calls = []
    real = triton_delta_step.triton_delta_step
    monkeypatch.setattr(triton_delta_step, "triton_delta_step", lambda *a, **kw: calls.append(kw["steps"]) or
                        real(*a, **kw))
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    with torch.no_grad():
        state = layer.init_state()
        outs = []
        for t in range(5):
            o, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            outs.append(o)
        monkeypatch.setattr(chunkwise, "BACKEND", "torch")
        want = layer(**x)
    assert calls == [2] * 5
    torch.testing.assert_close(torch.stack(outs, 1), want, rtol=1e-4, atol=1e-4)
