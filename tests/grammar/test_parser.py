"""The grammar is conflict-free, every shipped program parses, and syntax errors say in words
what was expected, at the right line and column."""
from pathlib import Path

import pytest
from lark import Lark

from psmc.errors import PsmcError, PsmcLimitError, PsmcSyntaxError
from psmc.grammar import ast
from psmc.grammar.parser import MAX_SOURCE_CHARS, lark_parser, parse

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = sorted((ROOT / "examples").glob("*.psm")) + sorted((ROOT / "tests/analysis/ops").glob("*.psm"))


def test_grammar_builds_in_lark_strict_mode():
    # strict=True turns every LALR conflict and terminal collision into an exception.
    parser = lark_parser(strict=True)
    assert isinstance(parser, Lark)
    assert parser.options.parser == "lalr"


def test_there_are_programs_to_parse():
    names = {p.stem for p in PROGRAMS}
    assert {"gla", "running_argmax", "transformer_psm", "ema", "tree_rnn"} <= names
    assert len(PROGRAMS) >= 40


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_program_parses(path):
    text = path.read_text(encoding="utf-8")
    module = parse(text, str(path))
    ops = [item for item in module.items if isinstance(item, ast.OpDef)]
    assert ops, "every file defines at least one op"
    for op in ops:
        # every op has a span pointing into its own file
        assert op.span.source.filename == str(path)
        assert text.splitlines()[op.name_span.line - 1][op.name_span.col - 1:].startswith(op.name)


def test_ast_ignores_layout():
    a = parse("op s { state (x: f32); combine (l, r) { return l.x + r.x; } }")
    b = parse("# sum\nop s {\n  state (x: f32);\n  combine (l, r) {\n    return l.x+r.x;  # add\n  }\n}\n")
    assert a == b
    c = parse("op s { state (x: f32); combine (l, r) { return l.x - r.x; } }")
    assert a != c


def test_spans_of_nested_expressions():
    text = "op s {\n  state (x: f32);\n  combine (l, r) { return exp(l.x) * r.x; }\n}"
    op = parse(text).items[0]
    combine = op.members[1]
    result = combine.body.result
    assert isinstance(result, ast.Binary) and result.op == "*"
    assert (result.span.line, result.span.col) == (3, 27)
    call = result.left
    assert isinstance(call, ast.Call) and call.name == "exp"
    assert (call.name_span.line, call.name_span.col, call.name_span.end_col) == (3, 27, 30)
    assert (result.op_span.line, result.op_span.col) == (3, 36)


def test_language_md_precedence():
    # `-x ** 2` is -(x ** 2); `a + b * c` groups the product; `not a < b` negates the comparison.
    op = parse("op s { state (x: f32); combine (l, r) { return -l.x ** 2 + l.x * r.x; } }").items[0]
    result = op.members[1].body.result
    assert result.op == "+"
    assert isinstance(result.left, ast.Unary) and result.left.operand.op == "**"
    assert result.right.op == "*"
    op = parse("op s { state (x: bool); combine (l, r) { return not 1 < 2 or l.x; } }").items[0]
    result = op.members[1].body.result
    assert result.op == "or" and isinstance(result.left, ast.Unary) and result.left.operand.op == "<"


def test_readout_exclusive_and_tuple_targets():
    text = """
    op s[K] {
      state (x: f32[K]);
      combine (l, r) { let (a, b) = split(l.x, 1); return a + r.x; }
      identity = zeros;
      readout exclusive (p, y: f32[K]) { return p.x * y; }
    }"""
    op = parse(text).items[0]
    readout = op.members[-1]
    assert isinstance(readout, ast.ReadoutDef) and readout.exclusive and readout.state == "p"
    let = op.members[1].body.lets[0]
    assert let.targets == ("a", "b")
    assert [s.col for s in let.target_spans] == [29, 32]


def test_empty_file_is_an_empty_module():
    assert parse("").items == ()
    assert parse("# only a comment\n\n").items == ()


# (source, line, col, message fragment). Each message says, in words, what was expected.
SYNTAX_ERRORS = [
    ("op a { state (x: f32); combine (l, r) { return l.x + r.x } }", 1, 58,
     "expected ';' after the return expression, found '}'"),
    ("op a {\n  state (x: f32)\n  combine (l, r) { return l.x; }\n}", 3, 3,
     "expected ';' after the state declaration, found 'combine'"),
    ("op a { state (x: f32); combine (l, r) { let y = l.x return y; } }", 1, 53,
     "expected ';' after the let statement, found 'return'"),
    ("op a { state (x: f32); combine (l, r) { return l.x + ; } }", 1, 54,
     "expected an expression, found ';'"),
    ("op a { state (x: f32); combine (l, r) { return l.x; }", 1, 54,
     "unexpected end of file; expected '}' or an op member"),
    ("op a { state (x: f32); combine (l r) { return l.x; } }", 1, 35,
     "expected ',', found a name 'r'"),
    ("op a { state (x: f32); combine (l, r) { return l.x $ r.x; } }", 1, 52,
     "unexpected character '$'"),
    ("op a { state (x: f33); }", 1, 18, "expected a dtype (f32, i64, bool, ...), found a name 'f33'"),
    ("op a { stat (x: f32); }", 1, 8, "expected '}' or an op member (state, lift, combine"),
    ("op a { state (x: f32); combine (l, r) {\n  if l.x > 0 { return l.x; }\n} }", 2, 3,
     "expected 'return' or 'let', found 'if'"),
    ("op a[D] { param W: f32[D] = zeros }", 1, 35, "expected ';' after the param declaration"),
    ("op a[K { }", 1, 8, "expected ']' or ',', found '{'"),
    ("op a[C] { chunk C }", 1, 19, "expected ';' after the chunk size"),
    ("op a { identity = 1 }", 1, 21, "expected ';' after the identity value"),
    ("op a { assume associativ; }", 1, 15, "expected 'associative' or 'commutative'"),
    ("op { }", 1, 4, "expected a name, found '{'"),
    ("op a { state (x: f32); combine (l, r) { return l.x; } } }", 1, 57, "expected 'fn' or 'op', found '}'"),
    ("op a { state (x: f32); combine (l, r) { return (l.x, ); } }", 1, 54, "expected an expression"),
    ("op a { state (x: f32); combine (l, r) { return l.x[]; } }", 1, 52, "expected an index"),
    ("op a { state (x f32); }", 1, 17, "expected ':', found a name 'f32'"),
    ("op a { state (x: f32[]); }", 1, 22, "expected '(', a name or an integer, found ']'"),
    ("fn f(x) { }", 1, 11, "expected 'return' or 'let', found '}'"),
    ("op a { readout exclusive s { return s; } }", 1, 26, "expected '(', found a name 's'"),
    ("op a { state (x: f32); combine (l, r) { return l.x > r.x > 0; } }", 1, 58,
     "expected ';' after the return expression, found '>'"),
    ("op a {\n\tstate (x: f32);\n\tcombine (l, r) { return l.x\n}\n}\n", 4, 1,
     "expected ';' after the return expression"),
    ("op a { state (x: f32); combine (l, r) { return l.x; } }\n\x01", 2, 1, "unexpected character U+0001"),
    ("op a { state (x: f32); combine (l, r) { return l.x; } }\n€", 2, 1, "unexpected character '€'"),
]


@pytest.mark.parametrize("text,line,col,fragment", SYNTAX_ERRORS)
def test_syntax_error_position_and_message(text, line, col, fragment):
    with pytest.raises(PsmcSyntaxError) as info:
        parse(text, "bad.psm")
    err = info.value
    assert (err.line, err.col) == (line, col), err.message
    assert fragment in err.message
    rendered = str(err)
    assert rendered.startswith(f"bad.psm:{line}:{col}: ")
    source_line = text.split("\n")[line - 1]
    shown = "".join(ch if ch.isprintable() or ch == "\t" else "\ufffd" for ch in source_line).expandtabs(4)
    assert "\n    " + shown + "\n" in rendered
    assert "\n    " + " " * (col - 1) + "^" in rendered


@pytest.mark.parametrize("text,hint", [
    ("op a { state (x: f32); combine (l, r) { if l.x > 0 { return l.x; } } }", "if c then a else b"),
    ("op a { state (x: f32); combine (l, r) { for i in l { return l.x; } } }", "straight-line"),
    ("op a { state (x: f32); combine (l, r) { return l.x > r.x > 0; } }", "comparisons do not chain"),
    ("op a { state (x: f32); combine (l, r) { } }", "`let` statements then one `return`"),
    ("op a[K] { state (x: f32[K]); lift (y: f32[K]) { return reshape(y, (K,)); } }", "`reshape(x, K * K)`"),
    ("op a { state (x: f32); combine (l, r) { return (l.x, ); } }", "a one-element tuple is its element"),
])
def test_syntax_hints_say_what_to_do(text, hint):
    with pytest.raises(PsmcSyntaxError) as info:
        parse(text)
    assert hint in (info.value.hint or "")
    assert "hint: " + info.value.hint in str(info.value)


@pytest.mark.parametrize("text,line,col,what", [
    ("op a {\n  # a comment with a NUL \x00 in it\n}", 2, 26, "a NUL character"),
    ("op a { state (x: f32); }  # \ud800", 1, 29, "an unpaired surrogate U+D800"),
    ("\x00", 1, 1, "a NUL character"),
])
def test_characters_no_text_file_holds_are_rejected_even_in_comments(text, line, col, what):
    # the op's source (comments included) is copied into generated modules, where a NUL is a
    # SyntaxError and a surrogate cannot be written as UTF-8
    with pytest.raises(PsmcSyntaxError) as info:
        parse(text, "bad.psm")
    err = info.value
    assert (err.line, err.col) == (line, col) and what in err.message
    str(err).encode("utf-8")  # the report itself is printable: the character is shown as U+FFFD
    assert "\ufffd" in str(err)


def test_unexpected_end_points_past_the_last_character():
    text = "op a {\n  state (x: f32);\n  combine (l, r) { return l.x\n\n\n"
    with pytest.raises(PsmcSyntaxError) as info:
        parse(text, "eof.psm")
    err = info.value
    assert (err.line, err.col) == (3, 30)  # just past "l.x"
    assert "unexpected end of file" in err.message


def test_oversized_source_is_a_limit_error():
    with pytest.raises(PsmcLimitError) as info:
        parse("#" * (MAX_SOURCE_CHARS + 1))
    assert (info.value.line, info.value.col) == (1, 1)


def test_deep_nesting_is_a_limit_error_or_parses():
    # Lark's LALR parser is iterative, the AST transformer recursive: either way no RecursionError.
    depth = 5000
    text = "op a { state (x: f32); combine (l, r) { return " + "(" * depth + "l.x" + ")" * depth + "; } }"
    try:
        parse(text)
    except PsmcError as err:
        assert isinstance(err, PsmcLimitError)
        assert "nested too deeply" in err.message
