"""backend='triton' through the public layer API under TRITON_INTERPRET=1: forward, streaming,
step and gradients equal backend='torch' (fp32, DESIGN.md tolerances).

Layers come from psmc.load (the real analysis plans); the gradient tests also check the
generated backward kernel (a reverse scan of the adjoint with VJPs printed from the IR) on
every input and parameter, through a stream continued from a state, and through `step`."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported


import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.codegen import triton_vjp  # noqa: E402
from triton_helpers import close as _close, example_inputs as _inputs, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

SUPPORTED = ["cumsum", "linear_recurrence", "logcumsumexp", "running_argmax", "welford", "segmented_sum",
             "selective_ssm", "softmax_pool"]
DIMS = {"selective_ssm": {"N": 4}, "softmax_pool": {"V": 5}}


def _pair(name: str):
    """The op's class from psmc.load, as a torch layer and a triton layer sharing params."""
    cls = layer_class(name)
    ref = cls(backend="torch", **DIMS.get(name, {}))
    tri = cls(backend="triton", **DIMS.get(name, {}))
    with torch.no_grad():
        for p in ref.parameters():  # params away from their init, so their gradients are generic
            p.add_(0.1 * torch.randn_like(p))
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _loss(outputs) -> torch.Tensor:
    """A weighted sum, so every output position gets a different adjoint."""
    total = 0.0
    for o in outputs:
        if o.is_floating_point():
            w = torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)
            total = total + (o * w).sum()
    return total


def _grads(layer, inputs: dict, loss) -> list:
    wrt = [x for x in inputs.values() if x.requires_grad] + list(layer.parameters())
    return torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else []


def test_every_triton_op_has_a_vjp_rule():
    assert triton_vjp.vjp_rule_missing() == []


@pytest.mark.parametrize("name", SUPPORTED)
def test_layer_forward_stream_and_step_equal_torch(name):
    ref, tri = _pair(name)
    assert type(tri)._triton_kernels is not None, "the real plan should give Triton kernels"
    with torch.no_grad():
        for T, block_t in ((1, 4), (5, 2), (64, 16), (130, 32)):
            tri.triton_block_t = block_t  # below T: the carry between blocks is exercised
            inputs = _inputs(ref, 2, T, seed=T)
            want, want_state = ref(**inputs, return_state=True)
            got, got_state = tri(**inputs, return_state=True)
            for r, o in zip(_tuple(want), _tuple(got)):
                _close(r, o, f"T={T}")
            for r, o in zip(want_state.prefix, got_state.prefix):
                assert (r is None) == (o is None), f"state T={T}: a dead field is left out by both"
                if r is not None:
                    _close(r.expand_as(o), o, f"state T={T}")
        tri.triton_block_t = 8
        inputs = _inputs(ref, 2, 21, seed=5)
        want = _tuple(ref(**inputs))
        _, state = tri(**{k: v[:, :12] for k, v in inputs.items()}, return_state=True)
        rest = _tuple(tri(**{k: v[:, 12:] for k, v in inputs.items()}, state=state))
        state = tri.init_state()
        for t in range(4):
            out, state = tri.step(state, **{k: v[:, t] for k, v in inputs.items()})
            for r, o in zip(want, _tuple(out)):
                _close(r[:, t], o, f"step {t}")
    for r, o in zip(want, rest):
        _close(r[:, 12:], o, "continued stream")


@pytest.mark.parametrize("name", [n for n in SUPPORTED if n != "running_argmax"])  # its output is i64
def test_layer_gradients_equal_torch(name):
    ref, tri = _pair(name)
    for T, block_t in ((3, 2), (19, 8)):
        tri.triton_block_t = block_t
        inputs = _inputs(ref, 2, T, seed=11 + T, grad=True)
        want = _grads(ref, inputs, _loss(_tuple(ref(**inputs))))
        got = _grads(tri, inputs, _loss(_tuple(tri(**inputs))))
        assert len(want) == len(got) > 0
        for i, (r, o) in enumerate(zip(want, got)):
            assert (r is None) == (o is None), i
            if r is not None:
                _close(r, o, f"T={T} gradient {i}")


@pytest.mark.parametrize("name", ["linear_recurrence", "softmax_pool"])
def test_gradients_through_streams_and_steps(name):
    """A stream continued from a state (the init state's adjoint crosses the call) and a
    differentiable step (one token continuing a state) equal torch's gradients."""
    ref, tri = _pair(name)
    tri.triton_block_t = 4
    inputs = _inputs(ref, 2, 9, seed=3, grad=True)

    def run(layer):
        _, state = layer(**{k: v[:, :5] for k, v in inputs.items()}, return_state=True)
        rest, state = layer(**{k: v[:, 5:8] for k, v in inputs.items()}, state=state, return_state=True)
        last, state = layer.step(state, **{k: v[:, 8] for k, v in inputs.items()})
        # the final state's adjoint too (a mean: the torch backend may hold a broadcast field)
        final = sum((i + 1.5) * f.mean() for i, f in enumerate(state.prefix)
                    if f is not None and f.is_floating_point())
        return _loss(_tuple(rest)) + _loss(_tuple(last)) + final

    for r, o in zip(_grads(ref, inputs, run(ref)), _grads(tri, inputs, run(tri))):
        _close(r, o, "stream gradient")


@pytest.mark.parametrize("name", ["linear_recurrence", "selective_ssm", "welford", "softmax_pool", "segmented_sum"])
def test_half_inputs_stay_half_through_the_kernels(name, monkeypatch):
    """fp16 inputs reach the generated kernels as given (their loads widen to fp32) and the
    kernels write the outputs in fp16: no float32 copy of an input is made, and the outputs and
    gradients are exactly the float32 computation from the same values, rounded once to fp16."""
    from layer_harness import Casts
    from psmc.runtime import triton_support
    ref, tri = _pair(name)
    tri.use_fast_path = False  # the generated kernels, not the first-order scan kernel
    launched = []  # per launch: the dtypes of the inputs it reads and of the outputs it writes
    real = triton_support._launch

    def spy(k, per_lane, call, kernel, g, inputs, *args, **kwargs):
        outputs, finals, bounds = real(k, per_lane, call, kernel, g, inputs, *args, **kwargs)
        launched.append(([x.dtype for x in inputs], [o.dtype for o, _ in outputs]))
        return outputs, finals, bounds
    monkeypatch.setattr(triton_support, "_launch", spy)
    tri.triton_block_t = 8
    wide = _inputs(ref, 2, 19, seed=3)
    low = {n: (x.half().requires_grad_() if x.is_floating_point() else x) for n, x in wide.items()}
    wide = {n: (x.detach().float().requires_grad_() if x.is_floating_point() else x) for n, x in low.items()}
    with Casts({n: x for n, x in low.items() if x.is_floating_point()}) as casts:
        got = _tuple(tri(**low))
        floats = [torch.float16 for o in tri.spec.outputs if o.dtype == "f32"]
        assert launched[-1] == ([x.dtype for x in low.values()], floats)
        want = _tuple(tri(**wide))
        w = [torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape).half().float() for o in want]
        torch.autograd.backward([(o.float() * wi).sum() for o, wi in zip(got, w)])
    assert casts.copies == [], casts.copies
    torch.autograd.backward([(o * wi).sum() for o, wi in zip(want, w)])
    for o, r in zip(got, want):
        assert o.dtype == torch.float16 and torch.equal(o, r.to(torch.float16))
    for n, x in low.items():
        if x.is_floating_point():
            assert x.grad.dtype == torch.float16 and torch.equal(x.grad, wide[n].grad.to(torch.float16)), n
