"""One rank of the DDP test (test_compile_and_ddp.py), kept in its own light module: spawned
processes import only this, torch and the compiled layer file (which needs psmc.runtime
alone), not the compiler or the test modules, so a rank starts in a couple of seconds."""
from __future__ import annotations

import datetime
import importlib.util

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def training_step(model, h) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(h=h).square().mean().backward()
    optimizer.step()


def run_rank(rank: int, world: int, port: int, module_file: str, layer_state: dict, batch, out_dir: str):
    """Build the layer from the compiled file with the given weights, train on this rank's
    rows of `batch`, save the gradients and the updated params."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        spec = importlib.util.spec_from_file_location("ddp_layer_module", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        layer = module.tree_rnn(D=layer_state["p_W1"].shape[0]).double()
        layer.load_state_dict(layer_state)
        rows = batch.shape[0] // world
        training_step(DistributedDataParallel(layer), batch[rank * rows:(rank + 1) * rows])
        torch.save({"grads": {n: p.grad for n, p in layer.named_parameters()},
                    "params": {n: p.detach() for n, p in layer.named_parameters()}},
                   f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # tear down together: a rank leaving while its peer still talks can abort gloo
    finally:
        dist.destroy_process_group()
