"""The diagonal-plus-low-rank decode token as one Triton kernel (psmc.runtime.triton_dplr_step),
under TRITON_INTERPRET=1: the same token as the torch form of `dplr_step`, with a per-key, a
scalar (last axis 1) or no decay, from a state or from none, leading axes broadcast, K and V not
powers of two, K up to 256 (the kernel's limit) and past it (the torch form serves), bf16
tokens, and a stream of tokens through a generated layer (examples/rwkv7.psm)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.runtime import chunkwise, dplr, triton_dplr_step  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = os.environ.get("PSMC_TEST_DEVICE", "cpu")


def token(seed, lead, K, V, decay, state, shared=False):
    """(S, q, k, v, a, b, log_decay) of one token; decay: 'key', 'scalar' (last axis 1) or None."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(*lead, K), r(*lead, K), r(*lead, V)
    kappa = torch.nn.functional.normalize(r(*lead, K), dim=-1)
    a, b = -kappa, kappa * torch.rand(*lead, K, generator=g)
    if shared:  # one removal key per batch row, shared by every lane
        a = a[:, :1]
    log_decay = {"key": -torch.rand(*lead, K, generator=g), "scalar": -torch.rand(*lead, 1, generator=g),
                 None: None}[decay]
    S = r(*lead, K, V) if state else None
    return [None if t is None else t.to(DEVICE) for t in (S, q, k, v, a, b, log_decay)]


@pytest.mark.parametrize("lead, K, V, decay, state, shared", [
    ((2, 3), 16, 16, "key", True, False),
    ((1, 2), 20, 12, None, True, False),  # neither a power of two
    ((3,), 8, 40, "key", False, False),  # a stream's first token, two V blocks
    ((2, 4), 16, 8, "scalar", True, True),  # a scalar decay; a broadcast over the lanes
    ((1, 1), 256, 16, "key", True, False),  # the largest K the kernel takes
])
def test_the_kernel_equals_the_torch_token(lead, K, V, decay, state, shared):
    S, q, k, v, a, b, g = token(K + V, lead, K, V, decay, state, shared)
    assert triton_dplr_step.takes(S, q, k, v, a, b, g)
    o, S1 = triton_dplr_step.triton_dplr_step(S, q, k, v, a, b, g, scale=0.5)
    wide = [None if t is None else t.double() for t in (S, q, k, v, a, b, g)]
    ro, rS1 = dplr.dplr_step(*wide, scale=0.5)
    assert o.dtype == v.dtype and S1.dtype == torch.float32
    assert o.shape == ro.shape and S1.shape == rS1.shape
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S1.double(), rS1, rtol=1e-5, atol=1e-5)


def test_bf16_tokens_read_as_given():
    S, q, k, v, a, b, g = token(5, (2, 2), 16, 16, "key", True)
    half = [t.to(torch.bfloat16) for t in (q, k, v, a, b, g)]
    o, S1 = triton_dplr_step.triton_dplr_step(S, *half, scale=1.0)
    ro, rS1 = dplr.dplr_step(S.double(), *(t.double() for t in half))
    assert o.dtype == torch.bfloat16 and S1.dtype == torch.float32
    torch.testing.assert_close(S1.double(), rS1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), ro, rtol=1e-2, atol=1e-2)


def test_what_the_kernel_declines():
    S, q, k, v, a, b, g = token(1, (1, 2), 16, 16, "key", True)
    assert not triton_dplr_step.takes(S.double(), q, k, v, a, b, g)  # a float64 state
    assert not triton_dplr_step.takes(*token(2, (1, 1), 300, 8, "key", True))  # K past MAX_K
    assert not triton_dplr_step.takes(S, q.requires_grad_(), k, v, a, b, g)  # a gradient wanted
    with torch.no_grad():
        assert triton_dplr_step.takes(S, q, k, v, a, b, g)


def test_dplr_step_routes_to_the_kernel(monkeypatch):
    """dplr_step takes the kernel where it is wanted (CUDA tensors; here BACKEND='triton'), the
    torch form otherwise, with the same values."""
    calls = []
    real = triton_dplr_step.triton_dplr_step
    monkeypatch.setattr(triton_dplr_step, "triton_dplr_step", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    args = token(3, (2, 2), 16, 24, "key", True)
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    o, S1 = dplr.dplr_step(*args, scale=0.25)
    assert calls == [1]
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    ro, rS1 = dplr.dplr_step(*args, scale=0.25)
    assert calls == [1]
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S1, rS1, rtol=1e-5, atol=1e-5)


def rwkv7_layer(steps: int):
    """examples/rwkv7.psm at K = V = 8 (torch backend) and RWKV-7-like inputs [1, steps, 2, 8]."""
    import pathlib

    import psmc
    root = pathlib.Path(__file__).resolve().parents[2]
    layer = psmc.load(root / "examples/rwkv7.psm").rwkv7(K=8, V=8, backend="torch")
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.randn(1, steps, 2, 8, generator=g)  # noqa: E731
    kappa = torch.nn.functional.normalize(r(), dim=-1)
    x = {"w": -torch.rand(1, steps, 2, 8, generator=g), "k": r(), "v": r(), "a": -kappa, "b": kappa * 0.5, "r": r()}
    return layer, {n: t.to(DEVICE) for n, t in x.items()}


def test_a_generated_layer_decodes_through_the_kernel(monkeypatch):
    """rwkv7's bound step: a stream of tokens through the kernel equals the parallel pass."""
    layer, x = rwkv7_layer(6)
    calls = []
    real = triton_dplr_step.triton_dplr_step
    monkeypatch.setattr(triton_dplr_step, "triton_dplr_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
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
