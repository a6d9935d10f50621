"""Text → AST. The grammar is package data (psm.lark); syntax errors are `PsmcSyntaxError`s
with a caret and a sentence saying what was expected, in words."""
from __future__ import annotations

import functools
import re
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import PsmcError, PsmcLimitError, PsmcSyntaxError, Source, Span
from . import ast

MAX_SOURCE_CHARS = 1_000_000


@functools.lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files(__package__).joinpath("psm.lark").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=2)
def lark_parser(strict: bool = False) -> Lark:
    # cache=True keeps the built LALR tables in the temp dir (keyed by the grammar's hash).
    return Lark(grammar_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True, strict=strict, cache=not strict)


def parse(text: str, filename: str = "<string>") -> ast.Module:
    """Parse `.psm` text into an `ast.Module`; raises `PsmcSyntaxError`."""
    source = Source(filename, text)
    if len(text) > MAX_SOURCE_CHARS:
        raise PsmcLimitError(f"the file is {len(text)} characters long; psmc reads at most "
                             f"{MAX_SOURCE_CHARS}", Span(source, 1, 1, 1, 2),
                             hint="split the operators into several files")
    _check_characters(source)
    try:
        tree = lark_parser().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, source) from None
    except RecursionError:
        raise PsmcLimitError("the program is nested too deeply to parse", Span(source, 1, 1, 1, 2),
                             hint="flatten deeply nested expressions with `let`") from None
    try:
        return _ToAst(source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, PsmcError):
            raise err.orig_exc from None
        if isinstance(err.orig_exc, RecursionError):
            raise PsmcLimitError("the program is nested too deeply", Span(source, 1, 1, 1, 2),
                                 hint="flatten deeply nested expressions with `let`") from None
        raise
    except RecursionError:
        raise PsmcLimitError("the program is nested too deeply", Span(source, 1, 1, 1, 2),
                             hint="flatten deeply nested expressions with `let`") from None


# NUL and unpaired surrogates are no text a file can hold (UTF-8 cannot encode a surrogate),
# yet the lexer lets them through inside comments, and the op's source travels on into
# generated modules (docstrings): stop them here, with their position.
_FORBIDDEN_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


def _check_characters(source: Source) -> None:
    found = _FORBIDDEN_CHARACTERS.search(source.text)
    if found is None:
        return
    offset = found.start()
    line = source.text.count("\n", 0, offset) + 1
    col = offset - (source.text.rfind("\n", 0, offset) + 1) + 1
    what = "a NUL character" if found.group() == "\x00" else f"an unpaired surrogate U+{ord(found.group()):04X}"
    raise PsmcSyntaxError(f"the text contains {what}, which is not allowed anywhere, even in a comment",
                          Span(source, line, col, line, col + 1),
                          hint="save the file as plain UTF-8 text; remove the character")


# ----------------------------------------------------------------------------- AST building
def _meta_span(source: Source, meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(source, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + len(tok))


@v_args(meta=True)
class _ToAst(Transformer):
    """Parse tree → AST; one method per grammar rule (alias)."""

    def __init__(self, source: Source):
        super().__init__(visit_tokens=False)
        self.source = source

    def _s(self, meta):
        return _meta_span(self.source, meta)

    def _t(self, tok):
        return _token_span(self.source, tok)

    # module and top level
    def start(self, meta, items):
        return ast.Module(tuple(items), source=self.source)

    def fn_def(self, meta, children):
        name, *params, body = children
        params = tuple(str(p) for p in params if p is not None)
        return ast.FnDef(str(name), params, body, self._s(meta), self._t(name))

    def op_def(self, meta, children):
        name, *rest = children
        dims = ()
        if rest and isinstance(rest[0], tuple):
            dims, rest = rest[0], rest[1:]
        return ast.OpDef(str(name), dims, tuple(rest), self._s(meta), self._t(name))

    def dims(self, meta, names):
        return tuple(ast.DimName(str(n), self._t(n)) for n in names)

    # members
    def chunk_decl(self, meta, c):
        return ast.ChunkDecl(c[0], self._s(meta))

    def param_decl(self, meta, c):
        return ast.ParamDecl(str(c[0]), c[1], c[2], self._s(meta))

    def state_decl(self, meta, fields):
        return ast.StateDecl(tuple(fields), self._s(meta))

    def lift_def(self, meta, c):
        *inputs, body = c
        return ast.LiftDef(tuple(i for i in inputs if i is not None), body, self._s(meta))

    def combine_def(self, meta, c):
        return ast.CombineDef(str(c[0]), str(c[1]), c[2], self._s(meta))

    def identity_def(self, meta, c):
        return ast.IdentityDef(c[0], self._s(meta))

    def readout_def(self, meta, c):
        exclusive = isinstance(c[0], Token) and c[0].type == "EXCLUSIVE"
        if exclusive:
            c = c[1:]
        name, *inputs, body = c
        return ast.ReadoutDef(str(name), exclusive, tuple(inputs), body, self._s(meta))

    def assume_decl(self, meta, props):
        return ast.AssumeDecl(tuple(str(p) for p in props), self._s(meta))

    # types
    def typed(self, meta, c):
        return ast.Typed(str(c[0]), c[1], self._s(meta))

    def type(self, meta, c):
        return ast.TypeExpr(str(c[0]), tuple(c[1:]), self._s(meta))

    def dim_binop(self, meta, c):
        return ast.DimBin(str(c[1]), c[0], c[2], self._s(meta))

    def dim_mul(self, meta, c):
        return ast.DimBin("*", c[0], c[1], self._s(meta))

    def dim_int(self, meta, c):
        return ast.DimInt(int(c[0]), self._s(meta))

    def dim_name(self, meta, c):
        return ast.DimName(str(c[0]), self._s(meta))

    # statements
    def block(self, meta, c):
        *lets, result = c
        return ast.Block(tuple(lets), result, self._s(meta))

    def stmt(self, meta, c):
        target, value = c
        if isinstance(target, Token):
            return ast.Let((str(target),), value, self._s(meta), (self._t(target),))
        names, spans = target
        return ast.Let(names, value, self._s(meta), spans)

    def tuple_target(self, meta, names):
        return tuple(str(n) for n in names), tuple(self._t(n) for n in names)

    # expressions
    def select(self, meta, c):
        return ast.Select(c[0], c[1], c[2], self._s(meta))

    def or_(self, meta, c):
        return ast.Binary("or", c[0], c[1], self._s(meta))

    def and_(self, meta, c):
        return ast.Binary("and", c[0], c[1], self._s(meta))

    def not_(self, meta, c):
        return ast.Unary("not", c[0], self._s(meta))

    def compare(self, meta, c):
        return ast.Binary(str(c[1]), c[0], c[2], self._s(meta), self._t(c[1]))

    def binop(self, meta, c):
        return ast.Binary(str(c[1]), c[0], c[2], self._s(meta), self._t(c[1]))

    def neg(self, meta, c):
        return ast.Unary("-", c[0], self._s(meta))

    def pow(self, meta, c):
        return ast.Binary("**", c[0], c[1], self._s(meta))

    def field(self, meta, c):
        return ast.Field(c[0], str(c[1]), self._s(meta))

    def subscript(self, meta, c):
        return ast.Subscript(c[0], tuple(c[1:]), self._s(meta))

    def newaxis(self, meta, c):
        return ast.NewAxis(self._s(meta))

    def slice(self, meta, c):
        return ast.Slice(c[0], c[1], self._s(meta))

    def number(self, meta, c):
        return ast.Number(str(c[0]), self._s(meta))

    def inf(self, meta, c):
        return ast.Inf(self._s(meta))

    def true(self, meta, c):
        return ast.Bool(True, self._s(meta))

    def false(self, meta, c):
        return ast.Bool(False, self._s(meta))

    def var(self, meta, c):
        return ast.Var(str(c[0]), self._s(meta))

    def call(self, meta, c):
        name, *args = c
        args = [a for a in args if a is not None]
        positional = tuple(a for a in args if not isinstance(a, ast.Kwarg))
        kwargs = tuple(a for a in args if isinstance(a, ast.Kwarg))
        return ast.Call(str(name), positional, kwargs, self._s(meta), self._t(name))

    def kwarg(self, meta, c):
        return ast.Kwarg(str(c[0]), c[1], self._s(meta))

    def tuple(self, meta, items):
        return ast.TupleExpr(tuple(items), self._s(meta))


# ----------------------------------------------------------------------------- syntax errors
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "DTYPE": "a dtype (f32, i64, bool, ...)",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/' or '@'", "CMP_OP": "a comparison",
    "PROPERTY": "'associative' or 'commutative'", "EXCLUSIVE": "'exclusive'", "$END": "the end of the file",
}
# Which expected terminal to name first when several are possible.
_PRIORITY = ["SEMICOLON", "RPAR", "RSQB", "RBRACE", "COMMA", "EQUAL", "COLON", "LBRACE", "LPAR",
             "NAME", "DTYPE", "NUMBER", "INT", "RETURN"]
_STATEMENT_CONTEXT = {
    "return": "after the return expression", "let": "after the let statement",
    "state": "after the state declaration", "param": "after the param declaration",
    "chunk": "after the chunk size", "identity": "after the identity value",
    "assume": "after the assumed properties",
}
_KEYWORDS = set(_STATEMENT_CONTEXT) | {"op", "fn", "lift", "combine", "readout"}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = lark_parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type in ("NAME", "NUMBER", "INT", "DTYPE"):
        return f"{_TERMINAL_WORDS[tok.type].split(' (')[0]} '{tok}'"
    return f"'{tok}'"


def _context_keyword(text: str, line: int, col: int) -> str | None:
    """The last statement keyword before (line, col): names the construct being written."""
    last = None
    try:
        for tok in lark_parser().lex(text[:_offset(text, line, col)]):
            if tok.type != "NAME" and str(tok) in _KEYWORDS:
                last = str(tok)
            elif str(tok) in ("{", "}") and last in ("op", "fn", "lift", "combine", "readout"):
                last = None
    except UnexpectedInput:
        pass
    return last


def _offset(text: str, line: int, col: int) -> int:
    lines = text.split("\n")  # the lexer counts lines at '\n' only
    return sum(len(x) + 1 for x in lines[: line - 1]) + col - 1


# Sets of expected terminals that read better as one phrase than as a list of tokens.
_MEMBER_WORDS = {"STATE", "LIFT", "COMBINE", "IDENTITY", "READOUT", "PARAM", "CHUNK", "ASSUME"}


def _phrase(expected: set[str]) -> str | None:
    """One phrase for a whole family of expected terminals, or None to list them."""
    if _MEMBER_WORDS <= expected:
        return ("expected '}' or an op member (state, lift, combine, identity, readout, param, "
                "chunk or assume)")
    if {"NAME", "NUMBER"} <= expected:
        if "COLON" in expected:
            return "expected an index (an expression, a slice 'a:b' or None)"
        return "expected an expression"
    return None


def _expected_sentence(expected: set[str], keyword: str | None) -> str:
    ordered = sorted(expected, key=lambda t: (_PRIORITY.index(t) if t in _PRIORITY else len(_PRIORITY), t))
    first = ordered[0] if ordered else None
    if first == "SEMICOLON" and keyword in _STATEMENT_CONTEXT:
        return f"expected ';' {_STATEMENT_CONTEXT[keyword]}"
    phrase = _phrase(expected)
    if phrase:
        return phrase
    words = [_describe_terminal(t) for t in ordered[:4]]
    more = ", ..." if len(ordered) > 4 else ""
    if len(words) == 1:
        return f"expected {words[0]}"
    return f"expected {', '.join(words[:-1])} or {words[-1]}{more}"


def _syntax_error(err: UnexpectedInput, source: Source) -> PsmcSyntaxError:
    text = source.text
    line = getattr(err, "line", 1) or 1
    col = getattr(err, "column", 1) or 1
    if isinstance(err, UnexpectedToken) and err.token.type == "$END" or isinstance(err, UnexpectedEOF):
        # Point just past the last non-blank character: that is where something is missing.
        stripped = text.rstrip()
        line = stripped.count("\n") + 1
        col = len(stripped) - (stripped.rfind("\n") + 1) + 1
        span = Span(source, line, col, line, col + 1)
        expected = set(getattr(err, "expected", ()) or ())
        keyword = _context_keyword(text, line, col)
        msg = "unexpected end of file"
        if expected:
            msg += "; " + _expected_sentence(expected, keyword)
        return PsmcSyntaxError(msg, span, hint="an op is `op NAME[DIMS] { ... }` and every statement ends with ';'")
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        span = Span(source, line, col, line, col + 1)
        allowed = set(err.allowed or ())
        keyword = _context_keyword(text, line, col)
        shown = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}" if ch else "end of file"
        msg = f"unexpected character {shown}"
        if allowed:
            msg += "; " + _expected_sentence(allowed, keyword)
        return PsmcSyntaxError(msg, span, hint="names are ASCII letters, digits and '_'; comments start with '#'")
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    span = _token_span(source, tok)
    keyword = _context_keyword(text, line, col)
    msg = f"{_expected_sentence(set(err.expected), keyword)}, found {_describe_token(tok)}"
    trailing_comma = text[:tok.start_pos].rstrip().endswith(",") if tok.start_pos is not None else False
    return PsmcSyntaxError(msg, span, hint=_token_hint(tok, set(err.expected), trailing_comma))


def _token_hint(tok: Token, expected: set[str], trailing_comma: bool = False) -> str | None:
    """Advice for tokens that usually mean the writer reached for another language's syntax."""
    if str(tok) == ")" and trailing_comma and "NAME" in expected:
        return ("a trailing comma before ')' is not allowed: a one-element tuple is its element, and a shape "
                "of one axis is its size, e.g. `reshape(x, K * K)`")
    # `if` is a keyword token (IF), the others lex as names: compare the text, not the type.
    if str(tok) in ("if", "for", "while", "def", "class", "lambda") and "RETURN" in expected:
        return "bodies are straight-line: `let` statements then one `return`; use `if c then a else b`"
    if tok.type == "CMP_OP" and "NAME" not in expected:  # a comparison after a complete one
        return "comparisons do not chain: write `(a < b) and (b < c)`"
    if expected == {"RETURN", "LET"}:
        return "a body is `let` statements then one `return`, e.g. `{ let m = max(l.m, r.m); return m; }`"
    return None
