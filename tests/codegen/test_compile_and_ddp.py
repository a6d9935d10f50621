"""Generated layers are plain nn.Modules: torch.compile runs one (forward and backward equal
eager), and a 2-process DDP training step gives the single-process gradients."""
from __future__ import annotations

import torch

from layer_cases import CASES
from layer_ddp_worker import run_rank, training_step
from layer_harness import layer_class, make_inputs
from psmc.loader import compiled_path
from spawning import spawn_ranks

WORLD = 2


def test_torch_compile_matches_eager():
    """aot_eager: Dynamo's capture and AOTAutograd's functionalised backward, without paying
    for Inductor's C++ builds on a small shared machine (T = 2 keeps the capture short)."""
    dims = CASES["gla"].dim_sets[-1]
    layer = layer_class("gla")(**dims)
    broadcast = ((False,),) * 4
    inputs = make_inputs(type(layer), dims, 2, 2, (2,), broadcast, seed=0, kinds=CASES["gla"].kinds)
    inputs = {n: x.float() for n, x in inputs.items()}
    k = inputs.pop("k")
    k_eager, k_compiled = k.clone().requires_grad_(), k.clone().requires_grad_()
    want = layer(k=k_eager, **inputs)
    want.square().sum().backward()
    got = torch.compile(layer, backend="aot_eager")(k=k_compiled, **inputs)
    got.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(k_compiled.grad, k_eager.grad)




def test_ddp_training_step_matches_single_process(tmp_path):
    dims = {"D": 3}
    torch.manual_seed(0)
    layer = layer_class("tree_rnn")(**dims).double()
    with torch.no_grad():
        layer.p_b.uniform_(-0.5, 0.5)  # its init is zeros: make its gradient check meaningful
    h = make_inputs(type(layer), dims, 4, 9, (1,), ((False,),), seed=5)["h"]
    start = {n: t.clone() for n, t in layer.state_dict().items()}
    training_step(layer, h)  # the mean over the whole batch = the mean of the ranks' means
    assert all(bool(p.grad.abs().sum() > 0) for p in layer.parameters())

    module_file = str(compiled_path(CASES["tree_rnn"].path))
    out_dir = spawn_ranks(run_rank, WORLD, lambda port, out: (WORLD, port, module_file, start, h, out), tmp_path)
    for rank in range(WORLD):
        result = torch.load(out_dir / f"rank{rank}.pt")
        for name, p in layer.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"rank {rank}, grad of {name}: {m}")
            torch.testing.assert_close(result["params"][name], p.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"rank {rank}, {name} after the step: {m}")
