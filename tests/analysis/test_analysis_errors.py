"""Programs the algebra contradicts are compile errors with a caret and the evidence."""
import re
from fractions import Fraction
from pathlib import Path

import pytest

from psmc.analysis import analyse
from psmc.errors import PsmcAnalysisError
from psmc.ir import ops_from_file, ops_from_source

OPS = Path(__file__).resolve().parent / "ops"


def test_refuted_assume_associative_shows_the_counterexample():
    (op,) = ops_from_file(OPS / "assumed_bad.psm")
    with pytest.raises(PsmcAnalysisError) as info:
        analyse(op)
    err = info.value
    text = str(err)
    assert err.line == 6 and err.col == 3  # the `assume associative;` line
    assert "^^^^^^^^^^^^^^^^^^^" in text
    m = re.search(r"combine\(combine\(a, b\), c\) = (\S+) but combine\(a, combine\(b, c\)\) = (\S+) "
                  r"for a = \(x = (\S+)\), b = \(x = (\S+)\), c = \(x = (\S+)\)", text)
    assert m, text
    left, right, a, b, c = (Fraction(g) for g in m.groups())
    agg = lambda x, y: x + 2 * y  # noqa: E731 - the op's combine, by hand
    assert left == agg(agg(a, b), c) and right == agg(a, agg(b, c)) and left != right


def test_a_true_assumption_is_reported_as_assumed():
    (op,) = ops_from_file(OPS / "assumed_ok.psm")
    result = analyse(op)
    assert result.associativity == "assumed" and result.plan == "exact-scan"


NON_CAUSAL = """
op peek[C, D] {
  chunk C;
  state (X: f32[C, D]);
  lift (x: f32[C, D]) { return x; }
  combine (l, r) { return l.X + r.X; }
  identity = zeros;
  readout exclusive (p, x: f32[C, D], y: f32[C, D]) {
    return p.X + x + attention(y, y, y);
  }
}
"""


def test_a_non_causal_chunk_readout_names_the_input():
    (op,) = ops_from_source(NON_CAUSAL, "peek.psm")
    with pytest.raises(PsmcAnalysisError) as info:
        analyse(op)
    err = info.value
    assert "not causal" in err.message and "'y'" in err.message and "'x'" not in err.message
    assert err.line == 8  # the declaration of y


def test_a_causal_chunk_readout_passes():
    (op,) = ops_from_source(NON_CAUSAL.replace("attention(y, y, y)", "attention(y, y, y, causal=true)"))
    result = analyse(op)
    assert result.causal is True and result.causal_violation is None


def test_refuted_assume_commutative_is_an_error_too():
    (op,) = ops_from_source("op sub {\n  assume commutative;\n  state (x: f32);\n"
                            "  combine (l, r) { return l.x - r.x; }\n}\n", "sub.psm")
    with pytest.raises(PsmcAnalysisError) as info:
        analyse(op)
    assert info.value.line == 2 and "combine(a, b) = " in info.value.message
