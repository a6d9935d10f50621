"""For every op in examples/: the parallel pass, token-by-token streaming, a forward continued
from a mid-sequence state, decoding after a parallel prefill and an independent reference
(the IR interpreter, folded left or by the paper's closed-form tree) all agree.

Shapes are drawn by hypothesis: batch, time (T = 1, 2, 3, 17 and 101 always, as explicit
examples), lane axes with inputs broadcast (size 1) on some of them, the op's dims, and where
the sequence is split. Chunk ops get every remainder T mod C across the examples.

Also per op: the plan (tree exactly for the non-associative ops), the float32 path against
float64, and the batch-and-time broadcast that some examples document for constant inputs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from layer_cases import CASES, EXAMPLES_DIR
from layer_harness import as_tuple, assert_agree, layer_class, make_inputs, stream, time_slice, tree_roots
from layer_reference import op_ir, reference_outputs
from psmc.ir import ops_from_file

MAX_INPUTS = 8  # no example has more inputs; broadcast masks are drawn for this many


@dataclass(frozen=True)
class Run:
    batch: int
    time: int
    lanes: tuple  # sizes of the lane axes between time and the declared shape
    broadcast: tuple  # broadcast[i][j]: input i has size 1 on lane axis j
    dim_set: int  # index into the case's dim_sets (modulo their count)
    split: float  # where the continued forward splits the sequence, as a fraction of T
    pass_dims: bool  # dims to the constructor, or bound from the input shapes
    seed: int


def masks(pattern):
    """A broadcast table from a per-lane-axis pattern repeated over the inputs."""
    return tuple(tuple(pattern[(i + j) % len(pattern)] for j in range(2)) for i in range(MAX_INPUTS))


@st.composite
def runs(draw):
    n_lanes = draw(st.integers(0, 2))
    lanes = tuple(draw(st.lists(st.integers(1, 3), min_size=n_lanes, max_size=n_lanes)))
    bools = st.lists(st.booleans(), min_size=2, max_size=2).map(tuple)
    return Run(
        batch=draw(st.integers(1, 2)),
        time=draw(st.integers(1, 40)),
        lanes=lanes,
        broadcast=tuple(draw(st.lists(bools, min_size=MAX_INPUTS, max_size=MAX_INPUTS))),
        dim_set=draw(st.integers(0, 2)),
        split=draw(st.floats(0.0, 1.0)),
        pass_dims=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def split_point(run: Run) -> int:
    return min(run.time - 1, max(1, round(run.split * run.time)))


def concat_time(first: tuple, second: tuple) -> tuple:
    return tuple(torch.cat([a, b], dim=1) for a, b in zip(first, second))


def test_the_table_covers_every_example_op():
    ops = {op.name for path in EXAMPLES_DIR.glob("*.psm") for op in ops_from_file(path)}
    assert ops == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_is_the_tree_exactly_for_the_non_associative_ops(name):
    assert layer_class(name).spec.scan == ("tree" if CASES[name].tree else "exact")


@pytest.mark.parametrize("name", sorted(CASES))
@given(run=runs())
@example(run=Run(1, 1, (), masks((False,)), 0, 0.5, True, 1))
@example(run=Run(2, 2, (3,), masks((False, True)), 1, 0.5, False, 2))
@example(run=Run(1, 3, (2, 1), masks((True, False, False)), 2, 0.4, True, 3))
@example(run=Run(2, 17, (2,), masks((False, False, True)), 1, 0.7, False, 4))
@example(run=Run(1, 101, (2,), masks((False, True, False)), 2, 0.37, True, 5))
def test_parallel_streaming_continued_and_reference_agree(name, run):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[run.dim_set % len(case.dim_sets)]
    torch.manual_seed(run.seed)  # the params' initial values
    layer = (cls(**dims) if run.pass_dims or cls.spec.params else cls()).double()
    inputs = make_inputs(cls, dims, run.batch, run.time, run.lanes, run.broadcast, run.seed, case.kinds)
    T = run.time

    full = as_tuple(layer(**inputs))
    lead = torch.broadcast_shapes(*(x.shape[:2 + len(run.lanes)] for x in inputs.values()))
    for out, slot in zip(full, cls.spec.outputs):
        assert tuple(out.shape[:len(lead)]) == tuple(lead), f"output {slot.name}: shape {tuple(out.shape)}"

    streamed, end_state = stream(layer, inputs, layer.init_state(batch_shape=(lead[0], *lead[2:])), 0, T)
    assert_agree(streamed, full, "token-by-token step vs the parallel pass")

    if T >= 2:
        mid = split_point(run)
        first, state = layer(**time_slice(inputs, 0, mid), return_state=True)
        first = as_tuple(first)
        rest = as_tuple(layer(**time_slice(inputs, mid, T), state=state))
        assert_agree(concat_time(first, rest), full, f"forward continued from the state after {mid} tokens")
        decoded, _ = stream(layer, inputs, state, mid, T)
        assert_agree(concat_time(first, decoded), full, f"steps after a parallel prefill of {mid} tokens")

    if case.tree:
        chunk = 1 if cls.spec.chunk is None else int(cls.spec.chunk(dims))
        leaves = T // chunk  # a chunk op's state holds complete chunks; the rest is buffered
        _, parallel_state = layer(**inputs, return_state=True)
        for state, how in ((parallel_state, "parallel"), (end_state, "streamed")):
            roots = tree_roots(state)
            assert roots == bin(leaves).count("1") <= math.ceil(math.log2(leaves + 1)), \
                f"{how} state after {leaves} leaves holds {roots} roots"

    check_reference(case, cls, layer, dims, inputs, lead, full)


def check_reference(case, cls, layer, dims, inputs, lead, full):
    """The interpreter-based reference, lane by lane (every batch row and lane position)."""
    op = op_ir(str(case.path), case.name)
    params = {p.name: getattr(layer, "p_" + p.name).detach() for p in cls.spec.params}
    expanded = {name: torch.broadcast_to(x, (*lead, *x.shape[len(lead):])) for name, x in inputs.items()}
    for b in range(lead[0]):
        for lane in itertools.product(*(range(size) for size in lead[2:])):
            where = (b, slice(None), *lane)
            want = reference_outputs(op, dims, params, {n: x[where] for n, x in expanded.items()}, case.tree)
            got = tuple(out[where] for out in full)
            assert_agree(got, want, f"parallel pass vs the reference at batch {b}, lanes {lane}")


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.sequence_broadcast))
def test_documented_broadcast_over_batch_and_time(name):
    """The example's layout comment says these inputs may be `[1, 1, *lanes, ...]` (constant
    over batch and time): that must equal passing them expanded."""
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    layer = cls(**dims).double()
    broadcast = ((False,),) * len(cls.spec.inputs)
    inputs = make_inputs(cls, dims, 2, 7, (3,), broadcast, seed=9, kinds=case.kinds)
    constant = {n: x[:1, :1] if n in case.sequence_broadcast else x for n, x in inputs.items()}
    expanded = {n: x.expand_as(inputs[n]) for n, x in constant.items()}
    assert_agree(as_tuple(layer(**constant)), as_tuple(layer(**expanded)), "[1, 1, ...] vs expanded")


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_layer_is_close_to_float64(name):
    """The float32 path (DESIGN.md's bar for fp32: relative RMS error <= 1e-5) and its dtypes:
    float outputs come back float32, integer ones as declared."""
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1]
    torch.manual_seed(0)
    layer = cls(**dims).double()
    broadcast = ((False,),) * len(cls.spec.inputs)
    inputs = make_inputs(cls, dims, 2, 17, (2,), broadcast, seed=21, kinds=case.kinds)
    want = as_tuple(layer(**inputs))
    single = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    got = as_tuple(layer.float()(**single))
    for g, w, slot in zip(got, want, cls.spec.outputs):
        if not w.is_floating_point():
            assert g.dtype == w.dtype and torch.equal(g, w), slot.name
            continue
        assert g.dtype == torch.float32, f"output {slot.name} is {g.dtype}"
        error = (g.double() - w).norm() / w.norm().clamp_min(1e-30)
        assert error <= 1e-5, f"output {slot.name}: relative RMS error {error:.2e}"
