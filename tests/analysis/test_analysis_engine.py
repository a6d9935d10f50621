"""The machinery under the verdicts: exact evaluation, linear arithmetic, case splits,
the prover on its own (without the monoid table), printing, the table, structure, plans."""
import random
from fractions import Fraction

import pytest
import sympy
import torch
from analysis_programs import all_ops

from psmc.analysis import monoids, symbolic
from psmc.analysis.budget import Budget
from psmc.analysis.cases import explore
from psmc.analysis.dsl import exact_text, parse_exact
from psmc.analysis.grid import Grid
from psmc.analysis.laws import ASSOCIATIVITY, COMMUTATIVITY
from psmc.analysis.linear import Constraint, feasible, linearize
from psmc.analysis.plan import state_size
from psmc.analysis.prove import prove, search_exact
from psmc.analysis.refute import dims_options
from psmc.analysis.structure import structure
from psmc.ir import ops_from_source
from psmc.ir.interp import concrete_shape, evaluate

OPS = all_ops()


# ---------------------------------------------------------------------------- semantics
def _random_inputs(op, body, dims, rng):
    """Short decimals for every leaf the body reads, as exact Fractions and as tensors."""
    exact, tensors = {}, {}
    values = {}
    for v in op.state:
        for role in ("left", "right", "state"):
            values[("field", role, v.name)] = v
    for v in op.lift_inputs + op.readout_inputs:
        values[("arg", v.name)] = v
    for p in op.params:
        values[("param", p.name)] = p
    for key, v in values.items():
        shape = concrete_shape(v.shape, dims)
        if v.dtype == "bool":
            grid = Grid.build(shape, lambda i: rng.random() < 0.5)
        elif v.dtype.startswith("i"):
            grid = Grid.build(shape, lambda i: rng.randint(-3, 3))
        else:
            grid = Grid.build(shape, lambda i: Fraction(rng.randint(-20, 20), 10))
        exact[key] = grid.map(lambda x: x if isinstance(x, bool) else sympy.Rational(str(x)))
        nested = grid.map(lambda x: x if isinstance(x, (bool, int)) else float(x)).to_nested()
        tensors[key] = torch.tensor(nested, dtype=torch.bool if v.dtype == "bool" else
                                    torch.int64 if v.dtype.startswith("i") else torch.float64)
    exact[("index",)] = Grid.scalar(sympy.Integer(3))
    tensors[("index",)] = torch.tensor(3)
    return exact, tensors


def _as_float(x) -> float:
    if isinstance(x, bool):
        return float(x)
    if x.has(sympy.zoo, sympy.nan):  # x / 0: undefined in exact arithmetic, inf or nan in float64
        return float("nan")
    return float(x)


@pytest.mark.parametrize("name", sorted(OPS))
def test_exact_evaluation_agrees_with_the_reference_interpreter(name):
    op = OPS[name]
    dims = dims_options(op, sizes=(2,))[0]
    rng = random.Random(0)
    for body in ("lift", "combine", "readout"):
        nodes = getattr(op, body)
        exact, tensors = _random_inputs(op, nodes, dims, rng)
        want = evaluate(nodes, tensors, dims)
        got = symbolic.evaluate(nodes, exact, dims, digits=30)
        for w, g in zip(want, got):
            values = torch.tensor([_as_float(x) for x in g.items], dtype=torch.float64).reshape(w.shape)
            finite = torch.isfinite(w.double())
            assert torch.equal(finite, torch.isfinite(values)), (body, w, g)
            assert torch.allclose(w.double()[finite], values[finite], rtol=1e-9, atol=1e-9), (body, w, g)


# ---------------------------------------------------------------------------- linear arithmetic
def test_fourier_motzkin_decides_small_systems():
    x, y, z = sympy.symbols("x y z", real=True)

    def gt(e):
        return Constraint(linearize(e), True)

    def ge(e):
        return Constraint(linearize(e), False)

    assert feasible([gt(x - y), gt(y - z)])
    assert not feasible([gt(x - y), gt(y - z), gt(z - x)])  # a cycle of strict orders
    assert feasible([ge(x - y), ge(y - x)])  # x = y
    assert not feasible([ge(x - y), ge(y - x), gt(x - y)])
    assert not feasible([gt(x + y - 1), gt(-x), gt(-y)])
    # a non-linear term is one opaque unknown: exp(x) - exp(x) cancels, exp(x) < 0 stays possible
    assert feasible([gt(-sympy.exp(x))])


def test_case_split_enumerates_the_weak_orders_of_three_values():
    a, b, c = sympy.symbols("a b c", real=True)

    def run(branch):
        return tuple(branch.decide(p, q) for p, q in ((a, b), (b, c), (a, c)))

    outcomes = [signs for _, signs in explore(run)]
    assert len(outcomes) == 13  # the ordered Bell number for 3: 6 strict orders + 6 with one tie + 1
    assert len(set(outcomes)) == 13


# ---------------------------------------------------------------------------- the prover alone
@pytest.mark.parametrize("name", ["gla", "delta_rule", "online_softmax", "softmax_pool", "segmented_sum",
                                  "argmin_last", "max_plus", "matmul2x2", "welford"])
def test_sympy_proves_associative_ops_without_the_table(name):
    op = OPS[name]
    for dims in dims_options(op, sizes=(1, 2)):
        attempt = prove(op, ASSOCIATIVITY, dims, Budget(20))
        assert attempt.status == "proven", attempt.reason


@pytest.mark.parametrize("name", ["ema", "saturating_add", "subtract", "abs_diff"])
def test_failed_proofs_turn_into_exact_counterexamples(name):
    op = OPS[name]
    attempt = prove(op, ASSOCIATIVITY, {}, Budget(20))
    assert attempt.status == "failed"
    found = search_exact(op, ASSOCIATIVITY, attempt, {}, Budget(20), seed=0)
    assert found is not None
    assert found.lhs[0].item() != found.rhs[0].item()


def test_tie_breaking_counterexample_needs_the_tie():
    # argmin_first is not commutative only where the values tie: exact search finds the tie
    op = OPS["argmin_first"]
    attempt = prove(op, COMMUTATIVITY, {}, Budget(20))
    assert attempt.status == "failed"
    found = search_exact(op, COMMUTATIVITY, attempt, {}, Budget(20), seed=1)
    a, b = found.point.elements["a"], found.point.elements["b"]
    assert a[0].item() == b[0].item() and a[1].item() != b[1].item()


# ---------------------------------------------------------------------------- printing
def test_exact_numbers_print_like_a_mathematician_writes_them():
    assert exact_text(Fraction(9, 100)) == "0.09"
    assert exact_text(Fraction(-1, 2)) == "-0.5"
    assert exact_text(Fraction(1, 3)) == "1/3"
    assert exact_text(Fraction(4)) == "4"
    assert exact_text(float("-inf")) == "-inf"
    assert exact_text(sympy.oo) == "inf"
    assert exact_text(True) == "true"
    for text in ("0.09", "-0.5", "1/3", "4", "-inf", "true"):
        assert exact_text(parse_exact(text)) == text


# ---------------------------------------------------------------------------- the table
def _op(combine: str, state: str = "(x: f32)"):
    (op,) = ops_from_source(f"op t {{ state {state}; combine (l, r) {{ return {combine}; }} }}")
    return op


def test_the_table_sees_through_operand_order_and_views():
    assert monoids.match(_op("r.x + l.x")).name == "sum"
    assert monoids.match(_op("l.x - r.x")) is None
    assert monoids.match(_op("max(r.x, l.x)")).name == "max"
    gate = monoids.match(_op("(r.a * l.a, l.S * r.a[:, None] + r.S)", "(a: f32[3], S: f32[3, 4])"))
    assert gate.name == "diagonal affine maps"
    # a real slice is not a view: no match
    assert monoids.match(_op("(r.a * l.a, l.S * r.a[0:1] + r.S)", "(a: f32[3], S: f32[3])")) is None
    # xor needs bools
    assert monoids.match(_op("l.x != r.x", "(x: bool)")).name == "xor"


# ---------------------------------------------------------------------------- structure and plans
def test_structure_classes():
    assert structure(_op("tanh(r.x) * l.x + r.x")) == "elementwise"
    assert structure(_op("r.M @ l.M + r.M", "(M: f32[2, 2])")) == "affine"
    assert structure(_op("l.M @ l.M", "(M: f32[2, 2])")) == "general"
    assert structure(_op("l.x * sum(r.x) + r.x", "(x: f32[3])")) == "affine"
    assert structure(_op("l.x / sum(l.x)", "(x: f32[3])")) == "general"


def test_state_size_formulas():
    assert state_size(OPS["gla"], "exact-scan") == "(K + K*V) floats"
    assert state_size(OPS["gla"], "tree-scan") == "(ceil(log2(n + 1)) + 1) * (K + K*V) floats"
    assert state_size(OPS["running_argmax"], "exact-scan") == "1 float + 1 int"
    assert state_size(OPS["transformer_psm"], "tree-scan") == "(ceil(log2(n/C + 1)) + 1) * (C*D) floats"


def test_a_verdict_at_the_time_limit_says_it_may_differ_and_what_to_do():
    """An `unknown` that ran out of CPU time (F2 of the outside probe: the same file gave
    unknown, proven, unknown on a loaded machine) says that another machine or load may decide
    otherwise and names `assume associative;`; an unknown for another reason does not."""
    import dataclasses

    from psmc.analysis import analyse
    from psmc.analysis.budget import OutOfTime, ran_out
    (op,) = ops_from_source("op t { state (x: f32); combine (l, r) { return l.x + r.x; } }")
    proven = analyse(op, use_cache=False)
    budget = Budget(0.0)
    with pytest.raises(OutOfTime) as timed_out:
        budget.check()
    assert ran_out(str(timed_out.value)) and str(timed_out.value) == "CPU-time limit of 0 s reached"
    at_limit = dataclasses.replace(proven, associativity="unknown", reason=str(timed_out.value))
    text = at_limit.report()
    assert "unknown (treated as not associative): CPU-time limit of 0 s reached; at the limit a verdict can " \
           "differ between machines and loads" in text and "`assume associative;`" in text
    other = dataclasses.replace(proven, associativity="unknown", reason="a comparison SymPy cannot split on (x)")
    assert "assume associative" not in other.report() and not ran_out(other.reason)
