"""Every example and every test operator gets the verdicts of the hand-decided table."""
import json
import re
from fractions import Fraction

import pytest
from analysis_programs import all_ops
from expected import EXPECTED

from psmc.errors import PsmcAnalysisError

OPS = sorted(all_ops())
COMPILE_ERRORS = {"assumed_bad"}  # `assume associative` refuted: a compile error


def test_the_table_covers_every_op():
    assert set(OPS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(set(OPS) - COMPILE_ERRORS))
def test_verdicts_match_the_table(analyses, name):
    result = analyses[name]
    want = EXPECTED[name]
    got = dict(associativity=result.associativity, commutative=result.commutative,
               identity=result.identity, structure=result.structure)
    assert got == want, result.report()


@pytest.mark.parametrize("name", sorted(set(OPS) - COMPILE_ERRORS))
def test_plan_follows_the_verdicts(analyses, name):
    result = analyses[name]
    exact = result.associativity in ("proven", "assumed")
    assert result.plan == ("exact-scan" if exact else "tree-scan")
    backends = dict(result.backends)
    fused = exact and result.structure == "elementwise"
    for p in ("forward", "backward", "step"):
        assert backends[p] == (("torch", "triton") if fused else ("torch",))
    if result.associativity == "refuted":
        assert result.counterexample is not None and result.counterexample.law == "associativity"
    else:
        assert result.counterexample is None
    if result.associativity == "unknown":
        assert result.reason


@pytest.mark.parametrize("name", sorted(COMPILE_ERRORS))
def test_refuted_assumption_is_a_compile_error(analyses, name):
    err = analyses[name]
    assert isinstance(err, PsmcAnalysisError)
    assert EXPECTED[name]["associativity"] == "refuted"


@pytest.mark.parametrize("name", sorted(set(OPS) - COMPILE_ERRORS))
def test_json_has_the_issue_keys(analyses, name):
    data = analyses[name].as_dict()
    assert set(data) == {"op", "associativity", "method", "counterexample", "identity", "commutative",
                         "structure", "causal", "plan", "backends", "state_size"}
    assert data["op"] == name
    assert data["method"]
    json.dumps(data)  # serialisable as is
    if data["counterexample"] is not None:
        assert set(data["counterexample"]) == {"a", "b", "c", "left", "right"}


def test_reports_read_well(analyses):
    report = analyses["ema"].report()
    m = re.search(r"combine\(combine\(a, b\), c\) = (\S+) but combine\(a, combine\(b, c\)\) = (\S+) for "
                  r"a = \(y = (\S+)\), b = \(y = (\S+)\), c = \(y = (\S+)\)", report)
    assert m, report
    left, right, a, b, c = (Fraction(g) for g in m.groups())
    agg = lambda x, y: Fraction(9, 10) * x + Fraction(1, 10) * y  # noqa: E731 - ema by hand
    assert (left, right) == (agg(agg(a, b), c), agg(a, agg(b, c))) and left != right
    assert max(len(g) for g in m.groups()) <= 5  # short decimals, not 0.7316...
    assert "exact arithmetic" in report
    assert "tree-scan" in report
    gla = analyses["gla"].report()
    assert "(K + K*V) floats" in gla and "exact-scan" in gla and "known monoid" in gla
    argmax = analyses["running_argmax"].report()
    assert "case split" in argmax and "(-inf, 0)" in argmax


def test_state_sizes(analyses):
    assert analyses["gla"].state_size == "(K + K*V) floats"
    assert analyses["segmented_sum"].state_size == "1 float + 1 bool"
    assert analyses["transformer_psm"].state_size == "(ceil(log2(n/C + 1)) + 1) * (C*D) floats"
    assert analyses["tree_rnn"].state_size == "(ceil(log2(n + 1)) + 1) * D floats"


def test_causality_of_the_chunk_readout(analyses):
    assert analyses["transformer_psm"].causal is True
    assert analyses["gla"].causal is None  # token-level op: nothing to check


def test_identity_kinds(analyses):
    assert analyses["first"].identity_kind == "right-only"
    assert analyses["last"].identity_kind == "left-only"
    assert analyses["subtract"].identity_kind == "right-only"
    assert analyses["minimum"].identity_kind == "inferred"
    assert analyses["gla"].identity_kind == "declared"
    assert analyses["ema"].identity_kind == "none"
    assert "empty prefix" in analyses["transformer_psm"].identity_note


def test_elementwise_fields_for_codegen(analyses):
    assert dict(analyses["gla"].elementwise_fields) == {"a": True, "S": True}
    assert dict(analyses["delta_rule"].elementwise_fields) == {"E": False, "S": False}
