"""The analysis cache: a second analysis of the same op does no symbolic work."""
import json

import pytest

from psmc.analysis import analyse, cache, pipeline, symbolic
from psmc.errors import PsmcAnalysisError
from psmc.ir import ops_from_source

WELFORD = """
op welford {
  state (n: f32, mean: f32, m2: f32);
  combine (l, r) {
    let n = l.n + r.n;
    let d = r.mean - l.mean;
    return (n, l.mean + d * r.n / n, l.m2 + r.m2 + d * d * l.n * r.n / n);
  }
}
"""
BAD = "op bad { assume associative; state (x: f32); combine (l, r) { return l.x - r.x; } }"


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A private cache dir, and a count of symbolic evaluations and full analyses."""
    monkeypatch.setenv("PSMC_CACHE_DIR", str(tmp_path))
    calls = {"symbolic": 0, "compute": 0}
    real_evaluate = symbolic.evaluate

    def counting_evaluate(*args, **kwargs):
        calls["symbolic"] += 1
        return real_evaluate(*args, **kwargs)

    real_compute = pipeline.compute

    def counting_compute(*args, **kwargs):
        calls["compute"] += 1
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(symbolic, "evaluate", counting_evaluate)
    monkeypatch.setattr(pipeline, "compute", counting_compute)
    return calls


def test_second_analysis_does_no_symbolic_work(counted):
    (op,) = ops_from_source(WELFORD)
    first = analyse(op)
    assert first.associativity == "proven"
    assert counted["symbolic"] > 0 and counted["compute"] == 1
    counted.update(symbolic=0, compute=0)
    (again,) = ops_from_source(WELFORD, "another_file.psm")
    second = analyse(again)
    assert counted == {"symbolic": 0, "compute": 0}
    assert second == first


def test_corrupt_entries_are_recomputed(counted):
    (op,) = ops_from_source(WELFORD)
    first = analyse(op)
    path = cache.cache_dir() / "analysis" / f"{cache.key(op)}.json"
    for garbage in ("{not json", "[]", json.dumps({"op": "welford"}),
                    json.dumps(dict(first.to_record(), associativity=7))):
        path.write_text(garbage, encoding="utf-8")
        counted.update(compute=0)
        assert analyse(op) == first
        assert counted["compute"] == 1
        assert json.loads(path.read_text(encoding="utf-8"))["associativity"] == "proven"


def test_the_key_is_the_ir_not_the_text():
    (a,) = ops_from_source(WELFORD)
    (b,) = ops_from_source("# a comment\n" + WELFORD.replace("let d", "   let d"), "elsewhere.psm")
    (c,) = ops_from_source(WELFORD.replace("l.m2 + r.m2", "l.m2 - r.m2"))
    assert cache.key(a) == cache.key(b)
    assert cache.key(a) != cache.key(c)


def test_the_key_covers_the_code_that_judges(monkeypatch):
    """No schema number to bump by hand: other analysis code (a new fingerprint) is a new key."""
    (a,) = ops_from_source(WELFORD)
    before = cache.key(a)
    assert len(cache.code_fingerprint()) == 64 and not hasattr(cache, "SCHEMA")
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "other code")
    assert cache.key(a) != before


def test_refuted_assumption_is_reported_again_from_the_cache(counted):
    (op,) = ops_from_source(BAD, "bad.psm")
    with pytest.raises(PsmcAnalysisError):
        analyse(op)
    counted.update(symbolic=0, compute=0)
    with pytest.raises(PsmcAnalysisError) as err:
        analyse(op)
    assert counted["compute"] == 0
    assert "combine(combine(a, b), c)" in str(err.value)


def test_default_cache_dir_follows_the_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("PSMC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cache.sys, "platform", "linux")
    assert cache.cache_dir() == tmp_path / "psmc"
    monkeypatch.setenv("PSMC_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_an_unwritable_cache_is_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PSMC_CACHE_DIR", str(blocker))
    (op,) = ops_from_source("op s { state (x: f32); combine (l, r) { return l.x + r.x; } }")
    assert analyse(op).associativity == "proven"
