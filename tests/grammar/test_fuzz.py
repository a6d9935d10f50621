"""Fuzzing the front end: whatever the text, `ops_from_source` returns ops or raises a PsmcError.

Never another exception (an internal error would reach the user as a traceback), and never a
hang: every input runs under a hard per-input time limit (SIGALRM) as well as hypothesis's
deadline. Four sources of inputs, a few thousand cases in all:
- random bytes (decoded leniently) and random unicode text;
- random sequences of the grammar's own tokens (so the parser gets past the first character);
- random mutations of the shipped programs (delete, duplicate, swap, replace tokens or characters,
  or swap a name, number, dtype or operator for another of its kind), which reach the semantic
  checks;
- random expressions inside an otherwise valid op, which reach shape and dtype inference.
The runs are derandomized (tests/conftest.py), so a failure reproduces on every machine.
"""
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psmc.errors import PsmcError
from psmc.grammar.parser import lark_parser
from psmc.ir import ops_from_source
from psmc.ir.builtins import BUILTINS

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {p.stem: p.read_text(encoding="utf-8")
            for p in sorted((ROOT / "examples").glob("*.psm")) + sorted((ROOT / "tests/analysis/ops").glob("*.psm"))}
HARD_LIMIT_S = 10  # a hang, not a slow input: hypothesis's deadline catches slowness


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=5000,  # ms; generous: the CI machines are shared
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class Hang(Exception):
    pass


@contextmanager
def hard_limit(seconds: int):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def front_end(text: str):
    """Ops or a PsmcError; anything else (or a hang) fails the test."""
    with hard_limit(HARD_LIMIT_S):
        try:
            return ops_from_source(text, "fuzz.psm")
        except PsmcError as err:
            # the report renders, can be printed, and points into the file when it has a place
            assert str(err).encode("utf-8")
            if err.line is not None:
                assert 1 <= err.line <= text.count("\n") + 1 and err.col >= 1
            return err


# ----------------------------------------------------------------------------- random text
@fuzz_settings(600)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    front_end(data.decode("utf-8", errors="replace"))
    front_end(data.decode("latin-1"))


@fuzz_settings(400)
@given(st.text(max_size=200))
def test_random_text(text):
    front_end(text)


ODD_CHARACTERS = st.one_of(st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Zp"]),
                           st.sampled_from(["#", "\n", " ", "op a {", "}", "state (x: f32);"]))


@fuzz_settings(200)
@given(st.lists(ODD_CHARACTERS, max_size=40).map("".join))
def test_random_text_with_surrogates_and_controls(text):
    # strings handed to the API directly may hold what no UTF-8 file can (lone surrogates)
    front_end(text)


# ----------------------------------------------------------------------------- grammar tokens
# Sample spellings for the terminals defined by a pattern; literal terminals spell themselves.
PATTERN_SAMPLES = {
    "NAME": ["x", "y", "l", "r", "s", "p", "K", "V", "C", "exp", "max", "sum", "zeros", "ones", "eye",
             "split", "concat", "attention", "index", "T", "axis", "heads", "f", "a", "h"],
    "NUMBER": ["0", "1", "2", "0.5", "1e-3", "3.0", "99999999999999999999", "1e400"],
    "INT": ["0", "1", "2", "4"],
    "DTYPE": ["f16", "bf16", "f32", "f64", "i32", "i64", "bool"],
    "ADD_OP": ["+", "-"],
    "MUL_OP": ["*", "/", "@"],
    "CMP_OP": ["<", "<=", ">", ">=", "==", "!="],
    "PROPERTY": ["associative", "commutative"],
    "EXCLUSIVE": ["exclusive"],
    "WS": [" ", "\n"],
    "COMMENT": ["# note\n"],
}


def grammar_vocabulary() -> list[str]:
    words = []
    for terminal in lark_parser().terminals:
        if terminal.pattern.type == "str":
            words.append(terminal.pattern.value)
        else:
            # a new pattern terminal needs samples here, or the fuzzer would never produce it
            assert terminal.name in PATTERN_SAMPLES, f"add samples for terminal {terminal.name}"
            words += PATTERN_SAMPLES[terminal.name]
    return sorted(set(words))


VOCABULARY = grammar_vocabulary()


def test_vocabulary_covers_the_keywords():
    assert {"op", "fn", "state", "lift", "combine", "identity", "readout", "exclusive", "chunk", "param",
            "assume", "let", "return", "if", "then", "else", "None", "inf", "true", "false"} <= set(VOCABULARY)


@fuzz_settings(900)
@given(st.lists(st.sampled_from(VOCABULARY), max_size=60))
def test_random_token_sequences(tokens):
    front_end(" ".join(tokens))


@fuzz_settings(300)
@given(st.lists(st.sampled_from(VOCABULARY), max_size=40))
def test_random_tokens_inside_an_op(tokens):
    # keeps the parser inside a body, where most of the grammar lives
    front_end("op a[K] { state (x: f32[K]); combine (l, r) { return " + " ".join(tokens) + "; } }")


# ----------------------------------------------------------------------------- mutations
def tokens_of(text: str) -> list[tuple[str, str]]:
    return [(tok.type, str(tok)) for tok in lark_parser().lex(text)]


PROGRAM_TOKENS = {name: tokens_of(text) for name, text in PROGRAMS.items()}
NAMES = sorted(PROGRAMS)


@st.composite
def same_kind_mutants(draw):
    """Replace a few names, numbers, dtypes or operators by others of the same kind: the text
    stays grammatical, so the mutant exercises name resolution and shape/dtype inference."""
    tokens = PROGRAM_TOKENS[draw(st.sampled_from(NAMES))]
    spellings = [text for _, text in tokens]
    replaceable = [i for i, (kind, _) in enumerate(tokens) if kind in PATTERN_SAMPLES]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(replaceable))
        kind = tokens[i][0]
        same_kind = sorted({text for k, text in tokens if k == kind} | set(PATTERN_SAMPLES[kind]))
        spellings[i] = draw(st.sampled_from(same_kind))
    return " ".join(spellings)


@st.composite
def token_mutants(draw):
    tokens = [text for _, text in PROGRAM_TOKENS[draw(st.sampled_from(NAMES))]]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert"]))
        if kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "replace":
            tokens[i] = draw(st.sampled_from(VOCABULARY))
        else:
            tokens.insert(i, draw(st.sampled_from(VOCABULARY)))
        if not tokens:
            break
    return " ".join(tokens)


@st.composite
def character_mutants(draw):
    text = PROGRAMS[draw(st.sampled_from(NAMES))]
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chars) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "replace"]))
        if kind == "delete":
            del chars[i]
        elif kind == "duplicate":
            chars.insert(i, chars[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(chars) - 1))
            chars[i], chars[j] = chars[j], chars[i]
        else:
            chars[i] = draw(st.characters(codec="utf-8"))
        if not chars:
            break
    return "".join(chars)


@fuzz_settings(500)
@given(token_mutants())
def test_token_mutations_of_the_programs(text):
    front_end(text)


@fuzz_settings(500)
@given(same_kind_mutants())
def test_same_kind_mutations_of_the_programs(text):
    front_end(text)


@fuzz_settings(300)
@given(character_mutants())
def test_character_mutations_of_the_programs(text):
    front_end(text)


# ----------------------------------------------------------------------------- expressions
LEAVES = ["l.x", "r.x", "l.m", "r.m", "l.b", "r.b", "K", "1", "2", "0.5", "-1", "inf", "true", "false",
          "eye(K)", "zeros(K)", "ones(2, K)", "l.x[0]", "r.m[:, None]", "l.m.T", "index", "l", "W"]
CALLS = sorted(BUILTINS) + ["helper"]
OPERATORS = ["+", "-", "*", "/", "@", "**", "<", "==", "and", "or"]


def expressions():
    def extend(inner):
        binary = st.tuples(inner, st.sampled_from(OPERATORS), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
        call = st.tuples(st.sampled_from(CALLS), st.lists(inner, max_size=3),
                         st.sampled_from(["", ", axis=0", ", axis=-1", ", heads=2", ", causal=true", ", axis=l.x"]))
        call = call.map(lambda t: f"{t[0]}({', '.join(t[1])}{t[2] if t[1] else ''})")
        unary = st.tuples(st.sampled_from(["-", "not "]), inner).map(lambda t: f"{t[0]}{t[1]}")
        select = st.tuples(inner, inner, inner).map(lambda t: f"(if {t[0]} then {t[1]} else {t[2]})")
        index = st.tuples(inner, st.sampled_from(["[0]", "[1:]", "[:, None]", "[K - 1]", "[0, 0]", ".T"]))
        return st.one_of(binary, call, unary, select, index.map("".join))
    return st.recursive(st.sampled_from(LEAVES), extend, max_leaves=8)


EXPRESSION_OP = """
fn helper(a, b) {{ return a * b; }}
op a[K] {{
  param W: f32[K, K];
  state (x: f32[K], m: f32[K, K], b: bool);
  lift (u: f32[K], v: f32[K, K]) {{ return (u, v, true); }}
  combine (l, r) {{
    let e = {expr};
    return (l.x + r.x, l.m @ r.m, l.b and r.b);
  }}
  readout (s, q: f32[K]) {{ return {expr2}; }}
}}
"""


def as_readout(expr: str) -> str:
    """The same expression over the readout's names (the prefix `s` instead of `l` and `r`)."""
    return re.sub(r"\b[lr]\.", "s.", expr)


@fuzz_settings(400)
@given(expressions(), st.sampled_from(["s.x", "q @ s.m", "q", None]))
def test_random_expressions_in_a_valid_op(expr, readout):
    front_end(EXPRESSION_OP.format(expr=expr, expr2=readout or as_readout(expr)))


def test_the_fuzzers_reach_the_semantic_checks():
    # a guard against a fuzzer that only ever produces syntax errors: the base programs are valid
    assert all(not isinstance(front_end(text), PsmcError) for text in PROGRAMS.values())
    assert not isinstance(front_end(EXPRESSION_OP.format(expr="l.x * 2.0", expr2="q @ s.m")), PsmcError)


def test_hard_limit_turns_a_hang_into_a_failure():
    import time
    with pytest.raises(Hang):
        with hard_limit(1):
            time.sleep(3)
