"""torch.autograd.gradcheck of every example's parallel pass in float64, through its float
inputs and its params, on tiny shapes (T = 5: not a power of two, and a partial chunk for the
chunk op; one lane axis with one input broadcast on it)."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from layer_cases import CASES
from layer_harness import as_tuple, layer_class, make_inputs

BATCH, TIME, LANES = 1, 5, (2,)


def tiny_layer_and_inputs(name: str):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[min(1, len(case.dim_sets) - 1)]
    torch.manual_seed(0)
    layer = cls(**dims).double()
    n = len(cls.spec.inputs)
    broadcast = tuple((i == n - 1,) for i in range(n))  # the last input broadcasts over the lane
    inputs = make_inputs(cls, dims, BATCH, TIME, LANES, broadcast, seed=11, kinds=case.kinds)
    return layer, inputs


@pytest.mark.parametrize("name", sorted(n for n in CASES if n != "running_argmax"))
def test_gradcheck_through_inputs_and_params(name):
    layer, inputs = tiny_layer_and_inputs(name)
    float_names = [n for n, x in inputs.items() if x.is_floating_point()]
    fixed = {n: x for n, x in inputs.items() if n not in float_names}
    params = dict(layer.named_parameters())
    assert len(params) == len(layer.spec.params)

    def run(*tensors):
        xs = dict(zip(float_names, tensors))
        ps = dict(zip(params, tensors[len(float_names):]))
        return as_tuple(functional_call(layer, ps, args=(), kwargs={**fixed, **xs}))

    leaves = tuple(inputs[n].clone().requires_grad_() for n in float_names) + \
        tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_running_argmax_output_is_an_index_without_gradient():
    """Its output is an integer position: nothing to differentiate, and autograd must not
    pretend otherwise."""
    layer, inputs = tiny_layer_and_inputs("running_argmax")
    x = inputs["x"].clone().requires_grad_()
    out = layer(x=x)
    assert out.dtype == torch.int64 and not out.requires_grad
    assert torch.equal(out[0, :, 0], torch.cummax(x.detach()[0, :, 0], dim=0).indices)
