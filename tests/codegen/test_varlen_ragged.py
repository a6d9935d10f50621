"""Varlen (fla's cu_seqlens convention) and ragged streaming, for every example op.

Packed sequences must give exactly what running each sequence alone gives: outputs, the
final state (batch N), gradients; a tree-scan sequence keeps its own tree. A ragged batch
(rows that have seen different numbers of tokens) then steps and continues each row as if it
were alone. Tiny shapes: every example runs in a few hundred milliseconds.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from layer_cases import CASES
from layer_harness import Unread, as_tuple, assert_agree, layer_class, make_inputs, stream, time_slice

LENGTHS = (3, 1, 4)  # three packed sequences; a one-token one in the middle
LANES = (2,)


def packed_case(name, lengths=LENGTHS, seed=5):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    torch.manual_seed(0)
    layer = cls(**dims).double()
    total = sum(lengths)
    broadcast = tuple((slot.name in case.sequence_broadcast,) for slot in cls.spec.inputs)
    inputs = make_inputs(cls, dims, 1, total, LANES, broadcast, seed=seed, kinds=case.kinds)
    for slot in cls.spec.inputs:  # documented per-sequence inputs: [1, 1, ...]
        if slot.name in case.sequence_broadcast:
            inputs[slot.name] = inputs[slot.name][:, :1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return layer, inputs, cu


def piece(inputs, lo, hi):
    return {n: (x if x.shape[1] == 1 else x[:, lo:hi]) for n, x in inputs.items()}


def alone(layer, inputs, cu):
    """Each sequence run on its own: (outputs, states)."""
    outs, states = [], []
    for i in range(len(cu) - 1):
        out, state = layer(**piece(inputs, int(cu[i]), int(cu[i + 1])), return_state=True)
        outs.append(as_tuple(out))
        states.append(state)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outs)), states


@pytest.mark.parametrize("name", sorted(CASES))
def test_varlen_equals_separate_runs_then_ragged_streaming_continues_each_row(name):
    layer, inputs, cu = packed_case(name)
    packed, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    want, states = alone(layer, inputs, cu)
    assert_agree(as_tuple(packed), want, f"{name}: varlen vs separate runs")
    assert state.batch_size == len(LENGTHS)
    # ragged streaming: two more tokens per row, each row at its own position
    gen = torch.Generator().manual_seed(11)
    nxt = {}
    for slot in layer.spec.inputs:
        x = inputs[slot.name]
        if x.shape[1] == 1:
            nxt[slot.name] = x.expand(len(LENGTHS), 2, *x.shape[2:])
        else:  # reuse drawn values in another order: valid ranges, new tokens
            idx = torch.randint(0, x.shape[1], (len(LENGTHS) * 2,), generator=gen)
            nxt[slot.name] = x[0, idx].reshape(len(LENGTHS), 2, *x.shape[2:])
    stepped, ragged = stream(layer, nxt, state, 0, 2)
    for i, row_state in enumerate(states):
        row = {n: x[i:i + 1] for n, x in nxt.items()}
        want_row, _ = stream(layer, row, row_state, 0, 2)
        assert_agree(tuple(o[i:i + 1] for o in stepped), want_row, f"{name}: ragged row {i} stepped")
    # a parallel continuation of the ragged batch agrees with stepping it
    continued = as_tuple(layer(**nxt, state=state))
    assert_agree(continued, stepped, f"{name}: ragged forward continuation vs steps")
    assert ragged.batch_size == len(LENGTHS)


@pytest.mark.parametrize("name", ["gla", "ema", "transformer_psm", "selective_ssm"])
def test_varlen_gradients_equal_separate_runs(name):
    layer, inputs, cu = packed_case(name)
    floats = {n: x.clone().requires_grad_() for n, x in inputs.items() if x.is_floating_point()}
    weights = None

    def loss(outs):
        nonlocal weights
        if weights is None:
            g = torch.Generator().manual_seed(3)
            weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        return sum((o * w).sum() for o, w in zip(outs, weights) if o.is_floating_point())

    full = {**inputs, **floats}
    grads_packed = torch.autograd.grad(loss(as_tuple(layer(**full, cu_seqlens=cu))), list(floats.values()))
    grads_alone = torch.autograd.grad(loss(alone(layer, full, cu)[0]), list(floats.values()))
    for n, g, w in zip(floats, grads_packed, grads_alone):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: d/d{n}: {m}")


def test_varlen_continues_from_a_batch_n_state_and_returns_batch_n():
    layer, inputs, cu = packed_case("gla")
    first, _ = layer(**inputs, cu_seqlens=cu, return_state=True)
    # the same sequences again, continuing the per-sequence states
    _, states = alone(layer, inputs, cu)
    import psmc
    start = psmc.cat_states(states)
    again = layer(**inputs, cu_seqlens=cu, state=start)
    want = [as_tuple(layer(**piece(inputs, int(cu[i]), int(cu[i + 1])), state=states[i]))[0] for i in range(3)]
    torch.testing.assert_close(again, torch.cat(want, dim=1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 3, 3, 8]), "strictly increasing"),
    (torch.tensor([0, 5, 3, 8]), "strictly increasing"),
    (torch.tensor([0, 3, 7]), "must end at total_T = 8"),
    (torch.tensor([1, 3, 8]), "must start at 0"),
    (torch.tensor([0.0, 3.0, 8.0]), "int32/int64"),
    (torch.tensor([[0, 8]]), "1-D"),
])
def test_bad_offsets_get_a_clear_error(cu, message):
    layer, inputs, _ = packed_case("gla")
    with pytest.raises((ValueError, TypeError), match=message):
        layer(**inputs, cu_seqlens=cu)


def test_varlen_needs_packed_batch_one():
    layer, inputs, cu = packed_case("gla")
    two = {n: x.expand(2, *x.shape[1:]) for n, x in inputs.items()}
    with pytest.raises(ValueError, match=r"packed as \[1, total_T"):
        layer(**two, cu_seqlens=cu)


# fast paths that take packed sequences
PACKING = ["gla", "simple_gla", "retention", "linear_attention", "delta_rule", "gated_delta_rule",
           "linear_recurrence", "selective_ssm"]


def _count_fast_calls(monkeypatch, layer):
    calls = []
    real = type(layer)._fast_forward

    def spy(self, call, index, state):
        calls.append(call.cu_seqlens is not None)
        return real(self, call, index, state)
    monkeypatch.setattr(type(layer), "_fast_forward", spy)
    return calls


@pytest.mark.parametrize("name", PACKING)
def test_packed_sequences_run_in_one_fast_path_call(name, monkeypatch):
    """Ops whose fast path is the chunk form run all packed sequences in one call (one set of
    kernel launches on a GPU), with the outputs, per-row states and gradients of the loop."""
    layer, inputs, cu = packed_case(name)
    layer.backend = "torch"
    calls = _count_fast_calls(monkeypatch, layer)
    floats = {n: x.clone().requires_grad_() for n, x in inputs.items() if x.is_floating_point()}
    full = {**inputs, **floats}
    packed, state = layer(**full, cu_seqlens=cu, return_state=True)
    assert calls == [True]
    want, states = alone(layer, full, cu)
    assert_agree(as_tuple(packed), want, f"{name}: packed vs separate runs")
    assert state.batch_size == len(LENGTHS)
    assert [int(state[i].count) for i in range(len(LENGTHS))] == list(LENGTHS)
    for i, row in enumerate(states):
        for got, ref in zip(state[i].tensors(), row.tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    weights = [torch.randn(o.shape, dtype=o.dtype) for o in as_tuple(packed)]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    g_packed = torch.autograd.grad(loss(as_tuple(packed)), list(floats.values()))
    g_alone = torch.autograd.grad(loss(want), list(floats.values()))
    for n, g, w in zip(floats, g_packed, g_alone):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: d/d{n}: {m}")
    # continuing a batch-N state (regular: every row has seen the same count) stays packed
    again_inputs = {n: x.detach() for n, x in full.items()}
    even = psmc_cat([alone(layer, piece(again_inputs, 0, 2), torch.tensor([0, 1, 2]))[1][0]] * 3)
    calls.clear()
    again = as_tuple(layer(**again_inputs, cu_seqlens=cu, state=even))
    assert calls == [True]
    bounds = cu.tolist()
    ref = [as_tuple(layer(**piece(again_inputs, bounds[i], bounds[i + 1]), state=even[i]))[0] for i in range(3)]
    torch.testing.assert_close(again[0], torch.cat(ref, dim=1), rtol=1e-9, atol=1e-11)


def psmc_cat(states):
    import psmc
    return psmc.cat_states(states)


@pytest.mark.triton
def test_packed_sequences_through_the_triton_chunk_kernels(monkeypatch):
    """float32 GLA with the chunk kernels (under TRITON_INTERPRET=1 here, compiled on a GPU):
    the packed call launches the state kernel once for all sequences and equals the loop."""
    from psmc.runtime import chunkwise, triton_chunk
    monkeypatch.setattr(chunkwise, "BACKEND", "triton")
    layer, inputs, cu = packed_case("gla", lengths=(5, 17, 2))
    layer = layer.float()
    layer.backend = "torch"
    inputs = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    launches = []
    real = triton_chunk._states
    monkeypatch.setattr(triton_chunk, "_states", lambda *a, **k: launches.append(1) or real(*a, **k))
    packed, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    assert len(launches) == 1
    monkeypatch.setattr(chunkwise, "BACKEND", "torch")
    want, states = alone(layer, inputs, cu)
    torch.testing.assert_close(as_tuple(packed)[0], want[0], rtol=1e-4, atol=1e-4)
    for i, row in enumerate(states):
        for got, ref in zip(state[i].tensors(), row.tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


POSITIONAL = """
op pos_decay {
  state (a: f32, h: f32);
  lift (x: f32, log_a: f32) { return (exp(log_a), x * (1.0 + 0.1 * index)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (1.0, 0.0);
  readout (s, x: f32) { return s.h + s.a * x + 0.01 * index; }
}
"""


@pytest.mark.parametrize("continued", [False, True])
def test_packed_first_order_restarts_positions_products_and_states(continued, tmp_path, monkeypatch):
    """A first-order op whose lift and readout read `index` and whose readout reads the running
    decay product: packed in one call, each sequence's positions start at its row's count, its
    running product and its state restart, exactly as running it alone."""
    import psmc
    path = tmp_path / "pos_decay.psm"
    path.write_text(POSITIONAL)
    layer = psmc.load(path).__psmc_layers__["pos_decay"](backend="torch").double()
    calls = _count_fast_calls(monkeypatch, layer)
    gen = torch.Generator().manual_seed(2)
    lengths, lanes = (3, 1, 5), 2
    total = sum(lengths)
    inputs = {"x": torch.randn(1, total, lanes, generator=gen, dtype=torch.float64, requires_grad=True),
              "log_a": (-torch.rand(1, total, lanes, generator=gen, dtype=torch.float64)).requires_grad_()}
    cu = torch.tensor([0, 3, 4, 9])
    start = None
    if continued:  # three rows that have each seen two tokens
        warm = {n: torch.randn(3, 2, lanes, generator=gen, dtype=torch.float64) for n in inputs}
        warm["log_a"] = -warm["log_a"].abs()
        _, start = layer(**warm, return_state=True)
    packed, state = layer(**inputs, cu_seqlens=cu, state=start, return_state=True)
    assert calls[-1] is True and len(calls) == (2 if continued else 1)
    bounds = cu.tolist()
    want, rows = [], []
    for i in range(3):
        out, row = layer(**piece(inputs, bounds[i], bounds[i + 1]), state=None if start is None else start[i],
                         return_state=True)
        want.append(out)
        rows.append(row)
    want = torch.cat(want, dim=1)
    torch.testing.assert_close(packed, want, rtol=1e-12, atol=1e-12)
    for i, row in enumerate(rows):
        assert int(state[i].count) == int(row.count)
        for got, ref in zip(state[i].tensors(), row.tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(packed.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((packed * w).sum(), list(inputs.values()))
    grads_alone = torch.autograd.grad((want * w).sum(), list(inputs.values()))
    for n, g, r in zip(inputs, grads, grads_alone):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=lambda m: f"d/d{n}: {m}")


@pytest.mark.triton
def test_packed_first_order_through_the_triton_scan_kernel(monkeypatch):
    """backend='triton' (the first-order kernel; for this op 'auto' takes the cheaper state
    loop, taken out here): packed sequences in one kernel call (the decay zeroed at each
    sequence start), equal to the loop."""
    from psmc.runtime import dispatch, triton_scan
    monkeypatch.setattr(dispatch, "PATHS", [p for p in dispatch.PATHS if p.name != "triton-state-loop"])
    layer, inputs, cu = packed_case("selective_ssm", lengths=(5, 1, 9))
    layer = layer.float()
    inputs = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    layer.backend = "triton"
    launches = []
    real = triton_scan.FirstOrderScan.apply
    monkeypatch.setattr(triton_scan.FirstOrderScan, "apply", lambda *a: launches.append(1) or real(*a))
    packed, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    assert launches == [1]
    layer.backend = "torch"
    want, states = alone(layer, inputs, cu)
    torch.testing.assert_close(as_tuple(packed)[0], want[0], rtol=1e-5, atol=1e-5)
    for i, row in enumerate(states):
        for got, ref in zip(state[i].tensors(), row.tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequences_of_one_length_run_as_one_batch(name, monkeypatch):
    """Where no fast path packs them, packed sequences of one length run as the rows of one
    batch (one pass per distinct length, a tree scan's tree per row as alone), and each row's
    outputs, state and gradients are those of the sequence alone; continuing a ragged state
    groups by length and count."""
    layer, inputs, cu = packed_case(name, lengths=(3, 1, 3, 3))
    layer._packs_sequences = False  # the grouping under test, for the ops that would pack
    passes = []
    real = type(layer)._forward_one
    monkeypatch.setattr(type(layer), "_forward_one", lambda self, *a: passes.append(1) or real(self, *a))
    floats = {n: x.clone().requires_grad_() for n, x in inputs.items() if x.is_floating_point()}
    full = {**inputs, **floats}
    packed, state = layer(**full, cu_seqlens=cu, return_state=True)
    assert len(passes) == 2  # lengths 3 and 1
    passes.clear()
    want, states = alone(layer, full, cu)
    assert_agree(as_tuple(packed), want, f"{name}: grouped varlen vs separate runs")
    for i, row in enumerate(states):
        for got, ref in zip(state[i]._all_tensors(), row._all_tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    weights = [torch.randn(o.shape, dtype=o.dtype) for o in as_tuple(packed) if o.is_floating_point()]
    loss = lambda outs: sum((o * w).sum() for o, w in zip([o for o in outs if o.is_floating_point()], weights))  # noqa: E731
    l_packed, l_alone = loss(as_tuple(packed)), loss(want)
    differentiable = isinstance(l_packed, torch.Tensor) and l_packed.requires_grad  # (running_argmax's: no)
    g_packed = torch.autograd.grad(l_packed, list(floats.values()), allow_unused=True) if differentiable else ()
    g_alone = torch.autograd.grad(l_alone, list(floats.values()), allow_unused=True) if differentiable else ()
    for n, g, w in zip(floats, g_packed, g_alone):
        if w is None:
            assert g is None or not g.abs().any(), n
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: d/d{n}: {m}")
    # continue every row by the same lengths from the ragged state (counts 3, 1, 3, 3)
    again = {n: x.detach() for n, x in full.items()}
    passes.clear()
    more, _ = layer(**again, cu_seqlens=cu, state=state, return_state=True)
    assert len(passes) == 2
    bounds = cu.tolist()
    ref = [as_tuple(layer(**piece(again, bounds[i], bounds[i + 1]), state=states[i]))[0] for i in range(4)]
    torch.testing.assert_close(as_tuple(more)[0], torch.cat(ref, dim=1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "pos_decay_like"])
def test_a_packed_call_reads_the_offsets_once(name, tmp_path):
    """The offsets are read off the device once per packed call (each read is a host sync on a
    GPU): the runtime functions get them already read (varlen.Offsets)."""
    reads = []

    class Counting(torch.Tensor):
        def tolist(self):
            reads.append(1)
            return super().tolist()
    if name == "pos_decay_like":  # a first-order op reading index and the running product
        import psmc
        path = tmp_path / "pos_decay.psm"
        path.write_text(POSITIONAL)
        layer = psmc.load(path).__psmc_layers__["pos_decay"](backend="torch")
        gen = torch.Generator().manual_seed(0)
        inputs = {"x": torch.randn(1, 8, 2, generator=gen), "log_a": -torch.rand(1, 8, 2, generator=gen)}
        cu = torch.tensor([0, 3, 4, 8])
    else:
        layer, inputs, cu = packed_case(name)
        layer.backend = "torch"
    layer(**inputs, cu_seqlens=cu.as_subclass(Counting), return_state=True)
    assert reads == [1]


def _calls(monkeypatch, layer, method: str) -> list:
    calls = []
    real = getattr(type(layer), method)
    monkeypatch.setattr(type(layer), method, lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_ragged_rows_of_a_count_free_op_run_as_one_batch(name, monkeypatch):
    """After a packed prefill the rows have seen 3, 1 and 4 tokens (a RaggedState). An exact scan
    whose bodies never read `index` computes nothing from a row's count, so a continuing forward,
    a decode step and a further packed call run every row in one call, each row keeping its own
    count, and the state stays one batch (RaggedState's compact form: `batch` and `counts`); the
    others (tree scans, chunk ops, `index` readers) run the rows of one count together. Either
    way each row equals its sequence run alone."""
    from psmc.runtime.batch import _tokens_seen as seen
    layer, inputs, cu = packed_case(name)
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    _, alone_states = alone(layer, inputs, cu)
    assert type(state).__name__ == "RaggedState"
    free = layer._count_free()
    spec = layer.spec
    assert free == (spec.scan != "tree" and spec.chunk is None and not (spec.lift_index or spec.readout_index))
    calls = 1 if free else len(LENGTHS)  # the counts 3, 1, 4 are all different
    gen = torch.Generator().manual_seed(4)
    nxt = {}
    for slot in spec.inputs:
        x = inputs[slot.name]
        idx = torch.randint(0, x.shape[1], (len(LENGTHS) * 2,), generator=gen)
        nxt[slot.name] = x.expand(len(LENGTHS), 2, *x.shape[2:]) if x.shape[1] == 1 else \
            x[0, idx].reshape(len(LENGTHS), 2, *x.shape[2:])
    forwards = _calls(monkeypatch, layer, "_forward_local")
    continued, after = layer(**nxt, state=state, return_state=True)
    assert len(forwards) == calls
    assert (state.batch is not None) == free and (after.batch is not None) == free  # the compact form
    token = {n: x[:, 0] for n, x in nxt.items()}
    steps = _calls(monkeypatch, layer, "step")
    stepped, stepped_state = layer.step(state, **token)
    assert len(steps) == 1 + calls  # the ragged call, then one per group (all rows: one)
    assert (stepped_state.batch is not None) == free
    for i, row in enumerate(alone_states):
        want, want_state = layer(**{n: x[i:i + 1] for n, x in nxt.items()}, state=row, return_state=True)
        assert_agree(tuple(o[i:i + 1] for o in as_tuple(continued)), as_tuple(want), f"{name}: row {i} continued")
        assert seen(after[i]) == seen(row) + 2 == seen(want_state)
        one, one_state = layer.step(row, **{n: x[i:i + 1] for n, x in token.items()})
        assert_agree(tuple(o[i:i + 1] for o in as_tuple(stepped)), as_tuple(one), f"{name}: row {i} stepped")
        assert seen(stepped_state[i]) == seen(row) + 1
        for got, ref in zip(after[i]._all_tensors(), want_state._all_tensors()):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    # a second packed call from the ragged state: one pass for a count-free op whose path packs
    forwards.clear()
    more, _ = layer(**inputs, cu_seqlens=cu, state=state, return_state=True)
    bounds = cu.tolist()
    ref = [as_tuple(layer(**piece(inputs, bounds[i], bounds[i + 1]), state=alone_states[i]))
           for i in range(len(LENGTHS))]
    assert_agree(as_tuple(more), tuple(torch.cat(parts, dim=1) for parts in zip(*ref)), f"{name}: packed again")


def test_ragged_rows_of_an_index_reading_op_keep_their_positions(tmp_path, monkeypatch):
    """An op whose lift and readout read `index` (its count matters): continuing a ragged state
    runs the rows of one count together, and each row's positions continue from its own count."""
    import psmc
    path = tmp_path / "pos_decay.psm"
    path.write_text(POSITIONAL)
    layer = psmc.load(path).__psmc_layers__["pos_decay"](backend="torch").double()
    assert not layer._count_free()
    gen = torch.Generator().manual_seed(6)
    inputs = {"x": torch.randn(1, 8, 2, generator=gen, dtype=torch.float64),
              "log_a": -torch.rand(1, 8, 2, generator=gen, dtype=torch.float64)}
    cu = torch.tensor([0, 3, 4, 8])
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    nxt = {n: torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) for n in inputs}
    nxt["log_a"] = -nxt["log_a"].abs()
    forwards = _calls(monkeypatch, layer, "_forward_local")
    continued = layer(**nxt, state=state)
    passes = len(forwards)
    for i, (lo, hi) in enumerate(((0, 3), (3, 4), (4, 8))):
        _, row = layer(**{n: x[:, lo:hi] for n, x in inputs.items()}, return_state=True)
        want = layer(**{n: x[i:i + 1] for n, x in nxt.items()}, state=row)
        torch.testing.assert_close(continued[i:i + 1], want, rtol=1e-12, atol=1e-12)
    assert passes == 3


@pytest.mark.parametrize("name", ["cumsum", "welford", "running_argmax", "transformer_psm"])
def test_packed_rows_of_one_length_continue_together_when_the_op_is_count_free(name, monkeypatch):
    """Where no path packs them (the torch generic scan), sequences of one length continuing a
    ragged state run as one batch when the op is count-free, whatever the rows' counts; an op
    that reads `index` (running_argmax) or a tree or chunk op (transformer_psm) runs one pass
    per count. Each row equals its sequence run alone."""
    layer, inputs, cu = packed_case(name)  # rows at counts 3, 1, 4
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    _, rows = alone(layer, inputs, cu)
    again = {n: (x if x.shape[1] == 1 else x[:, :6]) for n, x in inputs.items()}
    cu2 = torch.tensor([0, 2, 4, 6])
    layer._packs_sequences = False  # the grouping under test
    passes = _calls(monkeypatch, layer, "_forward_local")
    more = as_tuple(layer(**again, cu_seqlens=cu2, state=state))
    assert len(passes) == (1 if layer._count_free() else 3)
    for i, (lo, hi) in enumerate(((0, 2), (2, 4), (4, 6))):
        want = as_tuple(layer(**piece(again, lo, hi), state=rows[i]))
        assert_agree(tuple(o[:, lo:hi] for o in more), want, f"{name}: row {i}")


def test_selecting_rows_of_a_compact_ragged_state_keeps_it_compact():
    """Beam search reorders the rows of a ragged batch every token: rows picked from the compact
    form (a count-free op's) stay one batch state with their counts, and equal the one-row
    states they were."""
    from psmc.runtime.batch import RaggedState
    layer, inputs, cu = packed_case("gla")
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    assert state.batch is not None and state.sizes == list(LENGTHS)
    picked = state[torch.tensor([2, 0, 2])]
    assert isinstance(picked, RaggedState) and picked.batch is not None and picked.sizes == [4, 3, 4]
    rows = state.row_states
    for got, i in zip(picked.row_states, (2, 0, 2)):
        assert int(got.count) == int(rows[i].count)
        for a, b in zip(got._all_tensors(), rows[i]._all_tensors()):
            assert torch.equal(a, b)
    same = state[torch.tensor([1, 1])]  # one count: a plain state
    assert type(same).__name__ == "ScanState" and int(same.count) == 1 and same.batch_size == 2


def test_decoding_a_compact_ragged_state_never_reads_its_count():
    """A count-free op decoding rows of different lengths (RaggedState's compact form) steps
    them as one batch; a step is one token, so the batch's count is not read on the host."""
    from psmc.runtime.batch import RaggedState
    layer, inputs, cu = packed_case("gla")
    _, state = layer(**inputs, cu_seqlens=cu, return_state=True)
    assert state.batch is not None
    batch = dataclasses.replace(state.batch, count=state.batch.count.as_subclass(Unread))
    state = RaggedState(batch=batch, counts=state.counts)
    token = {slot.name: inputs[slot.name][0, :1].expand(len(LENGTHS), *inputs[slot.name].shape[2:])
             for slot in layer.spec.inputs}
    for _ in range(2):
        _, state = layer.step(state, **token)
    assert list(state.counts) == [n + 2 for n in LENGTHS]
