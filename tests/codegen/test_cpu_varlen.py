"""Packed sequences (fla's cu_seqlens) through the fused C++ kernels: ONE forward and ONE
backward kernel call for all sequences (psmc.runtime.cpu_support.forward, marked `packs`),
giving exactly what running each sequence alone gives.

For every example op with C++ kernels, in float64 and float32, lengths of which no two are
equal (the grouping by length would need a pass per sequence): outputs, each sequence's final
state and count, and the gradients of inputs, params and the initial state; fresh, and
continuing a batch-N state (every row at one count), then continuing again. Ops reading
`index` restart their positions at each sequence ('lanes' and 'state' kernels, shared and
per-lane params)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import psmc
from layer_cases import CASES
from layer_harness import as_tuple, layer_class, make_inputs
from psmc.runtime import cpu_support
from test_cpu import COVERED, needs_compiler

LENGTHS = (3, 1, 5, 2)  # four sequences, no two of one length; a one-token one
LANES = (2,)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


class KernelCalls:
    """The passes of the compiled kernels that ran: cpu_support._call is the one function that
    calls them (a packed call that fell back to a pass per sequence would show four)."""

    def __init__(self, monkeypatch):
        self.passes = []
        original = cpu_support._call

        def spy(fn, *args):
            self.passes.append("backward" if "_backward_" in fn.__name__ else "forward")
            return original(fn, *args)
        monkeypatch.setattr(cpu_support, "_call", spy)


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def piece(inputs: dict, lo: int, hi: int) -> dict:
    return {n: (x if x.shape[1] == 1 else x[:, lo:hi]) for n, x in inputs.items()}


def with_grad_leaves(state):
    """`state` with its float prefix tensors as fresh leaves that require grad."""
    if state is None:
        return None
    prefix = tuple(t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
                   for t in state.prefix)
    return dataclasses.replace(state, prefix=prefix)


def leaves_of(inputs: dict, layer, state) -> list:
    floats = [x for x in inputs.values() if x.requires_grad]
    floats += [p for p in layer.parameters() if p.requires_grad]
    if state is not None:
        floats += [t for t in state.prefix if t is not None and t.requires_grad]
    return floats


def run_packed_and_alone(layer, inputs: dict, lengths, start, monkeypatch):
    """The packed call (one kernel pass asserted) and each sequence alone: for each,
    (outputs, per-sequence states)."""
    cu = offsets(lengths)
    bounds = cu.tolist()
    calls = KernelCalls(monkeypatch)
    packed, state = layer(**inputs, cu_seqlens=cu, state=start, return_state=True)
    assert calls.passes == ["forward"], f"packed sequences ran the kernels as {calls.passes}"
    assert state.batch_size == len(lengths)
    outs, rows = [], []
    for i in range(len(lengths)):
        out, row = layer(**piece(inputs, bounds[i], bounds[i + 1]), state=None if start is None else start[i],
                         return_state=True)
        outs.append(as_tuple(out))
        rows.append(row)
    alone = tuple(torch.cat(parts, dim=1) for parts in zip(*outs))
    return (as_tuple(packed), [state[i] for i in range(len(lengths))]), (alone, rows), calls


def assert_same(got: tuple, want: tuple, tol: dict, what: str):
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {j}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if w.is_floating_point():
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what} {j}: {m}")
        else:
            assert torch.equal(g, w), f"{what} {j}: {g} != {w}"


def assert_states(got: list, want: list, tol: dict, what: str):
    for i, (g, w) in enumerate(zip(got, want)):
        assert int(g.count) == int(w.count), f"{what}: sequence {i} count {int(g.count)} vs {int(w.count)}"
        assert_same(g.tensors(), w.tensors(), tol, f"{what}: sequence {i} state field")


def weighted_loss(outputs: tuple, states: list, seed: int = 3):
    """A fixed random weighting of every float output and final-state value (the same weights
    for the packed call and the runs alone)."""
    gen = torch.Generator().manual_seed(seed)
    terms = [o for o in outputs if o.is_floating_point()]
    terms += [t for s in states for t in s.tensors() if t.is_floating_point()]
    total = None
    for t in terms:
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
        total = (t * w).sum() if total is None else total + (t * w).sum()
    return total


def assert_gradients(packed, alone, leaves: list, tol: dict, calls: KernelCalls, what: str):
    loss_packed, loss_alone = weighted_loss(*packed), weighted_loss(*alone)
    if not (isinstance(loss_packed, torch.Tensor) and loss_packed.requires_grad):
        return  # (running_argmax: no float output or state to differentiate)
    before = len(calls.passes)
    got = torch.autograd.grad(loss_packed, leaves, allow_unused=True)
    assert calls.passes[before:] == ["backward"], f"{what}: the packed backward ran {calls.passes[before:]}"
    want = torch.autograd.grad(loss_alone, leaves, allow_unused=True)
    for j, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.abs().any(), f"{what}: gradient {j}: none alone, {g} packed"
            continue
        assert g is not None, f"{what}: gradient {j}: none packed"
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what}: gradient {j} of {len(leaves)}: {m}")


def example_case(name: str, dtype, continued: bool, seed: int = 5):
    """A backend='cpu' layer of example `name` in `dtype`, packed inputs [1, sum(LENGTHS), 2, ...]
    (the inputs documented as per-sequence broadcast over time), and None or a batch-N state
    in which every row has seen two tokens."""
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    torch.manual_seed(0)
    layer = cls(backend="cpu", **dims).to(dtype)
    broadcast = tuple((slot.name in case.sequence_broadcast,) for slot in cls.spec.inputs)

    def draw(batch, steps, seed):
        xs = make_inputs(cls, dims, batch, steps, LANES, broadcast, seed=seed, kinds=case.kinds)
        for slot in cls.spec.inputs:
            if slot.name in case.sequence_broadcast:
                xs[slot.name] = xs[slot.name][:1, :1]
        return {n: x.to(dtype) if x.is_floating_point() else x for n, x in xs.items()}

    inputs = draw(1, sum(LENGTHS), seed)
    start = None
    if continued:
        with torch.no_grad():
            _, start = layer(**draw(len(LENGTHS), 2, seed + 1), return_state=True)
    return layer, inputs, start, draw


@needs_compiler
@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", COVERED)
def test_packed_sequences_in_one_kernel_pass_equal_each_alone(name, dtype, continued, monkeypatch):
    layer, inputs, start, draw = example_case(name, dtype, continued)
    tol = TOL[dtype]
    inputs = {n: x.clone().requires_grad_() if x.is_floating_point() else x for n, x in inputs.items()}
    start = with_grad_leaves(start)
    packed, alone, calls = run_packed_and_alone(layer, inputs, LENGTHS, start, monkeypatch)
    assert_same(packed[0], alone[0], tol, f"{name}: output")
    assert_states(packed[1], alone[1], tol, name)
    assert_gradients(packed, alone, leaves_of(inputs, layer, start), tol, calls, name)

    # continuing again from the packed call's state (its rows now at different counts)
    more = draw(1, sum(LENGTHS), 7)
    cu = offsets(LENGTHS)
    bounds = cu.tolist()
    with torch.no_grad():
        state = psmc.cat_states(packed[1])
        again, after = layer(**more, cu_seqlens=cu, state=state, return_state=True)
        want, rows = [], []
        for i in range(len(LENGTHS)):
            out, row = layer(**piece(more, bounds[i], bounds[i + 1]), state=alone[1][i], return_state=True)
            want.append(as_tuple(out))
            rows.append(row)
    assert_same(as_tuple(again), tuple(torch.cat(p, dim=1) for p in zip(*want)), tol, f"{name}: continued output")
    assert_states([after[i] for i in range(len(LENGTHS))], rows, tol, f"{name}: continued")


@needs_compiler
def test_auto_on_cpu_runs_packed_sequences_in_one_kernel_pass(monkeypatch):
    """backend='auto' on CPU tensors serves a packed call with the C++ kernels too: one pass."""
    monkeypatch.setenv("PSMC_CPU", "1")
    layer, inputs, _, _ = example_case("selective_ssm", torch.float32, False)
    layer.backend = "auto"
    packed, alone, calls = run_packed_and_alone(layer, inputs, LENGTHS, None, monkeypatch)
    assert_same(packed[0], alone[0], TOL[torch.float32], "output")
    assert_states(packed[1], alone[1], TOL[torch.float32], "auto")


POSITIONAL = """
op pos_gate {
  param w: f32 = uniform(0.5, 1.5);
  state (a: f32, h: f32);
  lift (x: f32, log_a: f32) { return (exp(w * log_a), x * (1.0 + 0.1 * index)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (1.0, 0.0);
  readout (s, x: f32) { return s.h + s.a * x + 0.01 * index; }
}
op pos_ssm[N] {
  param A: f32[N] = uniform(-1.0, -0.1);
  state (a: f32[N], h: f32[N]);
  lift (u: f32, delta: f32, B: f32[N]) { return (exp(delta * A), delta * B * u * (1.0 + 0.1 * index)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout (s, C: f32[N]) { return sum(s.h * C) + 0.01 * index; }
}
"""


@pytest.fixture(scope="module")
def positional(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu_varlen") / "positional.psm"
    path.write_text(POSITIONAL)
    return psmc.load(path)


def _positional_inputs(name: str, batch: int, steps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lanes = LANES[0]

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    if name == "pos_gate":
        return {"x": r(batch, steps, lanes), "log_a": -torch.rand(batch, steps, lanes, generator=gen, dtype=torch.float64)}
    return {"u": r(batch, steps, lanes), "delta": torch.rand(batch, steps, lanes, generator=gen, dtype=torch.float64),
            "B": r(batch, steps, lanes, 3), "C": r(batch, steps, lanes, 3)}


@needs_compiler
@pytest.mark.parametrize("continued", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize("per_lane", [False, True], ids=["shared", "per_lane"])
@pytest.mark.parametrize("name", ["pos_gate", "pos_ssm"])
def test_positions_restart_at_each_packed_sequence(positional, name, per_lane, continued, monkeypatch):
    """An op whose lift and readout read `index` ('lanes' kernel: pos_gate; 'state' kernel:
    pos_ssm), its param shared or one slice per lane: sequence i's token j is at position
    start + j. Packed in one pass, each sequence equals itself alone with backend='cpu' (to
    1e-12) and with backend='torch' (an independent count of positions), gradients too."""
    kwargs = dict(lanes=LANES, per_lane=True) if per_lane else {}
    dims = {"N": 3} if name == "pos_ssm" else {}
    torch.manual_seed(1)
    layer = getattr(positional, name)(backend="cpu", **dims, **kwargs).double()
    inputs = {n: x.requires_grad_() for n, x in _positional_inputs(name, 1, sum(LENGTHS), 4).items()}
    start = None
    if continued:
        with torch.no_grad():
            _, start = layer(**_positional_inputs(name, len(LENGTHS), 2, 6), return_state=True)
        start = with_grad_leaves(start)
    packed, alone, calls = run_packed_and_alone(layer, inputs, LENGTHS, start, monkeypatch)
    tol = TOL[torch.float64]
    assert_same(packed[0], alone[0], tol, f"{name}: output")
    assert_states(packed[1], alone[1], tol, name)
    assert_gradients(packed, alone, leaves_of(inputs, layer, start), tol, calls, name)
    # the torch backend's own positions, each sequence alone
    ref = getattr(positional, name)(backend="torch", **dims, **kwargs).double()
    ref.load_state_dict(layer.state_dict())
    bounds = offsets(LENGTHS).tolist()
    with torch.no_grad():
        want = [ref(**piece(inputs, bounds[i], bounds[i + 1]), state=None if start is None else start[i])
                for i in range(len(LENGTHS))]
    torch.testing.assert_close(packed[0][0].detach(), torch.cat(want, dim=1), rtol=1e-10, atol=1e-12)
