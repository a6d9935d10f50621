"""One rank of the context-parallel tests (spawned by test_context_parallel.py), kept light:
a spawned process imports only torch, psmc.runtime and the compiled layer files, so it starts in
a few seconds. The parent builds every job (weights, the whole sequence, the initial state, the
loss weights) and compares what each rank saves against its single-process reference."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os

import torch
import torch.distributed as dist

from psmc.runtime import context_parallel
from psmc.runtime.state import StreamState

_MODULES: dict = {}


def layer_of(module_file: str, op: str, dims: dict):
    if module_file not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"cp_layer_{len(_MODULES)}", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[module_file] = module
    return _MODULES[module_file].__psmc_layers__[op](**dims)


def init(rank: int, world: int, port: int, timeout_s: float = 120.0):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def state_tensors(value) -> list:
    """Every tensor of a state in field order, a tensor held twice counted twice (a fold may or
    may not be the same object as its root, depending on how the state was built)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, StreamState):
        return [t for f in dataclasses.fields(value) for t in state_tensors(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in state_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in state_tensors(value[k])]
    return []


def loss_of(outputs: tuple, weights: tuple, state, state_share: float):
    """sum(outputs * weights) + state_share * (a weighted sum of the state's tensors)."""
    total = torch.zeros((), dtype=torch.float64)
    for o, w in zip(outputs, weights):
        if o.is_floating_point():
            total = total + (o * w).sum()
    for i, t in enumerate(state_tensors(state) if state is not None else []):
        if t.is_floating_point():
            total = total + state_share * 0.1 * (i + 1) * t.sum()
    return total


def split(inputs: dict, start: int, stop: int) -> dict:
    """Time slice; an input with T = 1 (broadcast over time) is the same on every rank."""
    return {n: x if x.shape[1] == 1 else x[:, start:stop] for n, x in inputs.items()}


def run_jobs(rank: int, world: int, port: int, jobs: list, out_dir: str):
    init(rank, world, port)
    context_parallel.TIMEOUT_S = 60.0
    results = []
    for job in jobs:
        layer = layer_of(job["module"], job["op"], job["dims"]).double()
        layer.load_state_dict(job["params"])
        start = sum(job["lengths"][:rank])
        stop = start + job["lengths"][rank]
        mine = {n: x.clone().requires_grad_(x.is_floating_point())
                for n, x in split(job["inputs"], start, stop).items()}
        context_parallel.SCHEMES.clear()
        varlen = {} if job.get("cu") is None else {"cu_seqlens": torch.tensor(job["cu"])}
        result = layer(**mine, state=job["state"], return_state=job["return_state"], cp_group=dist.group.WORLD,
                       **varlen)
        got, state = result if job["return_state"] else (result, None)
        got = got if isinstance(got, tuple) else (got,)
        # every rank's loss reaches the exchanges; the final state is on every rank: 1/world each
        loss = loss_of(got, tuple(w[:, start:stop] for w in job["weights"]), state, 1.0 / world)
        if loss.requires_grad:
            loss.backward()
        results.append({
            "outputs": [o.detach() for o in got],
            "state": None if state is None else state.detach(),
            "input_grads": {n: x.grad for n, x in mine.items()},
            "param_grads": {n: p.grad for n, p in layer.named_parameters()},
            "schemes": dict(context_parallel.SCHEMES),
        })
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_errors(rank: int, world: int, port: int, modules: dict, out_dir: str):
    """Mismatched calls: every rank records the error it got (the parent compares them)."""
    init(rank, world, port, timeout_s=30.0)
    context_parallel.TIMEOUT_S = 3.0
    group = dist.group.WORLD
    messages = {}
    cumsum = layer_of(modules["cumsum"], "cumsum", {})
    ema = layer_of(modules["ema"], "ema", {})

    def attempt(key, fn):
        try:
            fn()
            messages[key] = None
        except Exception as error:  # noqa: BLE001 - the parent compares the type and the text
            messages[key] = f"{type(error).__name__}: {error}"

    x = torch.randn(2, 3, 2)
    last = rank == world - 1
    attempt("batch", lambda: cumsum(torch.randn(2 + rank, 3, 2), cp_group=group))
    attempt("empty", lambda: cumsum(torch.randn(2, 0 if last else 3, 2), cp_group=group))
    K = 2 if rank == 0 else 3
    gla = layer_of(modules["gla"], "gla", {})
    attempt("dims", lambda: gla(k=torch.randn(2, 3, K), v=torch.randn(2, 3, 2), gk=-torch.rand(2, 3, K),
                                q=torch.randn(2, 3, K), cp_group=group))
    attempt("ops", lambda: (cumsum if rank == 0 else ema)(x, cp_group=group))
    attempt("local", lambda: cumsum(torch.randn(2, 3, 2) if not last else torch.randn(2, 3, 2).int(),
                                    cp_group=group))
    attempt("lanes", lambda: cumsum(torch.randn(2, 3, 2 + rank), cp_group=group))
    packed = torch.randn(1, 3, 2)
    attempt("cu_differ", lambda: cumsum(packed, cu_seqlens=torch.tensor([0, 2 + (rank == 1), 9]), cp_group=group))
    attempt("cu_total", lambda: cumsum(packed, cu_seqlens=torch.tensor([0, 4, 8]), cp_group=group))
    attempt("ok", lambda: cumsum(x, cp_group=group))
    # half-precision inputs give outputs in that dtype, as in one process (computed in float32)
    messages["bf16"] = str(cumsum(x.to(torch.bfloat16), cp_group=group).dtype)
    messages["bf16 varlen"] = str(cumsum(packed.to(torch.bfloat16), cu_seqlens=torch.tensor([0, 4, 9]),
                                         cp_group=group).dtype)
    if rank == 0:  # last: the other ranks never call, rank 0 must time out with a clear message
        attempt("missing", lambda: cumsum(x, cp_group=group))
    torch.save(messages, f"{out_dir}/rank{rank}.pt")
    os._exit(0)  # the timed-out exchange left the group unusable: do not wait on its teardown
