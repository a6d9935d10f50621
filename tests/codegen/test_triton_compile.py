"""backend='triton' layers inside torch.compile graphs, under TRITON_INTERPRET=1.

The generated kernels (forward, backward and decode step: psmc::generated_scan and
psmc::generated_scan_backward) and the first-order scan kernel (psmc::first_order_scan) are
torch custom ops inside a graph (psmc/runtime/custom_ops.py), so Dynamo never traces a launch:
a fullgraph training pass holds each pass as one node, and the compiled layer's outputs and
gradients are the eager layer's, bit for bit. Cases cover every tile model (lanes, state,
matrix), a lane-broadcast input (its adjoint summed by the kernel), per-lane params, a stream
continued from a differentiable state, and decode steps; and the Triton tree kernels
(psmc::tree_scan and psmc::tree_scan_backward) of a non-associative op.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

import psmc  # noqa: E402
from psmc.runtime import tree_kernels, triton_scan, triton_support  # noqa: E402,F401  (registers the ops)
from param_ops import GLA_W, SSM_A  # noqa: E402
from tree_cases import HAND_WRITTEN  # noqa: E402
from triton_helpers import example_inputs as _inputs, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

SCAN = torch.ops.psmc.generated_scan.default
SCAN_BACKWARD = torch.ops.psmc.generated_scan_backward.default
FIRST_ORDER = torch.ops.psmc.first_order_scan.default

# name: (dims, per-lane params, fast path on, the forward op, the backward op)
CASES = {
    "welford": ({}, False, False, SCAN, SCAN_BACKWARD),  # lanes tile, three outputs
    "selective_ssm": ({"N": 4}, False, False, SCAN, SCAN_BACKWARD),  # state tile; B shared by the lanes
    "gla": ({"K": 4, "V": 3}, False, False, SCAN, SCAN_BACKWARD),  # matrix tile
    "linear_recurrence": ({}, False, True, FIRST_ORDER, FIRST_ORDER),  # the first-order scan kernel
    "ssm_a": ({"N": 3}, True, False, SCAN, SCAN_BACKWARD),  # per-lane params, state tile
    "gla_w": ({"K": 3, "V": 2}, True, False, SCAN, SCAN_BACKWARD),  # per-lane params, matrix tile
}


@pytest.fixture(scope="module")
def param_ops(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "param_ops.psm"
    path.write_text(SSM_A + GLA_W)
    return psmc.load(path)


def _layer(name: str, param_ops):
    dims, per_lane, fast, _, _ = CASES[name]
    cls = getattr(param_ops, name) if name in ("ssm_a", "gla_w") else layer_class(name)
    torch.manual_seed(0)
    layer = cls(backend="triton", lanes=(3,), per_lane=per_lane, **dims) if per_lane else cls(backend="triton", **dims)
    layer.use_fast_path = fast
    return layer


def _tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _weighted(outputs) -> torch.Tensor:
    """A weighted sum, so every position gets its own adjoint."""
    return sum((o * torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)).sum() for o in outputs)


def _ops(graphs, op) -> int:
    return sum(n.target is op for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes)


def _capturing():
    """An AOTAutograd backend that keeps its forward and backward graphs (eager kernels)."""
    forward, backward = [], []

    def keep(graphs):
        return lambda gm, _: graphs.append(gm) or make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=keep(forward), bw_compiler=keep(backward)), forward, backward


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_training_holds_each_pass_once_and_equals_eager(name, param_ops):
    """A warm-up pass, then a pass continuing its state (so the entering state's adjoint flows
    back into the warm-up's inputs), all in one fullgraph training step: each pass is one
    forward node and one backward node, and outputs and gradients equal eager exactly."""
    layer = _layer(name, param_ops)
    warm, x = _inputs(layer, 2, 5, seed=1), _inputs(layer, 2, 11, seed=2)
    _, _, _, forward_op, backward_op = CASES[name]

    def run(warm, x):
        _, state = layer(**warm, return_state=True)
        out, state = layer(**x, state=state, return_state=True)
        return _tuple(out) + tuple(t for t in state.prefix if t is not None)

    def train(fn):
        leaves = [{n: v.clone().requires_grad_() for n, v in d.items()} for d in (warm, x)]
        result = fn(*leaves)
        wrt = [v for d in leaves for v in d.values()] + list(layer.parameters())
        return result, torch.autograd.grad(_weighted(result), wrt)

    want, want_grads = train(run)
    backend, forward, backward = _capturing()
    dynamo.reset()
    got, got_grads = train(torch.compile(run, fullgraph=True, backend=backend))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    if forward_op is FIRST_ORDER:  # the backward is the same scan in reverse time
        assert (_ops(forward, FIRST_ORDER), _ops(backward, FIRST_ORDER)) == (2, 2)
    else:
        assert (_ops(forward, forward_op), _ops(forward, backward_op)) == (2, 0)
        assert (_ops(backward, forward_op), _ops(backward, backward_op)) == (0, 2)


@pytest.mark.parametrize("name", ["welford", "selective_ssm", "gla"])
def test_compiled_prefill_and_decode_steps_equal_eager(name, param_ops):
    """Serving compiled with fullgraph: a prefill, then two decode tokens from its state, each
    pass one op (the step kernel is psmc::generated_scan over no time axis), the eager values."""
    layer = _layer(name, param_ops)
    x = _inputs(layer, 2, 9, seed=3)
    tokens = [_inputs(layer, 2, None, seed=4 + i) for i in range(2)]

    def serve(x, tokens):
        out, state = layer(**x, return_state=True)
        ys = []
        for token in tokens:
            y, state = layer.step(state, **token)
            ys += _tuple(y)
        return _tuple(out) + tuple(ys) + tuple(t for t in state.prefix if t is not None)

    with torch.no_grad():
        want = serve(x, tokens)
        graphs = []
        dynamo.reset()
        got = torch.compile(serve, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm)(x, tokens)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _ops(graphs, SCAN) == 3


def test_compiled_training_of_a_tree_scan_holds_its_kernels_once_and_equals_eager(tmp_path):
    """The paper's fixed tree of a non-associative op (psmc::tree_scan and its backward), with a
    per-lane param: a fresh forward (a stream continued from a state reads its token count on
    the host, which a fullgraph trace refuses)."""
    path = tmp_path / "blend.psm"
    path.write_text(HAND_WRITTEN["blend"])
    torch.manual_seed(0)
    layer = psmc.load(path).blend(backend="triton", lanes=(3,), per_lane=True)
    g = torch.Generator().manual_seed(7)
    x = {n: torch.randn(2, 13, 3, generator=g) * 0.5 for n in ("x", "z")}

    def train(fn):
        leaves = {n: v.clone().requires_grad_() for n, v in x.items()}
        out = fn(**leaves)
        return out, torch.autograd.grad(_weighted((out,)), [*leaves.values(), *layer.parameters()])

    want, want_grads = train(layer)
    backend, forward, backward = _capturing()
    dynamo.reset()
    got, got_grads = train(torch.compile(layer, fullgraph=True, backend=backend))
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    tree, tree_backward = torch.ops.psmc.tree_scan.default, torch.ops.psmc.tree_scan_backward.default
    assert (_ops(forward, tree), _ops(backward, tree_backward), _ops(backward, tree)) == (1, 1, 0)


def test_a_compiled_tree_cache_token_is_one_kernel_op_in_one_graph_for_every_position(tmp_path):
    """A TreeCache decode step under fullgraph: the step kernel is one psmc::tree_cache_step
    node, and one graph serves every position and mix of rows (a TreeState step would trace a
    graph per position), equal to eager bit for bit."""
    from psmc.runtime.state import TreeCache
    path = tmp_path / "blend.psm"
    path.write_text(HAND_WRITTEN["blend"])
    torch.manual_seed(0)
    layer = psmc.load(path).blend(backend="triton", lanes=(3,))
    g = torch.Generator().manual_seed(5)
    packed = {n: torch.randn(1, 9, 3, generator=g) for n in ("x", "z")}
    with torch.no_grad():
        _, state = layer(**packed, cu_seqlens=torch.tensor([0, 2, 3, 9]), return_state=True)
    eager = compiled = TreeCache.of(state, 100)
    graphs = []
    dynamo.reset()
    step = torch.compile(layer.step, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    for _ in range(12):
        token = {n: torch.randn(3, 3, generator=g) for n in ("x", "z")}
        with torch.no_grad():  # (serving; a token autograd records runs the differentiable torch push)
            want, eager = layer.step(eager, **token)
            got, compiled = step(compiled, **token)
        assert torch.equal(got, want)
    assert compiled.sizes == eager.sizes == [14, 13, 18]
    assert len(graphs) == 1 and _ops(graphs, torch.ops.psmc.tree_cache_step.default) == 1


def test_a_second_derivative_through_the_kernels_is_a_clear_error(param_ops):
    """The backward kernels are not differentiable again: an error, not a silently partial
    second derivative (their outputs would carry no graph)."""
    layer = _layer("welford", param_ops)
    x = _inputs(layer, 2, 6, seed=5)["x"].requires_grad_()
    n, mean, m2 = layer(x=x)
    (grad,) = torch.autograd.grad(m2.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad.sum().backward()
