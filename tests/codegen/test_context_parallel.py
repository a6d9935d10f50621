"""Context parallelism (`cp_group=`): 2 and 4 gloo processes on CPU, every example op, uneven
slices (length 1 included; T not a multiple of any block or chunk size), with and without an
initial state, the final state on every rank, and gradients (inputs, params, through the final
state), all against a single-process run over the whole sequence; tree ops bit for bit. Then
mismatched calls fail with the same clear message on every rank, and a rank that never calls
makes the others time out with a message, not hang.

Few process groups, many ops per group: each spawn pays for process start-up, so the parent
computes the references and the ranks only run their slices (cp_worker.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import cp_worker
from layer_cases import CASES
from layer_harness import ATOL, RTOL, as_tuple, layer_class, make_inputs
from psmc.loader import compiled_path
from psmc.runtime.state import StreamState
from spawning import spawn_ranks


def _job(name: str, lengths: tuple, prefix, seed: int, return_state: bool, cu: list | None = None):
    """A cp job and its single-process reference (outputs, final state, gradients). `prefix`:
    the number of tokens run first, whose state is the initial state; with `cu` (the global
    cu_seqlens of the packed sequence, batch 1) it is the prefix's own cu_seqlens (or None):
    the initial state then has one row per sequence."""
    case = CASES[name]
    dims = case.dim_sets[-1]
    cls = layer_class(name)
    torch.manual_seed(seed)
    layer = cls(**dims).double()
    with torch.no_grad():
        for p in layer.parameters():  # zero-initialised params would hide their gradients
            p.add_(0.2 * torch.randn_like(p))
    varlen = {} if cu is None else {"cu_seqlens": torch.tensor(cu)}
    prefix_varlen = {}
    if cu is not None and prefix:
        prefix_varlen = {"cu_seqlens": torch.tensor(prefix)}
        prefix = prefix[-1]
    prefix = prefix or 0
    total = prefix + sum(lengths)
    batch = 1 if cu is not None else 2
    inputs = make_inputs(cls, dims, batch, total, (2,), ((False,),) * len(cls.spec.inputs), seed=seed,
                         kinds=case.kinds)
    for n in case.sequence_broadcast:  # [1, 1, *lanes, ...]: the same tensor on every rank
        inputs[n] = inputs[n][:1, :1].contiguous()
    state = None
    if prefix:
        with torch.no_grad():
            _, state = layer(**cp_worker.split(inputs, 0, prefix), return_state=True, **prefix_varlen)
    rest = cp_worker.split(inputs, prefix, total)
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in rest.items()}
    want, want_state = layer(**leaves, state=state, return_state=True, **varlen)
    want = as_tuple(want)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = tuple(torch.rand(o.shape, generator=gen, dtype=torch.float64) - 0.5 for o in want)
    if not return_state:
        want_state = None
    loss = cp_worker.loss_of(want, weights, want_state, 1.0)
    if loss.requires_grad:
        loss.backward()
    job = {"module": str(compiled_path(case.path)), "op": name, "dims": dims, "lengths": lengths,
           "params": {n: t.detach().clone() for n, t in layer.state_dict().items()},
           "inputs": rest, "state": state, "weights": weights, "return_state": return_state, "cu": cu}
    reference = {"outputs": [o.detach() for o in want], "state": None if want_state is None else want_state.detach(),
                 "input_grads": {n: x.grad for n, x in leaves.items()},
                 "param_grads": {n: p.grad for n, p in layer.named_parameters()}}
    return job, reference


def _agree(got, want, what: str, exact: bool, failures: list):
    if want is None:
        want = torch.zeros_like(got) if got is not None else None
    if got is None:
        got = torch.zeros_like(want) if want is not None else None
    if want is None:
        return
    if got.shape != want.shape or got.dtype != want.dtype:
        failures.append(f"{what}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}")
    elif exact or not want.is_floating_point():
        if not torch.equal(got, want):
            failures.append(f"{what}: not bit-for-bit equal, max diff {(got - want).abs().max()}")
    elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        failures.append(f"{what}: max diff {(got - want).abs().max():.3g}")


def _agree_state(got, want, what: str, exact: bool, failures: list):
    if isinstance(want, StreamState):
        if type(got) is not type(want):
            failures.append(f"{what}: a {type(got).__name__}, expected {type(want).__name__}")
            return
        for f in dataclasses.fields(want):
            _agree_state(getattr(got, f.name), getattr(want, f.name), f"{what}.{f.name}", exact, failures)
    elif isinstance(want, (tuple, dict)):
        keys = range(len(want)) if isinstance(want, tuple) else sorted(want)
        if len(got) != len(want):
            failures.append(f"{what}: {len(got)} entries, expected {len(want)}")
            return
        for k in keys:
            _agree_state(got[k], want[k], f"{what}[{k}]", exact, failures)
    elif want is None or got is None:
        if not (want is None and got is None):
            failures.append(f"{what}: {got!r}, expected {want!r}")
    elif not isinstance(want, torch.Tensor):  # tags (op, dims, lanes), counts: plain values
        if got != want:
            failures.append(f"{what}: {got!r}, expected {want!r}")
    else:
        _agree(got.expand(want.shape) if got.dim() == want.dim() else got, want, what, exact, failures)


def _compare(job: dict, reference: dict, results: list, exact: bool) -> list:
    failures = []
    world = len(results)
    label = f"{job['op']} lengths={job['lengths']} state={'yes' if job['state'] is not None else 'no'}"
    if job["cu"] is not None:
        label += f" cu_seqlens={job['cu']}"
    for rank, got in enumerate(results):
        start = sum(job["lengths"][:rank])
        stop = start + job["lengths"][rank]
        where = f"{label}, rank {rank}"
        for i, (g, w) in enumerate(zip(got["outputs"], reference["outputs"])):
            _agree(g, w[:, start:stop], f"{where}: output {i}", exact, failures)
        _agree_state(got["state"], reference["state"], f"{where}: final state", exact, failures)
        for n, g in got["input_grads"].items():
            w = reference["input_grads"][n]
            if job["inputs"][n].shape[1] == 1:  # one tensor on every rank: the ranks' grads add up
                g = sum(r["input_grads"][n] for r in results)
            elif w is not None:
                w = w[:, start:stop]
            _agree(g, w, f"{where}: gradient of input {n}", False, failures)
    case = CASES.get(job["op"])  # the example ops; other callers' ops are compared, not scheme-checked
    if case is not None and case.tree is False and hasattr(layer_class(job["op"]), "_fast_carry"):
        # first-order and chunkwise ops: one fast pass per slice, the carry added by its algebra
        for rank, got in enumerate(results):
            if set(got["schemes"]) - {"cheap carry"}:
                failures.append(f"{label}, rank {rank}: the carry went in by {got['schemes']}, expected only the "
                                "cheap carry")
        if not any(got["schemes"].get("cheap carry") for got in results):
            failures.append(f"{label}: no rank took the cheap carry")
    for n, w in reference["param_grads"].items():
        grads = [r["param_grads"][n] for r in results if r["param_grads"][n] is not None]
        g = sum(grads) if grads else None
        _agree(g, w, f"{label}: gradient of param {n} (summed over {world} ranks)", False, failures)
    return failures


def _run_and_compare(world: int, jobs: list, references: list, exact: list, tmp_path):
    """Run `jobs` on `world` spawned gloo ranks and compare each rank's results with the
    single-process references (bit for bit where `exact`)."""
    out = spawn_ranks(cp_worker.run_jobs, world, lambda port, out: (world, port, jobs, out), tmp_path)
    per_rank = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    failures = []
    for k, job in enumerate(jobs):
        failures += _compare(job, references[k], [per_rank[r][k] for r in range(world)], exact[k])
    assert not failures, "\n".join(failures)


# (slice lengths, tokens run before (their state is the initial state), return_state)
LENGTHS = {2: [((4, 7), 0, False), ((1, 6), 5, True)], 4: [((3, 1, 5, 2), 0, True), ((2, 6, 1, 4), 5, False)]}


@pytest.mark.parametrize("world", [2, 4])
def test_every_example_matches_one_process(world, tmp_path):
    jobs, references, exact = [], [], []
    for i, name in enumerate(sorted(CASES)):
        for j, (lengths, prefix, return_state) in enumerate(LENGTHS[world]):
            job, reference = _job(name, lengths, prefix, seed=100 * j + i, return_state=return_state)
            jobs.append(job)
            references.append(reference)
            exact.append(CASES[name].tree)  # the fixed tree's prefixes: bit for bit
    _run_and_compare(world, jobs, references, exact, tmp_path)


def test_mismatched_calls_fail_on_every_rank(tmp_path):
    world = 3
    modules = {n: str(compiled_path(CASES[n].path)) for n in ("cumsum", "ema", "gla")}
    out = spawn_ranks(cp_worker.run_errors, world, lambda port, out: (world, port, modules, out), tmp_path)
    got = [torch.load(out / f"rank{rank}.pt") for rank in range(world)]
    E = "ContextParallelError: "
    expected = {
        "batch": "cumsum (context parallel, rank {r} of 3): the ranks disagree on the batch size B (rank 0: 2, "
                 "rank 1: 3, rank 2: 4); every rank passes the same batch, split along time only",
        "empty": "cumsum (context parallel, rank {r} of 3): rank 2 passed an empty slice (T = 0): every rank of the "
                 "group needs at least one token of the sequence (use fewer ranks for short sequences)",
        "dims": "gla (context parallel, rank {r} of 3): the ranks disagree on the dims (K, V) (rank 0: [2, 2], "
                "rank 1: [3, 2], rank 2: [3, 2]); every rank builds the layer with the same dims",
        "local": "cumsum (context parallel, rank {r} of 3): rank 2 rejected its inputs; rank 2 says: cumsum: input "
                 "'x' is declared f32 but got a torch.int32 tensor",
        "lanes": "cumsum (context parallel, rank {r} of 3): the ranks disagree on the lane axes [B, T, *lanes] "
                 "(rank 0: [2], rank 1: [3], rank 2: [4]); every rank passes the same lane shape",
        "cu_differ": "cumsum (context parallel, rank {r} of 3): the ranks pass different cu_seqlens (ranks 0, 2 pass "
                     "one; rank 1 passes another); pass the same global cu_seqlens (offsets into the whole packed "
                     "sequence) on every rank",
        "cu_total": "cumsum (context parallel, rank {r} of 3): cu_seqlens ends at 8 but the ranks' slices hold 9 "
                    "tokens in all (T_r = [3, 3, 3]); cu_seqlens holds the offsets of the whole packed sequence, the "
                    "same tensor on every rank",
    }
    for rank in range(world):
        for key, text in expected.items():
            assert got[rank][key] == E + text.format(r=rank), (rank, key, got[rank][key])
        assert got[rank]["ok"] is None
        assert got[rank]["bf16"] == got[rank]["bf16 varlen"] == "torch.bfloat16", got[rank]
    # different ops: each rank names its own op first, and the message lists every rank's op
    for rank in range(world):
        assert got[rank]["ops"].startswith(E + f"{'cumsum' if rank == 0 else 'ema'} (context parallel, rank {rank}")
        assert "(rank 0: 'cumsum', rank 1: 'ema', rank 2: 'ema'): every rank of cp_group must call the same layer" \
            in got[rank]["ops"]
    assert got[0]["missing"].startswith(E + "context parallel exchange 'metadata' did not complete within 3 s")
    assert "every rank of cp_group must call the layer" in got[0]["missing"]


# cu_seqlens with cp_group: (slice lengths, global cu_seqlens, the prefix's cu_seqlens (the initial
# state's rows) or None, return_state). Sequences spanning 0, 1 and several rank boundaries, one
# token long, ending exactly at a boundary; a slice inside one sequence; ragged initial states.
VARLEN = {2: [((5, 6), [0, 2, 3, 9, 11], None, True), ((4, 3), [0, 7], [0, 5], True)],
          4: [((3, 1, 5, 2), [0, 1, 8, 11], None, True), ((2, 6, 1, 4), [0, 2, 9, 13], [0, 3, 4, 9], False)]}


# 4 ranks (4 processes on the CI's 2 cores): one or two ops per plan and carry scheme: generic
# exact scans (cumsum; rwkv6: exclusive readout, a sequence-broadcast input), the cheap carries
# (gla: chunkwise per-key decay; retention: scalar decay, broadcast input; selective_ssm: first
# order), the delta rule (fast path twice), trees (ema, tree_rnn) and the chunk op
# (transformer_psm). 2 ranks run every example op.
VARLEN_OPS = {2: sorted(CASES), 4: ["cumsum", "delta_rule", "ema", "gla", "retention", "rwkv6", "selective_ssm",
                                    "transformer_psm", "tree_rnn"]}


@pytest.mark.parametrize("world", [2, 4])
def test_varlen_matches_one_process(world, tmp_path):
    """cp_group + cu_seqlens (fla's cp varlen convention: each rank passes its slice [1, T_r, ...]
    and the global cu_seqlens): every sequence's outputs, final state (batch N, on every rank)
    and gradients equal the single-process varlen call; tree ops bit for bit."""
    jobs, references, exact = [], [], []
    for i, name in enumerate(VARLEN_OPS[world]):
        for j, (lengths, cu, prefix_cu, return_state) in enumerate(VARLEN[world]):
            job, reference = _job(name, lengths, prefix_cu, seed=100 * j + i + 7, return_state=return_state, cu=cu)
            jobs.append(job)
            references.append(reference)
            exact.append(CASES[name].tree)
    _run_and_compare(world, jobs, references, exact, tmp_path)


@pytest.mark.parametrize("name", sorted(n for n in CASES if hasattr(layer_class(n), "_fast_carry")))
def test_cheap_carry_matches_one_pass(name):
    """The cheap carry in one process: the fast path run from zero over tokens [5, 12) with
    carry_terms returns the slice's full total (its decay product too, though dead in a stream),
    and `_fast_carry` adds the state after tokens [0, 5) to its outputs by the op's algebra; both
    equal the generic scan and one pass over all 12 tokens."""
    from psmc.runtime.element import at
    from psmc.runtime.layer import _positions
    from psmc.runtime.scan import exact_scan
    from psmc.runtime.state import ScanState
    case = CASES[name]
    dims = case.dim_sets[-1]
    cls = layer_class(name)
    torch.manual_seed(3)
    layer = cls(**dims).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    inputs = make_inputs(cls, dims, 2, 12, (2,), ((False,),) * len(cls.spec.inputs), seed=5, kinds=case.kinds)
    for n in case.sequence_broadcast:
        inputs[n] = inputs[n][:1, :1].contiguous()
    want = as_tuple(layer(**inputs))
    head, rest = cp_worker.split(inputs, 0, 5), cp_worker.split(inputs, 5, 12)

    def generic_total(part: dict, start: int):
        call = layer._prepare(part, step=False)
        index = _positions(start, call.lead[1], call.lead, call.ctx.dev)
        return at(exact_scan(layer._lift_batch(call, call.lead, call.inputs, index), layer._combine_fn(call)),
                  call.lead[1] - 1)

    call = dataclasses.replace(layer._prepare(rest, step=False), carry_terms={})
    index = _positions(5, 7, call.lead, call.ctx.dev)
    outputs, total = layer._fast_forward(call, index, ScanState(prefix=None, count=5))
    for i, (got, expected) in enumerate(zip(total.prefix, generic_total(rest, 5))):
        assert got is not None, f"{name}: field {i} of the total is missing though carry_terms asked for it"
        torch.testing.assert_close(got, expected.expand_as(got), rtol=RTOL, atol=ATOL)
    carried = layer._fast_carry(call, outputs, generic_total(head, 0))
    for got, expected in zip(carried, want):
        torch.testing.assert_close(got, expected[:, 5:], rtol=RTOL, atol=ATOL)
    plain = layer._prepare(rest, step=False)
    assert plain.carry_terms is None  # the normal path is asked for nothing extra


GENERATED_SEEDS = range(20)  # programs of the differential generator (tests/fuzz/generator.py)


def _program_job(program, path, lengths: tuple, seed: int):
    """`_job` for a generated program: its module compiled from `path`, no initial state, with
    the final state returned, float64, params perturbed so their gradients show."""
    import psmc
    module = psmc.load(path)
    cls = getattr(module, program.name)
    torch.manual_seed(seed)
    layer = cls(**program.dims).double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.is_floating_point():
                p.add_(0.2 * torch.randn_like(p))
    inputs = make_inputs(cls, program.dims, 2, sum(lengths), (2,), ((False,),) * len(cls.spec.inputs), seed=seed,
                         kinds=program.kinds)
    inputs = {n: x.double() if x.is_floating_point() else x for n, x in inputs.items()}
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in inputs.items()}
    want, want_state = layer(**leaves, return_state=True)
    want = as_tuple(want)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = tuple(torch.rand(o.shape, generator=gen, dtype=torch.float64) - 0.5 for o in want)
    loss = cp_worker.loss_of(want, weights, want_state, 1.0)
    if loss.requires_grad:
        loss.backward()
    job = {"module": str(compiled_path(path)), "op": program.name, "dims": program.dims, "lengths": lengths,
           "params": {n: t.detach().clone() for n, t in layer.state_dict().items()},
           "inputs": inputs, "state": None, "weights": weights, "return_state": True, "cu": None}
    reference = {"outputs": [o.detach() for o in want], "state": want_state.detach(),
                 "input_grads": {n: x.grad for n, x in leaves.items()},
                 "param_grads": {n: p.grad for n, p in layer.named_parameters()}}
    return job, reference, cls.spec.scan == "tree"


def test_generated_programs_match_one_process(tmp_path):
    """Random programs of the differential generator (exact scans, tree scans, chunk ops, mixed
    dtypes) over 2 gloo ranks with uneven slices: outputs, final state and gradients equal one
    process; tree scans bit for bit."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
    from generator import generate
    jobs, references, exact = [], [], []
    for seed in GENERATED_SEEDS:
        program = generate(seed)
        path = tmp_path / f"{program.name}.psm"
        path.write_text(program.text)
        job, reference, tree = _program_job(program, path, (5, 8) if seed % 2 else (9, 1), seed)
        jobs.append(job)
        references.append(reference)
        exact.append(tree)
    assert any(exact) and not all(exact), exact  # both plans are in the sample
    _run_and_compare(2, jobs, references, exact, tmp_path)


def test_a_group_of_one_rank_returns_what_forward_returns(tmp_path):
    """cp_group= with a one-process group runs the local pass: the outputs alone, or (outputs,
    state) with return_state=True, equal to the call without cp_group (it returned the
    (outputs, state) pair in both cases before)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = layer_class("delta_rule")(K=4, V=4)
        g = torch.Generator().manual_seed(3)
        x = {"k": torch.randn(2, 6, 3, 4, generator=g), "v": torch.randn(2, 6, 3, 4, generator=g),
             "beta": torch.rand(2, 6, 3, generator=g), "q": torch.randn(2, 6, 3, 4, generator=g)}
        out = layer(**x, cp_group=dist.group.WORLD)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, layer(**x), rtol=0, atol=0)
        out, state = layer(**x, cp_group=dist.group.WORLD, return_state=True)
        want, want_state = layer(**x, return_state=True)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert state.op == want_state.op and int(state.count) == int(want_state.count)
        torch.testing.assert_close(state.prefix, want_state.prefix, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
