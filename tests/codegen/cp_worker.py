"""One rank of the context-parallel tests (spawned by test_context_parallel.py).

Every rank builds the same layer (same seed), the same whole sequence and the same
single-process reference (forward, final state and gradients), then runs its own slice with
`cp_group=` and compares. A failed comparison is recorded, not raised, so the ranks keep making
the same collectives; the parent reads every rank's list.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from layer_cases import CASES
from layer_harness import RTOL, ATOL, as_tuple, layer_class, make_inputs
from psmc.runtime import context_parallel
from psmc.runtime.state import StreamState


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    dims: dict
    lengths: tuple  # T per rank
    prefix: int = 0  # tokens run single-process first: their state is the cp call's state=
    seed: int = 0
    exact_bits: bool = False  # tree ops: the fixed tree's prefixes are bit-for-bit the same


def init(rank: int, world: int, port: int, timeout_s: float = 120.0):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def run_tasks(rank: int, world: int, port: int, tasks: list, out_dir: str):
    init(rank, world, port)
    context_parallel.TIMEOUT_S = 60.0
    failures = []
    for task in tasks:
        try:
            check(task, rank, world)
        except AssertionError as error:
            failures.append(f"{task}: {error}")
    torch.save(failures, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _sequence(task: Task):
    case = CASES[task.name]
    cls = layer_class(task.name)
    torch.manual_seed(task.seed)
    layer = cls(**task.dims).double()
    with torch.no_grad():
        for p in layer.parameters():  # zero-initialised params would hide their gradients
            p.add_(0.2 * torch.randn_like(p))
    total = task.prefix + sum(task.lengths)
    inputs = make_inputs(cls, task.dims, 2, total, (2,), ((False,),) * len(cls.spec.inputs), seed=task.seed,
                         kinds=case.kinds)
    for name in case.sequence_broadcast:  # [1, 1, *lanes, ...]: the same tensor on every rank
        inputs[name] = inputs[name][:1, :1].contiguous()
    return layer, inputs


def _split(inputs: dict, start: int, stop: int) -> dict:
    return {n: x if x.shape[1] == 1 else x[:, start:stop] for n, x in inputs.items()}


def _leaf(x):
    return x.clone().requires_grad_(x.is_floating_point())


def _loss(outputs: tuple, weights: tuple):
    return sum((o * w).sum() for o, w in zip(outputs, weights) if o.is_floating_point())


def _state_tensors(value) -> list:
    """Every tensor of a state in field order, a tensor held twice counted twice (a fold may or
    may not be the same object as its root, depending on how the state was built)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, StreamState):
        return [t for f in dataclasses.fields(value) for t in _state_tensors(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _state_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _state_tensors(value[k])]
    return []


def _state_loss(state) -> torch.Tensor:
    return sum(0.1 * (i + 1) * t.sum() for i, t in enumerate(_state_tensors(state)) if t.is_floating_point())


def check(task: Task, rank: int, world: int):
    layer, inputs = _sequence(task)
    T0 = task.prefix
    state = None
    if T0:
        with torch.no_grad():
            _, state = layer(**_split(inputs, 0, T0), return_state=True)
    rest = _split(inputs, T0, T0 + sum(task.lengths))
    # the single-process reference over the whole (rest of the) sequence
    ref_inputs = {n: _leaf(x) for n, x in rest.items()}
    want, want_state = layer(**ref_inputs, state=state, return_state=True)
    want = as_tuple(want)
    gen = torch.Generator().manual_seed(task.seed + 1)
    weights = tuple(torch.rand(o.shape, generator=gen, dtype=torch.float64) - 0.5 for o in want)
    ref_loss = _loss(want, weights) + _state_loss(want_state)
    if isinstance(ref_loss, torch.Tensor) and ref_loss.requires_grad:
        ref_loss.backward()
    want_input_grads = {n: x.grad if x.grad is not None else torch.zeros_like(x) for n, x in ref_inputs.items()}
    want_param_grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                        for n, p in layer.named_parameters()}
    layer.zero_grad()

    start = sum(task.lengths[:rank])
    stop = start + task.lengths[rank]
    mine = {n: _leaf(x) for n, x in _split(rest, start, stop).items()}
    got, got_state = layer(**mine, state=state, return_state=True, cp_group=dist.group.WORLD)
    got = as_tuple(got)
    # every rank's loss reaches the exchanges (the final state is on every rank: 1/world each)
    loss = _loss(got, tuple(w[:, start:stop] for w in weights)) + _state_loss(got_state) / world
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()

    label = f"{task.name} {task.dims} lengths={task.lengths} prefix={T0}, rank {rank}"
    for i, (g, w) in enumerate(zip(got, want)):
        _agree(g, w[:, start:stop], f"{label}: output {i}", task.exact_bits)
    _agree_state(got_state, want_state, f"{label}: final state", task.exact_bits)
    for n, x in mine.items():
        if not x.is_floating_point():
            continue
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        want_grad = want_input_grads[n]
        if x.shape[1] == 1 and rest[n].shape[1] == 1:  # one tensor on every rank: the grads add up
            dist.all_reduce(grad)
        else:
            want_grad = want_grad[:, start:stop]
        _agree(grad, want_grad, f"{label}: gradient of input {n}", False)
    for n, p in layer.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        _agree(grad, want_param_grads[n], f"{label}: gradient of param {n}", False)
    layer.zero_grad()


def _agree(got, want, what: str, exact: bool):
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
    if exact or not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: not bit-for-bit equal, max diff {(got - want).abs().max()}"
    else:
        try:
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        except AssertionError as error:
            raise AssertionError(f"{what}: {error}") from None


def _agree_state(got, want, what: str, exact: bool):
    if isinstance(want, StreamState):
        assert type(got) is type(want), f"{what}: a {type(got).__name__}, expected {type(want).__name__}"
        for field in dataclasses.fields(want):
            _agree_state(getattr(got, field.name), getattr(want, field.name), f"{what}.{field.name}", exact)
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), f"{what}: {got!r} vs {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _agree_state(g, w, f"{what}[{i}]", exact)
    elif isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys {sorted(got)} vs {sorted(want)}"
        for k in want:
            _agree_state(got[k], want[k], f"{what}[{k}]", exact)
    elif want is None:
        assert got is None, f"{what}: {got!r}, expected None"
    else:
        _agree(got.detach().expand(want.shape) if got.dim() == want.dim() else got.detach(), want.detach(), what,
               exact)


def run_errors(rank: int, world: int, port: int, out_dir: str):
    """Mismatched calls: every rank records the message it got (the parent compares them)."""
    init(rank, world, port, timeout_s=30.0)
    context_parallel.TIMEOUT_S = 3.0
    group = dist.group.WORLD
    messages = {}
    cumsum = layer_class("cumsum")()
    gla_cls = layer_class("gla")

    def attempt(key, fn):
        try:
            fn()
            messages[key] = None
        except Exception as error:  # noqa: BLE001 - the test compares the type and text
            messages[key] = f"{type(error).__name__}: {error}"

    x = torch.randn(2, 3, 2)
    attempt("batch", lambda: cumsum(torch.randn(2 + rank, 3, 2), cp_group=group))
    attempt("empty", lambda: cumsum(torch.randn(2, 0 if rank == world - 1 else 3, 2), cp_group=group))
    K = 2 if rank == 0 else 3
    attempt("dims", lambda: gla_cls(K=K, V=2)(k=torch.randn(2, 3, K), v=torch.randn(2, 3, 2),
                                              gk=-torch.rand(2, 3, K), q=torch.randn(2, 3, K), cp_group=group))
    ema = layer_class("ema")()
    attempt("ops", lambda: (cumsum if rank == 0 else ema)(x, cp_group=group))
    attempt("local", lambda: cumsum(torch.randn(2, 3, 2) if rank == 0 else torch.randn(2, 3, 2).int(),
                                    cp_group=group))
    attempt("ok", lambda: cumsum(x, cp_group=group))
    if rank == 0:  # last: rank 1.. never call, rank 0 must time out with a clear message
        attempt("missing", lambda: cumsum(x, cp_group=group))
    torch.save(messages, f"{out_dir}/rank{rank}.pt")
    os._exit(0)  # the timed-out exchange left the group unusable: do not wait on its teardown
