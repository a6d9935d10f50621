"""The mutation fuzzer for the whole front end (issue 11 item 3).

A mutant is a valid program (a shipped example or a generated one) with 1-3 random edits:
tokens deleted, duplicated, swapped, replaced by another token of the grammar, or by another
of the same kind (a name, number, dtype or operator: the text stays grammatical and reaches
name resolution, shape and dtype inference and the algebra), or characters edited. Each
mutant goes through everything `psmc check` and `psmc compile` do (parse, lower, analyse,
plan, print the report, generate the module), and must give either a valid program or a
`file:line:col` error with a caret: never an internal error, never an unlocated error.

tests/grammar/test_fuzz.py fuzzes the parser and lowering alone with hypothesis (random bytes,
token soup, expressions); this one is seeded and goes on through the analysis and codegen.
"""
from __future__ import annotations

import contextlib
import io
import random
import re
from functools import lru_cache
from pathlib import Path

from psmc.cli import main as psmc_main
from psmc.grammar.parser import lark_parser

ROOT = Path(__file__).resolve().parents[2]

SAME_KIND = {
    "NAME": ["x", "l", "r", "s", "p", "K", "V", "C", "D", "exp", "max", "sum", "zeros", "ones", "eye", "index",
             "tanh", "outer", "attention", "split", "concat", "where", "softmax", "axis", "causal", "heads", "self",
             "state", "a", "h", "W", "f", "n", "m"],
    "NUMBER": ["0", "1", "2", "0.5", "1e-3", "-1", "3.0", "1e400", "99999999999999999999"],
    "INT": ["0", "1", "2", "4"],
    "DTYPE": ["f16", "bf16", "f32", "f64", "i32", "i64", "bool"],
    "ADD_OP": ["+", "-"],
    "MUL_OP": ["*", "/", "@"],
    "CMP_OP": ["<", "<=", ">", ">=", "==", "!="],
    "PROPERTY": ["associative", "commutative"],
    "EXCLUSIVE": ["exclusive"],
}


@lru_cache(maxsize=1)
def vocabulary() -> tuple:
    words = set()
    for terminal in lark_parser().terminals:
        if terminal.pattern.type == "str":
            words.add(terminal.pattern.value)
        else:
            words.update(SAME_KIND.get(terminal.name, []))
    return tuple(sorted(words))


def example_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.psm"))]


def tokens_of(text: str) -> list[tuple[str, str]]:
    return [(tok.type, str(tok)) for tok in lark_parser().lex(text)]


def mutate(text: str, rng: random.Random) -> str:
    """1-3 edits of one kind family: token, same-kind token, or character edits."""
    family = rng.random()
    if family < 0.15:
        chars = _edit(list(text), rng, ["delete", "duplicate", "swap", "replace"],
                      lambda: rng.choice("(){}[];:,.=+-*/@<>!#_ aKx019\n\t\u00e9"))
        return "".join(chars)
    tokens = tokens_of(text)
    spellings = [t for _, t in tokens]
    if family < 0.6:  # same-kind: stays grammatical
        replaceable = [i for i, (kind, _) in enumerate(tokens) if kind in SAME_KIND]
        for _ in range(rng.randint(1, 2)):
            i = rng.choice(replaceable)
            kind = tokens[i][0]
            pool = sorted({t for k, t in tokens if k == kind} | set(SAME_KIND[kind]))
            spellings[i] = rng.choice(pool)
        return _join(spellings)
    _edit(spellings, rng, ["delete", "duplicate", "swap", "replace", "insert"], lambda: rng.choice(vocabulary()))
    return _join(spellings)


def _edit(items: list, rng: random.Random, kinds: list[str], fresh) -> list:
    """1-3 edits of `items` in place (characters or token spellings), each of a kind drawn from
    `kinds`: delete, duplicate, swap with another, replace by fresh(), insert fresh() before."""
    for _ in range(rng.randint(1, 3)):
        if not items:
            break
        i = rng.randrange(len(items))
        kind = rng.choice(kinds)
        if kind == "delete":
            del items[i]
        elif kind == "duplicate":
            items.insert(i, items[i])
        elif kind == "swap":
            j = rng.randrange(len(items))
            items[i], items[j] = items[j], items[i]
        elif kind == "replace":
            items[i] = fresh()
        else:
            items.insert(i, fresh())
    return items


def _join(spellings: list[str]) -> str:
    """Tokens back into text, a statement per line (errors then have distinct lines)."""
    return re.sub(r" ([;{}]) ", r" \1\n", " ".join(spellings))


LOCATED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): ")


class MutantFailure(Exception):
    def __init__(self, kind: str, message: str, text: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.text = kind, message, text


def check_mutant(text: str, path: Path) -> bool:
    """True for a valid program, False for a located error; raises MutantFailure otherwise."""
    path.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = psmc_main(["check", str(path)])
    report = err.getvalue()
    if rc == 2 or "internal error" in report:
        raise MutantFailure("internal-error", report.strip().splitlines()[0] if report.strip() else "", text)
    if rc == 1:
        m = LOCATED.match(report)
        if m is None or m["file"] != str(path):
            raise MutantFailure("unlocated-error", report.strip().splitlines()[0] if report.strip() else "", text)
        line, col = int(m["line"]), int(m["col"])
        lines = text.split("\n")
        if not (1 <= line <= len(lines) and 1 <= col <= len(lines[line - 1]) + 1) or "^" not in report:
            raise MutantFailure("misplaced-error", report.strip().splitlines()[0], text)
        return False
    if rc != 0:
        raise MutantFailure("exit-code", f"psmc check exited {rc}", text)
    from psmc.compiler import compile_source
    from psmc.errors import PsmcError
    try:
        compile_source(text, str(path))
    except PsmcError as e:  # check accepted it: compile must too
        raise MutantFailure("compile-rejects-checked", str(e).splitlines()[0], text) from None
    except Exception as e:
        raise MutantFailure("compile-internal", f"{type(e).__name__}: {e}".splitlines()[0], text) from None
    return True


def mutant_class(err: MutantFailure) -> str:
    text = re.sub(r"'[^']*'", "'N'", err.message)
    text = re.sub(r"\S+\.psm:\d+:\d+", "FILE:L:C", text)
    text = re.sub(r"\d+", "#", text)
    return f"{err.kind}: {text[:160]}"
