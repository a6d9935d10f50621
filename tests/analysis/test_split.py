"""Laws proved one independent group of fields at a time (psmc/analysis/split.py).

- the dataflow groups and the entrywise test on hand-written combines;
- the fuzz program of seed 203548 (a product field next to a `min` over a [K, D] matrix),
  whose whole-op case split is too large, gets proven;
- a property over generated combines of independent groups, each group drawn from a menu of
  associative and non-associative combines on scalar, [D] or [K, D] fields: the split proof
  says proven exactly when every group is associative, and when a group is not, the
  counterexample found on that group alone is lifted to the whole op and confirmed there in
  exact arithmetic (the float64 search of the whole op is skipped, so the lift is what runs).
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psmc.analysis import compute
from psmc.analysis.budget import Budget
from psmc.analysis.judge import _prove
from psmc.analysis.laws import ASSOCIATIVITY, exact_sides, exact_verdict
from psmc.analysis.split import entrywise, field_groups, parts
from psmc.ir import ops_from_source


def one_op(state: str, body: str, dims: str = "[D, K]", identity: str = ""):
    text = f"op t{dims} {{ state ({state}); combine (l, r) {{ return {body}; }} {identity} }}"
    (op,) = ops_from_source(text, "<test>")
    return op


def test_groups_follow_the_dataflow():
    op = one_op("a: f32, h: f32[D], m: f32[K, D], n: f32",
                "(l.a * r.a, r.a * l.h + r.h, min(l.m, r.m), l.n + r.n)")
    assert field_groups(op) == [(0, 1), (2,), (3,)]
    assert entrywise(op, (0, 1)) and entrywise(op, (2,))
    assert not entrywise(op, (3,))  # scalars already: nothing to split further
    assert [(p.fields, p.scalar) for p in parts(op)] == [((0, 1), True), ((2,), True), ((3,), False)]
    assert all(f.shape == () for p in parts(op) for f in p.op.state)


def test_entrywise_needs_the_same_function_at_every_position():
    # a reduction, a transpose, the dim's value and a matrix product each see other positions
    for body in ("l.m + sum(r.m, axis=0)[None, :]", "l.m + transpose(r.m)", "l.m * D + r.m", "l.m @ r.m"):
        op = one_op("m: f32[D, D]", body)
        assert not entrywise(op, (0,)), body
        assert [p.op for p in parts(op)] == [op]


def test_seed_203548_is_proven():
    op = one_op("p1: f64[D], m3: f64[K, D]", "(r.p1 * l.p1, min(r.m3, l.m3))", identity="identity = (ones, inf);")
    result = compute(op, seed=203548)
    assert result.associativity == "proven", result.report()
    assert result.commutative is True
    assert result.identity == "(ones, inf)" and result.identity_kind == "declared"
    assert "each independent group of fields apart" in result.method


# ---------------------------------------------------------------------------- property
# (state declaration with {t} for the type and {0} for a name prefix, combine outputs, associative?)
MENU = (
    ("{0}x: {t}", ("l.{0}x + r.{0}x",), True),
    ("{0}x: {t}", ("max(l.{0}x, r.{0}x)",), True),
    ("{0}x: {t}", ("min(r.{0}x, l.{0}x)",), True),
    ("{0}x: {t}", ("r.{0}x",), True),
    ("{0}a: {t}, {0}h: {t}", ("l.{0}a * r.{0}a", "r.{0}a * l.{0}h + r.{0}h"), True),
    ("{0}m: {t}, {0}i: {t}", ("min(l.{0}m, r.{0}m)", "where(r.{0}m < l.{0}m, r.{0}i, l.{0}i)"), True),
    ("{0}x: {t}", ("l.{0}x - r.{0}x",), False),
    ("{0}x: {t}", ("min(l.{0}x + r.{0}x, 1.0)",), False),
    ("{0}x: {t}", ("0.5 * l.{0}x + r.{0}x",), False),
)
TYPES = ("f32", "f32[D]", "f32[K, D]")


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(MENU) - 1), st.integers(0, len(TYPES) - 1)), min_size=2, max_size=3))
def test_split_verdict_is_the_conjunction_of_the_groups(choice):
    state, outputs, groups, associative = [], [], [], True
    for k, (row, t) in enumerate(choice):
        decl, outs, ok = MENU[row]
        prefix = "abc"[k]
        start = len(outputs)
        state.append(decl.format(prefix, t=TYPES[t]))
        outputs += [o.format(prefix) for o in outs]
        groups.append(tuple(range(start, len(outputs))))
        associative &= ok
    op = one_op(", ".join(state), "(" + ", ".join(outputs) + ")" if len(outputs) > 1 else outputs[0])
    assert field_groups(op) == groups
    j = _prove(op, ASSOCIATIVITY, Budget(20.0), seed=0, fixed=None)
    if associative:
        assert j.status == "proven", (choice, j.reason)
        return
    assert j.status == "refuted", (choice, j.reason)
    lhs, rhs = exact_sides(op, ASSOCIATIVITY, j.found.point)  # a point of the whole op, re-evaluated
    assert exact_verdict(lhs, rhs) == "differs"


@pytest.mark.parametrize("identity, kind", [("identity = (inf, 0.0);", "declared"),
                                            ("identity = (inf, 1.0);", "inferred")])
def test_declared_identity_is_judged_per_group(identity, kind):
    op = one_op("m: f32[K, D], s: f32", "(min(l.m, r.m), l.s + r.s)", identity=identity)
    result = compute(op, seed=1)
    assert (result.identity, result.identity_kind) == ("(inf, 0.0)", kind), result.report()
    if kind == "inferred":  # the wrong declared one is refuted with a point of the whole op
        assert "is not a left identity" in result.identity_note and "s = 1" in result.identity_note


@pytest.mark.parametrize("state, body, identity, kind", [
    ("m: f32[K, D], s: f32, p: f32[D]", "(min(l.m, r.m), l.s + r.s, l.p * r.p)", "(inf, 0.0, ones)", "inferred"),
    ("m: f32[K, D], s: f32", "(min(l.m, r.m), l.s)", None, "right-only"),  # `first` keeps l: right identities
    ("m: f32[K, D], s: f32, t: f32", "(max(l.m, r.m), l.s, r.t)", None, "none"),  # first and last: no side
    ("m: f32[K, D], s: f32", "(min(l.m, r.m), l.s - r.s)", None, "right-only"),
])
def test_inferred_identity_is_the_tuple_of_the_groups(state, body, identity, kind):
    result = compute(one_op(state, body), seed=2)
    assert (result.identity, result.identity_kind) == (identity, kind), result.report()
