"""The chunked kernels as torch custom ops (psmc/runtime/custom_ops.py), under TRITON_INTERPRET=1.

Decayed linear attention (psmc::chunk_linear_attention), the delta rule (psmc::chunk_delta_rule)
and the DPLR chain (psmc::dplr_chain), reached through the public entry points with the Triton
backend on: a torch.compile(fullgraph=True) training pass holds each as one forward node and
one backward node (Dynamo never traces a kernel launch), and its outputs and gradients equal
the eager pass's; compiled prefill and decode hold their kernels' op once; a second derivative
is a clear error.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest  # noqa: E402
import torch  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

from psmc.runtime import chunkwise, delta, dplr  # noqa: E402

pytestmark = pytest.mark.triton


def _linear_attention(seed: int, decay: str, exclusive: bool):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 1, 21, 2, 16, 8
    q, k, v = (torch.randn(B, T, H, n, generator=gen) for n in (K, K, V))
    g = None if decay == "none" else -torch.rand(B, T, H, *((K,) if decay == "key" else ()), generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen)

    def run(q, k, v, h0, *g):
        return chunkwise.chunk_linear_attention(q, k, v, *(g or (None,)), decay=decay, scale=0.25,
                                                initial_state=h0, exclusive=exclusive, chunk_size=16)
    return run, [q, k, v, h0, *(() if g is None else (g,))]


def _delta_rule(seed: int, gated: bool):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 1, 21, 2, 16, 8
    q, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, V, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    beta = torch.rand(B, T, H, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) if gated else None
    h0 = torch.randn(B, H, K, V, generator=gen)

    def run(q, k, v, beta, h0, *g):
        return delta.chunk_delta_rule(q, k, v, beta, *(g or (None,)), scale=0.5, initial_state=h0, chunk_size=16)
    return run, [q, k, v, beta, h0, *(() if g is None else (g,))]


def _dplr(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 1, 21, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, n, generator=gen) for n in (K, K, V))
    kappa = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    a, b = -kappa, kappa * torch.rand(B, T, H, 1, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen)

    def run(q, k, v, a, b, g):
        return dplr.chunk_dplr(q, k, v, a, b, g, scale=0.5)
    return run, [q, k, v, a, b, g]


CASES = {
    "gla key": (lambda: _linear_attention(0, "key", False), "chunk_linear_attention"),
    "retention scalar exclusive": (lambda: _linear_attention(1, "scalar", True), "chunk_linear_attention"),
    "gated delta rule": (lambda: _delta_rule(3, True), "chunk_delta_rule"),
    "dplr": (lambda: _dplr(5), "dplr_chain"),
}


def _train(run, inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, s = run(*leaves)
    (o.square().sum() + (s * s).sum()).backward()
    return o, s, [x.grad for x in leaves]


@pytest.mark.parametrize("name", list(CASES))
def test_a_compiled_training_pass_holds_each_kernel_op_once_and_equals_eager(name, monkeypatch):
    make, op = CASES[name]
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    run, inputs = make()
    graphs = {"forward": [], "backward": []}

    def keep(which):
        def compiler(gm, example_inputs):
            graphs[which].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend=aot_autograd(fw_compiler=keep("forward"),
                                                                        bw_compiler=keep("backward")))
    got = _train(compiled, inputs)
    targets = {which: [str(n.target) for g in gms for n in g.graph.nodes if n.op == "call_function"]
               for which, gms in graphs.items()}
    assert targets["forward"].count(f"psmc.{op}.default") == 1, targets["forward"]
    assert targets["backward"].count(f"psmc.{op}_backward.default") == 1, targets["backward"]
    want = _train(run, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gla key", "gated delta rule", "dplr"])
def test_a_second_derivative_is_a_clear_error(name, monkeypatch):
    """The kernels' gradients are differentiable once: differentiating them again raises (never
    a silent zero)."""
    make, _ = CASES[name]
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    run, inputs = make()
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, _ = run(*leaves)
    (dq,) = torch.autograd.grad(o.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with "
                                           "@once_differentiable"):
        dq.sum().backward()


def _decode(which: str):
    """A state and one token of the delta rule or the DPLR form ([B, H, ...])."""
    gen = torch.Generator().manual_seed(6)
    B, H, K, V = 3, 2, 16, 8
    S = torch.randn(B, H, K, V, generator=gen)
    q, k, v = (torch.randn(B, H, n, generator=gen) for n in (K, K, V))
    k = torch.nn.functional.normalize(k, dim=-1)
    if which == "delta":
        beta, g = torch.rand(B, H, generator=gen), -torch.rand(B, H, generator=gen)
        return (lambda *x: delta.delta_rule_step(*x, scale=0.5)), [S, q, k, v, beta, g]
    a, g = -k, -torch.rand(B, H, K, generator=gen)
    return (lambda *x: dplr.dplr_step(*x, scale=0.5)), [S, q, k, v, a, k * 0.5, g]


INFERENCE = {
    "gla prefill": (lambda: _linear_attention(7, "key", False), "chunk_linear_attention"),
    "delta rule prefill": (lambda: _delta_rule(8, True), "chunk_delta_rule"),
    "dplr prefill": (lambda: _dplr(9), "dplr_infer"),
    "delta rule decode": (lambda: _decode("delta"), "delta_step"),
    "dplr decode": (lambda: _decode("dplr"), "dplr_step"),
}


@pytest.mark.parametrize("name", list(INFERENCE))
def test_compiled_inference_runs_each_kernel_op_once(name, monkeypatch):
    """Without gradients (prefill, decode) a compiled call holds the kernels' op once and equals
    the eager call, which runs the same kernels."""
    make, op = INFERENCE[name]
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    run, inputs = make()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend=keep)(*inputs)
    targets = [str(n.target) for g in graphs for m in g.modules() for n in m.graph.nodes if n.op == "call_function"]
    assert targets.count(f"psmc.{op}.default") == 1, targets
    want = run(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_inductor_compiles_training_around_the_ops_with_broadcast_keys(monkeypatch):
    """Inductor trusts the fake implementations' shapes and strides: GLA keys shared by every head
    (a stride-0 view into the op) train compiled as they do eagerly."""
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    run, (q, k, v, h0, g) = _linear_attention(10, "key", False)
    inputs = [q, k[:, :, :1].clone(), v, h0, g]
    torch._dynamo.reset()
    got = _train(torch.compile(run, fullgraph=True), inputs)
    want = _train(run, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
